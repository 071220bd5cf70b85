"""Command line: ``ditfastattn demo | calibrate | generate | evaluate | inspect``.

Bad input exits 2 with one line on stderr, found before any long work; an interrupt exits 130
quietly. Every output is checked before the work starts and written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from ._files import folder_reason, output_target, unwritable_reason
from .ops import IMPLEMENTATIONS

TESTBED_PREFIX = "testbed:"
TESTBED_DIR = Path(__file__).resolve().parent / "testbed"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
# Formats PIL writes without extra plugins, by extension.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF", ".gif": "GIF"}


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


# The library's errors name the keyword arguments that fix them; at the command line, the flags do.
_FLAGS = (
    (r"\bhead_coefficient=None\b", "--head-coefficient none"),
    (r"\bnum_inference_steps=(\d+)", r"--steps \1"),
    (r"\bnum_image_tokens=", "--num-image-tokens "),
    (r"\bgrid=\(frames, rows, cols\)", "--grid F,R,C"),
    (r"\bbudget='(\w+)'", r"--budget \1"),
    (r"\bcache='(\w+)'", r"--cache \1"),
    (r"\bsensitivity='([\w+]+)'", r"--sensitivity \1"),
    (r"\bfit_prompts=None\b", "--fit-prompts all"),
    (r"\btarget_sparsity\b", "--target-sparsity"),
    (r"\btarget_speedup\b", "--target-speedup"),
    (r"\bguidance_scale\b", "--guidance-scale"),
)


def _as_flags(message: str) -> str:
    for pattern, flag in _FLAGS:
        message = re.sub(pattern, flag, message)
    return message


# flag types -------------------------------------------------------------------------------
def _number(kind, *, minimum=None, above=None, below=None):
    """An argparse type: an int or a finite float within the given bounds."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}; got {text}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be > {above}; got {text}")
        if below is not None and not value < below:
            raise argparse.ArgumentTypeError(f"must be < {below}; got {text}")
        return value

    return parse


def _head_coefficient(text: str) -> float | str | None:
    named = {"none": None, "auto": "auto"}
    return named[text.lower()] if text.lower() in named else _number(float, above=0)(text)


def _fit_prompts(text: str) -> int | None:
    return None if text.lower() == "all" else _POSITIVE(text)


def _deltas(text: str) -> list[float]:
    """Comma-separated budgets, each finite and >= 0, none repeated (each names one plan and row)."""
    parse = _number(float, minimum=0)
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"give comma-separated numbers without empty entries; got {text!r}")
    deltas = [parse(item) for item in items]
    names = [f"{delta:g}" for delta in deltas]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{', '.join(repeated)} given more than once; list each delta once")
    return deltas


def _candidates(text: str) -> tuple[str, ...]:
    # A tile window's name holds commas itself (tile:0,0.5,0.5): a method name starts with a letter.
    items = tuple(item.strip() for item in re.split(r",(?=\s*[A-Za-z])", text))
    if not all(items) or any(item.endswith(",") for item in items):
        raise argparse.ArgumentTypeError(
            f"give comma-separated method names without empty entries (e.g. full,cache,arrow:0.125,tile:0,0.5,0.5); "
            f"got {text!r}"
        )
    return items


def _triple(text: str) -> tuple[int, int, int]:
    """Three positive ints, comma-separated: a grid or a tile shape (frames, rows, cols)."""
    parse = _number(int, minimum=1)
    items = [item.strip() for item in text.split(",")]
    if len(items) != 3:
        raise argparse.ArgumentTypeError(f"give frames,rows,cols as three comma-separated integers; got {text!r}")
    return tuple(parse(item) for item in items)


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty")
    return text


_POSITIVE = _number(int, minimum=1)
_SEED = _number(int, minimum=0, below=2**63)


# helpers ----------------------------------------------------------------------------------
def _can_write_in(folder: Path) -> str | None:
    """None when a file can be made in ``folder`` (tried: permissions, read-only mounts, root), else why not."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as err:
        return err.strerror or str(err)


def _output_file(path: str | Path, flag: str, formats: dict[str, str] | None = None) -> Path:
    """Check an output file before any long work, so nothing fails (or is written) half-way."""
    if not str(path).strip():
        raise CliError(f"{flag} needs a file name")
    if str(path).endswith(("/", os.sep)):
        raise CliError(f"{flag} {path} names a folder; give a file name")
    path = Path(path)
    reason = _name_too_long(path)  # first: asking about a name past the limit raises
    if reason is not None:
        raise CliError(f"cannot write {path}: {reason}")
    if path.is_dir():
        raise CliError(f"{flag} {path} is a directory; give a file name")
    if formats is not None and path.suffix.lower() not in formats:
        raise CliError(f"{flag} {path}: give a file name ending in one of {', '.join(sorted(formats))}")
    reason = unwritable_reason(path)
    if reason is not None:
        raise CliError(f"cannot write {path}: {reason}")
    target = output_target(path)  # as the output is written: through a link, to its file
    reason = folder_reason(target) or _can_write_in(target.parent) or _name_too_long(target)
    if reason is not None:
        raise CliError(f"cannot write {path}: {reason}")
    return path


def _name_too_long(path: Path) -> str | None:
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such limit to ask for here
        return None
    if len(os.fsencode(path.name)) > limit:
        return f"its name is longer than the {limit} bytes this file system allows"
    return None


def _output_dir(path: str | Path, flag: str) -> Path:
    """Check an output folder (made later, parents included) before any long work."""
    if not str(path).strip():
        raise CliError(f"{flag} needs a folder name")
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CliError(f"{flag} {path}: {existing} exists and is not a folder")
    reason = _can_write_in(existing)
    if reason is not None:
        raise CliError(f"{flag} {path}: cannot write in {existing}: {reason}")
    return path


def _figure_formats() -> dict[str, str]:
    from .visualize import picture_formats

    return {f".{ext}": ext for ext in picture_formats()}


def _distinct(*paths: Path | None, what: str = "two outputs") -> None:
    resolved = [p.resolve() for p in paths if p is not None]
    if len(set(resolved)) != len(resolved):
        raise CliError(f"{what} name the same file; give each its own path")


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise CliError(f"prompts file {path} does not exist" if not path.exists() else f"prompts file {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise CliError(f"prompts file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise CliError(f"cannot read prompts file {path}: {err.strerror}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise CliError(f"prompts file {path} has no prompts (one per line)")
    return prompts


def _load_plan(path: str | Path, flag: str = "plan"):
    from .plan import Plan

    if not str(path).strip():
        raise CliError(f"{'--plan' if flag == 'plan' else flag} needs a file name")
    try:
        return Plan.load(path)
    except (OSError, ValueError) as err:
        raise CliError(f"{flag}: {err}") from None


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CliError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
    if device.type not in DEVICE_TYPES:
        raise CliError(f"--device {name}: ditfastattn runs on {', '.join(DEVICE_TYPES)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as err:
        raise CliError(f"--device {name} cannot be used here: {str(err).splitlines()[0]}") from None
    return str(device)


def _dtype_name(args, device: str) -> str:
    """The testbed and the CPU default to fp32 (bf16 there is slow, and casting the testbed warns); GPUs to bf16."""
    if args.dtype != "auto":
        return args.dtype
    return "fp32" if args.model.startswith(TESTBED_PREFIX) or device == "cpu" else "bf16"


def _torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def _check_impl(impl: str, device: str, dtype: str, head_dims=None) -> None:
    from .ops import impl_unsupported

    reason = impl_unsupported(impl, device, _torch_dtype(dtype), head_dims)
    if reason is not None:
        raise CliError(f"--impl {impl} cannot run here: {reason}; use --impl auto")


def _testbed_kind(model: str) -> str | None:
    if not model.startswith(TESTBED_PREFIX):
        return None
    from .testbed.models import KINDS

    kind = model[len(TESTBED_PREFIX) :]
    if kind not in KINDS:
        raise CliError(f"--model {model}: no such testbed; choose {', '.join(TESTBED_PREFIX + k for k in KINDS)}")
    return kind


def _check_size(args, pipe=None) -> None:
    """Heights and widths the model takes: the testbed's before loading it, SD3's once loaded."""
    sizes = {name: getattr(args, name) for name in ("height", "width") if getattr(args, name) is not None}
    if pipe is None and _testbed_kind(args.model):
        bad = {name: value for name, value in sizes.items() if value % 4 or value > 64}
        if bad:
            raise CliError(f"the testbed takes heights and widths that are multiples of 4 up to 64; got {bad}")
    elif pipe is not None and isinstance(getattr(pipe, "patch_size", None), int):  # SD3 pipelines refuse others
        multiple = pipe.vae_scale_factor * pipe.patch_size
        bad = {name: value for name, value in sizes.items() if value % multiple}
        if bad:
            raise CliError(f"{type(pipe).__name__} takes heights and widths that are multiples of {multiple}; got {bad}")


def load_model(model: str, device: str, dtype: str):
    """A diffusers pipeline from a hub id or local folder, or ``testbed:sd3`` / ``testbed:flux``."""
    from .adapters import adapter_for

    kind = _testbed_kind(model)
    if kind is not None:
        from diffusers.utils import logging as diffusers_logging

        from .testbed.pipeline import load_pipeline
        from .testbed.text import get_text_encoder

        # Casting the testbed warns that modules should stay in float32, listing none: it has none.
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            pipe = load_pipeline(kind, device=device, dtype=_torch_dtype(dtype))
        finally:
            diffusers_logging.set_verbosity(verbosity)
        get_text_encoder(str(pipe._execution_device))  # loaded now, not inside the first pass's progress bar
    else:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=_torch_dtype(dtype))
        except (OSError, ValueError) as err:
            raise CliError(f"cannot load the pipeline {model!r}: {err}") from err
        pipe = pipe.to(device)
    try:
        adapter_for(getattr(pipe, "transformer", None))
    except TypeError as err:
        raise CliError(f"--model {model}: {err}") from None
    return pipe


def _prepare(args, check=None):
    """The model loaded, with everything about it checked that would fail later: device, dtype,
    implementation, sizes, then the command's own ``check(pipe)``."""
    device = _device(args.device)
    dtype = _dtype_name(args, device)
    _check_impl(args.impl, device, dtype)
    _check_size(args)
    pipe = load_model(args.model, device, dtype)
    _check_size(args, pipe)
    from .adapters import adapter_for

    adapter = adapter_for(pipe.transformer)
    _check_impl(args.impl, device, dtype, [layer.head_dim for layer in adapter.describe(pipe.transformer).layers])
    if check is not None:
        check(pipe)
    return pipe


def _check_cfg(pipe, method_names, guidance_scale) -> None:
    """cfg_share methods need CFG as one batch: a family that batches it, and guidance above 1."""
    from .adapters import adapter_for, check_cfg_sharing
    from .methods import parse_method

    if not any(parse_method(name).shares_cfg for name in method_names):
        return
    try:
        check_cfg_sharing(adapter_for(pipe.transformer), method_names, pipe)
    except ValueError as err:
        raise CliError(str(err)) from None
    if guidance_scale is not None and guidance_scale <= 1:
        raise CliError(f"cfg_share methods need classifier-free guidance; --guidance-scale {guidance_scale:g} turns "
                       "it off (give more than 1, or drop the cfg_share methods)")


def _format_summary(summary: dict, per_layer: bool = True) -> str:
    grid = ""
    if summary["grid"] is not None:
        grid = f" (grid {' x '.join(map(str, summary['grid']))} in tiles of {' x '.join(map(str, summary['tile']))})"
    lines = [
        f"attention sparsity   {summary['sparsity']:.1%}  (ideal attention speed-up {summary['speedup_estimate']:.2f}x)",
        f"geometry             {summary['num_image_tokens']} image tokens{grid}, {summary['text_len']} text tokens",
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
    from .visualize import plot_plan

    png = _output_file(args.png, "--png", _figure_formats()) if args.png is not None else None
    _distinct(Path(args.plan), png, what="the plan and --png")
    plan = _load_plan(args.plan)
    print(f"{plan!r}")
    provenance = plan.provenance
    unknown = "(not recorded)"
    print(f"made by ditfastattn {provenance.get('library_version', unknown)} on {provenance.get('date', unknown)} "
          f"({provenance.get('source', 'source not recorded')})")
    search = provenance.get("search")
    if search:
        candidates = ", ".join(map(str, search.get("candidates") or []))
        print(f"search: delta={search.get('delta')}, c={search.get('head_coefficient')}, candidates={candidates}")
    if provenance.get("expert_switch_steps"):
        print(f"second expert (transformer_2) from step {', '.join(map(str, provenance['expert_switch_steps']))}")
    geometry = {"num_image_tokens": args.num_image_tokens, "text_len": args.text_len, "grid": args.grid,
                "tile": args.tile}
    try:
        summary = plan.summary(**geometry)
    except ValueError as err:
        raise CliError(f"{err} (inspect takes --num-image-tokens, --text-len, --grid and --tile)") from err
    print(_format_summary(summary))
    if png:
        plot_plan(plan, png, **geometry)
        print(f"heatmap: {png}")


def _sensitivity(value: str):
    """One of ``sensitivity.MODES``, ``none`` (no weights), or a calibrated plan whose sensitivity
    measurement is reused."""
    from .sensitivity import MODES

    if not value.strip():
        raise CliError(f"--sensitivity needs one of {', '.join((*MODES, 'none'))}, or a plan file")
    if value == "none":
        return None
    if value in MODES:
        return value
    if not Path(value).exists():
        raise CliError(f"--sensitivity: {value!r} is none of {', '.join((*MODES, 'none'))}, nor a plan file")
    weights = _load_plan(value, "--sensitivity").provenance.get("search", {}).get("sensitivity")
    if not weights:
        raise CliError(f"--sensitivity: {value} holds no sensitivity measurement; calibrate with --sensitivity measure")
    return weights


def _search_config(args):
    from .search_config import SearchConfig

    common = {
        "delta": args.delta,
        "head_coefficient": args.head_coefficient,
        "budget": args.budget,
        "granularity": args.granularity,
        "cache": getattr(args, "cache", "head"),  # calibrate only: evaluate sweeps bare deltas
        "num_inference_steps": args.steps,
        "height": args.height,
        "width": args.width,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "impl": args.impl,
        "target_sparsity": getattr(args, "target_sparsity", None),
        "target_speedup": getattr(args, "target_speedup", None),
        "fit_prompts": getattr(args, "fit_prompts", SearchConfig.fit_prompts),  # calibrate only
        "sensitivity": _sensitivity(args.sensitivity),
    }
    try:
        if args.candidates is not None:
            return SearchConfig(candidates=args.candidates, **common)
        return SearchConfig.from_method_set(args.method_set, **common)
    except (TypeError, ValueError) as err:
        raise CliError(str(err)) from err


def cmd_calibrate(args) -> None:
    from .calibration import calibrate
    from .visualize import plot_plan

    prompts = read_prompts(args.prompts)
    if hasattr(args, "fit_prompts") and args.target_sparsity is None and args.target_speedup is None:
        raise CliError("--fit-prompts sizes a target's first pass: give --target-sparsity or --target-speedup, or drop it")
    output = _output_file(args.output, "-o")
    png = _output_file(args.png, "--png", _figure_formats()) if args.png is not None else None
    sensitivity_file = Path(args.sensitivity) if Path(args.sensitivity).is_file() else None
    _distinct(Path(args.prompts), sensitivity_file, output, png, what="--prompts, --sensitivity, -o and --png")
    config = _search_config(args)
    pipe = _prepare(args, lambda pipe: _check_cfg(pipe, config.candidates, args.guidance_scale))
    start = time.perf_counter()
    try:
        plan = calibrate(pipe, prompts, config)
    except (ValueError, NotImplementedError) as err:  # what the search refuses once it sees the model
        raise CliError(str(err)) from err
    elapsed = time.perf_counter() - start
    plan.save(output)
    print(f"calibrated in {elapsed:.1f} s on {len(prompts)} prompts; plan written to {output}")
    search = plan.provenance["search"]
    if "cache_final_rse" in search:
        errors = ", ".join(f"per {mode} {error:.4g}" for mode, error in search["cache_final_rse"].items())
        print(f"cache auto: kept caching per {search['cache']} (final latents' relative squared error: {errors})")
    print(_format_summary(plan.summary(), per_layer=False))
    if png:
        plot_plan(plan, png)
        print(f"heatmap: {png}")


def cmd_generate(args) -> None:
    import torch

    from . import apply
    from ._files import write_atomically
    from .plan import PlanMismatchError

    output = _output_file(args.output, "-o", IMAGE_FORMATS)
    _distinct(Path(args.plan) if args.plan is not None else None, output, what="--plan and -o")
    plan = _load_plan(args.plan, "--plan") if args.plan is not None else None
    steps = args.steps or (plan.num_steps if plan else 28)
    if plan is not None:
        try:
            plan.check_compatible(plan.model, steps)
        except PlanMismatchError as err:
            raise CliError(str(err)) from None

    def check_plan(pipe):
        if plan is None:
            return
        _check_cfg(pipe, {m for rows in plan.methods for heads in rows for m in heads}, args.guidance_scale)
        try:
            apply(pipe, plan, impl=args.impl)
        except (PlanMismatchError, TypeError, ValueError) as err:
            raise CliError(str(err)) from err

    pipe = _prepare(args, check_plan)
    kwargs = {"guidance_scale": args.guidance_scale} if args.guidance_scale is not None else {}
    for name in ("height", "width"):  # the plan's size unless given, as its step count
        value = getattr(args, name) or (plan.provenance.get(name) if plan is not None else None)
        if value:
            kwargs[name] = value
    start = time.perf_counter()
    image = pipe(
        prompt=args.prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(args.seed), **kwargs
    ).images[0]
    elapsed = time.perf_counter() - start
    write_atomically(output, lambda tmp: image.save(tmp, format=IMAGE_FORMATS[output.suffix.lower()]))
    print(f"{output} in {elapsed:.2f} s ({'plan ' + args.plan if plan else 'full attention'})")


def cmd_evaluate(args) -> None:
    import json

    from ._files import write_atomically
    from .evaluation import delta_sweep, require_metrics

    try:
        require_metrics()
    except ImportError as err:
        raise CliError(str(err)) from None
    prompts = read_prompts(args.prompts)
    calibration_prompts = read_prompts(args.calibration_prompts)
    config = _search_config(args)
    out = _output_dir(args.out, "--out")
    if out.is_dir() and any(out.iterdir()):
        raise CliError(f"--out {out} is not empty; give a new folder (evaluate writes its images, plans and "
                       "results.json there, and an earlier run's left beside them would mix with them)")
    pipe = _prepare(args, lambda pipe: _check_cfg(pipe, config.candidates, args.guidance_scale))
    try:
        results, _ = delta_sweep(pipe, calibration_prompts, prompts, args.deltas, config, out_dir=out)
    except (ValueError, NotImplementedError) as err:  # what the search refuses once it sees the model
        raise CliError(str(err)) from err
    # Strict JSON: an image equal to the reference has an infinite PSNR, which JSON has no number for.
    text = json.dumps(_finite(results), indent=1, allow_nan=False)
    write_atomically(out / "results.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    # The table's columns are the numbers (a video's per-frame lists stay in results.json).
    columns = sorted({key for row in results.values() for key, value in row.items() if isinstance(value, (int, float))})
    print(f"{'':<14}" + "".join(f"{c:>18}" for c in columns))
    for name, row in results.items():
        print(f"{name:<14}" + "".join(f"{row[c]:>18.4f}" if isinstance(row.get(c), (int, float)) else f"{'-':>18}"
                                      for c in columns))
    print(f"images, plans and results.json in {out}")


def _finite(value):
    """``value`` with every non-finite float written as a string ("inf", "-inf", "nan")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def cmd_demo(args) -> None:
    from .demo import available_prompts, check_outputs, run_demo

    out = _output_dir(args.out, "--out")
    try:
        check_outputs(out)
    except ValueError as err:
        raise CliError(f"--out: {err}") from None
    limit = available_prompts()
    if args.num_prompts > limit:
        raise CliError(f"--num-prompts: the testbed bundles {limit} prompts of each kind; give at most {limit}")
    run_demo(out, delta=args.delta, steps=args.steps, num_prompts=args.num_prompts, device=_device(args.device))


# parser -----------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Bad flags: one line on stderr and exit 2 (the usage is what --help is for)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    # -v works before or after the subcommand: each subparser takes it too, defaulting to "not given".
    verbose = _Parser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log the library's info messages")
    parser = _Parser(prog="ditfastattn", description="Head-wise compressed attention for diffusers MMDiT pipelines",
                     formatter_class=_HelpFormatter, parents=[verbose])
    parser.add_argument("--version", action="version", version=f"ditfastattn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,calibrate,generate,evaluate,inspect}")

    def command(name, help_text):
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter,
                              parents=[verbose])

    demo = command("demo", "calibrate and compare on the bundled trained testbed (CPU, ~2 minutes)")
    demo.add_argument("--out", default="demo_out", help="folder for the grid PNG, the plan and its heatmap")
    demo.add_argument("--delta", type=_number(float, minimum=0), default=0.2, help="error budget per layer and step")
    demo.add_argument("--steps", type=_POSITIVE, default=20, help="denoising steps")
    demo.add_argument("--num-prompts", type=_POSITIVE, default=6, help="calibration and held-out prompts each")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.set_defaults(run=cmd_demo)

    def model_args(p, size_default="the model's"):
        p.add_argument("--model", required=True, help="diffusers id or local path, or testbed:sd3 / testbed:flux")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda when available)")
        p.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                       help="auto: fp32 for the testbed and on the CPU, else bf16")
        p.add_argument("--height", type=_POSITIVE, default=None, help=f"image height in pixels (default: {size_default})")
        p.add_argument("--width", type=_POSITIVE, default=None, help=f"image width in pixels (default: {size_default})")
        p.add_argument("--guidance-scale", type=_number(float, minimum=0), default=None,
                       help="classifier-free guidance (default: the pipeline's)")
        p.add_argument("--seed", type=_SEED, default=0, help="seed of the generator")
        p.add_argument("--impl", choices=IMPLEMENTATIONS, default="auto", help="attention op implementation")

    def search_args(p):
        p.add_argument("--steps", type=_POSITIVE, default=50, help="denoising steps")
        p.add_argument("--head-coefficient", type=_head_coefficient, default="auto",
                       help="c of the per-head bound c * delta / heads, 'none', or 'auto' (1.5, the paper's, under "
                            "--budget layer; none under --budget generation, which takes no other)")
        p.add_argument("--budget", choices=["auto", "layer", "generation"], default="auto",
                       help="layer: delta bounds every layer at every step (the paper); generation: one exchange "
                            "rate over all layers and steps (delta is then a price; best with a target); auto: "
                            "generation with a target (unless --head-coefficient is a number), else layer")
        p.add_argument("--granularity", choices=["head", "layer"], default="head",
                       help="one method per head, or per layer (a baseline)")
        p.add_argument("--method-set", default="aa+oc",
                       help="aa, aa+oc, aa+oc+pk (pooled keys), aa+oc+cfg, aa+oc+rs, aa+oc+cfg+rs, ta+oc (tile "
                            "windows); tile windows and pooled keys need a model whose calls give the image grid")
        p.add_argument("--candidates", type=_candidates, default=None,
                       help="comma-separated methods (overrides --method-set)")
        p.add_argument("--sensitivity", default="auto",
                       help="'auto' (step weights from the scheduler's noise levels where it gives them, else "
                            "none), 'none' (the paper's search), "
                            "'measure' (probes: one pass per layer and one per step and kind of method), "
                            "'schedule' (step weights from the scheduler's noise levels, refused without them), "
                            "'measure+schedule' (layers probed, steps from the noise levels), or a "
                            "calibrated plan whose measurement to reuse")

    calibrate = command("calibrate", "search a head-wise plan")
    model_args(calibrate)
    search_args(calibrate)
    calibrate.add_argument("--prompts", required=True,
                           help="UTF-8 text file, one prompt per line (blank lines and lines starting with # skipped)")
    calibrate.add_argument("--delta", type=_number(float, minimum=0), default=0.2,
                           help="error budget per layer and step")
    calibrate.add_argument("--target-sparsity", type=_number(float, above=0, below=1), default=None,
                           help="reach this attention sparsity instead (two passes a search; --delta starts the first)")
    calibrate.add_argument("--target-speedup", type=_number(float, above=1), default=None,
                           help="or this ideal attention speed-up")
    calibrate.add_argument("--fit-prompts", type=_fit_prompts, default=argparse.SUPPRESS,
                           help="with a target, how many of the prompts the first pass (which only fits the budget) "
                                "runs, or 'all' (default: 1)")
    calibrate.add_argument("--cache", choices=["head", "step", "auto"], default="auto",
                           help="head: caching is chosen head by head; step: for every head of a step or none (needs a "
                                "target and --budget generation); auto: both where step applies, keeping the plan "
                                "nearer full attention (four passes instead of two), else head")
    calibrate.add_argument("-o", "--output", required=True, help="plan file (JSON)")
    calibrate.add_argument("--png", default=None, help="also draw the plan's heatmap here (.png, .pdf, .svg, ...)")
    calibrate.set_defaults(run=cmd_calibrate)

    generate = command("generate", "generate one image, with or without a plan")
    model_args(generate, "the plan's where it records one, else the model's")
    generate.add_argument("--plan", default=None, help="plan file (default: full attention)")
    generate.add_argument("--prompt", type=_text, required=True, help="the prompt")
    generate.add_argument("--steps", type=_POSITIVE, default=None, help="denoising steps (default: the plan's, else 28)")
    generate.add_argument("-o", "--output", required=True, help="image file (.png, .jpg, .webp, ...)")
    generate.set_defaults(run=cmd_generate)

    evaluate = command("evaluate", "calibrate per delta, then compare images with full attention")
    model_args(evaluate)
    search_args(evaluate)
    evaluate.add_argument("--prompts", required=True,
                          help="evaluation prompts, one per line (blank lines and lines starting with # skipped)")
    evaluate.add_argument("--calibration-prompts", required=True, help="calibration prompts, one per line (as --prompts)")
    evaluate.add_argument("--deltas", type=_deltas, default="0.2,0.6", help="comma-separated error budgets")
    evaluate.add_argument("--out", required=True, help="folder for images, plans and results.json")
    evaluate.set_defaults(run=cmd_evaluate, delta=0.2)  # the first pass's budget, which --deltas sweeps

    inspect = command("inspect", "summarise a plan and draw its heatmap")
    inspect.add_argument("plan", help="plan file")
    inspect.add_argument("--png", default=None, help="draw the heatmap here (.png, .pdf, .svg, ...)")
    inspect.add_argument("--num-image-tokens", type=_POSITIVE, default=None,
                         help="geometry for the sparsity (default: the plan's)")
    inspect.add_argument("--text-len", type=_number(int, minimum=0), default=None,
                         help="text tokens for the sparsity (default: the plan's)")
    inspect.add_argument("--grid", type=_triple, default=None, metavar="F,R,C",
                         help="image grid (frames,rows,cols of latent patches) that sizes tile: windows and "
                              "pool: keys (default: the plan's)")
    inspect.add_argument("--tile", type=_triple, default=None, metavar="T,H,W",
                         help="tile shape of tile: windows, T*H*W = 128 (default: the plan's, else of 2,8,8, "
                              "1,8,16 and 1,16,8 (one frame: the last two) the first that leaves the fewest pad "
                              "slots on the grid)")
    inspect.set_defaults(run=cmd_inspect)
    return parser


class _LogFormatter(logging.Formatter):
    """One "ditfastattn:" prefix per line, whether or not a message already names the library."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if message.startswith("ditfastattn") else f"ditfastattn: {message}"


@contextlib.contextmanager
def _library_log(verbose: bool):
    """The library's log on stderr while a command runs, printed above any progress bar (not inside
    it); the logger is left as it was found, for callers of :func:`main` in a larger program."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    logger = logging.getLogger("ditfastattn")
    saved = logger.level, logger.propagate
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
    try:
        with logging_redirect_tqdm(loggers=[logger]):
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, --version, or a bad flag (already reported in one line)
        return exit.code if isinstance(exit.code, int) else 2
    from .plan import PlanMismatchError

    try:
        with _library_log(getattr(args, "verbose", False)):
            args.run(args)
    except (CliError, PlanMismatchError) as err:
        print(f"ditfastattn {args.command}: error: {_as_flags(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `ditfastattn inspect plan.json | head`: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
