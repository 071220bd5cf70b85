"""Does the Triton kernel's autotuner pick its fastest config? (lab, one GPU)

Off Hopper the Triton kernel runs every plan, with the config its autotuner picks at the first
launch of each (sequence bucket, head dim, path) in a process. On one H100 the same arrow plans at
SD3 1024² read 0.58-0.84 of their ideal speed-up from one run to the next (pool_speed.py,
2026-12-06). Here: every config timed directly on the same inputs, then what the tuner picks in
fresh processes, with its timing as shipped and with longer or graph-replayed timings.

    PYTHONPATH=src python3 docs/history/triton_tuning.py OUT.json [--processes 3]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import torch
import triton

from ditfastattn import ops
from ditfastattn.ops import _triton

SHAPES = {  # text after the image (SD3) or before it (FLUX); the arrow densities pool_speed.py times
    "SD3-1K": {"batch": 2, "text": 333, "grid": (1, 64, 64), "dim": 64, "text_first": False, "fractions": (0.25, 0.125)},
    "FLUX-1K": {"batch": 1, "text": 512, "grid": (1, 64, 64), "dim": 128, "text_first": True, "fractions": (0.25, 0.125)},
}
HEADS = 24
BENCHES = {
    "shipped": None,
    "long": lambda fn, quantiles: triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=quantiles),
    "graph": lambda fn, quantiles: triton.testing.do_bench_cudagraph(fn, rep=100, quantiles=quantiles),
}


def case(name: str, fraction: float):
    shape = SHAPES[name]
    image = math.prod(shape["grid"])
    seq = shape["text"] + image
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape["batch"], HEADS, seq, shape["dim"], device="cuda", dtype=torch.bfloat16,
                           generator=gen).transpose(1, 2) for _ in range(3))
    width = ops.window_blocks(fraction, image)
    modes = ops.mode_tensor([width] * HEADS, "cuda")
    start = shape["text"] if shape["text_first"] else 0
    density = ops.density(width, image, shape["text"])
    return q, k, v, modes, start, image, density


def dense_ms(q, k, v) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh),
                                       warmup=25, rep=200, return_mode="median")


def timed(q, k, v, modes, start, image, config) -> float:
    out = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5

    def run():
        _triton.attention(q, k, v, modes, start, image, out, scale, False, config=config)

    run()
    return triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")


def tune(bench: str) -> dict:
    """In this (fresh) process: the tuner's pick per shape (tuned at the first fraction) and the
    op's time at every fraction with it."""
    if BENCHES[bench] is not None:
        _triton._tuned._do_bench = BENCHES[bench]
    picks = {}
    for name, shape in SHAPES.items():
        for fraction in shape["fractions"]:
            q, k, v, modes, start, image, density = case(name, fraction)
            ms = timed(q, k, v, modes, start, image, None)
            picks[f"{name} arrow {fraction}"] = {"ms": ms, "density": density}
        picks[name] = {str(key): config for key, config in _triton._chosen.items() if key[1] == shape["dim"]}
    return picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--tune", choices=sorted(BENCHES), help="(internal) tune in this process and print JSON")
    args = parser.parse_args()
    if args.tune:
        print(json.dumps(tune(args.tune)))
        return
    results = {"environment": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "triton": triton.__version__}, "configs": {}, "tuned": {}}
    for name, shape in SHAPES.items():
        for fraction in shape["fractions"]:
            q, k, v, modes, start, image, density = case(name, fraction)
            dense = dense_ms(q, k, v)
            rows = []
            for config in _triton.tile_configs(shape["dim"]):
                ms = timed(q, k, v, modes, start, image, config)
                rows.append({"config": config, "ms": ms, "of_ideal": dense / ms * density})
            results["configs"][f"{name} arrow {fraction}"] = {"density": density, "cudnn_ms": dense, "rows": rows}
            print(name, fraction, f"density {density:.3f}",
                  " ".join(f"{r['config']['BLOCK_N']}/{r['config']['num_warps']}/{r['config']['num_stages']}:"
                           f"{r['of_ideal']:.2f}" for r in rows), flush=True)
    for bench in BENCHES:
        results["tuned"][bench] = []
        for _ in range(args.processes):
            run = subprocess.run([sys.executable, __file__, "--tune", bench], capture_output=True, text=True)
            if run.returncode:
                print(run.stderr[-1500:], flush=True)
                continue
            picks = json.loads(run.stdout.strip().splitlines()[-1])
            results["tuned"][bench].append(picks)
            line = []
            for key, value in picks.items():
                if "arrow" in key:
                    dense = results["configs"][key]["cudnn_ms"]
                    line.append(f"{key}: {dense / value['ms'] * value['density']:.2f}")
            print(bench, "; ".join(line), [list(v.values()) for k, v in picks.items() if "arrow" not in k], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
