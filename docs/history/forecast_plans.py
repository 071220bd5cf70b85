"""The recommended search's plans caching per step, scored with their cached steps forecast from
the last two computed steps (``forecast_cache.Forecast``, linear in the step index) against reused
as the library does (CPU).

    PYTHONPATH=src python docs/history/forecast_plans.py flux OUT.json --targets 0.6,0.7 --granularities head,layer
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "docs/history")
import quality as q  # noqa: E402
from ditfastattn import calibrate  # noqa: E402
from forecast_cache import Forecast  # noqa: E402
from oracle_heads import recommended_search, testbed  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("kind")
    parser.add_argument("out")
    parser.add_argument("--targets", default="0.6,0.7")
    parser.add_argument("--granularities", default="head,layer")
    parser.add_argument("--embeddings", default=".carry/embeddings.pt")
    parser.add_argument("--heldout-seed", type=int, default=2026)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    pipe = testbed(args.kind, Path(args.embeddings), "cpu")
    held = q.heldout_prompts(args.heldout_seed)
    cal = q.calibration_prompts(8, 2026)
    steps, seeds = args.steps, [int(s) for s in args.seeds.split(",")]
    hooks = Forecast(pipe)
    refs = {seed: hooks.run(held, steps, seed, (), "reuse") for seed in seeds}
    rows = []
    for target in (float(t) for t in args.targets.split(",")):
        for granularity in args.granularities.split(","):
            started = time.perf_counter()
            plan = calibrate(pipe, cal, recommended_search(args.kind, steps, target, granularity=granularity),
                             progress=False)
            searched = time.perf_counter() - started
            cached = [s for s in range(steps) if all(m == "cache" for row in plan.methods[s] for m in row)]
            sparsity = plan.summary()["sparsity"]
            scores = {}
            with q.applied(pipe, plan):
                for mode in ("reuse", "step"):
                    per = [q.per_image(hooks.run(held, steps, seed, cached, mode), refs[seed]) for seed in seeds]
                    scores[mode] = [np.mean([p[i] for p in per], 0) for i in (0, 1)]
            diff = scores["step"][0] - scores["reuse"][0]
            boot = np.random.default_rng(0).integers(0, len(diff), (10000, len(diff)))
            lo, hi = np.percentile(diff[boot].mean(1), [2.5, 97.5])
            rows.append({"target": target, "granularity": granularity, "sparsity": sparsity, "cached_steps": cached,
                         "search_s": searched, "ssim_reuse": scores["reuse"][0].tolist(),
                         "ssim_forecast": scores["step"][0].tolist(), "psnr_reuse": float(scores["reuse"][1].mean()),
                         "psnr_forecast": float(scores["step"][1].mean()), "difference": float(diff.mean()),
                         "interval": [float(lo), float(hi)]})
            print(f"{args.kind} {target} {granularity}: sparsity {sparsity:.3f}, cached {cached}, SSIM reuse "
                  f"{scores['reuse'][0].mean():.4f} forecast {scores['step'][0].mean():.4f} "
                  f"({diff.mean():+.4f} [{lo:+.4f}, {hi:+.4f}])", flush=True)
            Path(args.out).write_text(json.dumps({"kind": args.kind, "steps": steps, "seeds": seeds, "rows": rows},
                                                 indent=1))


if __name__ == "__main__":
    main()
