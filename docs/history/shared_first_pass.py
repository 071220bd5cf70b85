"""One uncompressed first pass for both searches of ``cache="auto"`` (lab script, issue 16).

``cache="auto"`` searched caching per head and per step, two passes each (the first at ``delta``
to fit the budget to the target), then ran an uncompressed pass to compare their final latents
with: five. One uncompressed pass that scores every candidate serves as both searches' first pass
and as the reference: three. This calibrates the default target search with whatever library is
on the path (run it once at each commit), then scores the plans paired like quality.py.

    PYTHONPATH=src python shared_first_pass.py calibrate flux PLAN.json --embeddings emb.pt
    PYTHONPATH=src python shared_first_pass.py score flux THREE.json FIVE.json OUT.json --embeddings emb.pt

Not kept: the change is ``patches/shared_first_pass.diff`` (on 8224213, which gives the five
passes). Results (CPU, 2026-12-06): ``results/shared_first_pass_{flux,sd3}_0.6_cpu.json``
(CALIBRATION_NOTES.md).
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402
from oracle_heads import score_paired  # noqa: E402
from pooled_target import testbed  # noqa: E402

from ditfastattn import Plan, SearchConfig, calibrate  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["calibrate", "score"])
    p.add_argument("kind")
    p.add_argument("files", nargs="+", type=Path, help="calibrate: PLAN; score: THREE FIVE OUT")
    p.add_argument("--target", type=float, default=0.6)
    p.add_argument("--embeddings", type=Path, required=True)
    args = p.parse_args()
    pipe = testbed(args.kind, args.embeddings, "cpu")
    if args.command == "calibrate":
        started = time.perf_counter()
        config = SearchConfig(num_inference_steps=20, candidates=q.SETS["AA+OC"], seed=0, target_sparsity=args.target)
        plan = calibrate(pipe, q.calibration_prompts(8, 2026), config, progress=False)
        search = plan.provenance["search"]
        print(args.kind, round(plan.summary()["sparsity"], 4), search["cache"], search["cache_final_rse"],
              round(time.perf_counter() - started, 1), flush=True)
        plan.save(args.files[0])
        return
    three, five, out = args.files
    plans = {"three passes": Plan.load(three), "five passes": Plan.load(five)}
    _, ssim, differences = score_paired(pipe, plans, q.heldout_prompts(2026)[:16], 20, [1, 2],
                                        [("three passes", "five passes")])
    result = {
        "meta": {"kind": args.kind, "target": args.target, "steps": 20, "heldout_seed": 2026, "seeds": [1, 2]},
        "plans": {name: {"sparsity": plan.summary()["sparsity"], "ssim": float(ssim[name].mean()),
                         "cache": plan.provenance["search"]["cache"],
                         "cache_final_rse": plan.provenance["search"]["cache_final_rse"],
                         "pass_seconds": plan.provenance["search"]["seconds"]} for name, plan in plans.items()},
        "differences": differences,
        "per_prompt_ssim": {name: values.tolist() for name, values in ssim.items()},
        "methods": {name: plan.methods for name, plan in plans.items()},
    }
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("plans", "differences")}, indent=1))


if __name__ == "__main__":
    main()
