"""Step sensitivity from the scheduler's sigmas instead of probes (lab script, issue 16).

The measured step weights of the arrow probe (``benchmarks/results/quality.json``) follow the
squared step size of the flow-matching schedule on both testbeds: weight / (sigma_s - sigma_{s+1})²
stays within 0.6-1.8x of its median over all 19 steps (the weights themselves span 300x). An Euler
step adds ``(sigma_s - sigma_{s+1})`` times the velocity's error to the latents, and what happens
to it afterwards varies little. If the search weighted each step's scores by that alone, it would
need none of the probes' ``layers + 2 x steps`` passes.

One target, head-wise, one error budget over the generation, no per-head bound, caching per head
(``--cache``): plans with no sensitivity, the committed measurement (steps, layers and heads), its
step weights alone, step weights from the schedule, and the measurement's layer and head weights
with or without the schedule's step weights (``--variants``); scored like quality.py, paired.

    PYTHONPATH=src python schedule_sensitivity.py OUT.json --kind flux --target 0.6 --embeddings emb.pt

Results (CPU, 2026-12-05): ``results/schedule_sensitivity_*_cpu.json``; the library took both ways
in as ``SearchConfig(sensitivity="schedule")`` and ``"measure+schedule"`` (CALIBRATION_NOTES.md).
"""
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402
from e2e import environment  # noqa: E402
from exact_target import write_result  # noqa: E402
from oracle_heads import committed_sensitivity, recommended_search, score_paired  # noqa: E402
from pooled_target import arguments, setup  # noqa: E402

from ditfastattn import calibrate  # noqa: E402


def schedule_weights(pipe, steps: int) -> list[float]:
    """(sigma_s - sigma_{s+1})² per step, normalised to a geometric mean of 1 over steps 1.."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double().numpy()
    squared = (sigmas[:-1] - sigmas[1:]) ** 2
    return [1.0] + (squared[1:] / np.exp(np.log(squared[1:]).mean())).tolist()


def main():
    args = arguments(0.6, "head", **{"--variants": dict(default="none;measured;measured steps;schedule",
                                                         help="names of VARIANTS, separated by ;"),
                                     "--per-layer": dict(action="store_true",
                                                         help="the paper's per-layer budget with c=1.5 (the default search's)")})
    started = time.perf_counter()
    pipe, cal, held, seeds = setup(args)
    measured = committed_sensitivity(args.kind, args.steps)
    by_schedule = schedule_weights(pipe, args.steps)
    print("schedule weights", np.round(by_schedule, 3).tolist(), flush=True)
    schedule = {"cache": by_schedule, "arrow": by_schedule}
    variants = {
        "none": None,
        "measured": measured,
        "measured steps": {"steps": measured["steps"]},
        "schedule": {"steps": schedule},
        "measured layers and heads": {"layers": measured["layers"], "heads": measured["heads"]},
        "schedule, measured layers and heads": {"layers": measured["layers"], "heads": measured["heads"],
                                                "steps": schedule},
    }
    variants = {name: variants[name] for name in args.variants.split(";")}
    plans, seconds = {}, {}
    for name, sensitivity in variants.items():
        budget = {"budget": "layer", "head_coefficient": 1.5} if args.per_layer else {}
        config = recommended_search(args.kind, args.steps, args.target, cache=args.cache, sensitivity=sensitivity,
                                    **budget)
        t0 = time.perf_counter()
        plans[name] = calibrate(pipe, cal, config, progress=False)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(name, round(plans[name].summary()["sparsity"], 4), seconds[name], flush=True)
    pairs = [(a, b) for a, b in (("schedule", "none"), ("measured", "schedule"), ("measured steps", "schedule"),
                                 ("measured", "none"), ("measured", "schedule, measured layers and heads"),
                                 ("schedule, measured layers and heads", "measured layers and heads"))
             if a in plans and b in plans]
    scored, ssim, differences = score_paired(pipe, plans, held, args.steps, seeds, pairs)
    meta = {**environment(torch.device("cpu")), "kind": args.kind, "target": args.target, "cache": args.cache,
            "budget": "layer, c=1.5" if args.per_layer else "generation, c=none",
            "heldout_seed": args.heldout_seed, "steps": args.steps, "heldout": len(held), "seeds": seeds,
            "schedule_weights": by_schedule, "calibration_seconds": seconds,
            "seconds": round(time.perf_counter() - started, 1)}
    write_result(args.out, meta, plans, scored, ssim, differences, {k: {} for k in plans})


if __name__ == "__main__":
    main()
