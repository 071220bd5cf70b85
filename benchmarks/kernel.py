"""Speed of the fused head-wise attention kernels against cuDNN, FlashAttention-2 and FlexAttention.

One GPU run prints a table per shape and writes JSON (and a PNG of speed-up against density):
dense rows (cuDNN SDPA, flash SDPA, compiled FlexAttention without a mask, our kernels with every
head full: the Triton kernel, and on Hopper the warp-specialised Gluon kernel), arrow plans at window fractions 1/32, 1/16, 1/8, 1/4, and mixed plans (a third full, a
third arrow 1/8, a third skip; and one near the paper's 68% sparsity), each beside FlexAttention
with the same per-head block mask. Speed-ups are over cuDNN; "of ideal" is speed-up x density,
where density is the share of a dense head's FLOPs the plan computes (``ditfastattn.ops.density``).
Times are ``triton.testing.do_bench`` medians after warm-up, on fresh random inputs; each row is
measured in three rounds over all rows (clocks drift as the card warms) and the median kept. A
second column replays each call from a CUDA graph: GPU time without host launch overhead. A few
plans also run with pointer loads instead of TMA descriptors, and host time per call is measured.

    PYTHONPATH=src python3 benchmarks/kernel.py OUT.json [--png OUT.png]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import random
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from ditfastattn import ops
from ditfastattn.ops import MODE_FULL, MODE_SKIP, _triton, headwise_attention

SHAPES = {
    "FLUX-2K": {"batch": 1, "heads": 24, "text": 512, "image": 16384, "dim": 128, "text_first": True},
    "FLUX-1K": {"batch": 1, "heads": 24, "text": 512, "image": 4096, "dim": 128, "text_first": True},
    "SD3-1K": {"batch": 2, "heads": 24, "text": 333, "image": 4096, "dim": 64, "text_first": False},
}
FRACTIONS = {"1/32": 1 / 32, "1/16": 1 / 16, "1/8": 1 / 8, "1/4": 1 / 4}
TARGET_SPARSITY = 0.68
ROUNDS = 3
POINTER_PLANS = ("full", "arrow 1/8", "mixed ~68% sparse")


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def plan_density(modes, image, text):
    return sum(ops.density(m, image, text) for m in modes) / len(modes)


def plan_pairs(modes, image, text):
    return sum(ops.density(m, image, text) for m in modes) * (image + text) ** 2


def shuffled(modes, seed):
    """Real plans interleave head types; order must not matter to a scheduler that ranks heads."""
    modes = list(modes)
    random.Random(seed).shuffle(modes)
    return modes


def mixed_third(heads, image):
    w8 = ops.window_blocks(1 / 8, image)
    third = heads // 3
    return shuffled([MODE_FULL] * third + [w8] * third + [MODE_SKIP] * (heads - 2 * third), 1)


def mixed_sparse(heads, image, text):
    """Full, arrow 1/8, arrow 1/32 and skip heads, the counts whose density is nearest 1 - 68%."""
    w8, w32 = ops.window_blocks(1 / 8, image), ops.window_blocks(1 / 32, image)
    best = None
    for full in range(1, heads):
        for a8 in range(1, heads - full):
            for a32 in range(1, heads - full - a8):
                skip = heads - full - a8 - a32
                if skip < 1:
                    continue
                modes = [MODE_FULL] * full + [w8] * a8 + [w32] * a32 + [MODE_SKIP] * skip
                gap = abs(plan_density(modes, image, text) - (1 - TARGET_SPARSITY))
                if best is None or gap < best[0]:
                    best = (gap, modes)
    return shuffled(best[1], 2)


def plans(shape):
    heads, image, text = shape["heads"], shape["image"], shape["text"]
    result = {"full": [MODE_FULL] * heads}
    for name, fraction in FRACTIONS.items():
        result[f"arrow {name}"] = [ops.window_blocks(fraction, image)] * heads
    result["mixed 1/3 full, 1/3 arrow 1/8, 1/3 skip"] = mixed_third(heads, image)
    result["mixed ~68% sparse"] = mixed_sparse(heads, image, text)
    return result


class FlexMask:
    """Per-head arrow block masks for FlexAttention; one compiled mask builder per shape."""

    def __init__(self, shape, seq, text_start):
        self.heads, self.seq = shape["heads"], seq
        self.modes = torch.zeros(shape["heads"], dtype=torch.int32, device="cuda")
        text_len = shape["text"]
        image_start = text_len if text_start == 0 else 0
        modes = self.modes

        def mask_mod(b, h, q_idx, kv_idx):
            mode = modes[h]
            q_text = (q_idx >= text_start) & (q_idx < text_start + text_len)
            kv_text = (kv_idx >= text_start) & (kv_idx < text_start + text_len)
            distance = ((q_idx - image_start) // ops.IMAGE_BLOCK - (kv_idx - image_start) // ops.IMAGE_BLOCK)
            band = (mode == MODE_FULL) | (distance.abs() <= mode)
            return (mode != MODE_SKIP) & (q_text | kv_text | band)

        self.mask_mod = mask_mod

    def __call__(self, modes):
        self.modes.copy_(torch.tensor(modes, dtype=torch.int32))
        # _compile: the builder never materialises the (seq x seq) mask (deprecated in torch 2.11, works).
        return create_block_mask(self.mask_mod, None, self.heads, self.seq, self.seq, device="cuda",
                                 BLOCK_SIZE=ops.IMAGE_BLOCK, _compile=True)


def pointer_path(fn):
    def run():
        _triton._PREFER_TMA = False
        try:
            return fn()
        finally:
            _triton._PREFER_TMA = True

    return run


def host_us(fn, calls=300):
    """Host time per call: the GPU work must be shorter than this for the number to mean anything."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def shape_inputs(shape, seed=0):
    """Random bf16 q, k, v of ``shape`` as (B, S, H, D) on the GPU, and where its text range starts."""
    batch, heads, text, image, dim = (shape[k] for k in ("batch", "heads", "text", "image", "dim"))
    torch.manual_seed(seed)
    q, k, v = (torch.randn(batch, text + image, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    return q, k, v, 0 if shape["text_first"] else image


def image_range(shape):
    """(image_start, image_len) of ``shape``: the kernels' form of its token layout."""
    return (shape["text"] if shape["text_first"] else 0), shape["image"]


def cudnn_dense(q, k, v):
    """The baseline: cuDNN SDPA, dense, on (B, S, H, D) inputs."""
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))


def run_shape(name, shape, flex, seed):
    batch, heads, text, image, dim = (shape[k] for k in ("batch", "heads", "text", "image", "dim"))
    seq = text + image
    q, k, v, text_start = shape_inputs(shape, seed)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    out = torch.empty_like(q)
    dense_flops = 4.0 * batch * heads * seq * seq * dim
    cases, errors = [], []
    gluon_reason = ops.impl_unsupported("gluon", q.device, q.dtype, [dim])
    use_gluon = gluon_reason is None
    if not use_gluon:
        errors.append(f"Gluon kernel not run: {gluon_reason}")

    def add(label, kind, fn, flops, density, backend=None):
        context = (lambda: sdpa_kernel(backend)) if backend is not None else contextlib.nullcontext
        try:
            with context():
                fn()  # compiles, tunes, builds
        except Exception as err:  # a baseline that fails to build must not cost the run its other rows
            errors.append(f"{label}: {err!r}")
            return
        cases.append({"row": label, "kind": kind, "fn": fn, "context": context, "flops": flops, "density": density})

    sdpa = lambda: F.scaled_dot_product_attention(qh, kh, vh)  # noqa: E731
    add("cuDNN SDPA (dense)", "cudnn", sdpa, dense_flops, 1.0, SDPBackend.CUDNN_ATTENTION)
    add("flash SDPA (dense)", "flash", sdpa, dense_flops, 1.0, SDPBackend.FLASH_ATTENTION)
    add("FlexAttention (dense, no mask)", "flex", lambda: flex(qh, kh, vh), dense_flops, 1.0)
    masks = FlexMask(shape, seq, text_start)
    tuning = {}
    for plan_name, modes in plans(shape).items():
        modes_t = torch.tensor(modes, dtype=torch.int32, device="cuda")
        density = plan_density(modes, image, text)
        flops = 4.0 * batch * dim * plan_pairs(modes, image, text)

        def ours(modes_t=modes_t):
            return headwise_attention(q, k, v, modes_t, text_start=text_start, text_len=text, out=out, impl="triton")

        add(f"ours: {plan_name}", "ours", ours, flops, density)
        if use_gluon:
            add(f"ours, Gluon: {plan_name}", "gluon",
                lambda modes_t=modes_t: headwise_attention(q, k, v, modes_t, text_start=text_start, text_len=text,
                                                           out=out, impl="gluon"), flops, density)
        if plan_name in POINTER_PLANS:  # the same kernel with pointer loads instead of TMA descriptors
            add(f"ours, pointer loads: {plan_name}", "ours_pointer", pointer_path(ours), flops, density)
        if _triton._tuned.configs_timings and not tuning:
            tuning = {str(c): t for c, t in _triton._tuned.configs_timings.items()}
        if plan_name != "full":
            try:
                block_mask = masks(modes)
            except Exception as err:
                errors.append(f"FlexAttention mask {plan_name}: {err!r}")
                continue
            add(f"Flex + mask: {plan_name}", "flex_mask", lambda bm=block_mask: flex(qh, kh, vh, block_mask=bm),
                flops, density)

    # Rounds over all rows, so that clocks drifting as the card warms touch every row alike; each
    # round times the eager call and its CUDA-graph replay (GPU time without host launch cost).
    times = {case["row"]: [] for case in cases}
    graph_times = {case["row"]: [] for case in cases}
    for _ in range(ROUNDS):
        for case in cases:
            with case["context"]():
                times[case["row"]].append(bench(case["fn"]))
                try:
                    graph_times[case["row"]].append(
                        triton.testing.do_bench_cudagraph(case["fn"], rep=50, return_mode="median"))
                except Exception as err:
                    errors.append(f"graph timing {case['row']}: {err!r}")
    rows = []
    for case in cases:
        ms = statistics.median(times[case["row"]])
        graph = graph_times[case["row"]]
        rows.append({
            "row": case["row"], "kind": case["kind"], "ms": ms, "ms_rounds": times[case["row"]],
            "graph_ms": statistics.median(graph) if graph else None, "graph_ms_rounds": graph,
            "tflops": case["flops"] / ms * 1e-9, "density": case["density"],
        })
    cudnn = next(r for r in rows if r["kind"] == "cudnn")
    for row in rows:
        row["speedup_vs_cudnn"] = cudnn["ms"] / row["ms"]
        row["share_of_ideal"] = row["speedup_vs_cudnn"] * row["density"]
        if row["graph_ms"] and cudnn["graph_ms"]:
            row["graph_share_of_ideal"] = cudnn["graph_ms"] / row["graph_ms"] * row["density"]

    # Each launch configuration on the dense and one sparse plan, to see what autotuning trades.
    per_config = {}
    for plan_name in ("full", "arrow 1/8"):
        modes_t = torch.tensor(plans(shape)[plan_name], dtype=torch.int32, device="cuda")
        for config in _triton.tile_configs(dim):
            ms = bench(lambda c=config: _triton.attention(q, k, v, modes_t, *image_range(shape), out, dim ** -0.5,
                                                          False, config=c))
            per_config[f"{plan_name} | {config}"] = ms
        if use_gluon:
            from ditfastattn.ops import _gluon

            for config in _gluon.tile_configs(dim):
                ms = bench(lambda c=config: _gluon.attention(q, k, v, modes_t, *image_range(shape), out,
                                                             dim ** -0.5, False, config=c))
                per_config[f"gluon {plan_name} | {config}"] = ms
    skip_t = torch.full((heads,), MODE_SKIP, dtype=torch.int32, device="cuda")
    skip = lambda: headwise_attention(q, k, v, skip_t, text_start=text_start, text_len=text, out=out,  # noqa: E731
                                      impl="triton")
    gluon_skip = lambda: headwise_attention(q, k, v, skip_t, text_start=text_start, text_len=text,  # noqa: E731
                                            out=out, impl="gluon")
    return {
        "shape": {**shape, "seq": seq, "dtype": "bf16"}, "rows": rows, "autotune_timings_ms": tuning,
        "best_config": str(_triton._tuned.best_config), "per_config_ms": per_config,
        "all_skip_ms": bench(skip), "all_skip_graph_ms": triton.testing.do_bench_cudagraph(skip, rep=50),
        "host_us_per_call_all_skip": host_us(skip), "errors": errors,
        **({"gluon_all_skip_graph_ms": triton.testing.do_bench_cudagraph(gluon_skip, rep=50),
            "gluon_host_us_per_call_all_skip": host_us(gluon_skip)} if use_gluon else {}),
    }


def host_overhead():
    """Host time per call of our entry point and of cuDNN SDPA, on inputs too small to make the GPU wait."""
    q, k, v = (torch.randn(1, 256, 24, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = torch.empty_like(q)
    modes = torch.full((24,), MODE_SKIP, dtype=torch.int32, device="cuda")
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    result = {
        "ours (headwise_attention, all skip)": host_us(
            lambda: headwise_attention(q, k, v, modes, text_start=0, text_len=128, out=out, impl="triton")),
        "ours (_triton.attention, all skip)": host_us(
            lambda: _triton.attention(q, k, v, modes, 128, 128, out, 0.1, False)),
        "ours, pointer loads (_triton.attention, all skip)": host_us(
            pointer_path(lambda: _triton.attention(q, k, v, modes, 128, 128, out, 0.1, False))),
    }
    if ops.impl_unsupported("gluon", q.device, q.dtype, [q.shape[-1]]) is None:
        result["ours, Gluon (headwise_attention, all skip)"] = host_us(
            lambda: headwise_attention(q, k, v, modes, text_start=0, text_len=128, out=out, impl="gluon"))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        result["cuDNN SDPA"] = host_us(lambda: F.scaled_dot_product_attention(qh, kh, vh))
    return result


def print_table(name, result):
    print(f"\n{name}  {result['shape']}")
    print(f"{'row':58s} {'ms':>8s} {'TFLOP/s':>8s} {'density':>8s} {'x cuDNN':>8s} {'of ideal':>8s} {'graph':>8s}")
    for r in result["rows"]:
        graph = f"{r['graph_share_of_ideal']:8.1%}" if "graph_share_of_ideal" in r else f"{'-':>8s}"
        print(f"{r['row']:58s} {r['ms']:8.3f} {r['tflops']:8.1f} {r['density']:8.3f} "
              f"{r['speedup_vs_cudnn']:8.2f} {r['share_of_ideal']:8.1%} {graph}")
    print(f"all heads skip: {result['all_skip_ms'] * 1e3:.1f} us (graph replay {result['all_skip_graph_ms'] * 1e3:.1f} us, "
          f"host {result['host_us_per_call_all_skip']:.1f} us per call); best config {result['best_config']}")
    for error in sorted(set(result["errors"])):
        print("error:", error)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    grid = [x / 100 for x in range(5, 101)]
    ax.plot(grid, [1 / x for x in grid], "k--", lw=1, label="ideal 1/density")
    for (name, result), color in zip(results.items(), ("C0", "C1", "C2")):
        for kind, marker, label in (("ours", "o", "ours (Triton)"), ("gluon", "s", "ours (Gluon)"),
                                    ("flex_mask", "x", "FlexAttention + mask")):
            pts = [(r["density"], r["speedup_vs_cudnn"]) for r in result["rows"] if r["kind"] == kind]
            if not pts:
                continue
            ax.scatter(*zip(*pts), color=color, marker=marker, label=f"{name} {label}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("density (share of dense FLOPs computed)")
    ax.set_ylabel("speed-up over cuDNN dense")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON results path")
    parser.add_argument("--png", help="plot of speed-up against density")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="_compile flag", category=DeprecationWarning)
    flex = torch.compile(flex_attention)
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "results": {},
    }
    summary["host_us_per_call"] = host_overhead()
    print("host time per call (us):", {k: round(v, 1) for k, v in summary["host_us_per_call"].items()})
    results = summary["results"]
    for seed, name in enumerate(args.shapes):
        results[name] = run_shape(name, SHAPES[name], flex, seed)
        print_table(name, results[name])
        summary["tuned_configs"] = {str(key): config for key, config in _triton._chosen.items()}
        with open(args.out, "w") as f:  # after every shape, so a late failure keeps the rest
            json.dump(summary, f, indent=1)
    if args.png:
        plot(results, args.png)


if __name__ == "__main__":
    main()
