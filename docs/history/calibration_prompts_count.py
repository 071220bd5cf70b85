"""Does calibrating on more prompts help head-wise plans more than layer-wise ones?

The recommended search (generation budget, step and head sensitivity, caching per step) at one
target on a testbed, calibrated on 32 prompts, against the plans of the same search on the 8
bundled prompts (read from an oracle_heads.py result), all scored in the same run like
benchmarks/quality.py (held-out prompts x seeds, SSIM against full attention, paired bootstrap).

    PYTHONPATH=src python calibration_prompts_count.py OUT.json --eight results/oracle_heads_flux_0.7.json --embeddings emb32.pt
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
from ditfastattn import Plan, calibrate


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--eight", type=Path, required=True, help="oracle_heads.py result holding the 8-prompt plans")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--embeddings", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    started = time.perf_counter()
    eight = json.loads(args.eight.read_text())
    kind, target, steps, seeds = eight["meta"]["kind"], eight["meta"]["target"], eight["meta"]["steps"], eight["meta"]["seeds"]
    pipe = testbed(kind, args.embeddings, args.device)
    cal = q.calibration_prompts(args.prompts, 2026)
    held = q.heldout_prompts(2026)[: eight["meta"]["heldout"]]
    base = recommended_search(kind, steps, target)
    plans, seconds = {}, {}
    for gran in ("head", "layer"):
        t0 = time.perf_counter()
        plans[f"{gran}, {args.prompts} prompts"] = calibrate(pipe, cal, dataclasses.replace(base, granularity=gran), progress=False)
        seconds[gran] = round(time.perf_counter() - t0, 1)
        print(gran, plans[f"{gran}, {args.prompts} prompts"].summary()["sparsity"], seconds[gran], flush=True)
    model = next(iter(plans.values())).model
    for gran in ("head", "layer"):
        plans[f"{gran}, 8 prompts"] = Plan(model, eight["methods"][gran], {"source": str(args.eight)})
    n = args.prompts
    scored, ssim, differences = score_paired(pipe, plans, held, steps, seeds, [
        (f"head, {n} prompts", f"layer, {n} prompts"), ("head, 8 prompts", "layer, 8 prompts"),
        (f"head, {n} prompts", "head, 8 prompts"), (f"layer, {n} prompts", "layer, 8 prompts")])
    result = {
        "meta": {**environment(torch.device(args.device)), "kind": kind, "target": target, "steps": steps,
                 "heldout": len(held), "seeds": seeds,
                 "calibration_seconds": seconds, "seconds": round(time.perf_counter() - started, 1)},
        "plans": {k: {"sparsity": r["sparsity"], "ssim": float(np.mean(r["ssim"])), "psnr": float(np.mean(r["psnr"]))}
                  for k, r in scored.items()},
        "differences": differences,
        "per_prompt_ssim": {k: v.tolist() for k, v in ssim.items()},
        "methods": {k: p.methods for k, p in plans.items() if k.endswith(f"{n} prompts")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result))
    print(json.dumps({k: result[k] for k in ("plans", "differences")}, indent=1))


if __name__ == "__main__":
    main()
