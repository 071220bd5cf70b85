"""Tile windows on a ragged grid against a grid of whole tiles of about the same size, next to 1-D
bands and the kernel's full mode on the same shapes, each against cuDNN dense SDPA.

    PYTHONPATH=src python3 benchmarks/tile_ragged.py OUT.json      # CUDA GPU, about 60 s

bf16, batch 1, 24 heads of 128, tiles of 2 x 8 x 8, ``impl="triton"``, every head the same mode;
shapes: 33 x 45 x 80 + 256 text (HunyuanVideo 720p x 129 frames: ragged along frames and rows),
32 x 48 x 80 + 256 text (whole tiles), 32 x 48 x 80 without text. "of_ideal" is the speed-up over
cuDNN times the mode's density (1.0 = the full 1/density). Times: ``triton.testing.do_bench``
medians.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditfastattn import ops

HEADS, DIM = 24, 128
SHAPES = (((33, 45, 80), 256), ((32, 48, 80), 256), ((32, 48, 80), 0))
WINDOWS = ((4, 2, 3), (1, 1, 1), (0, 0, 0), (16, 5, 9))
BANDS = (20, 60)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="JSON results path")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for grid, text in SHAPES:
        image = grid[0] * grid[1] * grid[2]
        seq = image + text
        q, k, v = (torch.randn(1, seq, HEADS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense = bench(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)))
        where = dict(text_start=image if text else 0, text_len=text, impl="triton")
        variants = [("tile", w, ops.tile_mode(*w), dict(grid=grid), ops.TileGrid(grid, (2, 8, 8))) for w in WINDOWS]
        variants += [("band", w, w, {}, None) for w in BANDS] + [("full-triton", None, ops.MODE_FULL, {}, None)]
        for kind, window, mode, extra, tiles in variants:
            modes = torch.full((HEADS,), mode, dtype=torch.int32, device="cuda")
            share = ops.density(mode, image, text, tiles)
            ms = bench(lambda: ops.headwise_attention(q, k, v, modes, **where, **extra))
            rows.append(dict(grid=grid, text=text, kind=kind, window=window, density=share, ms=ms, dense_ms=dense,
                             of_ideal=dense / ms * share))
            print(rows[-1], flush=True)
    with open(args.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
