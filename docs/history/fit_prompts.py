"""A target's fitting pass over one prompt against two, the default (CPU check of quality, issue 16's
search time).

A target's per-head search (``cache="head"``) fits its budget on a first pass over the first
``fit_prompts`` prompts, then decides the plan on a second pass over all of them. Since 83315e3 the
first pass does not wait on the host, so on a GPU it costs about its prompts' share of plain
denoising: one prompt of eight is about 0.13x, two about 0.25x. Here the library's search runs
once per fit count at the same targets, scored like ``quality.py`` (16 held-out prompts x 2 seeds,
SSIM against full attention, paired bootstrap over prompts).

    cd docs/history && PYTHONPATH=../../src python fit_prompts.py flux OUT.json --targets 0.6,0.7 --embeddings EMB.pt
    (other prompts: --heldout-seed 4242 --seeds 5,6 with embeddings of quality.calibration_prompts(8, 2026)
    + quality.heldout_prompts(4242) + [""], as quality.save_embeddings writes them)
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402
from ditfastattn import calibrate  # noqa: E402
from oracle_heads import recommended_search, target_parser, testbed  # noqa: E402


def main():
    parser = target_parser()
    parser.add_argument("--fits", default="2,1", help="fit_prompts of each search; differences are from the first")
    args = parser.parse_args()
    pipe = testbed(args.kind, Path(args.embeddings), "cpu")
    held = q.heldout_prompts(args.heldout_seed)
    cal = q.calibration_prompts(8, 2026)
    steps, seeds = args.steps, [int(s) for s in args.seeds.split(",")]
    fits = [int(f) for f in args.fits.split(",")]
    refs = {seed: q.images(pipe, held, steps, seed) for seed in seeds}
    rows = []
    for target in (float(t) for t in args.targets.split(",")):
        ssim = {}
        for fit in fits:
            config = recommended_search(args.kind, steps, target, cache="head", sensitivity="auto", fit_prompts=fit)
            started = time.perf_counter()
            plan = calibrate(pipe, cal, config, progress=False)
            searched = time.perf_counter() - started
            with q.applied(pipe, plan):
                images = {seed: q.images(pipe, held, steps, seed) for seed in seeds}
            ssim[fit] = np.mean([q.per_image(images[seed], refs[seed])[0] for seed in seeds], 0)
            search = plan.provenance["search"]
            rows.append({"target": target, "fit_prompts": fit, "sparsity": plan.summary()["sparsity"],
                         "predicted": search["predicted_sparsity"], "delta": search["delta"],
                         "pass_seconds": search["seconds"]["passes"], "search_s": searched,
                         "ssim": ssim[fit].tolist()})
            print(f"{args.kind} {target} fit {fit}: sparsity {rows[-1]['sparsity']:.4f}, SSIM {ssim[fit].mean():.4f}",
                  flush=True)
        for fit in fits[1:]:
            diff = ssim[fit] - ssim[fits[0]]
            boot = np.random.default_rng(0).integers(0, len(diff), (10000, len(diff)))
            lo, hi = np.percentile(diff[boot].mean(1), [2.5, 97.5])
            rows.append({"target": target, "difference": f"fit {fit} - fit {fits[0]}", "mean": float(diff.mean()),
                         "interval": [float(lo), float(hi)]})
            print(f"{args.kind} {target}: fit {fit} - fit {fits[0]} {diff.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]", flush=True)
        result = {"kind": args.kind, "steps": steps, "seeds": seeds, "heldout_seed": args.heldout_seed,
                  "calibration_prompts": "the 8 of quality.calibration_prompts(8, 2026)", "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
