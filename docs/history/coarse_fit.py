"""A target's budget-fitting first pass on a coarser step schedule (CPU prototype, issue 16's search time).

A target's per-head search (``cache="head"``) runs two passes: the first, over ``fit_prompts`` of
the prompts, only gives the scores that ``TargetController`` predicts the remaining steps from; the
second decides the plan. Over two of eight prompts the first costs 0.34x a whole pass at FLUX.1-dev
1024² and 0.26x at 2048², so the search takes about 1.4x / 1.3x plain denoising. Stop 54 showed
that a pass predicting from its own scores (no first pass) spends the budget in the wrong steps:
the fitting pass must see the whole trajectory. Here it sees it coarsely: the first pass runs
``--coarse`` steps instead of N, and its scores are carried to the N steps by noise level: each
candidate's unweighted score log-interpolated between the two coarse steps whose sigmas bracket
the fine step's, a ``cache`` score first divided by its coarse step's squared step in sigma (the
reuse error grows with the distance between the outputs) and multiplied by the fine step's; then
the fine schedule's step weights. The second pass is the library's.

Scored like ``quality.py`` against the library's two passes at the same targets (the default
weights: the schedule's, ``cache="head"``; 8 calibration prompts, the first pass on two of them).

    cd docs/history && PYTHONPATH=../../src python coarse_fit.py flux OUT.json --targets 0.6,0.7 --coarse 5 --embeddings EMB.pt
"""
import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402
from ditfastattn import calibrate, calibration  # noqa: E402
from ditfastattn._calibration_session import run_pass  # noqa: E402
from ditfastattn.sensitivity import schedule_step_weights, schedule_weigher  # noqa: E402
from oracle_heads import recommended_search, testbed  # noqa: E402

COARSE = 5  # --coarse


def sigmas_of(scheduler, steps: int) -> np.ndarray:
    fine = copy.deepcopy(scheduler)
    fine.set_timesteps(steps)
    return np.asarray(fine.sigmas[: steps + 1], dtype=np.float64)


def carried(first, pipe, steps: int):
    """A stand-in for a first pass of ``steps`` steps, from ``first``'s coarse scores."""
    coarse = first.plan.num_steps
    sig_k, sig_n = sigmas_of(pipe.scheduler, coarse), sigmas_of(pipe.scheduler, steps)
    weights_n = np.asarray(schedule_step_weights(SimpleNamespace(sigmas=sig_n), steps))
    reuses = np.array([m.reads_previous_output for m in first.candidates])
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = first.rse / first.weights  # unweighted: (coarse, layers, heads, candidates)
        gap_k = np.r_[np.nan, sig_k[:-2] - sig_k[1:-1]]  # the step in sigma into each coarse step
        raw = np.where(reuses, raw / gap_k[:, None, None, None] ** 2, raw)
        logs = np.log(np.maximum(raw, 1e-300))  # NaN (not scored) stays NaN
    rse = np.full((steps, *first.rse.shape[1:]), np.nan)
    methods = [first.plan.methods[0]]
    measured = sig_k[1:coarse]  # the coarse steps that were scored (1..), sigmas falling
    for step in range(1, steps):
        sigma = sig_n[step]
        if sigma >= measured[0] or sigma <= measured[-1]:  # before coarse step 1, or past the last
            mixed = logs[1 if sigma >= measured[0] else coarse - 1]
        else:
            j = int(np.flatnonzero(measured >= sigma)[-1])  # measured[j] >= sigma > measured[j + 1]
            t = (measured[j] - sigma) / (measured[j] - measured[j + 1])
            mixed = (1 - t) * logs[j + 1] + t * logs[j + 2]
        scores = np.where(mixed < -600, 0.0, np.exp(mixed))  # exact candidates (full) stay at 0
        scores = np.where(reuses, scores * (sig_n[step - 1] - sig_n[step]) ** 2, scores)
        rse[step] = scores * weights_n[step]
        methods.append(first.plan.methods[int(np.argmin(np.abs(sig_k[:coarse] - sig_n[step - 1])))])
    plan = SimpleNamespace(num_steps=steps, methods=methods)
    return SimpleNamespace(rse=rse, plan=plan, geometry=first.geometry, tiles=first.tiles, candidates=first.candidates,
                           _cost=first._cost, switch_steps=first.switch_steps)


library_search = calibration._search


def coarse_search(pipe, spec, call, config, weights, bars, seconds, weigh_steps=None, first=None, fit_call=None):
    assert config.cache == "head" and first is None and config.target is not None
    started = time.perf_counter()
    coarse = dataclasses.replace(config, num_inference_steps=COARSE)
    session, _ = run_pass(pipe, spec, fit_call or call, coarse, None,
                          weigh_steps=schedule_weigher(config.candidates, [], "schedule"))
    seconds["passes"].append(time.perf_counter() - started)
    return library_search(pipe, spec, call, config, weights, bars, seconds, weigh_steps,
                          carried(session, pipe, config.num_inference_steps), fit_call)


def main():
    global COARSE
    parser = argparse.ArgumentParser()
    parser.add_argument("kind")
    parser.add_argument("out")
    parser.add_argument("--targets", default="0.6,0.7")
    parser.add_argument("--coarse", type=int, default=COARSE)
    parser.add_argument("--embeddings", default=".carry/embeddings.pt")
    parser.add_argument("--heldout-seed", type=int, default=2026)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    COARSE = args.coarse
    pipe = testbed(args.kind, Path(args.embeddings), "cpu")
    held = q.heldout_prompts(args.heldout_seed)
    cal = q.calibration_prompts(8, 2026)
    steps, seeds = args.steps, [int(s) for s in args.seeds.split(",")]
    refs = {seed: q.images(pipe, held, steps, seed) for seed in seeds}
    rows = []
    for target in (float(t) for t in args.targets.split(",")):
        config = recommended_search(args.kind, steps, target, cache="head", sensitivity="auto")
        plans, ssim = {}, {}
        for name, search in (("two passes", library_search), ("coarse first pass", coarse_search)):
            calibration._search = search
            started = time.perf_counter()
            try:
                plans[name] = calibrate(pipe, cal, config, progress=False)
            finally:
                calibration._search = library_search
            searched = time.perf_counter() - started
            with q.applied(pipe, plans[name]):
                images = {seed: q.images(pipe, held, steps, seed) for seed in seeds}
            ssim[name] = np.mean([q.per_image(images[seed], refs[seed])[0] for seed in seeds], 0)
            search = plans[name].provenance["search"]
            rows.append({"target": target, "search": name, "sparsity": plans[name].summary()["sparsity"],
                         "predicted": search["predicted_sparsity"], "delta": search["delta"],
                         "pass_seconds": search["seconds"]["passes"], "search_s": searched, "ssim": ssim[name].tolist()})
            print(f"{args.kind} {target} {name}: sparsity {rows[-1]['sparsity']:.4f} (predicted {rows[-1]['predicted']:.4f}),"
                  f" passes {search['seconds']['passes']} s, SSIM {ssim[name].mean():.4f}", flush=True)
        diff = ssim["coarse first pass"] - ssim["two passes"]
        boot = np.random.default_rng(0).integers(0, len(diff), (10000, len(diff)))
        lo, hi = np.percentile(diff[boot].mean(1), [2.5, 97.5])
        rows[-1].update(difference=float(diff.mean()), interval=[float(lo), float(hi)])
        print(f"{args.kind} {target}: coarse - two passes {diff.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]", flush=True)
        result = {"kind": args.kind, "steps": steps, "coarse": COARSE, "seeds": seeds,
                  "heldout_seed": args.heldout_seed, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
