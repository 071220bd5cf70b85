"""An uncompressed first pass for a target's search (lab script, issue 16).

At 070887d a target's search (``cache="auto"``) ran two searches, caching per head and per step, two passes
each (the first at ``delta``, to fit the budget to the target), and an uncompressed pass to
compare their final latents with: five. With an uncompressed first pass that scores every
candidate for both searches and is the reference: three. This calibrates the default target
search with whatever library is on the path (run it at each commit), saving both searches'
plans, then scores plans paired like quality.py.

    PYTHONPATH=src python first_pass.py calibrate flux PREFIX --embeddings emb.pt
        (writes PREFIX_head.json and PREFIX_step.json, each search's plan)
    PYTHONPATH=src python first_pass.py score flux OUT.json NAME=PLAN.json ... --pairs A:B ... --embeddings emb.pt

The three-pass variant is ``patches/first_pass_three.diff`` (on 070887d; not kept). Results (CPU,
2026-12-06): ``results/first_pass_0.6_cpu.json`` (the searches), ``results/first_pass_{flux,sd3}_0.6_scored_cpu.json``
(scored); the curves on an H100: ``results/first_pass_three_curves_h100.json``; the four passes kept
since (the per-step search alone fitted on the uncompressed pass): ``results/first_pass_four_curves_h100.json``
and, on FLUX at 0.6, ``results/first_pass_four_flux_0.6_{,heldout4242_}scored_cpu.json`` (scored with
``--heldout-seed 4242 --seeds 5,6`` and the embeddings of those prompts) (CALIBRATION_NOTES.md,
2026-12-06, latest). ``calibrate --fit-prompts 2|all --sensitivity FILE`` (stop 52): the first pass
on two or all prompts, with quality.py's measured weights; ``results/fit_prompts_sd3_0.7_*``.
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

from ditfastattn import Plan, SearchConfig, calibrate, calibration  # noqa: E402


def calibrate_both(pipe, target: float, prefix: str, **settings) -> None:
    """The default target search, each of its two searches' plans saved (the kept one's provenance)."""
    found, search = {}, calibration._search

    def keep(*args, **kwargs):
        result = search(*args, **kwargs)
        found[args[3].cache] = result.session.plan.methods
        return result

    calibration._search = keep
    started = time.perf_counter()
    config = SearchConfig(num_inference_steps=20, candidates=q.SETS["AA+OC"], seed=0, target_sparsity=target, **settings)
    plan = calibrate(pipe, q.calibration_prompts(8, 2026), config, progress=False)
    seconds = time.perf_counter() - started
    calibration._search = search
    provenance = {**plan.provenance, "lab": {"seconds": round(seconds, 1), "kept": plan.provenance["search"]["cache"]}}
    for mode, methods in found.items():
        searched = Plan(plan.model, methods, provenance)
        searched.save(f"{prefix}_{mode}.json")
        print(mode, round(searched.summary()["sparsity"], 4), flush=True)
    print("kept", provenance["search"]["cache"], provenance["search"]["cache_final_rse"], round(seconds, 1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["calibrate", "score"])
    p.add_argument("kind")
    p.add_argument("out", help="calibrate: PREFIX of the plans; score: OUT.json")
    p.add_argument("plans", nargs="*", help="score: NAME=PLAN.json")
    p.add_argument("--pairs", nargs="*", default=[], help="score: A:B, the paired differences to report")
    p.add_argument("--target", type=float, default=0.6)
    p.add_argument("--heldout-seed", type=int, default=2026, help="score: grammar seed of the held-out prompts")
    p.add_argument("--seeds", default="1,2", help="score: generation seeds")
    p.add_argument("--embeddings", type=Path, required=True)
    p.add_argument("--fit-prompts", default=None, help="calibrate: SearchConfig.fit_prompts, or 'all' (default: the library's)")
    p.add_argument("--sensitivity", type=Path, default=None,
                   help="calibrate: a quality.py sensitivity file (.carry/sens/...) to search with, as its recommended curves do")
    args = p.parse_args()
    pipe = testbed(args.kind, args.embeddings, "cpu")
    if args.command == "calibrate":
        settings = {}
        if args.fit_prompts is not None:
            settings["fit_prompts"] = None if args.fit_prompts == "all" else int(args.fit_prompts)
        if args.sensitivity is not None:
            settings["sensitivity"] = json.loads(args.sensitivity.read_text())["sensitivity"]
        calibrate_both(pipe, args.target, args.out, **settings)
        return
    plans = {name: Plan.load(path) for name, path in (item.split("=", 1) for item in args.plans)}
    pairs = [tuple(pair.split(":")) for pair in args.pairs]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    _, ssim, differences = score_paired(pipe, plans, q.heldout_prompts(args.heldout_seed)[:16], 20, seeds, pairs)
    result = {
        "meta": {"kind": args.kind, "target": args.target, "steps": 20, "heldout_seed": args.heldout_seed,
                 "seeds": seeds},
        "plans": {name: {"sparsity": plan.summary()["sparsity"], "ssim": float(ssim[name].mean()),
                         "kept": plan.provenance["lab"]["kept"], "seconds": plan.provenance["lab"]["seconds"],
                         "pass_seconds": plan.provenance["search"]["seconds"],
                         "cache_final_rse": plan.provenance["search"]["cache_final_rse"]} for name, plan in plans.items()},
        "differences": differences,
        "per_prompt_ssim": {name: values.tolist() for name, values in ssim.items()},
        "methods": {name: plan.methods for name, plan in plans.items()},
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("plans", "differences")}, indent=1))


if __name__ == "__main__":
    main()
