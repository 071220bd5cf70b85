"""End-to-end step time under torch.compile and CUDA graphs: stock diffusers against static plans.

    python benchmarks/e2e_compiled.py                       # CUDA GPU: results/e2e_compiled.json
    python benchmarks/e2e_compiled.py --runs flux:1024 sd3:1024 --targets 0.43 0.68 0.80
    python benchmarks/e2e_compiled.py --smoke               # tiny models, CPU, aot_eager: checks the script
    python benchmarks/e2e_compiled.py --tiles               # plans with tile windows: results/e2e_compiled_tiles.json
    python benchmarks/e2e_compiled.py --pool                # plans with pooled keys: results/e2e_compiled_pool.json
    python benchmarks/e2e_compiled.py --cfg --check         # true CFG: two calls per step, static vs dynamic checked

Same models, inputs and timing as `e2e.py` (random bf16 weights, one transformer call per step,
median of steps 1..N-1 of one generation after a 2-step warm-up generation). For every compile
mode (`torch.compile(model, fullgraph=True, dynamic=False)`, and with `mode="reduce-overhead"`,
i.e. CUDA graphs), in one process: stock diffusers, stock with attention removed (the attention
share under that mode) and ditfastattn with a static plan (`apply(..., static=True)`). The ceiling
of a plan comes from the compiled stock run of the same mode. After the first compiled call,
`torch._dynamo.config.error_on_recompile` is set: a recompile (e.g. one per step) fails the run.
With ``--tiles`` the plans' compressed heads run tile windows (``TILE_MIX``) over the square
image's grid of patches instead of arrow bands (FLUX, SD3, Chroma); with ``--pool`` a fifth of them
pool keys (``POOL_MIX``, as ``e2e.py --pool``). With ``--cfg`` every step makes
two transformer calls, the second with another text (true CFG, as FluxPipeline's ``true_cfg_scale``,
Qwen-Image and Wan run it), and a step's time is both calls'. With ``--check`` each static plan's
generation is first compared, call by call, with the dynamic runtime's (both eager; the CPU tests
check the compiled graph against them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from pathlib import Path

import torch

import ditfastattn
from e2e import (
    MIX, MODELS, POOL_MIX, TILE_MIX, attention_removed, build_transformer, environment, setup, step_times, synthetic_plan,
)

HERE = Path(__file__).resolve().parent
# "graph": no compiler, the eager step captured once with torch.cuda.graph and replayed.
MODES = {"compile": None, "cudagraphs": "reduce-overhead", "graph": "manual capture"}
# Kinds whose calls report the image's grid (read from the latent or raster position ids), for --tiles.
TILED_KINDS = ("flux", "sd3", "chroma")


def graphed_measure(model, inputs, steps, mode=None, backend=None, context=contextlib.nullcontext, negative=None) -> dict:
    """Capture one eager transformer call in a CUDA graph (timestep as a static input), then time
    a generation of replays; the static plan's step counter advances inside the graph. One call per
    step: ``negative`` (true CFG) is refused before any run."""
    (name, first), = steps[0].items()  # each call's timestep argument, e2e.timesteps
    timestep = first.clone()
    side = torch.cuda.Stream()
    with torch.no_grad(), context():
        start = time.perf_counter()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream: cuDNN plans, Triton tuning, tables
            for t in steps[:2]:
                timestep.copy_(t[name])
                model(**{name: timestep}, **inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(**{name: timestep}, **inputs)
        capture_s = time.perf_counter() - start

        def replay(ts):
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(len(ts) + 1)]
            marks[0].record()
            for t, mark in zip(ts, marks[1:]):
                timestep.copy_(t[name])
                graph.replay()
                mark.record()
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]

        replay(steps[:2])
        torch.cuda.reset_peak_memory_stats()
        times = replay(steps)
    result = {"ms": statistics.median(times[1:]), "ms_steps": [round(t, 3) for t in times],
              "compile_s": round(capture_s, 1), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    del graph
    torch.cuda.empty_cache()
    return result


class TrueCFG:
    """A transformer called twice per step, as true CFG does: with the inputs, then with ``negative``
    in their place; returns the second call's output."""

    def __init__(self, model, negative: dict):
        self.model, self.negative = model, negative

    def __call__(self, **inputs):
        self.model(**inputs)
        return self.model(**{**inputs, **self.negative})


def calls(model, negative: dict | None):
    return model if negative is None else TrueCFG(model, negative)


def compiled_measure(model, inputs, steps, mode, backend, context=contextlib.nullcontext, negative=None) -> dict:
    """Compile ``model`` afresh, warm up with one 2-step generation, then time one generation."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = calls(torch.compile(model, fullgraph=True, dynamic=False, mode=mode, backend=backend), negative)
    with torch.no_grad(), context():
        start = time.perf_counter()
        step_times(compiled, inputs, steps[:1])
        compile_s = time.perf_counter() - start
        with torch._dynamo.config.patch(error_on_recompile=True):
            step_times(compiled, inputs, steps[:2])
            if inputs["hidden_states"].device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = step_times(compiled, inputs, steps)
    result = {"ms": statistics.median(times[1:]), "ms_steps": [round(t, 3) for t in times],
              "compile_s": round(compile_s, 1), "graphs": counters["stats"]["unique_graphs"],
              "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    if inputs["hidden_states"].device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    torch._dynamo.reset()
    return result


def eager_ms(model, inputs, steps) -> float:
    with torch.no_grad():
        step_times(model, inputs, steps[:2])
        return statistics.median(step_times(model, inputs, steps)[1:])


def outputs(model, inputs, steps, negative) -> list[torch.Tensor]:
    """Every call's output of one generation (with ``negative``: both calls of each step)."""
    prompts = [{}] if negative is None else [{}, negative]
    with torch.no_grad():
        return [model(**t, **{**inputs, **prompt})[0].float() for t in steps for prompt in prompts]


def check_static(model, plan, inputs, steps, negative, impl) -> dict:
    """The static plan's outputs against the dynamic runtime's, call by call, both eager on the same
    kernels: the largest absolute difference over the outputs' standard deviation. Calls mixing up
    their buffers would make it as large as the plan's own effect, given for scale (``plan_vs_stock``:
    the dynamic runtime's last step against stock attention's)."""
    stock = outputs(model, inputs, steps, negative)
    results = {}
    for static in (False, True):
        ditfastattn.apply(model, plan, impl=impl, static=static)
        try:
            results[static] = outputs(model, inputs, steps, negative)
        finally:
            ditfastattn.remove(model)
    errors = [float((a - b).abs().max() / b.std()) for a, b in zip(results[True], results[False])]
    moved = [float((a - b).abs().max() / b.std()) for a, b in zip(results[False][-2:], stock[-2:])]
    return {"max_error_over_std": max(errors), "per_call": [round(e, 5) for e in errors],
            "plan_vs_stock_last_step": [round(m, 4) for m in moved]}


def run_config(model, kind, size, args, device, dtype) -> dict:
    inputs, steps, row, impl = setup(kind, size, args, device, dtype)
    image_tokens, text_len, n_steps = row["image_tokens"], row["text_len"], row["steps_per_generation"]
    side = math.isqrt(image_tokens)  # a square image (TILED_KINDS)
    grid = (1, side, side) if args.tiles or args.pool else None
    full = ditfastattn.Plan.uniform(model, n_steps, "full", num_image_tokens=image_tokens, text_len=text_len,
                                    grid=grid)
    mix = TILE_MIX if args.tiles else POOL_MIX if args.pool else MIX
    plans = {f"plan_{t:.2f}": synthetic_plan(full, t, image_tokens, text_len, mix=mix) for t in args.targets}
    row["methods"] = mix
    negative = None
    if args.cfg:
        generator = torch.Generator(device).manual_seed(1)
        text = inputs["encoder_hidden_states"]
        negative = {"encoder_hidden_states": torch.randn(text.shape, generator=generator, device=device, dtype=dtype)}
        row["calls_per_step"] = 2
    if args.check:
        row["check"] = {name: check_static(model, plan, inputs, steps, negative, impl) for name, plan in plans.items()}
        print(f"  {kind} {size} check: {json.dumps({n: c['max_error_over_std'] for n, c in row['check'].items()})}",
              flush=True)
    row.update(eager_stock_ms=eager_ms(calls(model, negative), inputs, steps), modes={})
    for mode_name in args.modes:
        if time.perf_counter() > args.deadline:
            row.setdefault("skipped_modes", []).append(mode_name)
            continue
        mode = MODES[mode_name]
        measure = graphed_measure if mode_name == "graph" else compiled_measure
        out = row["modes"][mode_name] = {}
        out["stock"] = measure(model, inputs, steps, mode, args.backend, negative=negative)
        out["no_attention"] = measure(model, inputs, steps, mode, args.backend, attention_removed, negative=negative)
        share = 1.0 - out["no_attention"]["ms"] / out["stock"]["ms"]
        out["attention_share"] = share
        args.checkpoint(row)
        print(f"  {kind} {size} {mode_name}: stock {out['stock']['ms']:.2f} ms (compile/capture "
              f"{out['stock']['compile_s']} s), attention share {share:.3f}", flush=True)
        for name, plan in plans.items():
            sparsity = statistics.fmean(plan.summary(image_tokens, text_len)["sparsity_per_step"][1:])
            ditfastattn.apply(model, plan, impl=impl, static=True)
            try:
                with torch.no_grad():  # the uncompiled generation that builds tables and buffers
                    step_times(calls(model, negative), inputs, steps[:2])
                result = measure(model, inputs, steps, mode, args.backend, negative=negative)
            finally:
                ditfastattn.remove(model)
            result.update(sparsity=sparsity, speedup=out["stock"]["ms"] / result["ms"],
                          ceiling=1.0 / (1.0 - share * sparsity),
                          speedup_vs_eager_stock=row["eager_stock_ms"] / result["ms"])
            result["of_ceiling"] = result["speedup"] / result["ceiling"]
            out[name] = result
            args.checkpoint(row)
            print(f"  {kind} {size} {mode_name} {name}: {result['ms']:.2f} ms, x{result['speedup']:.3f}, "
                  f"{result['of_ceiling']:.1%} of ceiling", flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["model size  mode        variant        ms      compile_s  sparsity speedup ceiling of_ceil  x_eager_stock"]
    for row in rows:
        lines.append(f"{row['model']:5} {row['size']:4}  eager       stock      {row['eager_stock_ms']:9.2f}")
        for mode, variants in row["modes"].items():
            for name, v in variants.items():
                if not isinstance(v, dict):
                    continue
                cells = f"{row['model']:5} {row['size']:4}  {mode:10}  {name:12} {v['ms']:9.2f}  {v['compile_s']:8.1f}"
                if "speedup" in v:
                    cells += (f"  {v['sparsity']:6.3f}  {v['speedup']:6.3f}  {v['ceiling']:6.3f}  {v['of_ceiling']:6.3f}"
                              f"  {v['speedup_vs_eager_stock']:6.3f}")
                lines.append(cells)
            lines.append(f"      {mode}: attention share {variants['attention_share']:.3f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Speed-up over the same mode's stock run against sparsity, with each mode's Amdahl ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(rows), figsize=(5.0 * len(rows), 4.0), squeeze=False)
    grid = np.linspace(0.0, 0.9, 50)
    for ax, row in zip(axes.flat, rows):
        for color, (mode, variants) in zip(("C0", "C1", "C2"), row["modes"].items()):
            plans = [v for name, v in variants.items() if name.startswith("plan_")]
            share = variants["attention_share"]
            ax.plot(grid, 1.0 / (1.0 - share * grid), "--", color=color, lw=1,
                    label=f"ceiling, {mode} (attention {share:.0%})")
            ax.plot([v["sparsity"] for v in plans], [v["speedup"] for v in plans], "o", color=color,
                    label=f"ditfastattn static plan, {mode}")
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.set_title(f"{row['model'].upper()} {row['size']}², speed-up over stock in the same mode", fontsize=9)
        ax.set_xlabel("attention sparsity")
        ax.set_ylabel("end-to-end step speed-up")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, aot_eager, no CUDA graphs")
    parser.add_argument("--runs", nargs="+", default=["flux:2048"], help="model:size pairs, e.g. flux:2048 sd3:1024")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--targets", nargs="*", type=float, default=[0.68], help="synthetic plan sparsities")
    parser.add_argument("--tiles", action="store_true", help="plans with tile windows instead of arrow bands")
    parser.add_argument("--pool", action="store_true", help="plans where a fifth of the compressed heads pool keys")
    parser.add_argument("--cfg", action="store_true", help="true CFG: two transformer calls per step")
    parser.add_argument("--check", action="store_true", help="compare each compiled plan with the dynamic runtime")
    parser.add_argument("--steps", type=int, default=None, help="steps per generation (default 6 at 2K, 8 at 1K)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no new compile mode after this")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default results/e2e_compiled.json)")
    parser.add_argument("--plot", type=Path, nargs="+", default=None, metavar="JSON",
                        help="only draw benchmarks/e2e_compiled.png from these result files")
    args = parser.parse_args()
    if args.plot:
        rows = [row for path in args.plot for row in json.loads(path.read_text())["runs"]]
        plot(rows, HERE / "e2e_compiled.png")
        print(table(rows))
        return
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    args.backend = "aot_eager" if args.smoke else "inductor"
    if args.smoke:
        args.modes = ["compile"]
    if args.cfg and "graph" in args.modes:
        parser.error("--cfg runs under torch.compile (--modes compile cudagraphs): a manual capture holds one call")
    folder = HERE.parent / "out" if args.smoke else HERE / "results"
    name = ("e2e_compiled_tiles" if args.tiles else "e2e_compiled_pool" if args.pool
            else "e2e_compiled_cfg" if args.cfg else "e2e_compiled")
    args.out = args.out or folder / (f"{name}_smoke.json" if args.smoke else f"{name}.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = [(kind, int(size)) for kind, size in (r.split(":") for r in args.runs)]
    if args.tiles and args.pool:
        parser.error("--tiles or --pool, not both")
    if (args.tiles or args.pool) and any(kind not in TILED_KINDS for kind, _ in runs):
        parser.error(f"--tiles and --pool run on {', '.join(TILED_KINDS)} (their calls report the image grid)")
    if args.smoke:
        runs = [(kind, 256) for kind, _ in runs]
    result = {"environment": environment(device), "smoke": args.smoke, "backend": args.backend,
              "timing": "median of steps 1..N-1 of one generation, CUDA events, after a 2-step warm-up generation",
              "runs": [], "skipped": []}
    start = time.perf_counter()
    args.deadline = start + args.budget_s
    model, model_kind = None, None

    def checkpoint(row):  # a run cut short by a time limit still leaves what it measured
        args.out.write_text(json.dumps(dict(result, runs=result["runs"] + [row]), indent=1) + "\n")

    args.checkpoint = checkpoint
    for kind, size in runs:
        if time.perf_counter() > args.deadline:
            result["skipped"].append(f"{kind} {size}: time budget ({args.budget_s:.0f} s) spent")
            continue
        if kind != model_kind:
            model = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            model, model_kind = build_transformer(kind, MODELS[kind][2 if args.smoke else 1], device, dtype), kind
        result["runs"].append(run_config(model, kind, size, args, device, dtype))
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"[{time.perf_counter() - start:6.1f} s] {kind} {size} done", flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result["runs"]))
    for line in result["skipped"]:
        print("skipped:", line)


if __name__ == "__main__":
    main()
