"""How close ``SearchConfig(target_sparsity=...)`` lands, on the bundled trained testbeds.

Calibrates each testbed at each target with the recommended search (one budget over the
generation, scores weighted by measured step and layer sensitivity; head-wise, and layer-wise as
the baseline) and prints the sparsity reached against the target. No images are generated.

    PYTHONPATH=src python benchmarks/targets.py --device cuda --steps 20 --prompts 8 --out benchmarks/results \
        --embeddings EMB.pt   # the prompts' states from quality.py --save-embeddings, on a GPU machine without the encoder
    PYTHONPATH=src python benchmarks/targets.py --steps 12 --prompts 2    # CPU, about 20 minutes

The sensitivity is measured once per testbed (about steps + layers passes), or read from a
quality run with ``--sensitivity benchmarks/results/quality.json`` (its step count must match).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import time
from pathlib import Path

import diffusers
import torch

import ditfastattn
from ditfastattn import SearchConfig, calibrate
from ditfastattn.testbed import load_pipeline, load_prompts

# The quality benchmark's candidates: at 1024 image tokens the paper's 1/8..1/32 windows are all one block.
CANDIDATES = ("full", "cache", "arrow:0.5", "arrow:0.25", "arrow:0.125")
TARGETS = (0.3, 0.35, 0.5, 0.75, 0.85)


def sensitivity_of(kind: str, pipe, prompts, base: SearchConfig, source: Path | None) -> dict:
    if source is not None:
        sensitivity = json.loads(source.read_text())["results"][kind]["sensitivity"]
        steps = len(next(iter(sensitivity["steps"].values())))
        if steps != base.num_inference_steps:
            raise SystemExit(f"{source} holds {kind} step weights for {steps} steps, not {base.num_inference_steps}: "
                             f"pass --steps {steps}, or leave --sensitivity out to measure")
        return sensitivity
    measured = calibrate(pipe, prompts, dataclasses.replace(base, delta=0.0, sensitivity="measure"), progress=False)
    return measured.provenance["search"]["sensitivity"]


def run(kind: str, args) -> list[dict]:
    pipe = load_pipeline(kind, device=args.device, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompts = load_prompts("calibration")[: args.prompts]
    base = SearchConfig(num_inference_steps=args.steps, candidates=CANDIDATES, budget="generation", head_coefficient=None,
                        cache="head")
    sensitivity = sensitivity_of(kind, pipe, prompts, base, args.sensitivity)
    rows = []
    for granularity in args.granularities:
        for target in args.targets:
            config = dataclasses.replace(base, target_sparsity=target, sensitivity=sensitivity, granularity=granularity)
            started = time.perf_counter()
            plan = calibrate(pipe, prompts, config, progress=False)
            search = plan.provenance["search"]
            row = {
                "kind": kind, "granularity": granularity, "target": target, "sparsity": plan.summary()["sparsity"],
                "predicted": search["predicted_sparsity"], "fitted_delta": search["delta"],
                "seconds": round(time.perf_counter() - started, 1),
            }
            row["miss"] = row["sparsity"] - target
            rows.append(row)
            print(f"{kind} {granularity}-wise, target {target:.2f}: reached {row['sparsity']:.3f} (miss {row['miss']:+.3f}; "
                  f"first pass predicted {row['predicted']:.3f}) in {row['seconds']} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kinds", default="sd3,flux")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=8, help="calibration prompts (the bundled ones)")
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)))
    parser.add_argument("--granularities", default="head,layer")
    parser.add_argument("--sensitivity", type=Path, default=None, help="a quality.json whose measured sensitivity to reuse")
    parser.add_argument("--out", type=Path, default=None, help="folder for targets.json")
    parser.add_argument("--embeddings", type=Path, default=None,
                        help="precomputed prompt embeddings (quality.py --save-embeddings), for machines without the encoder")
    args = parser.parse_args()
    if args.embeddings is not None:
        from quality import use_embeddings

        use_embeddings(args.embeddings)
    args.targets = [float(t) for t in args.targets.split(",")]
    args.granularities = args.granularities.split(",")
    started = time.perf_counter()
    rows = [row for kind in args.kinds.split(",") for row in run(kind, args)]
    worst = max(abs(row["miss"]) for row in rows)
    print(f"largest miss {worst:.3f} over {len(rows)} plans")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "ditfastattn": ditfastattn.__version__, "steps": args.steps,
            "calibration_prompts": args.prompts, "candidates": CANDIDATES,
            "sensitivity": str(args.sensitivity) if args.sensitivity else "measured",
            "seconds": round(time.perf_counter() - started, 1),
        }
        (args.out / "targets.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
