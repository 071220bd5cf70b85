"""Command line: ``ditfastattn demo | calibrate | generate | evaluate | inspect``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .ops import IMPLEMENTATIONS

TESTBED_PREFIX = "testbed:"
TESTBED_DIR = Path(__file__).resolve().parent / "testbed"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


# helpers ----------------------------------------------------------------------------------
def _writable(path: str | Path) -> Path:
    """Check an output path before any long work, so nothing fails (or is written) half-way."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise CliError(f"output path {path} is a directory; give a file name")
    if not parent.is_dir():
        raise CliError(f"cannot write {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CliError(f"cannot write {path}: permission denied")
    return path


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise CliError(f"prompts file {path} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise CliError(f"prompts file {path} has no prompts (one per line)")
    return prompts


def _torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def load_model(model: str, device: str, dtype: str):
    """A diffusers pipeline from a hub id or local folder, or ``testbed:sd3`` / ``testbed:flux``."""
    if model.startswith(TESTBED_PREFIX):
        from .testbed.pipeline import load_pipeline

        return load_pipeline(model[len(TESTBED_PREFIX) :], device=device, dtype=_torch_dtype(dtype))
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=_torch_dtype(dtype))
    except (OSError, ValueError) as err:
        raise CliError(f"cannot load the pipeline {model!r}: {err}") from err
    return pipe.to(device)


def _format_summary(summary: dict, per_layer: bool = True) -> str:
    lines = [
        f"attention sparsity   {summary['sparsity']:.1%}  (ideal attention speed-up {summary['speedup_estimate']:.2f}x)",
        f"geometry             {summary['num_image_tokens']} image tokens, {summary['text_len']} text tokens",
        "methods (share of head-steps):",
    ]
    lines += [f"  {name:<28}{share:7.1%}" for name, share in summary["method_share"].items()]
    lines.append("sparsity per step:")
    lines += [f"  step {step:>3}  {value:6.1%}" for step, value in enumerate(summary["sparsity_per_step"])]
    if per_layer:
        lines.append("sparsity per layer:")
        lines += [f"  {name:<40}{value:6.1%}" for name, value in summary["sparsity_per_layer"].items()]
    return "\n".join(lines)


# commands ---------------------------------------------------------------------------------
def cmd_inspect(args) -> None:
    from .plan import Plan
    from .visualize import plot_plan

    png = _writable(args.png) if args.png else None
    try:
        plan = Plan.load(args.plan)
    except (FileNotFoundError, ValueError) as err:
        raise CliError(str(err)) from err
    print(f"{plan!r}")
    provenance = plan.provenance
    print(f"made by ditfastattn {provenance.get('library_version')} on {provenance.get('date')} ({provenance.get('source')})")
    if "search" in provenance:
        search = provenance["search"]
        print(f"search: delta={search['delta']}, c={search['head_coefficient']}, candidates={', '.join(search['candidates'])}")
    try:
        summary = plan.summary(args.num_image_tokens, args.text_len)
    except ValueError as err:
        raise CliError(f"{err} (use --num-image-tokens and --text-len)") from err
    print(_format_summary(summary))
    if png:
        plot_plan(plan, png)
        print(f"heatmap: {png}")


def _sensitivity(value: str | None):
    """``measure``, or a calibrated plan whose measured layer weights are reused."""
    from .plan import Plan

    if value is None or value == "measure":
        return value
    try:
        weights = Plan.load(value).provenance.get("search", {}).get("sensitivity")
    except (FileNotFoundError, ValueError) as err:
        raise CliError(f"--sensitivity: {err}") from err
    if not weights:
        raise CliError(f"--sensitivity: {value} holds no measured layer weights; calibrate with --sensitivity measure")
    return weights


def _search_config(args):
    from .calibration import SearchConfig

    coefficient = None if str(args.head_coefficient).lower() == "none" else float(args.head_coefficient)
    common = {
        "delta": args.delta,
        "head_coefficient": coefficient,
        "num_inference_steps": args.steps,
        "height": args.height,
        "width": args.width,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "impl": args.impl,
        "target_sparsity": getattr(args, "target_sparsity", None),
        "target_speedup": getattr(args, "target_speedup", None),
        "sensitivity": _sensitivity(getattr(args, "sensitivity", None)),
    }
    try:
        if args.candidates:
            return SearchConfig(candidates=tuple(args.candidates.split(",")), **common)
        return SearchConfig.from_method_set(args.method_set, **common)
    except ValueError as err:
        raise CliError(str(err)) from err


def cmd_calibrate(args) -> None:
    from .calibration import calibrate
    from .visualize import plot_plan

    prompts = read_prompts(args.prompts)
    config = _search_config(args)
    output = _writable(args.output)
    png = _writable(args.png) if args.png else None
    pipe = load_model(args.model, _device(args.device), args.dtype)
    start = time.perf_counter()
    plan = calibrate(pipe, prompts, config)
    elapsed = time.perf_counter() - start
    plan.save(output)
    print(f"calibrated in {elapsed:.1f} s on {len(prompts)} prompts; plan written to {output}")
    print(_format_summary(plan.summary(), per_layer=False))
    if png:
        plot_plan(plan, png)
        print(f"heatmap: {png}")


def cmd_generate(args) -> None:
    import torch

    from . import apply
    from .plan import Plan, PlanMismatchError

    output = _writable(args.output)
    plan = None
    if args.plan:
        try:
            plan = Plan.load(args.plan)
        except (FileNotFoundError, ValueError) as err:
            raise CliError(str(err)) from err
    steps = args.steps or (plan.num_steps if plan else 28)
    pipe = load_model(args.model, _device(args.device), args.dtype)
    if plan is not None:
        try:
            apply(pipe, plan, impl=args.impl)
        except (PlanMismatchError, TypeError, ValueError) as err:
            raise CliError(str(err)) from err
    kwargs = {"guidance_scale": args.guidance_scale} if args.guidance_scale is not None else {}
    for name in ("height", "width"):
        if getattr(args, name):
            kwargs[name] = getattr(args, name)
    start = time.perf_counter()
    try:
        image = pipe(
            prompt=args.prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(args.seed), **kwargs
        ).images[0]
    except PlanMismatchError as err:
        raise CliError(str(err)) from err
    elapsed = time.perf_counter() - start
    image.save(output)
    print(f"{output} in {elapsed:.2f} s ({'plan ' + args.plan if plan else 'full attention'})")


def cmd_evaluate(args) -> None:
    import json

    from .evaluation import delta_sweep

    prompts = read_prompts(args.prompts)
    calibration_prompts = read_prompts(args.calibration_prompts)
    try:
        deltas = [float(d) for d in args.deltas.split(",")]
    except ValueError as err:
        raise CliError(f"--deltas must be comma-separated numbers; got {args.deltas!r}") from err
    config = _search_config(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a folder")
    pipe = load_model(args.model, _device(args.device), args.dtype)
    results, plans = delta_sweep(pipe, calibration_prompts, prompts, deltas, config, out_dir=out)
    for name, plan in plans.items():
        plan.save(out / f"plan_{name}.json")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    columns = sorted({key for row in results.values() for key in row})
    print(f"{'':<14}" + "".join(f"{c:>18}" for c in columns))
    for name, row in results.items():
        print(f"{name:<14}" + "".join(f"{row[c]:>18.4f}" if c in row else f"{'-':>18}" for c in columns))
    print(f"images, plans and results.json in {out}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), delta=args.delta, steps=args.steps, num_prompts=args.num_prompts, device=_device(args.device))


# parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="ditfastattn", description="Head-wise compressed attention for diffusers MMDiT pipelines")
    parser.add_argument("--version", action="version", version=f"ditfastattn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the library's info messages")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="calibrate and compare on the bundled trained testbed (CPU, ~2 minutes)")
    demo.add_argument("--out", default="demo_out", help="folder for the grid PNG, the plan and its heatmap")
    demo.add_argument("--delta", type=float, default=0.2)
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--num-prompts", type=int, default=6, help="calibration and held-out prompts each")
    demo.add_argument("--device", default=None)
    demo.set_defaults(run=cmd_demo)

    def model_args(p):
        p.add_argument("--model", required=True, help="diffusers id or local path, or testbed:sd3 / testbed:flux")
        p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
        p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
        p.add_argument("--height", type=int, default=None)
        p.add_argument("--width", type=int, default=None)
        p.add_argument("--guidance-scale", type=float, default=None)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--impl", choices=IMPLEMENTATIONS, default="auto")

    calibrate = sub.add_parser("calibrate", help="search a head-wise plan")
    model_args(calibrate)
    calibrate.add_argument("--prompts", required=True, help="text file, one prompt per line")
    calibrate.add_argument("--delta", type=float, default=0.2, help="error budget per layer and step")
    calibrate.add_argument("--target-sparsity", type=float, default=None,
                           help="reach this attention sparsity instead (two passes; --delta starts the first)")
    calibrate.add_argument("--target-speedup", type=float, default=None, help="or this ideal attention speed-up")
    calibrate.add_argument("--sensitivity", default=None,
                           help="'measure' (one extra pass per layer) or a plan whose measured layer weights to reuse")
    calibrate.add_argument("--steps", type=int, default=50)
    calibrate.add_argument("--head-coefficient", default="1.5", help="c of the per-head bound, or 'none'")
    calibrate.add_argument("--method-set", default="aa+oc", help="aa, aa+oc, aa+oc+cfg, aa+oc+rs, aa+oc+cfg+rs")
    calibrate.add_argument("--candidates", default=None, help="comma-separated methods (overrides --method-set)")
    calibrate.add_argument("-o", "--output", required=True)
    calibrate.add_argument("--png", default=None, help="also draw the plan's heatmap here")
    calibrate.set_defaults(run=cmd_calibrate)

    generate = sub.add_parser("generate", help="generate one image, with or without a plan")
    model_args(generate)
    generate.add_argument("--plan", default=None)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--steps", type=int, default=None, help="default: the plan's step count")
    generate.add_argument("-o", "--output", required=True)
    generate.set_defaults(run=cmd_generate)

    evaluate = sub.add_parser("evaluate", help="calibrate per delta, then compare images with full attention")
    model_args(evaluate)
    evaluate.add_argument("--prompts", required=True, help="evaluation prompts, one per line")
    evaluate.add_argument("--calibration-prompts", required=True)
    evaluate.add_argument("--deltas", default="0.2,0.6", help="comma-separated RSE budgets")
    evaluate.add_argument("--delta", type=float, default=0.2, help=argparse.SUPPRESS)
    evaluate.add_argument("--steps", type=int, default=50)
    evaluate.add_argument("--head-coefficient", default="1.5")
    evaluate.add_argument("--method-set", default="aa+oc")
    evaluate.add_argument("--candidates", default=None)
    evaluate.add_argument("--out", required=True, help="folder for images, plans and results.json")
    evaluate.set_defaults(run=cmd_evaluate)

    inspect = sub.add_parser("inspect", help="summarise a plan and draw its heatmap")
    inspect.add_argument("plan")
    inspect.add_argument("--png", default=None)
    inspect.add_argument("--num-image-tokens", type=int, default=None)
    inspect.add_argument("--text-len", type=int, default=None)
    inspect.set_defaults(run=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        args.run(args)
    except CliError as err:
        print(f"ditfastattn {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
