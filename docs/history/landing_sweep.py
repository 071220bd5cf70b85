"""How close a target's search lands on tiny test models (lab script, issue 16).

The default target search (``cache="auto"``) on the test suite's tiny random models: FLUX and SD3
(2 prompts, 12 steps, 48 x 56) at targets 0.3 / 0.45 / 0.6, Wan 2.2's two experts (6 steps) at 0.4
/ 0.5 / 0.6 with the schedule's step weights and with measured ones, each with three prompt seeds.
Records each search's sparsity (caching per head, per step) and the kept plan's, with whatever
library is on the path; run from the repository root:

    PYTHONPATH=src:tests python docs/history/landing_sweep.py OUT.json [FIT_PROMPTS]

FIT_PROMPTS sets ``SearchConfig.fit_prompts`` (FLUX and SD3 calibrate on 2 prompts, Wan on one).

Results: ``results/landing_sweep_tiny_cpu.json`` (CALIBRATION_NOTES.md, 2026-12-06, latest).
"""
import json
import logging
import sys

import test_experts as wan
from conftest import embeds, make_pipeline, negative_embeds

import ditfastattn
from ditfastattn import SearchConfig, calibration
from ditfastattn._target import step_sparsity

logging.disable(logging.WARNING)
found: dict[str, float] = {}
search = calibration._search


def keep(*args, **kwargs):
    result = search(*args, **kwargs)
    session = result.session
    steps = [step_sparsity(args[1], session.plan.methods[t], *session.geometry, session.tiles,
                           session.charged.get(t, frozenset())) for t in range(session.plan.num_steps)]
    found[args[3].cache] = sum(steps) / len(steps)
    return result


def run(rows, kind, target, seed, pipe, prompts, **kwargs):
    found.clear()
    fit = {"fit_prompts": int(sys.argv[2])} if len(sys.argv) > 2 else {}
    plan = ditfastattn.calibrate(pipe, prompts, SearchConfig(target_sparsity=target, **fit, **kwargs), progress=False)
    searched = plan.provenance["search"]
    rows.append(dict(kind=kind, target=target, seed=seed, kept=searched["cache"], sparsity=plan.summary()["sparsity"],
                     head=found.get("head"), step=found.get("step"), rse=searched.get("cache_final_rse")))
    print(json.dumps(rows[-1]), flush=True)


def main():
    calibration._search = keep
    rows = []
    for kind in ("flux", "sd3"):
        pipe = make_pipeline(kind)
        for target in (0.3, 0.45, 0.6):
            for seed in (0, 10, 20):
                prompts = [{**embeds(1, seed=seed + i), **(negative_embeds(1, seed=seed + 20 + i) if kind == "sd3" else {})}
                           for i in range(2)]
                run(rows, kind, target, seed, pipe, prompts, num_inference_steps=12,
                    guidance_scale=4.0 if kind == "sd3" else None, height=48, width=56)
    pipe = wan.pipeline()
    for target in (0.4, 0.5, 0.6):
        for seed in (0, 10, 20):
            for sensitivity in ("auto", "measure"):
                run(rows, f"wan-{sensitivity}", target, seed, pipe, [wan.prompts(seed)], num_inference_steps=6,
                    sensitivity=sensitivity, pipeline_kwargs=dict(wan.SIZE))
    with open(sys.argv[1], "w") as out:
        json.dump(rows, out)


if __name__ == "__main__":
    main()
