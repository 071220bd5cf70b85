"""Speed of pool heads (``pool:<p>``) against dense cuDNN / flash SDPA and arrows of the same density.

Pool heads run on PyTorch's flash attention (two calls merged by log-sum-exp: the global keys with
the image tokens outside whole patches; the patch means, raised by log(p * p)), beside the fused
kernel's launch for the other heads. Per shape, on fresh random inputs: dense cuDNN and flash SDPA,
the op with every head full, every head ``pool:2`` / ``pool:4``, the arrow whose density is nearest
each, and a mixed plan (half the heads arrow 1/8, half pool:2, interleaved). Correctness first: each
plan's output against the float32 reference op, every element, beside the same-precision yardstick
(flash SDPA in the inputs' dtype against float32 SDPA, dense, on 4 heads). Times: ``triton.testing.do_bench``
medians after warm-up. Speed-up is over cuDNN; "of ideal" is speed-up x density (1.0: the plan runs
exactly as much faster as it computes fewer pairs).

    PYTHONPATH=src python3 benchmarks/pool_speed.py OUT.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditfastattn import ops

SHAPES = {  # the image as rows x cols of patches; text before (FLUX) or after (SD3) it
    "FLUX-1K": {"batch": 1, "heads": 24, "text": 512, "grid": (1, 64, 64), "dim": 128, "text_first": True},
    "FLUX-2K": {"batch": 1, "heads": 24, "text": 512, "grid": (1, 128, 128), "dim": 128, "text_first": True},
    "SD3-1K": {"batch": 2, "heads": 24, "text": 333, "grid": (1, 64, 64), "dim": 64, "text_first": False},
}


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def nearest_arrow(target: float, image: int, text: int) -> int:
    """The arrow half-width whose density is nearest ``target``."""
    widths = range(ops.window_blocks(1.0, image) + 1)
    return min(widths, key=lambda w: abs(ops.density(w, image, text) - target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="JSON results")
    args = parser.parse_args()
    results = {"environment": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                               "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                               "triton": triton.__version__},
               "rows": []}
    for name, shape in SHAPES.items():
        batch, heads, text, grid, dim = shape["batch"], shape["heads"], shape["text"], shape["grid"], shape["dim"]
        image = math.prod(grid)
        seq = text + image
        start = text if shape["text_first"] else 0
        layout = ops.TokenLayout(seq, start, image, grid)
        tiles = ops.TileGrid(grid)
        gen = torch.Generator(device="cuda").manual_seed(0)
        # (B, H, S, D) storage, as diffusers' attention holds it; the op reads the (B, S, H, D) view
        q, k, v = (torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
        qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = bench(lambda: F.scaled_dot_product_attention(q, k, v))
            fast = F.scaled_dot_product_attention(q[:, :4], k[:, :4], v[:, :4]).float()
        dense32 = F.scaled_dot_product_attention(q[:, :4].float(), k[:, :4].float(), v[:, :4].float())  # S x S scores
        yardstick = float((fast - dense32).norm() / dense32.norm())
        del dense32, fast
        pooled = {p: ops.density(ops.pool_mode(p), image, text, tiles) for p in (2, 4)}
        plans = {"full": [ops.MODE_FULL] * heads}
        for p, share in pooled.items():
            plans[f"pool:{p}"] = [ops.pool_mode(p)] * heads
            plans[f"arrow at pool:{p}'s density"] = [nearest_arrow(share, image, text)] * heads
        band = ops.window_blocks(1 / 8, image)
        plans["mixed: arrow 1/8 and pool:2"] = [band if h % 2 else ops.pool_mode(2) for h in range(heads)]
        print(f"{name}: cuDNN {cudnn:.3f} ms, flash {flash:.3f} ms, yardstick error {yardstick:.2e}", flush=True)
        for plan, values in plans.items():
            modes = ops.mode_tensor(values, "cuda")
            out = torch.empty_like(qs)

            def run():
                ops.headwise_attention(qs, ks, vs, modes, segments=layout, out=out)

            run()
            reference = ops.headwise_attention(qs.float(), ks.float(), vs.float(), modes, segments=layout,
                                               impl="reference")
            error = float((out.float() - reference).norm() / reference.norm())
            density = sum(ops.density(m, image, text, tiles) for m in values) / heads
            ms = bench(run)
            row = {"shape": name, "plan": plan, "density": density, "ms": ms, "cudnn_ms": cudnn, "flash_ms": flash,
                   "speedup_vs_cudnn": cudnn / ms, "of_ideal": cudnn / ms * density, "rel_error": error,
                   "yardstick_error": yardstick, "within_twice_yardstick": error <= 2 * yardstick}
            results["rows"].append(row)
            print(f"  {plan:30} density {density:.3f}  {ms:7.3f} ms  x{cudnn / ms:5.2f} vs cuDNN  "
                  f"of ideal {row['of_ideal']:.2f}  error {error:.2e}{'' if row['within_twice_yardstick'] else ' FAIL'}",
                  flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
