"""Head-wise against layer-wise read at one exact target rather than between the curves' targets.

benchmarks/quality.py draws each curve through targets 0.1 apart and reads 0.5 / 0.6 / 0.7 by linear
interpolation, which misread FLUX's head - layer at 0.6 by about 0.01 (oracle_heads.py). Here the
recommended search (generation budget, step and head sensitivity, the committed measurement) runs
at exactly one target for both granularities under one cache mode, and both plans are scored like
quality.py (held-out prompts x seeds, SSIM against full attention, paired bootstrap over prompts).

    PYTHONPATH=src python exact_target.py OUT.json --kind sd3 --target 0.6 --cache auto --embeddings emb.pt
    (other prompts: embeddings from quality.py --save-embeddings E.pt --heldout-seed 4242, then
    --embeddings E.pt --heldout-seed 4242 --seeds 5,6)
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q
from e2e import environment
from oracle_heads import recommended_search, score_paired, testbed
from ditfastattn import calibrate


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--kind", default="sd3")
    p.add_argument("--target", type=float, default=0.6)
    p.add_argument("--cache", default="auto")
    p.add_argument("--candidates", default="AA+OC", choices=list(q.SETS), help="the candidate set (quality.py's SETS)")
    p.add_argument("--add", default="", help="semicolon-separated candidates added to the set, e.g. arrow:0.75")
    p.add_argument("--fit-prompts", default="2", help="SearchConfig.fit_prompts, or 'all'")
    p.add_argument("--sensitivity-folder", type=Path, default=None,
                   help="at a step count without the committed measurement: measure once for both granularities, "
                        "kept in (and read from) this folder as quality.py --sensitivity does")
    add_run_arguments(p)
    args = p.parse_args()
    started = time.perf_counter()
    pipe, cal, held, seeds = run_inputs(args)
    candidates = q.SETS[args.candidates] + tuple(name for name in args.add.split(";") if name)
    fit_prompts = None if args.fit_prompts == "all" else int(args.fit_prompts)
    base = recommended_search(args.kind, args.steps, args.target, cache=args.cache, candidates=candidates,
                              fit_prompts=fit_prompts)
    if base.sensitivity == "measure" and args.sensitivity_folder is not None:
        untargeted = dataclasses.replace(base, target_sparsity=None)  # the measuring pass runs no search after it
        measured, _ = q.measured_sensitivity(pipe, args.kind, cal, untargeted, args.sensitivity_folder)
        base = dataclasses.replace(base, sensitivity=measured)
    plans, seconds = {}, {}
    for gran in ("head", "layer"):
        t0 = time.perf_counter()
        plans[gran] = calibrate(pipe, cal, dataclasses.replace(base, granularity=gran), progress=False)
        seconds[gran] = round(time.perf_counter() - t0, 1)
        print(gran, plans[gran].summary()["sparsity"], plans[gran].provenance["search"]["cache"], seconds[gran], flush=True)
    scored, ssim, differences = score_paired(pipe, plans, held, args.steps, seeds, [("head", "layer")])
    meta = {**environment(torch.device(args.device)), "kind": args.kind, "target": args.target, "cache": args.cache,
            "candidates": args.candidates, "added": args.add, "steps": args.steps, "heldout": len(held),
            "heldout_seed": args.heldout_seed, "seeds": seeds, "fit_prompts": args.fit_prompts,
            "calibration_seconds": seconds, "seconds": round(time.perf_counter() - started, 1)}
    write_result(args.out, meta, plans, scored, ssim, differences,
                 {k: {"cache": plan.provenance["search"]["cache"]} for k, plan in plans.items()})


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The testbed run's arguments: steps, held-out prompts and seeds, embeddings, device."""
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--heldout", type=int, default=16)
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--heldout-seed", type=int, default=2026, help="grammar seed of the held-out prompts")
    p.add_argument("--embeddings", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run_inputs(args):
    """(pipeline, the 8 calibration prompts, the held-out prompts, the seeds) of :func:`add_run_arguments`'s."""
    pipe = testbed(args.kind, args.embeddings, args.device)
    held = q.heldout_prompts(args.heldout_seed)[: args.heldout]
    return pipe, q.calibration_prompts(8, args.heldout_seed), held, [int(s) for s in args.seeds.split(",")]


def write_result(out: Path, meta: dict, plans, scored, ssim, differences, extra: dict) -> None:
    """Write the run's JSON (each plan's sparsity, mean SSIM and PSNR with its ``extra`` fields, the paired
    differences, per-prompt SSIM, the plans' methods) and print its plans and differences."""
    result = {
        "meta": meta,
        "plans": {k: {"sparsity": r["sparsity"], "ssim": float(np.mean(r["ssim"])), "psnr": float(np.mean(r["psnr"])),
                      **extra[k]} for k, r in scored.items()},
        "differences": differences,
        "per_prompt_ssim": {k: v.tolist() for k, v in ssim.items()},
        "methods": {k: plan.methods for k, plan in plans.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result))
    print(json.dumps({k: result[k] for k in ("plans", "differences")}, indent=1))

if __name__ == "__main__":
    main()
