"""A toy model of the L2 under the Gluon kernel's tiled launch, from which its order of query tiles came.

132 persistent programs take query tiles in a given order; each walks its window's box of key tiles
(a key and a value tile, 64 KB in bf16 at head dim 128), frame by frame, one tile per unit of time
(with noise), and pays 2 units between items. Every read goes through one LRU cache. Data that
every SM reads gets at most half of a two-partition L2 (each partition holds what its side of the
chip reads): 30 MiB on the H200. An LRU of 25 MB fits what Nsight Compute measured there in raster
order, 63% and 75% hits at HunyuanVideo's (16, 3, 2) and (12, 2, 2) windows in 1 x 8 x 16 tiles
(KERNEL_NOTES.md): the model gives 61% and 76% (71% and 86% with 30 MiB). The order of
``ditfastattn.ops._item_order`` gives 89% and 85% at 25 MB.

    PYTHONPATH=src python3 docs/history/l2_model.py [--mb 25] [--heads 2]

Not a benchmark: it ranks orders, the GPU decides (benchmarks/results/gluon_ab_tiles_order*.json).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
from collections import OrderedDict

from ditfastattn.ops._item_order import head_order

KV_TILE_BYTES = 2 * 128 * 128 * 2
CASES = [((33, 6, 5), (16, 3, 2)), ((33, 6, 5), (12, 2, 2)), ((33, 6, 5), (10, 2, 1)),
         ((21, 6, 5), (16, 2, 2)), ((21, 6, 5), (8, 4, 1)), ((21, 6, 5), (5, 3, 1))]


def box(tile, window, counts):
    return [(max(a - w, 0), min(a + w + 1, n)) for a, w, n in zip(tile, window, counts)]


def walk(head, ranges):
    for frame, row, col in itertools.product(*(range(lo, hi) for lo, hi in ranges)):
        yield head, frame, row, col


def hit_rate(counts, window, order, heads, mb, programs=132, noise=0.3, seed=0):
    tiles = list(itertools.product(*(range(n) for n in counts)))
    items = [(h, box(tiles[i], window, counts)) for h in range(heads) for i in order]
    rng = random.Random(seed)
    capacity = int(mb * 2**20 / KV_TILE_BYTES)
    cache, hits, reads = OrderedDict(), 0, 0
    walks = {p: walk(*items[p]) for p in range(programs)}
    queue = [(0.0, p) for p in range(programs)]
    taken = programs
    while queue:
        time, p = heapq.heappop(queue)
        key = next(walks[p], None)
        if key is None:
            if taken < len(items):
                walks[p] = walk(*items[taken])
                taken += 1
                heapq.heappush(queue, (time + 2.0, p))
            continue
        reads += 1
        if key in cache:
            hits += 1
            cache.move_to_end(key)
        else:
            cache[key] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
        heapq.heappush(queue, (time + 1.0 + rng.uniform(-noise, noise), p))
    return hits / reads


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=25.0, help="the L2 that keys and values read by every SM get")
    parser.add_argument("--heads", type=int, default=2)
    args = parser.parse_args()
    for counts, window in CASES:
        raster = list(range(counts[0] * counts[1] * counts[2]))
        ordered = head_order(window, counts, KV_TILE_BYTES, int(args.mb * 2**20)).tolist()
        print(f"{counts} {window}: raster {hit_rate(counts, window, raster, args.heads, args.mb):.3f}, "
              f"ordered {hit_rate(counts, window, ordered, args.heads, args.mb):.3f}", flush=True)


if __name__ == "__main__":
    main()
