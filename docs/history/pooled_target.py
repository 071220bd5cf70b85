"""Pooled keys and values (``pool:<p>``) in the recommended search at one target.

Four plans from the same search at ``--target``: head- and layer-wise, each with the default
candidates and with ``pool:2`` and ``pool:4`` added (the library's method since 515486c; the
committed results of 2026-12-05 before it ran pooled_kv.py's patch, ``pool:0.5`` and
``pool:0.25``, the same computation on the testbeds' 32 x 32 grid); all scored like quality.py (held-out
prompts x seeds, SSIM against full attention) with paired bootstrap differences over prompts.

    PYTHONPATH=src python pooled_target.py OUT.json --kind flux --target 0.7 --cache step --embeddings emb.pt

``--sensitivity auto`` runs the library's default search instead (the schedule's step weights).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402
from e2e import environment  # noqa: E402
from exact_target import write_result  # noqa: E402
from oracle_heads import recommended_search, score_paired, testbed  # noqa: E402

from ditfastattn import calibrate  # noqa: E402

POOLS = ("pool:2", "pool:4")


def arguments(target: float, cache: str, **more) -> argparse.Namespace:
    """The run's arguments (``more``: extra options, name -> add_argument keywords)."""
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--kind", default="flux")
    p.add_argument("--target", type=float, default=target)
    p.add_argument("--cache", default=cache)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--heldout-seed", type=int, default=2026)
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--embeddings", type=Path, required=True)
    for name, options in more.items():
        p.add_argument(name, **options)
    return p.parse_args()


def setup(args):
    """(testbed pipeline, calibration prompts, held-out prompts, seeds) of the run."""
    pipe = testbed(args.kind, args.embeddings, "cpu")
    held = q.heldout_prompts(args.heldout_seed)[:16]
    return pipe, q.calibration_prompts(8, 2026), held, [int(s) for s in args.seeds.split(",")]


def main():
    args = arguments(0.7, "step", **{"--sensitivity": {"default": "committed", "choices": ("committed", "auto"),
                                                       "help": "auto: the library's default (the schedule's weights)"}})
    started = time.perf_counter()
    pipe, cal, held, seeds = setup(args)
    plans, seconds = {}, {}
    for name, gran, extra in (("head", "head", ()), ("layer", "layer", ()), ("head+pool", "head", POOLS),
                              ("layer+pool", "layer", POOLS)):
        sensitivity = {} if args.sensitivity == "committed" else {"sensitivity": args.sensitivity}
        config = recommended_search(args.kind, args.steps, args.target, cache=args.cache, granularity=gran,
                                    candidates=q.SETS["AA+OC"] + extra, **sensitivity)
        t0 = time.perf_counter()
        plans[name] = calibrate(pipe, cal, config, progress=False)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(name, round(plans[name].summary()["sparsity"], 4), seconds[name], flush=True)
    pairs = [("head+pool", "layer"), ("head+pool", "head"), ("head", "layer"), ("layer+pool", "layer")]
    scored, ssim, differences = score_paired(pipe, plans, held, args.steps, seeds, pairs)
    meta = {**environment(torch.device("cpu")), "kind": args.kind, "target": args.target, "cache": args.cache,
            "sensitivity": args.sensitivity,
            "heldout_seed": args.heldout_seed, "steps": args.steps, "heldout": len(held), "seeds": seeds,
            "calibration_seconds": seconds, "seconds": round(time.perf_counter() - started, 1)}
    write_result(args.out, meta, plans, scored, ssim, differences,
                 {k: {"pool_share": pool_share(plans[k]), "min_ssim": float(min(r["ssim"]))} for k, r in scored.items()})

def pool_share(plan) -> float:
    """Share of (step, layer, head) entries that run a pool method."""
    names = [m for step in plan.methods for layer in step for m in layer]
    return sum(m.startswith("pool") for m in names) / len(names)


if __name__ == "__main__":
    main()
