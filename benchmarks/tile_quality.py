"""Tile windows against the 1-D band at matched attention sparsity, on the bundled testbeds (issue 19).

- Images (``sd3``, ``flux``: 32 x 32 patches, tiles of 1 x 8 x 16, so 4 x 2 tiles; the band's blocks
  are 4 patch rows): the recommended head-wise search (generation budget + step sensitivity, each
  curve drawn through target sparsities) with the 1-D arrow band as its windows, against the same
  search with 2-D tile windows, and with both. Same full and cache candidates, same sensitivity
  measurement (taken once with the band's candidates; its "arrow" step weights weigh every window),
  same everything else (``SearchConfig(sensitivity="measure")`` weighs tiles by a band probe too).
- Video (``video``: 8 frames x 16 x 16 patches, tiles of 2 x 8 x 8, so 4 x 2 x 2 tiles; a band block
  is half a frame; ``video-large``: 8 x 32 x 32, 4 x 4 x 4 tiles, a band block a strip of 4 patch
  rows, an eighth of a frame): 3-D tiles against the 1-D band, head-wise and layer-wise, uniform windows
  (one window for every head after step 0, no search), a step cache alone (every k-th step
  computes, the others reuse every head's output), and tiles and band under ``cache="auto"``,
  head- and layer-wise (the README's recommended search: caching per head or per whole step,
  whichever final output is nearer). Per-frame SSIM / PSNR and the PSNR of the frame-to-frame changes
  (``ditfastattn.evaluation.video_scores``) against full attention.

Every plan is scored on held-out prompts x seeds against full attention; curves are interpolated
at matched sparsity with 95% bootstrap intervals over prompts, paired between curves
(``benchmarks/quality.py``'s statistics). Each kind writes ``tile_quality_<kind>.json`` under
``--out``; the table (``tile_quality.md``) and the plot (``tile_quality.png``) are rendered from all
of them there, so kinds can run in separate commands.

    PYTHONPATH=src python benchmarks/tile_quality.py --save-embeddings .carry/tile_embeddings.pt   # CPU: the encoder
    PYTHONPATH=src python benchmarks/tile_quality.py --device cuda --kinds sd3,flux --embeddings .carry/tile_embeddings.pt
    PYTHONPATH=src python benchmarks/tile_quality.py --device cuda --kinds video --embeddings .carry/tile_embeddings.pt
    PYTHONPATH=src python benchmarks/tile_quality.py --device cuda --kinds video-large --dtype bf16 \
        --embeddings .carry/tile_embeddings.pt

Curves can run as separate processes side by side (``--curves``), sharing one sensitivity
measurement (``--sensitivity FOLDER``: the first run writes it, the others read it; ``--measure-only``
takes it and stops, so that the curves' runs can start after it), and be merged
afterwards: ``--merge RUN_FOLDER ... --out FOLDER`` writes the merged JSON and renders it.

Smoke check on the CPU (minutes; ``--untrained-video`` runs a video kind's code on random weights
when its trained ones are not bundled):

    PYTHONPATH=src python benchmarks/tile_quality.py --steps 4 --prompts 2 --heldout 2 --seeds 1 \\
        --targets 0.4,0.6 --resamples 50 --kinds sd3,video --untrained-video --out /tmp/tile_smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from quality import (AT, CURVE_TARGETS, SETS, STEP_CACHE_PERIODS, applied, differences, heldout_prompts, images, matched,
                     measured_sensitivity, score_plans, step_cache_plan, use_embeddings)

import ditfastattn
from ditfastattn import Plan, SearchConfig, calibrate
from ditfastattn.evaluation import video_scores
from ditfastattn.testbed import load_pipeline, load_prompts
from ditfastattn.testbed import video_data
from ditfastattn.testbed.models import (DEFAULT_CONFIGS, LARGE_VIDEO_KIND, VIDEO_FRAME_SIZES, VIDEO_KIND, build_transformer,
                                        is_video)
from ditfastattn.testbed.pipeline import PIPELINES, SCHEDULER_CONFIG, WEIGHTS_DIR

IMAGE_KINDS = ("sd3", "flux")
VIDEO_TEXT = 32
FULL_CACHE = ("full", "cache")
# The band as quality.py searches it on the 8 image blocks; the image tiles: the query's own
# 8 x 16 tile (the band's 1/8), its column of 3 tiles (5/16) and of 5 (7/16), then whole rows of
# 1 and 3 tiles (1/4, 5/8): about the band's densities, in square and wide shapes.
IMAGE_BAND = tuple(m for m in SETS["AA+OC"] if m not in FULL_CACHE)
IMAGE_TILES = ("tile:0,0,0", "tile:0,0.34,0", "tile:0,0.67,0", "tile:0,0,1", "tile:0,0.34,1")
UNIFORM_BAND = ("arrow:0.75", "arrow:0.5", "arrow:0.375", "arrow:0.25", "arrow:0.125")


@dataclasses.dataclass(frozen=True)
class VideoWindows:
    """The windows a video kind's searches choose from and its uniform windows."""

    band: tuple[str, ...]
    tiles: tuple[str, ...]
    uniform_tiles: tuple[str, ...]


VIDEO_WINDOWS = {
    # Bands of 1, 3, 5 and 9 half-frame blocks; tiles of one 2 x 8 x 8 tile (1/16), +-1 tile in
    # time (5/32), the whole frame pair (1/4), the same place across the clip (1/4), and a frame
    # pair's neighbourhood +-1 in time with the whole frame (5/8).
    VIDEO_KIND: VideoWindows(
        band=("arrow:0.0625", "arrow:0.125", "arrow:0.25", "arrow:0.5"),
        tiles=("tile:0,0,0", "tile:0.34,0,0", "tile:0,1,1", "tile:1,0,0", "tile:0.34,1,1"),
        uniform_tiles=("tile:0.67,1,1", "tile:0.34,1,1", "tile:0,1,1", "tile:0.34,0,0", "tile:0,0,0"),
    ),
    # 64 blocks of 4 patch rows, 4 x 4 x 4 tiles. Bands of 3, 5, 9, 17 and 33 blocks (0.05-0.5 of
    # the image pairs); tiles from one tile (1/64), +-1 in time (0.04), +-1 in rows and cols (0.10),
    # +-1 along all three (0.24), to the whole frame pair (1/4) and it +-1 in time (0.63): uniform
    # windows showed that this model wants whole frames, which compact tiles alone do not give.
    LARGE_VIDEO_KIND: VideoWindows(
        band=("arrow:0.03125", "arrow:0.0625", "arrow:0.125", "arrow:0.25", "arrow:0.5"),
        tiles=("tile:0,0,0", "tile:0.34,0,0", "tile:0,0.34,0.34", "tile:0.34,0.34,0.34", "tile:0,1,1",
               "tile:0.34,1,1"),
        uniform_tiles=("tile:0.67,0.67,0.67", "tile:0.34,1,1", "tile:0.34,0.67,0.67", "tile:0.34,0.34,0.67",
                       "tile:0,1,1", "tile:0.34,0.34,0.34"),
    ),
}
STEPPED = {"head_coefficient": None, "budget": "generation"}


def video_grid(kind: str) -> tuple[int, int, int]:
    """A video kind's token grid: frames x rows x cols of its patches."""
    config = DEFAULT_CONFIGS[kind]
    side = VIDEO_FRAME_SIZES[kind] // config["patch_size"]
    return video_data.FRAMES // config["patch_size_t"], side, side


def searched_curves(kind: str) -> dict[str, dict]:
    """Name -> SearchConfig changes of every searched curve of ``kind``. The "no cache" curves
    compare the window shapes alone: with cache, the search may spend most of a target on it."""
    if kind in IMAGE_KINDS:
        return {
            "head-wise, 1-D band": {"candidates": FULL_CACHE + IMAGE_BAND},
            "head-wise, 2-D tiles": {"candidates": FULL_CACHE + IMAGE_TILES},
            "head-wise, 2-D tiles + 1-D band": {"candidates": FULL_CACHE + IMAGE_TILES + IMAGE_BAND},
            "head-wise, 1-D band, no cache": {"candidates": ("full",) + IMAGE_BAND},
            "head-wise, 2-D tiles, no cache": {"candidates": ("full",) + IMAGE_TILES},
        }
    windows = VIDEO_WINDOWS[kind]
    return {
        "head-wise, 3-D tiles": {"candidates": FULL_CACHE + windows.tiles},
        "head-wise, 1-D band": {"candidates": FULL_CACHE + windows.band},
        "layer-wise, 3-D tiles": {"candidates": FULL_CACHE + windows.tiles, "granularity": "layer"},
        "layer-wise, 1-D band": {"candidates": FULL_CACHE + windows.band, "granularity": "layer"},
        "head-wise, 1-D band, no cache": {"candidates": ("full",) + windows.band},
        "head-wise, 3-D tiles, no cache": {"candidates": ("full",) + windows.tiles},
        "head-wise, 3-D tiles + 1-D band": {"candidates": FULL_CACHE + windows.tiles + windows.band},
        "head-wise, 3-D tiles, cache auto": {"candidates": FULL_CACHE + windows.tiles, "cache": "auto"},
        "head-wise, 1-D band, cache auto": {"candidates": FULL_CACHE + windows.band, "cache": "auto"},
        "head-wise, 3-D tiles + 1-D band, cache auto": {"candidates": FULL_CACHE + windows.tiles + windows.band,
                                                        "cache": "auto"},
        "layer-wise, 3-D tiles, cache auto": {"candidates": FULL_CACHE + windows.tiles, "cache": "auto",
                                              "granularity": "layer"},
        "layer-wise, 1-D band, cache auto": {"candidates": FULL_CACHE + windows.band, "cache": "auto",
                                             "granularity": "layer"},
    }


# Paired differences reported: (first, second) curve names, first minus second.
COMPARISONS = {
    "image": [("head-wise, 2-D tiles", "head-wise, 1-D band"), ("head-wise, 2-D tiles + 1-D band", "head-wise, 1-D band"),
              ("head-wise, 2-D tiles, no cache", "head-wise, 1-D band, no cache")],
    "video": [("head-wise, 3-D tiles", "head-wise, 1-D band"), ("head-wise, 3-D tiles + 1-D band", "head-wise, 1-D band"),
              ("head-wise, 3-D tiles + 1-D band", "head-wise, 3-D tiles"),
              ("head-wise, 3-D tiles, no cache", "head-wise, 1-D band, no cache"),
              ("head-wise, 3-D tiles", "layer-wise, 3-D tiles"),
              ("head-wise, 1-D band", "layer-wise, 1-D band"), ("head-wise, 3-D tiles", "uniform 3-D tile"),
              ("head-wise, 3-D tiles", "uniform 1-D band"), ("uniform 3-D tile", "uniform 1-D band"),
              ("head-wise, 3-D tiles", "step cache"), ("head-wise, 1-D band", "step cache"),
              ("head-wise, 3-D tiles, cache auto", "head-wise, 1-D band, cache auto"),
              ("head-wise, 3-D tiles, cache auto", "head-wise, 3-D tiles"),
              ("head-wise, 3-D tiles, cache auto", "step cache"),
              ("head-wise, 3-D tiles, cache auto", "layer-wise, 3-D tiles, cache auto"),
              ("head-wise, 1-D band, cache auto", "layer-wise, 1-D band, cache auto"),
              ("head-wise, 3-D tiles + 1-D band, cache auto", "head-wise, 3-D tiles, cache auto"),
              ("head-wise, 3-D tiles + 1-D band, cache auto", "head-wise, 1-D band, cache auto")],
}
METRICS = {"image": ("ssim", "psnr"), "video": ("ssim", "psnr", "temporal_psnr")}


def family(kind: str) -> str:
    return "image" if kind in IMAGE_KINDS else "video"


# --- prompts -----------------------------------------------------------------------------------

def video_heldout_prompts(seed: int, count: int = 16) -> list[str]:
    """``count`` video captions from the grammar with ``seed``, none of them a calibration prompt."""
    calibration = set(video_data.load_prompts("calibration"))
    return [c for c in video_data.sample_captions(4 * count, seed=seed) if c not in calibration][:count]


def prompts_of(kind: str, args) -> tuple[list[str], list[str]]:
    """(calibration prompts, held-out prompts) of ``kind``."""
    if kind in IMAGE_KINDS:
        return load_prompts("calibration")[: args.prompts], heldout_prompts(args.heldout_seed)[: args.heldout]
    return video_data.load_prompts("calibration")[: args.prompts], video_heldout_prompts(args.heldout_seed)[: args.heldout]


def save_embeddings(path: Path, heldout_seed: int) -> None:
    """Token states of every prompt both families use, for ``--embeddings`` (quality.py's format)."""
    from ditfastattn.testbed.text import encode_prompts

    texts = (load_prompts("calibration") + heldout_prompts(heldout_seed) + video_data.load_prompts("calibration")
             + video_heldout_prompts(heldout_seed) + [""])
    texts = list(dict.fromkeys(texts))
    states, pooled = encode_prompts(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"prompts": texts, "states": states, "pooled": pooled}, path)
    print(f"{len(texts)} prompt embeddings -> {path}")


# --- scoring -----------------------------------------------------------------------------------

def videos(pipe, prompts, steps, seed) -> torch.Tensor:
    out = pipe(prompt=prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt")
    return out.frames


def score_videos(pipe, plans: dict[str, Plan], prompts, steps, references) -> dict[str, dict]:
    """Per plan: sparsity, per-prompt SSIM / PSNR over frames and temporal PSNR (means over seeds,
    PSNRs capped at 100 dB as identical frames give inf), and the per-frame means."""
    rows = {}
    for name, plan in plans.items():
        with applied(pipe, plan):
            scores = [video_scores(videos(pipe, prompts, steps, seed), reference) for seed, reference in references.items()]
        mean = {key: torch.stack([s[key] for s in scores]).clamp(max=100.0).mean(dim=0) for key in scores[0]}
        rows[name] = {
            "sparsity": plan.summary()["sparsity"],
            "ssim": mean["ssim"].mean(dim=1).tolist(),
            "psnr": mean["psnr"].mean(dim=1).tolist(),
            "temporal_psnr": mean["temporal_psnr"].tolist(),
            "ssim_per_frame": mean["ssim"].mean(dim=0).tolist(),
            "psnr_per_frame": mean["psnr"].mean(dim=0).tolist(),
        }
    return rows


def uniform_plans(kind: str, pipe, steps: int) -> dict[str, dict[str, Plan]]:
    """The video's baselines without a search: group -> {name: plan}; every head after step 0 on
    one window, or every head cached at all steps but every k-th."""
    windows = VIDEO_WINDOWS[kind]
    layout = {"text_len": VIDEO_TEXT, "grid": video_grid(kind)}

    def uniform(method):
        return Plan.uniform(pipe.transformer, steps, method, **layout)

    return {"uniform 1-D band": {f"uniform {m}": uniform(m) for m in UNIFORM_BAND},
            "uniform 3-D tile": {f"uniform {m}": uniform(m) for m in windows.uniform_tiles},
            "step cache": {f"step cache, every {k}": step_cache_plan(pipe.transformer, steps, k, **layout)
                           for k in STEP_CACHE_PERIODS}}


# --- one kind ----------------------------------------------------------------------------------

def untrained(kind: str) -> bool:
    return is_video(kind) and not (WEIGHTS_DIR / f"{kind}.safetensors").is_file()


def load(kind: str, args):
    if untrained(kind):
        if not args.untrained_video:
            return None
        torch.manual_seed(0)  # random weights: only the code path is checked
        transformer = build_transformer(kind).to(args.device, args.dtype).eval()
        pipe = PIPELINES[kind](transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG))
    else:
        pipe = load_pipeline(kind, device=args.device, dtype=args.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(kind: str, args, save) -> dict | None:
    """Calibrate and score every curve of ``kind``; ``save(result)`` after each, so a run cut short
    keeps what it finished. None when the kind has no weights (the video testbed before training)."""
    pipe = load(kind, args)
    if pipe is None:
        print(f"  {kind}: no trained weights in {WEIGHTS_DIR} (train with `python -m ditfastattn.testbed.training.train "
              f"--kind {kind}`, or pass --untrained-video for a smoke check): skipped", flush=True)
        return None
    image = kind in IMAGE_KINDS
    calibration, heldout = prompts_of(kind, args)
    band = IMAGE_BAND if image else VIDEO_WINDOWS[kind].band
    base = SearchConfig(num_inference_steps=args.steps, candidates=FULL_CACHE + band, seed=0, sensitivity=None,
                        cache="head")
    generate = images if image else videos
    sensitivity, seconds = measured_sensitivity(pipe, kind, calibration, base, args.sensitivity)
    result = {"plans": {}, "groups": {}, "targets": {}, "calibration_seconds": {}, "sensitivity": sensitivity,
              "sensitivity_seconds": seconds}
    print(f"  {kind} sensitivity measured in {result['sensitivity_seconds']} s", flush=True)
    if args.measure_only:
        return result
    references = {seed: generate(pipe, heldout, args.steps, seed) for seed in args.seeds}
    score = score_plans if image else score_videos

    def add(group, plans):
        """Score ``plans`` into ``group`` (a searched curve grows a target at a time) and save."""
        result["plans"].update(score(pipe, plans, heldout, args.steps, references))
        result["groups"].setdefault(group, []).extend(plans)
        save(result)
        print(f"  {kind} {group}: sparsities {[round(result['plans'][n]['sparsity'], 3) for n in plans]}", flush=True)

    if not image:
        for group, plans in uniform_plans(kind, pipe, args.steps).items():
            if args.curves is None or group in args.curves:
                add(group, plans)
    for curve, changes in searched_curves(kind).items():
        if args.curves is not None and curve not in args.curves:
            continue
        result["calibration_seconds"][curve] = 0.0
        for target in args.targets:
            started = time.perf_counter()
            try:
                config = dataclasses.replace(base, target_sparsity=target, sensitivity=sensitivity, **STEPPED, **changes)
                plan = calibrate(pipe, calibration, config, progress=False)
            except ValueError as err:  # beyond what these candidates remove: the curve ends before it
                if "out of reach" not in str(err):
                    raise
                print(f"  {kind} {curve}, target {target:g}: {err}", flush=True)
                continue
            result["calibration_seconds"][curve] = round(
                result["calibration_seconds"][curve] + time.perf_counter() - started, 1)
            result["targets"][f"{curve}, target {target}"] = {
                "target": target, "sparsity": plan.summary()["sparsity"],
                "methods": sorted({m for rows in plan.methods for heads in rows for m in heads}),
                "cache": plan.provenance["search"]["cache"],
            }
            add(curve, {f"{curve}, target={target:g}": plan})
    return result


# --- tables and plot ---------------------------------------------------------------------------

def statistics(kind: str, result: dict, resamples: int) -> dict:
    """Matched-sparsity values and paired differences of every metric, from a result's plan rows."""
    rows, groups = result["plans"], result["groups"]
    for metric in METRICS[family(kind)]:
        stats = matched(rows, groups, metric, resamples)
        result[metric] = stats["curves"]
        result[f"{metric}_differences"] = {
            f"{a} - {b}": differences(stats["values"], a, b) for a, b in COMPARISONS[family(kind)] if a in groups and b in groups
        }
    return result


def markdown(metas: dict[str, dict], results: dict) -> str:
    lines = [
        "Tile windows against the 1-D band. Searched curves: generation budget + step sensitivity through each "
        "kind's target sparsities. Values at matched attention sparsity against full attention [95% bootstrap "
        "interval over prompts]; differences are paired.",
        "",
    ]

    def cell(value, digits):
        return "-" if value is None else f"{value['mean']:.{digits}f} [{value['low']:.{digits}f}, {value['high']:.{digits}f}]"

    header = ["| curve | " + " | ".join(map(str, AT)) + " |", "|---" * (len(AT) + 1) + "|"]
    for kind, result in results.items():
        run = metas[kind]
        lines += [f"**{kind}**: {run['device']}, {run['date']}, {run.get('dtype', 'float32')}, {run['steps']} steps, "
                  f"{run['calibration_prompts']} calibration prompts, {run['heldout']} held-out prompts (grammar seed "
                  f"{run['heldout_seed']}) x seeds {run['seeds']}, targets {run['targets']}.", ""]
        if result.get("untrained"):
            lines += [f"**{kind}: random weights (smoke check), not a quality result.**", ""]
        for metric in METRICS[family(kind)]:
            digits = 3 if metric == "ssim" else 1
            lines += [f"### {kind}: {metric} at sparsity", ""] + header
            lines += [f"| {curve} | " + " | ".join(cell(per[str(at)], digits) for at in AT) + " |"
                      for curve, per in result[metric].items()]
            lines += ["", f"### {kind}: {metric} differences", ""] + header
            lines += [f"| {name} | " + " | ".join(cell(per[str(at)], digits) for at in AT) + " |"
                      for name, per in result[f"{metric}_differences"].items()]
            lines.append("")
        lines += [f"### {kind}: targets", "", "| curve, target | sparsity | methods chosen |", "|---|---|---|"]
        # Runs before the caching mode was recorded show none.
        lines += [f"| {name} | {row['sparsity']:.3f} | {', '.join(row['methods'])}"
                  f"{'; caching per ' + row['cache'] if 'cache' in row else ''} |" for name, row in result["targets"].items()]
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(len(METRICS[family(kind)]) for kind in results)
    fig, axes = plt.subplots(rows, len(results), figsize=(6 * len(results), 4 * rows), squeeze=False)
    for column, (kind, result) in enumerate(results.items()):
        for row, metric in enumerate(METRICS[family(kind)]):
            axis = axes[row][column]
            for curve, names in result["groups"].items():
                points = sorted((result["plans"][n]["sparsity"], np.mean(result["plans"][n][metric])) for n in names)
                style = ("o-" if "tile" in curve else "s--") if curve.startswith("head") else (
                    "^:" if curve.startswith("layer") else "x-.")
                axis.plot(*zip(*points), style, label=curve, markersize=4)
            axis.set_title(f"{kind} testbed" + (" (random weights)" if result.get("untrained") else ""))
            axis.set_xlabel("attention sparsity")
            axis.set_ylabel(f"{metric} vs full attention")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        for row in range(len(METRICS[family(kind)]), rows):
            axes[row][column].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(out: Path, resamples: int) -> None:
    """The table and the plot of every ``tile_quality_<kind>.json`` in ``out``."""
    loaded = {path.stem.removeprefix("tile_quality_"): json.loads(path.read_text())
              for path in sorted(out.glob("tile_quality_*.json"))}
    if not loaded:
        return
    results = {kind: statistics(kind, data["result"], resamples) for kind, data in loaded.items()}
    text = markdown({kind: data["meta"] for kind, data in loaded.items()}, results)
    (out / "tile_quality.md").write_text(text)
    plot(results, out / "tile_quality.png")
    print(text)


def merge(folders: list[Path], out: Path) -> None:
    """One ``tile_quality_<kind>.json`` per kind in ``out`` from runs of different ``--curves`` in
    ``folders`` (the same prompts, seeds and sensitivity): their curves together."""
    for kind in sorted({p.stem.removeprefix("tile_quality_") for f in folders for p in f.glob("tile_quality_*.json")}):
        parts = [json.loads(p.read_text()) for f in folders if (p := f / f"tile_quality_{kind}.json").is_file()]
        merged = parts[0]
        for part in parts[1:]:
            if part["meta"]["seeds"] != merged["meta"]["seeds"] or part["meta"]["heldout"] != merged["meta"]["heldout"]:
                raise SystemExit(f"{kind}: the runs scored different prompts or seeds; they cannot be merged")
            for key in ("plans", "groups", "targets", "calibration_seconds"):
                merged["result"][key].update(part["result"][key])
            merged["meta"]["seconds"] = max(merged["meta"]["seconds"], part["meta"]["seconds"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"tile_quality_{kind}.json").write_text(json.dumps(merged, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kinds", default="sd3,flux,video")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=8, help="calibration prompts (the bundled ones)")
    parser.add_argument("--heldout", type=int, default=16, help="held-out prompts")
    parser.add_argument("--heldout-seed", type=int, default=2026, help="grammar seed of the held-out prompts")
    parser.add_argument("--seeds", default="1,2", help="generation seeds")
    parser.add_argument("--targets", default=",".join(map(str, CURVE_TARGETS)), help="target sparsities of each curve")
    parser.add_argument("--curves", default=None, help="';'-separated curve names to run (default: all)")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--untrained-video", action="store_true",
                        help="run a video kind without bundled weights on random ones (a smoke check)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="the testbed's dtype (bf16 runs the GPU kernels as at full size)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--sensitivity", type=Path, default=None,
                        help="folder of sensitivity measurements: read when it holds this kind's, else written there "
                             "(so that commands running different --curves share one)")
    parser.add_argument("--measure-only", action="store_true",
                        help="take the sensitivity measurement (into --sensitivity) and stop")
    parser.add_argument("--embeddings", type=Path, default=None, help="precomputed prompt embeddings")
    parser.add_argument("--save-embeddings", type=Path, default=None, help="write them and stop")
    parser.add_argument("--render", action="store_true", help="only render the table and plot from --out's JSON files")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="merge the JSON files of these folders (runs of different --curves) into --out, then render")
    args = parser.parse_args()
    if args.save_embeddings:
        save_embeddings(args.save_embeddings, args.heldout_seed)
        return
    if args.merge:
        merge(args.merge, args.out)
    if args.render or args.merge:
        render(args.out, args.resamples)
        return
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.targets = [float(t) for t in args.targets.split(",")]
    args.curves = None if args.curves is None else {c.strip() for c in args.curves.split(";")}
    args.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    kinds = args.kinds.split(",")
    unknown = sorted(set(kinds) - set(IMAGE_KINDS) - set(VIDEO_FRAME_SIZES))
    if unknown:
        parser.error(f"unknown kinds {unknown}; choose from {IMAGE_KINDS + tuple(VIDEO_FRAME_SIZES)}")
    if args.embeddings:
        use_embeddings(args.embeddings)
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        started = time.perf_counter()
        def save(result, kind=kind, started=started, untrained=untrained(kind)):
            meta = {
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
                "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
                "triton": importlib.metadata.version("triton"),
                "ditfastattn": ditfastattn.__version__, "steps": args.steps, "calibration_prompts": args.prompts,
                "heldout": args.heldout, "heldout_seed": args.heldout_seed, "seeds": args.seeds,
                "targets": args.targets, "seconds": round(time.perf_counter() - started, 1),
                "dtype": str(args.dtype).removeprefix("torch."),
                "commit": os.environ.get("BENCH_COMMIT"),  # the device's copy of the tree has no .git
            }
            payload = {"meta": meta, "result": {**result, "untrained": untrained}}
            (args.out / f"tile_quality_{kind}.json").write_text(json.dumps(payload, indent=1))

        run(kind, args, save)
    if not args.measure_only:
        render(args.out, args.resamples)


if __name__ == "__main__":
    main()
