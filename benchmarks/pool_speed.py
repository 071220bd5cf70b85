"""Correctness and speed of pool heads (``pool:<p>``) against dense cuDNN / flash SDPA and arrows of the
same density.

The op runs pool heads whose factor divides the grid's rows and cols inside the fused kernel (the
Gluon one on Hopper, ``impl="triton"`` the Triton one), their image keys and values read from a
buffer of patch means; the others on PyTorch's SDPA beside the kernel's launch.

First a correctness check of the fused paths through the public op (``--cases`` random cases, each
under one of ``--impls`` in turn:
grids of 1-3 frames whose rows and cols ``p`` divides or not, text before and / or after the
image, batch 1-3, head dims 64 / 128, bf16 / fp16, (B, S, H, D), (B, H, S, D) and fused-QKV
layouts, pool heads of factors 2-4 mixed with full, skip and arrow heads, with and without the
log-sum-exp, global rows or not): every computed element against the float32 reference op, the
error at most twice the same-precision yardstick's (``ops._dense``: probabilities, patch means and
output rounded to the inputs' dtype), skip heads untouched, log-sum-exps within the same slack as
the CPU tests'.

Then per shape, on fresh random inputs: dense cuDNN and flash SDPA, the op with every head full,
every head ``pool:2`` / ``pool:4`` (``impl="auto"``, and ``impl="triton"``), the arrow whose
density is nearest each (under both impls), and a mixed plan (half the heads arrow 1/8, half pool:2, interleaved).
Each plan's output against the float32 reference op, every element, beside the same-precision
yardstick (flash SDPA in the inputs' dtype against float32 SDPA, dense, on 4 heads). Times:
``triton.testing.do_bench`` medians after warm-up. Speed-up is over cuDNN; "of ideal" is speed-up x
density (1.0: the plan runs exactly as much faster as it computes fewer pairs).

    PYTHONPATH=src python3 benchmarks/pool_speed.py OUT.json [--cases 120] [--impls auto triton]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditfastattn import ops
from ditfastattn.ops._dense import dense_attention

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


def random_case(rng: random.Random) -> dict:
    factors = rng.sample([2, 3, 4], rng.randint(1, 3))
    whole = rng.random() < 0.7  # rows and cols every factor divides: all pool heads fused
    unit = math.lcm(*factors) if whole else 1
    grid = (rng.choice([1, 1, 2, 3]), unit * rng.randint(max(1, 4 // unit), 48 // unit),
            unit * rng.randint(max(1, 4 // unit), 48 // unit))
    heads = rng.randint(1, 8)
    image = math.prod(grid)
    modes = [rng.choice([ops.pool_mode(rng.choice(factors)), ops.pool_mode(rng.choice(factors)), ops.MODE_FULL,
                         ops.MODE_SKIP, rng.randint(0, -(-image // ops.IMAGE_BLOCK))]) for _ in range(heads)]
    return_lse = rng.random() < 0.5
    return {"grid": grid, "before": rng.choice([0, 77, 333, 512]), "after": rng.choice([0, 0, 154]),
            "batch": rng.choice([1, 1, 2, 3]), "dim": rng.choice([64, 128]), "dtype": rng.choice(["bf16", "fp16"]),
            "layout": rng.choice(["bshd", "bhsd", "fused"]), "modes": modes, "return_lse": return_lse,
            "global_rows": return_lse or rng.random() < 0.6, "scale_in": rng.choice([0.5, 1.0, 2.0])}


def inputs(case, seq, gen):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[case["dtype"]]
    batch, heads, dim = case["batch"], len(case["modes"]), case["dim"]
    if case["layout"] == "fused":
        qkv = (torch.randn(batch, seq, 3, heads, dim, device="cuda", generator=gen) * case["scale_in"]).to(dtype)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    shape = (batch, heads, seq, dim) if case["layout"] == "bhsd" else (batch, seq, heads, dim)
    made = [(torch.randn(shape, device="cuda", generator=gen) * case["scale_in"]).to(dtype) for _ in range(3)]
    return tuple(t.transpose(1, 2) for t in made) if case["layout"] == "bhsd" else tuple(made)


def check_case(case, gen, impl: str) -> dict:
    """The op under ``impl`` against the float32 reference, beside the same-precision yardstick."""
    image = math.prod(case["grid"])
    seq = case["before"] + image + case["after"]
    layout = ops.TokenLayout(seq, case["before"], image, case["grid"])
    q, k, v = inputs(case, seq, gen)
    modes = ops.mode_tensor(case["modes"], "cuda")
    out = torch.full_like(q, float("nan"))
    got = ops.headwise_attention(q, k, v, modes, segments=layout, out=out, return_lse=case["return_lse"],
                                 global_rows=case["global_rows"], impl=impl)
    got, lse = got if case["return_lse"] else (got, None)
    ref, ref_lse = ops.headwise_attention(q.float(), k.float(), v.float(), modes, segments=layout, impl="reference",
                                          return_lse=True, out=torch.zeros(q.shape, device="cuda"))
    kept = torch.tensor([m != ops.MODE_SKIP for m in case["modes"]], device="cuda")
    result = {"skip_untouched": bool(torch.isnan(got[:, :, ~kept]).all())}
    rows = torch.ones(seq, dtype=torch.bool, device="cuda")
    if not case["global_rows"]:  # global rows of pool and arrow heads stay unwritten: full heads' are checked
        rows[: layout.image_start] = rows[layout.image_end :] = False
    if bool(kept.any()):
        sub = got[:, rows][:, :, kept].float()
        reference = ref[:, rows][:, :, kept]
        base = dense_attention(q, k, v, case["modes"], layout, compute=torch.float32, rounded=q.dtype)[0][:, rows]
        norm = reference.norm()
        err = float((sub - reference).norm() / norm)
        base_err = float((base - reference).norm() / norm)
        result.update(finite=bool(torch.isfinite(sub).all()), err=err, base_err=base_err,
                      ratio=err / base_err if base_err > 0 else float("inf"))
        if lse is not None:
            base_lse = dense_attention(q, k, v, case["modes"], layout, compute=torch.float32, rounded=q.dtype)[1]
            slack = 2.0 * float((base_lse - ref_lse[:, kept]).abs().max())
            result["lse_err"] = float((lse[:, kept] - ref_lse[:, kept]).abs().max())
            result["lse_ok"] = result["lse_err"] <= 2e-4 + slack + 1e-5 * float(ref_lse[:, kept].abs().max())
            result["lse_skip_ok"] = bool(torch.isneginf(lse[:, ~kept]).all())
    else:
        result.update(finite=True, err=0.0, base_err=0.0, ratio=0.0)
    result["ok"] = (result["skip_untouched"] and result["finite"] and result["ratio"] <= 2.0
                    and result.get("lse_ok", True) and result.get("lse_skip_ok", True))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="JSON results")
    parser.add_argument("--cases", type=int, default=120, help="random correctness cases before the timings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--impls", nargs="+", default=["auto", "triton"],
                        help="the op's impls the cases rotate through")
    args = parser.parse_args()
    results = {"environment": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                               "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                               "triton": triton.__version__,
                               # the device's copy of the tree has no .git: the caller may name the commit
                               "commit": os.environ.get("BENCH_COMMIT")},
               "rows": [], "cases": []}
    rng = random.Random(args.seed)
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    for index in range(args.cases):
        case = random_case(rng)
        impl = args.impls[index % len(args.impls)]
        result = {"case": case, "impl": impl, **check_case(case, gen, impl)}
        results["cases"].append(result)
        if not result["ok"]:
            print(f"case {index} FAILED: {result}", flush=True)
    passed = sum(r["ok"] for r in results["cases"])
    worst = max((r["ratio"] for r in results["cases"]), default=0.0)
    results["check"] = {"cases": args.cases, "passed": passed, "worst_ratio": worst}
    print(f"check: {passed}/{args.cases} cases pass, worst error ratio {worst:.2f} (at most 2)", flush=True)
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
        for p in pooled:  # the Triton kernel's pool heads beside its own arrows of the same density
            plans[f"pool:{p}, impl='triton'"] = plans[f"pool:{p}"]
            plans[f"arrow at pool:{p}'s density, impl='triton'"] = plans[f"arrow at pool:{p}'s density"]
        plans["mixed, impl='triton'"] = plans["mixed: arrow 1/8 and pool:2"]
        for plan, values in plans.items():
            modes = ops.mode_tensor(values, "cuda")
            out = torch.empty_like(qs)
            impl = "triton" if "impl='triton'" in plan else "auto"

            def run():
                ops.headwise_attention(qs, ks, vs, modes, segments=layout, out=out, impl=impl)

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
    if passed < args.cases:
        print(f"{args.cases - passed} correctness cases FAILED", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
