"""What a target's defaults buy (lab script, issue 16).

Before stop 50 ``SearchConfig(target_sparsity=t)`` ran the paper's search at the fitted budget: a
per-layer budget with the head coefficient 1.5, caching chosen head by head. Since, a target's
defaults are the generation budget with ``cache="auto"`` (a bare delta keeps the paper's). This
calibrates, at one target, with the library's default step weights (the schedule's): the paper's
settings, the generation budget caching per head, and the new defaults, and scores them like
quality.py, paired.

    PYTHONPATH=src python target_defaults.py OUT.json --kind flux --target 0.6 --embeddings emb.pt

Results (CPU, 2026-12-06): ``results/target_defaults_*_cpu.json`` (CALIBRATION_NOTES.md).
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402
from e2e import environment  # noqa: E402
from exact_target import write_result  # noqa: E402
from oracle_heads import score_paired  # noqa: E402
from pooled_target import arguments, setup  # noqa: E402

from ditfastattn import SearchConfig, calibrate  # noqa: E402

VARIANTS = {
    "paper (per-layer budget, c=1.5, cache per head)": {"budget": "layer", "head_coefficient": 1.5, "cache": "head"},
    "generation budget, cache per head": {"budget": "generation", "head_coefficient": None, "cache": "head"},
    "defaults (generation budget, cache auto)": {},
}


def main():
    args = arguments(0.6, "auto")
    started = time.perf_counter()
    pipe, cal, held, seeds = setup(args)
    plans, seconds = {}, {}
    for name, settings in VARIANTS.items():
        config = SearchConfig(num_inference_steps=args.steps, candidates=q.SETS["AA+OC"], seed=0,
                              target_sparsity=args.target, **settings)
        t0 = time.perf_counter()
        plans[name] = calibrate(pipe, cal, config, progress=False)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(name, round(plans[name].summary()["sparsity"], 4), plans[name].provenance["search"]["cache"],
              seconds[name], flush=True)
    names = list(VARIANTS)
    pairs = [(names[2], names[0]), (names[1], names[0]), (names[2], names[1])]
    scored, ssim, differences = score_paired(pipe, plans, held, args.steps, seeds, pairs)
    meta = {**environment(torch.device("cpu")), "kind": args.kind, "target": args.target, "sensitivity": "auto",
            "heldout_seed": args.heldout_seed, "steps": args.steps, "heldout": len(held), "seeds": seeds,
            "calibration_seconds": seconds, "seconds": round(time.perf_counter() - started, 1)}
    write_result(args.out, meta, plans, scored, ssim, differences,
                 {name: {"cache": plan.provenance["search"]["cache"]} for name, plan in plans.items()})


if __name__ == "__main__":
    main()
