"""How much of each kernel row's gap to the ideal speed-up is tile padding, and how fast each computed tile ran.

The fused kernels compute 128 x 128 (query x key) tiles: a key range whose length is not a multiple
of 128 (SD3's 333 text tokens) still costs whole tiles, so a plan's tile density (tiles computed
over a dense head's tiles) can exceed its pair density (the FLOP share the ideal 1/density counts).
From a ``kernel.py`` result, with no GPU: per row, the two densities, the padding cap (pair over
tile density: the share of ideal reachable at cuDNN's dense rate per tile) and the rate per
computed tile (the measured share of ideal times tile over pair density; 100% = as fast per tile
as cuDNN dense, the issue's title).

    PYTHONPATH=src python3 benchmarks/tile_share.py benchmarks/results/kernel.json [OUT.json]
"""

from __future__ import annotations

import argparse
import json
import math

from kernel import SHAPES, plan_density, plans

from ditfastattn.ops import MODE_FULL, MODE_SKIP

# Query rows and keys per tile of the Gluon kernel at both head dims; the Triton kernel's 64-key
# tiles pad these shapes' key ranges to the same lengths (333 text keys to 384).
TILE = 128
KERNEL_ROWS = {"Gluon": "ours, Gluon: {}", "Triton": "ours: {}"}


def head_tiles(mode: int, image: int, text: int) -> int:
    """Tiles a head computes: full rows for full heads and text queries; band blocks plus all text
    keys for image queries of arrow heads (as the kernels' work items)."""
    text_tiles, image_tiles = math.ceil(text / TILE), math.ceil(image / TILE)
    if mode == MODE_SKIP:
        return 0
    if mode == MODE_FULL:
        return (text_tiles + image_tiles) ** 2
    band = sum(min(b + mode, image_tiles - 1) - max(b - mode, 0) + 1 for b in range(image_tiles))
    return text_tiles * (text_tiles + image_tiles) + band + image_tiles * text_tiles


def tile_density(modes, image: int, text: int) -> float:
    dense = (math.ceil(text / TILE) + math.ceil(image / TILE)) ** 2
    return sum(head_tiles(m, image, text) for m in modes) / (dense * len(modes))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="kernel.py JSON")
    parser.add_argument("out", nargs="?", help="JSON path for the derived table")
    args = parser.parse_args()
    with open(args.results) as f:
        results = json.load(f)["results"]
    table = []
    for name, measured in results.items():
        shape = SHAPES[name]
        rows = {row["row"]: row for row in measured["rows"]}
        for plan, modes in plans(shape).items():
            pairs = plan_density(modes, shape["image"], shape["text"])
            tiles = tile_density(modes, shape["image"], shape["text"])
            entry = {"shape": name, "plan": plan, "pair_density": pairs, "tile_density": tiles,
                     "padding_cap": pairs / tiles}
            for kernel, label in KERNEL_ROWS.items():
                row = rows.get(label.format(plan))
                if row is None:
                    continue
                for column, key in (("", "share_of_ideal"), (" graph", "graph_share_of_ideal")):
                    if row.get(key) is not None:
                        entry[f"{kernel}{column} per tile"] = row[key] * tiles / pairs
            table.append(entry)
            cells = " ".join(f"{k} {v * 100:5.1f}%" for k, v in entry.items() if k.endswith("per tile"))
            print(f"{name:8s} {plan:42s} pairs {pairs:.3f} tiles {tiles:.3f} cap {entry['padding_cap'] * 100:5.1f}% "
                  f"{cells}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"source": args.results, "tile": TILE, "rows": table}, f, indent=1)


if __name__ == "__main__":
    main()
