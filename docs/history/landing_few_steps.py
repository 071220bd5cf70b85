"""How close a target's search lands with few steps (lab script, issue 16).

The tiny test models (FLUX and SD3, 48 x 56) at 5, 7 and 9 steps, targets 0.35 / 0.5 / 0.7, on one
and three prompts, with the default search (``cache="auto"``) and with ``cache="head"``. Records each
plan's sparsity; run from the repository root:

    PYTHONPATH=src:tests python docs/history/landing_few_steps.py OUT.json

Results: ``results/landing_few_steps_tiny_cpu.json`` (CALIBRATION_NOTES.md, 2026-12-07, stop 62; its two variants
were transcribed from two runs of this script).
"""
import itertools
import json
import logging
import sys

import torch
from conftest import embeds, make_pipeline, negative_embeds

import ditfastattn
from ditfastattn import SearchConfig

logging.disable(logging.WARNING)
torch.set_num_threads(1)


def prompts(kind: str, count: int) -> list[dict]:
    return [{**embeds(1, seed=i), **(negative_embeds(1, seed=20 + i) if kind != "flux" else {})} for i in range(count)]


def main():
    rows = []
    for cache, kind, steps, target, count in itertools.product(("auto", "head"), ("flux", "sd3"), (5, 7, 9),
                                                               (0.35, 0.5, 0.7), (1, 3)):
        config = SearchConfig(num_inference_steps=steps, height=48, width=56, target_sparsity=target, cache=cache,
                              guidance_scale=4.0 if kind != "flux" else None)
        plan = ditfastattn.calibrate(make_pipeline(kind), prompts(kind, count), config, progress=False)
        rows.append(dict(cache=cache, kind=kind, steps=steps, target=target, prompts=count,
                         sparsity=plan.summary()["sparsity"], kept=plan.provenance["search"]["cache"]))
        print(json.dumps(rows[-1]), flush=True)
    misses = {cache: sum(abs(r["sparsity"] - r["target"]) > 0.02 for r in rows if r["cache"] == cache)
              for cache in ("auto", "head")}
    worst = {cache: max(abs(r["sparsity"] - r["target"]) for r in rows if r["cache"] == cache) for cache in ("auto", "head")}
    meta = {"script": "docs/history/landing_few_steps.py", "device": "CPU", "misses_beyond_0.02": misses,
            "worst_miss": worst, "searches_per_way": len(rows) // 2}
    with open(sys.argv[1], "w") as file:
        json.dump({"meta": meta, "rows": rows}, file, indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
