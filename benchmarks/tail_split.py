"""What splitting the tail items buys the Gluon kernel: each plan of ``kernel.py`` at each shape, with
tail items split (the default ``split_min_tiles``) and not (0), side by side with cuDNN SDPA in one run.

A launch's last ``n_items % programs`` items split over their key tiles into up to four parts,
which the last part to finish merges through their log-sum-exp (``ops/_gluon.py``), wherever that
takes the tail fewer rounds and every part keeps ``split_min_tiles`` key tiles. ``--variants``
lists the values to compare; ``--baseline`` adds a copy of the module from another commit. "parts"
is what the rule gives for the plan (1: no split, the same schedule as 0). Times are
``triton.testing.do_bench`` medians, eager and replayed from a CUDA graph, over three interleaved
rounds; "of ideal" is the speed-up over cuDNN times the density.

    PYTHONPATH=src python3 benchmarks/tail_split.py OUT.json [--shapes FLUX-1K SD3-1K] [--variants 8 0 4]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import statistics

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernel import ROUNDS, SHAPES, bench, plan_density, plans
from kernel_check import tail_parts


def graph_bench(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def load_baseline(path):
    """A copy of ``ops/_gluon.py`` from another commit, loaded beside the current one."""
    spec = importlib.util.spec_from_file_location("ditfastattn.ops._gluon_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_shape(shape, seed, variants, baseline):
    from ditfastattn.ops import _gluon

    batch, heads, text, image, dim = (shape[k] for k in ("batch", "heads", "text", "image", "dim"))
    seq = text + image
    text_start = 0 if shape["text_first"] else image
    torch.manual_seed(seed)
    q, k, v = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    out = torch.empty_like(q)
    block_n = _gluon.tile_configs(dim)[0]["BLOCK_N"]

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qh, kh, vh)

    rows = {("cuDNN SDPA (dense)", None): cudnn}
    densities, parts = {}, {}
    for plan_name, modes in plans(shape).items():
        modes_t = torch.tensor(modes, dtype=torch.int32, device="cuda")
        densities[plan_name] = plan_density(modes, image, text)
        for variant in variants:
            parts[plan_name, variant] = tail_parts(modes, batch, image, text, None, variant, block_n)

            def fn(modes_t=modes_t, variant=variant):
                return _gluon.attention(q, k, v, modes_t, text_start, text, out, dim ** -0.5, False,
                                        split_min_tiles=variant)

            fn()
            rows[plan_name, variant] = fn
        if baseline is not None:
            def fn(modes_t=modes_t):
                return baseline.attention(q, k, v, modes_t, text_start, text, out, dim ** -0.5, False)

            fn()
            rows[plan_name, "baseline"] = fn
    times = {row: [] for row in rows}
    graph_times = {row: [] for row in rows}
    for _ in range(ROUNDS):
        for row, fn in rows.items():
            times[row].append(bench(fn))
            graph_times[row].append(graph_bench(fn))
    cudnn_ms = statistics.median(times["cuDNN SDPA (dense)", None])
    cudnn_graph_ms = statistics.median(graph_times["cuDNN SDPA (dense)", None])
    result = {"shape": {**shape, "seq": seq, "dtype": "bf16"}, "cudnn_ms": cudnn_ms, "cudnn_graph_ms": cudnn_graph_ms,
              "plans": {}}
    for (plan_name, variant), fn in rows.items():
        if variant is None:
            continue
        ms, graph_ms = statistics.median(times[plan_name, variant]), statistics.median(graph_times[plan_name, variant])
        entry = result["plans"].setdefault(plan_name, {"density": densities[plan_name], "split_min_tiles": {}})
        entry["split_min_tiles"][str(variant)] = {
            "tail_parts": parts.get((plan_name, variant), 1), "ms": ms, "ms_rounds": times[plan_name, variant],
            "graph_ms": graph_ms, "graph_ms_rounds": graph_times[plan_name, variant],
            "of_ideal": cudnn_ms / ms * densities[plan_name],
            "graph_of_ideal": cudnn_graph_ms / graph_ms * densities[plan_name]}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON results path")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--variants", nargs="*", type=int, help="split_min_tiles values (default: the kernel's, and 0)")
    parser.add_argument("--baseline", help="a copy of ops/_gluon.py from another commit, timed as one more column")
    args = parser.parse_args()
    from ditfastattn.ops import _gluon

    variants = args.variants or [_gluon.SPLIT_MIN_TILES, 0]
    baseline = load_baseline(args.baseline) if args.baseline else None
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "default_split_min_tiles":
        _gluon.SPLIT_MIN_TILES, "results": {},
    }
    for seed, name in enumerate(args.shapes):
        result = summary["results"][name] = run_shape(SHAPES[name], seed, variants, baseline)
        print(f"\n{name}: cuDNN {result['cudnn_ms']:.3f} ms (graph {result['cudnn_graph_ms']:.3f}); "
              "per split_min_tiles: tail parts, of ideal eager / graph")
        columns = variants + (["baseline"] if baseline is not None else [])
        print(f"{'plan':45s}" + "".join(f"{f'min {v}':>24s}" for v in columns))
        for plan_name, entry in result["plans"].items():
            cells = [entry["split_min_tiles"][str(v)] for v in columns]
            print(f"{plan_name:45s}" + "".join(
                f"{c['tail_parts']:6d} {c['of_ideal']:7.1%} /{c['graph_of_ideal']:7.1%}" for c in cells))
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
