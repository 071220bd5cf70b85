"""GPU check and timing of what calibration runs per layer to score its candidates, old way and new.

    PYTHONPATH=src python3 benchmarks/search_kernels.py OUT.json      # CUDA GPU
    PYTHONPATH=src python3 benchmarks/search_kernels.py --smoke       # CPU, Triton's interpreter, tiny shapes

1. Correctness. ``ops.head_squared_errors`` and ``ops.head_variances`` (Triton) against float64, on
   FLUX-sized layer outputs and awkward shapes (odd head counts and head dims, (B, H, S, D) views,
   batch halves, a row range): the error must stay within twice that of the PyTorch expressions
   they replace (plus a few float32 roundings). ``ops.headwise_attention(..., global_rows=False)``
   with every arrow candidate, on each GPU kernel (Triton, Gluon on Hopper): image rows equal the
   default call's bit for bit, the global-query rows keep what ``out`` held.
2. Time (CUDA events, median), per FLUX.1-dev-sized layer output (batch x (512 text + image tokens)
   x 24 heads x 128, bf16): the torch expressions (difference tensor, then a strided norm) against
   the one-pass kernels, and the three arrow candidates with and without their text rows; then one
   layer's scoring (three arrows, four errors, the variance) both ways, and what that saves per
   denoising step of FLUX's 57 attention layers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:  # before Triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton.testing  # noqa: E402

from ditfastattn import ops  # noqa: E402

HERE = Path(__file__).resolve().parent
ARROWS = (0.125, 0.0625, 0.03125)  # the default candidates' windows
LAYERS = 57  # FLUX.1's attention layers


def old_squared_errors(a, b, rows=None):
    """The expression calibration used before: the difference in the inputs' dtype, then a norm."""
    if rows is not None:
        a, b = a[:, rows[0]: sum(rows)], b[:, rows[0]: sum(rows)]
    return torch.linalg.vector_norm(a - b, dim=(0, 1, 3), dtype=torch.float32).square()


def old_variances(x):
    mean = x.mean(dim=(0, 1, 3), keepdim=True, dtype=torch.float32)
    return torch.linalg.vector_norm(x - mean.to(x.dtype), dim=(0, 1, 3), dtype=torch.float32).square()


def relative(got, truth) -> float:
    return ((got.double() - truth).abs().max() / truth.abs().max()).item()


def make(shape, layout, dtype, gen, device, scale=1.0, offset=0.0):
    batch, seq, heads, dim = shape
    if layout == "bhsd":  # (B, H, S, D) storage seen as (B, S, H, D)
        x = torch.randn(batch, heads, seq, dim, generator=gen, device=device).transpose(1, 2)
    else:
        x = torch.randn(batch, seq, heads, dim, generator=gen, device=device)
    return (x * scale + offset).to(dtype)


def check_statistics(device, smoke: bool) -> list[dict]:
    eps = torch.finfo(torch.float32).eps
    gen = torch.Generator(device).manual_seed(0)
    shapes = [((2, 77, 3, 24), "bshd", None), ((3, 150, 5, 72), "bhsd", (20, 100))] if smoke else [
        ((8, 4608, 24, 128), "bshd", (512, 4096)), ((3, 1037, 5, 72), "bhsd", None), ((4, 333, 9, 64), "bshd", (1, 300)),
        ((2, 16896, 24, 128), "bhsd", (512, 16384)),
    ]
    rows_out = []
    for shape, layout, rows in shapes:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            a = make(shape, layout, dtype, gen, device)
            b = (a.float() + 0.05 * make(shape, layout, torch.float32, gen, device)).to(dtype)
            half = shape[0] // 2 or 1
            a, b = a[half - 1:], b[: shape[0] - half + 1]  # batch slices: offsets and views
            start, length = rows or (0, shape[1])
            truth = (a.double() - b.double())[:, start: start + length].square().sum(dim=(0, 1, 3))
            err = relative(ops.head_squared_errors(a, b, rows=rows, impl="triton"), truth)
            ref = relative(old_squared_errors(a, b, rows), truth)
            x = make(shape, layout, dtype, gen, device, 2.0, 3.0)
            xd = x.double()
            vtruth = (xd - xd.mean(dim=(0, 1, 3), keepdim=True)).square().sum(dim=(0, 1, 3))
            verr = relative(ops.head_variances(x, impl="triton"), vtruth)
            vref = relative(old_variances(x), vtruth)
            ok = err <= 2 * ref + 8 * eps and verr <= 2 * vref + 8 * eps
            rows_out.append({"shape": list(shape), "layout": layout, "rows": rows, "dtype": str(dtype), "error": err,
                             "torch_error": ref, "variance_error": verr, "torch_variance_error": vref, "ok": ok})
            print(f"stats {shape} {layout} {dtype}: error {err:.2e} (torch {ref:.2e}), variance {verr:.2e} "
                  f"(torch {vref:.2e}) {'ok' if ok else 'FAIL'}", flush=True)
            del a, b, x, xd, truth
    return rows_out


def inputs(batch, image, text, device, heads=24, seed=0):
    gen = torch.Generator(device).manual_seed(seed)
    return [torch.randn(batch, text + image, heads, 128, generator=gen, device=device, dtype=torch.bfloat16)
            for _ in range(3)]


def arrow_modes(image, heads, device):
    return [ops.mode_tensor([ops.window_blocks(f, image)] * heads, device) for f in ARROWS]


def impls(device) -> list[str]:
    found = ["triton"]
    if device.type == "cuda" and ops.gluon_available() is None and torch.cuda.get_device_capability(device) == (9, 0):
        found.append("gluon")
    return found


def check_global_rows(device, smoke: bool) -> list[dict]:
    batch, image, text, heads = (1, 300, 77, 2) if smoke else (2, 4096, 512, 24)
    q, k, v = inputs(batch, image, text, device, heads)
    results = []
    for impl in impls(device):
        for fraction, modes in zip(ARROWS, arrow_modes(image, heads, device)):
            every = ops.headwise_attention(q, k, v, modes, text_start=0, text_len=text, impl=impl)
            out = torch.full_like(q, float("nan"))
            ops.headwise_attention(q, k, v, modes, text_start=0, text_len=text, out=out, impl=impl, global_rows=False)
            same = torch.equal(out[:, text:], every[:, text:])
            untouched = bool(out[:, :text].isnan().all())
            results.append({"impl": impl, "arrow": fraction, "image_rows_equal": same, "text_rows_unwritten": untouched})
            print(f"global_rows=False {impl} arrow:{fraction}: image rows equal {same}, text rows unwritten "
                  f"{untouched}", flush=True)
    return results


def cuda_ms(fn) -> float:
    """Median milliseconds, the L2 cache flushed between runs (as calibration meets these tensors)."""
    return triton.testing.do_bench(fn, warmup=5, rep=100, return_mode="median")


def time_size(size: int, batch: int, device) -> dict:
    image, text = (size // 16) ** 2, 512
    q, k, v = inputs(batch, image, text, device)
    exact = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    previous = exact + 0.01 * torch.randn_like(exact)
    rows = (text, image)
    row = {"size": size, "batch": batch, "shape": list(exact.shape)}
    row["torch_error_ms"] = cuda_ms(lambda: old_squared_errors(previous, exact))
    row["kernel_error_ms"] = cuda_ms(lambda: ops.head_squared_errors(previous, exact))
    row["kernel_error_image_rows_ms"] = cuda_ms(lambda: ops.head_squared_errors(previous, exact, rows=rows))
    row["torch_variance_ms"] = cuda_ms(lambda: old_variances(exact))
    row["kernel_variance_ms"] = cuda_ms(lambda: ops.head_variances(exact))
    out = torch.empty_like(q)
    for impl in impls(device):
        for fraction, modes in zip(ARROWS, arrow_modes(image, 24, device)):
            for flag in (True, False):
                row[f"{impl}_arrow_{fraction}_global_rows_{flag}_ms"] = cuda_ms(
                    lambda: ops.headwise_attention(q, k, v, modes, text_start=0, text_len=text, out=out, impl=impl,
                                                   global_rows=flag))
    arrows = arrow_modes(image, 24, device)

    def layer(new: bool):
        # One layer's scoring of the default candidates: cache (the previous output), three arrows.
        errors = [ops.head_squared_errors(previous, exact) if new else old_squared_errors(previous, exact)]
        for modes in arrows:
            ops.headwise_attention(q, k, v, modes, text_start=0, text_len=text, out=out, global_rows=not new)
            errors.append(ops.head_squared_errors(out, exact, rows=rows) if new else old_squared_errors(out, exact))
        errors.append(ops.head_variances(exact) if new else old_variances(exact))
        return errors

    row["layer_scoring_old_ms"] = cuda_ms(lambda: layer(False))
    row["layer_scoring_new_ms"] = cuda_ms(lambda: layer(True))
    row["saved_per_step_s"] = (row["layer_scoring_old_ms"] - row["layer_scoring_new_ms"]) * LAYERS / 1000
    print(json.dumps(row, indent=1), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", default=None, help="JSON (default results/search_kernels.json)")
    parser.add_argument("--smoke", action="store_true", help="CPU through Triton's interpreter: checks only, tiny shapes")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    sys.path.insert(0, str(HERE))
    from e2e import environment

    result = {"environment": environment(device), "smoke": args.smoke,
              "statistics": check_statistics(device, args.smoke), "global_rows": check_global_rows(device, args.smoke)}
    if not args.smoke:
        result["timing"] = [time_size(size, args.batch, device) for size in args.sizes]
    failed = [r for r in result["statistics"] if not r["ok"]] + [
        r for r in result["global_rows"] if not (r["image_rows_equal"] and r["text_rows_unwritten"])]
    result["ok"] = not failed
    out = args.out or (HERE.parent / "out" / "search_kernels_smoke.json" if args.smoke else
                       HERE / "results" / "search_kernels.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'all checks passed' if not failed else f'{len(failed)} checks FAILED'}; wrote {out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
