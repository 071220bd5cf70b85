"""A target's deciding pass over the prompts its fitting pass did not run, against over all of them
(CPU check of quality, issue 16's search time; not kept).

A target's search fits its budget on a first pass over the first ``fit_prompts`` prompts and decides
the plan on a second pass over every prompt, so one prompt of eight is denoised twice (about 1/8 of
plain denoising beyond the batch's). ``patches/deciding_prompts_split.diff`` (on 8ce3566) runs the
deciding passes over the others instead (``calibration._pass_calls``). With it applied, the search
runs each way at the same targets (the old way by handing the deciding pass every prompt; ``all7``:
over the first 7 prompts, the fitting pass's among them, as many as the split decides on), scored
like ``quality.py`` (16 held-out prompts x 2 seeds, SSIM against full attention, paired bootstrap
over prompts).

    git apply docs/history/patches/deciding_prompts_split.diff
    cd docs/history && PYTHONPATH=../../src python deciding_prompts.py flux OUT.json --targets 0.6,0.7 --embeddings EMB.pt
    (other prompts: --heldout-seed 4242 --seeds 5,6 with embeddings of quality.calibration_prompts(8, 2026)
    + quality.heldout_prompts(4242) + [""], as quality.save_embeddings writes them; another draw of the
    searches: --search-seed 1)

Stop 70 (CALIBRATION_NOTES.md): ``results/deciding_prompts_{flux,sd3}{,_heldout4242}_cpu.json``,
``results/deciding_prompts_flux_search1_cpu.json`` (0.7 only), ``results/deciding_prompts_flux_all7_search{0,1}_cpu.json``.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402
from ditfastattn import calibrate, calibration  # noqa: E402
from oracle_heads import recommended_search, target_parser, testbed  # noqa: E402

library_pass_calls = calibration._pass_calls


def every_prompt_decides(pipe, config, prompts, call):
    """The calls before stop 70: the first pass over the first fit_prompts, the second over all."""
    return library_pass_calls(pipe, config, prompts, call)[0], call


def main():
    parser = target_parser()
    parser.add_argument("--cache", default="head")
    parser.add_argument("--sensitivity", default="auto", help="recommended_search's sensitivity ('auto': the schedule's)")
    parser.add_argument("--ways", default="all,rest",
                        help="all: the deciding pass over all 8 prompts; rest: over the 7 the fitting pass did not run; "
                             "all7: over the first 7, the fitting pass's among them (the same count as rest); "
                             "differences are from the first")
    parser.add_argument("--search-seed", type=int, default=0,
                        help="SearchConfig.seed (the calibration run's generator): another draw of both searches")
    args = parser.parse_args()
    pipe = testbed(args.kind, Path(args.embeddings), "cpu")
    held = q.heldout_prompts(args.heldout_seed)
    cal = q.calibration_prompts(8, 2026)
    steps, seeds = args.steps, [int(s) for s in args.seeds.split(",")]
    refs = {seed: q.images(pipe, held, steps, seed) for seed in seeds}
    sensitivity = {} if args.sensitivity == "committed" else {"sensitivity": args.sensitivity}
    ways = args.ways.split(",")
    rows = []
    for target in (float(t) for t in args.targets.split(",")):
        ssim = {}
        for way in ways:
            calibration._pass_calls = library_pass_calls if way == "rest" else every_prompt_decides
            config = recommended_search(args.kind, steps, target, cache=args.cache, fit_prompts=1,
                                        seed=args.search_seed, **sensitivity)
            started = time.perf_counter()
            plan = calibrate(pipe, cal[:7] if way == "all7" else cal, config, progress=False)
            searched = time.perf_counter() - started
            with q.applied(pipe, plan):
                images = {seed: q.images(pipe, held, steps, seed) for seed in seeds}
            ssim[way] = np.mean([q.per_image(images[seed], refs[seed])[0] for seed in seeds], 0)
            search = plan.provenance["search"]
            rows.append({"target": target, "deciding_prompts": way, "sparsity": plan.summary()["sparsity"],
                         "cache": search["cache"], "predicted": search["predicted_sparsity"], "delta": search["delta"],
                         "pass_seconds": search["seconds"]["passes"], "search_s": searched,
                         "ssim": ssim[way].tolist()})
            print(f"{args.kind} {target} {way}: sparsity {rows[-1]['sparsity']:.4f}, SSIM {ssim[way].mean():.4f}",
                  flush=True)
        calibration._pass_calls = library_pass_calls
        for way in ways[1:]:
            diff = ssim[way] - ssim[ways[0]]
            boot = np.random.default_rng(0).integers(0, len(diff), (10000, len(diff)))
            lo, hi = np.percentile(diff[boot].mean(1), [2.5, 97.5])
            rows.append({"target": target, "difference": f"{way} - {ways[0]}", "mean": float(diff.mean()),
                         "interval": [float(lo), float(hi)]})
            print(f"{args.kind} {target}: {way} - {ways[0]} {diff.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]", flush=True)
        result = {"kind": args.kind, "steps": steps, "seeds": seeds, "heldout_seed": args.heldout_seed,
                  "cache": args.cache, "sensitivity": args.sensitivity, "search_seed": args.search_seed,
                  "calibration_prompts": "the 8 of quality.calibration_prompts(8, 2026)", "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
