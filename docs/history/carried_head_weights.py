"""Under caching per step, weigh a head's window at a computed step by the cached step after it too?

With ``cache="step"`` a step cached whole reuses every head's output of the step before, so a
window's error at a computed step s is also in step s + 1's output. Here the head weights (Fisher)
of each computed step followed by a cached one become that step's plus the cached step's, each
times its step's window weight, renormalised to a mean of 1 over the layer's heads. Step and layer
weights stay as measured, so only how a layer's budget is shared among its heads moves, and only
head-wise plans can change. The recommended search at one target, scored like
benchmarks/quality.py against the 8-prompt head- and layer-wise plans of an oracle_heads.py result.

    PYTHONPATH=src python carried_head_weights.py OUT.json --plans results/oracle_heads_flux_0.7.json --embeddings emb.pt
"""
import argparse
import copy
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
from oracle_heads import committed_sensitivity, recommended_search, score_paired, testbed
from ditfastattn import Plan, calibrate


def carried(sensitivity: dict, cached: list[int]) -> dict:
    """``sensitivity`` with each computed step's head weights mixed with the next step's where that one is cached."""
    windows = np.array(sensitivity["steps"]["arrow"])
    result = copy.deepcopy(sensitivity)
    for name, rows in result["heads"].items():
        weights = np.array(sensitivity["heads"][name])
        for step in range(1, len(rows) - 1):
            if step not in cached and step + 1 in cached:
                mix = windows[step] * weights[step] + windows[step + 1] * weights[step + 1]
                rows[step] = (mix / mix.mean()).tolist()
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--plans", type=Path, required=True, help="oracle_heads.py result holding the 8-prompt plans")
    p.add_argument("--embeddings", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    started = time.perf_counter()
    given = json.loads(args.plans.read_text())
    kind, target, steps, seeds = given["meta"]["kind"], given["meta"]["target"], given["meta"]["steps"], given["meta"]["seeds"]
    pipe = testbed(kind, args.embeddings, args.device)
    cal = q.calibration_prompts(8, 2026)
    held = q.heldout_prompts(2026)[: given["meta"]["heldout"]]
    cached = [s for s in range(steps) if given["methods"]["head"][s][0][0] == "cache"]
    config = recommended_search(kind, steps, target, granularity="head",
                                sensitivity=carried(committed_sensitivity(kind, steps), cached))
    t0 = time.perf_counter()
    plans = {"head, carried head weights": calibrate(pipe, cal, config, progress=False)}
    calibration_seconds = round(time.perf_counter() - t0, 1)
    model = plans["head, carried head weights"].model
    for gran in ("head", "layer"):
        plans[gran] = Plan(model, given["methods"][gran], {"source": str(args.plans)})
    scored, ssim, differences = score_paired(pipe, plans, held, steps, seeds, [
        ("head, carried head weights", "head"), ("head, carried head weights", "layer"), ("head", "layer")])
    result = {
        "meta": {**environment(torch.device(args.device)), "kind": kind, "target": target, "steps": steps,
                 "heldout": len(held), "seeds": seeds, "cached_steps": cached,
                 "calibration_seconds": calibration_seconds, "seconds": round(time.perf_counter() - started, 1)},
        "plans": {k: {"sparsity": r["sparsity"], "ssim": float(np.mean(r["ssim"])), "psnr": float(np.mean(r["psnr"]))}
                  for k, r in scored.items()},
        "differences": differences,
        "per_prompt_ssim": {k: v.tolist() for k, v in ssim.items()},
        "methods": {"head, carried head weights": plans["head, carried head weights"].methods},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result))
    print(json.dumps({k: result[k] for k in ("plans", "differences")}, indent=1))


if __name__ == "__main__":
    main()
