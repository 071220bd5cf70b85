"""Host time per call of the head-wise attention entry points, stage by stage, beside dense SDPA.

Eager denoising launches one attention call per layer; when the GPU work of a call is shorter than
its host time (sparse plans at 1K), the host sets the pace. Every row here runs on inputs too
small to make the GPU wait (all heads skipped, so the kernels start no work), so each time is host
time only: Python, Triton's dispatch and the driver launch. A cProfile of the public Gluon call
closes the report.

    PYTHONPATH=src python3 benchmarks/host_time.py OUT.json
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import pstats
import statistics
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditfastattn.ops import MODE_SKIP, _check, _gluon_unsupported, headwise_attention

CALLS = 400
ROUNDS = 5


def host_us(fn) -> float:
    """Median over rounds of the mean host time per call."""
    fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        rounds.append((time.perf_counter() - start) / CALLS * 1e6)
        torch.cuda.synchronize()
    return statistics.median(rounds)


def inputs(dim, seq=256, heads=24):
    q, k, v = (torch.randn(1, seq, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    modes = torch.full((heads,), MODE_SKIP, dtype=torch.int32, device="cuda")
    return q, k, v, modes, torch.empty_like(q)


def dense_rows(q, k, v):
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    rows = {}
    for name, backend in (("cuDNN SDPA", SDPBackend.CUDNN_ATTENTION), ("flash SDPA", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel(backend):
            rows[name] = host_us(lambda: F.scaled_dot_product_attention(qh, kh, vh))
    return rows


def gluon_rows(q, k, v, modes, out):
    from ditfastattn.ops import _gluon

    text_len = 128
    rows = {
        "public call, impl='gluon'": host_us(
            lambda: headwise_attention(q, k, v, modes, text_start=0, text_len=text_len, out=out, impl="gluon")),
        "public call, impl='auto'": host_us(
            lambda: headwise_attention(q, k, v, modes, text_start=0, text_len=text_len, out=out)),
        "_gluon.attention": host_us(
            lambda: _gluon.attention(q, k, v, modes, text_len, q.shape[1] - text_len, out, 0.1, False)),
        "input checks (_check)": host_us(lambda: _check(q, k, v, modes, 0, text_len, out)),
        "Gluon support check": host_us(lambda: _gluon_unsupported(q, k, v)),
        "TMA views (view_coeffs x3)": host_us(lambda: [_gluon.view_coeffs(t) for t in (q, k, v)]),
    }
    if not hasattr(_gluon, "_plans"):  # a tree from before direct launches (for a same-machine comparison)
        return rows
    # The kernel alone, arguments prebuilt: through Triton's JIT dispatch, and directly (ops._launch).
    key = next(key for key in _gluon._plans if key[2] == q.shape)
    from ditfastattn.ops._launch import rebased

    templates, ints, grid, constexprs = _gluon._plans[key]
    descs = [rebased(template, t) for template, t in zip(templates, (q, k, v))]
    args = (*descs, out, out, modes, _gluon._counter(q.device.index), *ints, 0.1)
    rows["kernel launch, JIT dispatch"] = host_us(lambda: _gluon._headwise_kernel[grid](*args, **constexprs,
                                                                                           **_gluon._LAUNCH))
    rows["kernel launch, direct"] = host_us(lambda: _gluon._launches(key, grid, args, constexprs, _gluon._LAUNCH))
    return rows


def triton_rows(q, k, v, modes, out):
    from ditfastattn.ops import _triton

    text_len = 128
    return {
        "public call, impl='triton'": host_us(
            lambda: headwise_attention(q, k, v, modes, text_start=0, text_len=text_len, out=out, impl="triton")),
        "_triton.attention": host_us(
            lambda: _triton.attention(q, k, v, modes, text_len, q.shape[1] - text_len, out, 0.1, False)),
    }


def profile(fn, calls=2000, top=30):
    fn()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON path for the results")
    args = parser.parse_args()

    q, k, v, modes, out = inputs(128)
    result = {
        "gpu": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
        "date": datetime.date.today().isoformat(),
        "shape": "1 x 256 x 24 x 128 (head dim 64 for the Triton rows), bf16, every head skipped",
        "host_us_per_call": {},
    }
    rows = result["host_us_per_call"]
    rows.update(dense_rows(q, k, v))
    if _gluon_unsupported(q, k, v) is None:
        rows.update(gluon_rows(q, k, v, modes, out))
        result["profile_public_gluon"] = profile(
            lambda: headwise_attention(q, k, v, modes, text_start=0, text_len=128, out=out, impl="gluon"))
    rows.update(triton_rows(*inputs(64)))
    for name, us in rows.items():
        print(f"{name:40s} {us:8.1f} us")
    if "profile_public_gluon" in result:
        print(result["profile_public_gluon"])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
