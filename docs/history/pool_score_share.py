"""Candidates scored on a part of the batch against on all of it, at one target.

A pass with pool:2 and pool:4 among the candidates took 1.24x / 1.30x plain denoising at FLUX.1-dev
size (1024² / 2048², 8 prompts), against 1.15x without: their own attention. Since then the search
scores them on every SCORE_STRIDE-th batch element, rotating with the layer and step, scaled to the
batch by each head's variance (ratio estimate); stop 58 sampled the pool candidates only, stop 59
every candidate that runs its own attention (the arrows too). Here the recommended search
(head-wise, cache="auto") with ``--candidates`` runs at one target once per stride (1: the whole
batch), and the plans are scored like quality.py, paired over the held-out prompts.

    PYTHONPATH=src python pool_score_share.py OUT.json --kind flux --target 0.7 --strides 1,4 --candidates AA+OC --embeddings emb.pt
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q
from e2e import environment
from exact_target import add_run_arguments, run_inputs, write_result
from oracle_heads import recommended_search, score_paired
from ditfastattn import _calibration_session, calibrate


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--kind", default="flux")
    p.add_argument("--target", type=float, default=0.7)
    p.add_argument("--cache", default="auto")
    p.add_argument("--strides", default="1,4", help="SCORE_STRIDE values; the first is the baseline")
    p.add_argument("--candidates", default="AA+OC+PK", choices=sorted(q.SETS))
    add_run_arguments(p)
    args = p.parse_args()
    started = time.perf_counter()
    pipe, cal, held, seeds = run_inputs(args)
    strides = [int(s) for s in args.strides.split(",")]
    config = recommended_search(args.kind, args.steps, args.target, cache=args.cache, candidates=q.SETS[args.candidates])
    plans, seconds = {}, {}
    for stride in strides:
        _calibration_session.SCORE_STRIDE = stride
        t0 = time.perf_counter()
        name = f"stride {stride}"
        plans[name] = calibrate(pipe, cal, dataclasses.replace(config), progress=False)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(name, plans[name].summary()["sparsity"], plans[name].provenance["search"]["cache"], seconds[name], flush=True)
    names = list(plans)
    scored, ssim, differences = score_paired(pipe, plans, held, args.steps, seeds, [(n, names[0]) for n in names[1:]])
    meta = {**environment(torch.device(args.device)), "kind": args.kind, "target": args.target, "cache": args.cache,
            "candidates": args.candidates, "strides": strides, "steps": args.steps, "heldout": len(held),
            "heldout_seed": args.heldout_seed, "seeds": seeds, "calibration_seconds": seconds,
            "seconds": round(time.perf_counter() - started, 1)}
    extra = {name: {"cache": plan.provenance["search"]["cache"],
                    "pool_share": sum(m.startswith("pool:") for row in plan.methods for layer in row for m in layer)
                    / sum(len(layer) for row in plan.methods for layer in row)}
             for name, plan in plans.items()}
    write_result(args.out, meta, plans, scored, ssim, differences, extra)


if __name__ == "__main__":
    main()
