"""Fixed cost per work item of the Gluon kernel, what a launch's last partial round costs, and the
item order's effect on the L2 cache at large batch.

1. Full-mode attention, head dim 128, 24 heads, batch 1, no text, sequences of 16384 ... 2048 (items
   of 128 ... 16 key tiles) on 128 programs, which every item count divides (whole rounds), beside
   cuDNN SDPA. A least-squares fit of time = launch + rounds x (tiles per item x tile + item) gives
   one SM's cost of a key tile and the fixed cost of an item.
2. FLUX-1K full (864 items of 36 key tiles) on 96, 108, 120 and 132 programs: 9, 8, 7.2 and 6.5
   rounds. Were the last partial round free, time would scale with 864 / programs; were it a whole
   round, with ceil(864 / programs).
3. FLUX-2K's total work cut into batches of shorter sequences (batch 4, 16, 64 at 8192, 4096, 2048)
   on 128 programs: how many (batch, head) key/value sets the items running at once read depends
   on the order of items within a head (batch-fastest read up to the whole batch's).

Times are ``triton.testing.do_bench`` medians replayed from a CUDA graph, three interleaved rounds.

    PYTHONPATH=src python3 benchmarks/item_cost.py OUT.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics

import numpy as np
import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditfastattn.ops import MODE_FULL

ROUNDS = 3
DIM = 128
SEQS = (16384, 8192, 4096, 2048)  # 128, 64, 32, 16 key tiles per item
HEADS = 24


def graph_ms(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def inputs(batch, heads, seq, seed=0):
    torch.manual_seed(seed)
    return [torch.randn(batch, seq, heads, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3)]


def launches(batch, heads, seq, text, programs_list):
    """cuDNN and the Gluon kernel on each number of programs (None: one per SM), on one shape."""
    from ditfastattn.ops import _gluon

    q, k, v = inputs(batch, heads, seq + text)
    out = torch.empty_like(q)
    modes = torch.full((heads,), MODE_FULL, dtype=torch.int32, device="cuda")
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qh, kh, vh)

    fns = {"cudnn": cudnn}
    for programs in programs_list:
        fns[f"gluon {programs or 'per SM'}"] = (
            lambda programs=programs: _gluon.attention(q, k, v, modes, text, seq, out, DIM ** -0.5, False,
                                                       programs=programs))
    for fn in fns.values():
        fn()
    return fns


def timed(fns):
    times = {name: [] for name in fns}
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            times[name].append(graph_ms(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def fit(rows):
    """Least squares of time = launch + rounds x (tiles x tile + item): (launch, tile, item) in us."""
    design = np.array([[1.0, r["rounds"] * r["tiles_per_item"], r["rounds"]] for r in rows])
    times = np.array([r["ms"]["gluon 128"] * 1e3 for r in rows])
    return [float(x) for x in np.linalg.lstsq(design, times, rcond=None)[0]]


def length_rows(shapes):
    rows = []
    for batch, seq in shapes:
        tiles = seq // 128
        ms = timed(launches(batch, HEADS, seq, 0, [128, None]))
        items = batch * HEADS * tiles
        row = {"seq": seq, "batch": batch, "heads": HEADS, "items": items, "tiles_per_item": tiles,
               "rounds": items / 128, "ms": ms, "cudnn_over_gluon_128": ms["cudnn"] / ms["gluon 128"],
               "cudnn_over_gluon_per_sm": ms["cudnn"] / ms["gluon per SM"]}
        rows.append(row)
        print(f"batch {batch:3d} x {seq:5d} ({tiles:3d} tiles/item): cuDNN {ms['cudnn']:.3f} ms, Gluon on 128 "
              f"programs {ms['gluon 128']:.3f} ms ({row['cudnn_over_gluon_128']:.1%} of cuDNN), one per SM "
              f"{ms['gluon per SM']:.3f} ms ({row['cudnn_over_gluon_per_sm']:.1%})", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON results path")
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(), "sms": sms, "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
    }
    rows = length_rows([(1, seq) for seq in SEQS])
    launch_us, tile_us, item_us = fit(rows)
    summary["item_length"] = {"rows": rows, "fit_launch_us": launch_us, "fit_us_per_tile": tile_us,
                              "fit_us_per_item": item_us, "fit_item_in_tiles": item_us / tile_us}
    print(f"fit: {launch_us:.1f} us a launch + {tile_us:.3f} us per key tile + {item_us:.3f} us per item "
          f"({item_us / tile_us:.2f} tiles)")

    programs_list = [96, 108, 120, 132]
    image, text = 4096, 512
    ms = timed(launches(1, HEADS, image, text, programs_list))
    items = HEADS * (image + text) // 128
    rounds = {}
    for programs in programs_list:
        time = ms[f"gluon {programs}"]
        rounds[programs] = {"ms": time, "rounds": items / programs, "whole_rounds": math.ceil(items / programs),
                            "of_cudnn": ms["cudnn"] / time}
        print(f"FLUX-1K full on {programs} programs ({items / programs:.2f} rounds): {time:.3f} ms, "
              f"{ms['cudnn'] / time:.1%} of cuDNN; x 8-round time {time / ms['gluon 108']:.3f} "
              f"(free tail {items / programs / 8:.3f}, whole round {math.ceil(items / programs) / 8:.3f})")
    summary["flux_1k_full_rounds"] = {"cudnn_ms": ms["cudnn"], "programs": rounds}
    summary["batch_order"] = length_rows([((SEQS[0] // seq) ** 2, seq) for seq in SEQS])
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
