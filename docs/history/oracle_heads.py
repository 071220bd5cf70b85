"""How far is the search's head choice from what a search on the measured final error finds?

FLUX (or SD3) testbed, the recommended search (generation budget, step and head sensitivity,
caching per step) at one target, head-wise and layer-wise. From each plan, a greedy local search
moves one window level at a time (a head, or a whole layer's heads for layer-wise) at the computed
steps, one level narrower somewhere and one level wider elsewhere, keeping the sparsity within
+-0.002 of the start, and keeps a move when the final latents' relative squared error (RSE)
against full attention on the calibration prompts drops. Every plan is then scored like
benchmarks/quality.py on held-out prompts x seeds (SSIM against full attention, paired bootstrap).

    PYTHONPATH=src python oracle_heads.py OUT.json --kind flux --target 0.7 --evals 300 --embeddings emb.pt
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import quality as q
from e2e import environment
import ditfastattn
from ditfastattn import Plan, SearchConfig, calibrate
from ditfastattn.testbed.pipeline import load_pipeline

LEVELS = ("full", "arrow:0.5", "arrow:0.25", "arrow:0.125")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--kind", default="flux")
    p.add_argument("--target", type=float, default=0.7)
    p.add_argument("--evals", type=int, default=300)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=8, help="calibration prompts (beyond 8: drawn as quality.py draws them)")
    p.add_argument("--heldout", type=int, default=16)
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--embeddings", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop the local searches after this many seconds in all")
    args = p.parse_args()
    started = time.perf_counter()
    pipe = testbed(args.kind, args.embeddings, args.device)
    cal = q.calibration_prompts(args.prompts, 2026)
    held = q.heldout_prompts(2026)[: args.heldout]
    seeds = [int(s) for s in args.seeds.split(",")]
    base = recommended_search(args.kind, args.steps, args.target)

    def latents(plan=None):
        if plan is not None:
            ditfastattn.apply(pipe, plan)
        try:
            return pipe(prompt=cal, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
                        output_type="latent").images.float()
        finally:
            if plan is not None:
                ditfastattn.remove(pipe)

    reference = latents()

    def rse(plan):
        return float(((latents(plan) - reference).square().sum() / reference.square().sum()).item())

    plans, log = {}, {}
    for gran in ("head", "layer"):
        plans[gran] = calibrate(pipe, cal, dataclasses.replace(base, granularity=gran), progress=False)
    rng = np.random.default_rng(0)
    per_search = (args.budget_s - (time.perf_counter() - started)) / 2
    for gran in ("head", "layer"):
        plan = plans[gran]
        rows = [[list(heads) for heads in layers] for layers in plan.methods]
        start_sparsity = plan.summary()["sparsity"]
        computed = [s for s in range(1, args.steps) if rows[s][0][0] != "cache"]
        slots = ([(s, l, h) for s in computed for l in range(len(rows[s])) for h in range(len(rows[s][l]))]
                 if gran == "head" else [(s, l, None) for s in computed for l in range(len(rows[s]))])

        def level(slot):
            s, l, h = slot
            return LEVELS.index(rows[s][l][0 if h is None else h])

        def put(where, values):
            for (s, l, h), value in zip(where, values):
                for i in (range(len(rows[s][l])) if h is None else [h]):
                    rows[s][l][i] = LEVELS[value]

        best = rse(plan)
        history = [(0, best)]
        accepted, t0, it = 0, time.perf_counter(), 0
        for it in range(1, args.evals + 1):
            if time.perf_counter() - t0 > per_search:
                break
            for _ in range(100):
                narrower, wider = slots[rng.integers(len(slots))], slots[rng.integers(len(slots))]
                if narrower != wider and level(narrower) < 3 and level(wider) > 0:
                    break
            pair = narrower, wider
            old = level(narrower), level(wider)
            put(pair, (old[0] + 1, old[1] - 1))
            candidate = Plan(plan.model, rows, plan.provenance)
            if abs(candidate.summary()["sparsity"] - start_sparsity) > 0.002:
                put(pair, old)
                continue
            value = rse(candidate)
            if value < best:
                best, accepted = value, accepted + 1
                history.append((it, best))
            else:
                put(pair, old)
        plans[f"{gran}, local search"] = Plan(plan.model, rows, plan.provenance)
        log[gran] = {"start_rse": history[0][1], "end_rse": best, "accepted": accepted, "evaluations": it,
                     "seconds": round(time.perf_counter() - t0, 1), "history": history}
        print(gran, log[gran]["start_rse"], "->", best, f"({accepted} of {it} moves kept)", flush=True)
    plans["step cache alone"] = q.step_cache_plan(pipe.transformer, args.steps, 2)
    scored, ssim, differences = score_paired(pipe, plans, held, args.steps, seeds, [
        ("head", "layer"), ("head, local search", "layer, local search"), ("head, local search", "layer"),
        ("head, local search", "head"), ("layer, local search", "layer")])
    result = {
        "meta": {**environment(torch.device(args.device)), "kind": args.kind, "target": args.target,
                 "calibration_prompts": len(cal), "steps": args.steps, "heldout": len(held), "seeds": seeds,
                 "seconds": round(time.perf_counter() - started, 1)},
        "search": log,
        "plans": {n: {"sparsity": r["sparsity"], "ssim": float(np.mean(r["ssim"])), "psnr": float(np.mean(r["psnr"])),
                      "calibration_rse": (log[n.split(",")[0]]["end_rse"] if "local" in n else
                                          log[n]["start_rse"] if n in log else None)}
                  for n, r in scored.items()},
        "differences": differences,
        "per_prompt_ssim": {n: v.tolist() for n, v in ssim.items()},
        "methods": {n: p.methods for n, p in plans.items() if n != "step cache alone"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result))
    print(json.dumps({k: result[k] for k in ("plans", "differences")}, indent=1))


def score_paired(pipe, plans, held, steps, seeds, pairs):
    """Each plan scored like benchmarks/quality.py (SSIM / PSNR against full attention on ``held`` x
    ``seeds``): the rows, the per-prompt SSIM, and the paired bootstrap difference of each pair."""
    references = {seed: q.images(pipe, held, steps, seed) for seed in seeds}
    scored = q.score_plans(pipe, plans, held, steps, references)
    ssim = {name: np.array(row["ssim"]) for name, row in scored.items()}
    return scored, ssim, {f"{a} - {b}": paired_difference(ssim[a], ssim[b]) for a, b in pairs}


def compare_searches(pipe, cal, held, steps, seeds, refs, config, variants, label: str) -> list[dict]:
    """One target's search run once per variant, each plan scored on ``held`` x ``seeds`` against the
    full-attention images ``refs`` (seed -> images): a row per variant, the last with the second
    variant's SSIM difference from the first (a 95% bootstrap interval over prompts, 10000 resamples).
    ``variants``: (name, {attribute of ditfastattn.calibration: the replacement it runs with})."""
    from ditfastattn import calibration

    rows, ssim = [], {}
    for name, patches in variants:
        kept = {attribute: getattr(calibration, attribute) for attribute in patches}
        for attribute, replacement in patches.items():
            setattr(calibration, attribute, replacement)
        started = time.perf_counter()
        try:
            plan = calibrate(pipe, cal, config, progress=False)
        finally:
            for attribute, original in kept.items():
                setattr(calibration, attribute, original)
        searched = time.perf_counter() - started
        with q.applied(pipe, plan):
            images = {seed: q.images(pipe, held, steps, seed) for seed in seeds}
        ssim[name] = np.mean([q.per_image(images[seed], refs[seed])[0] for seed in seeds], 0)
        search = plan.provenance["search"]
        rows.append({"target": config.target_sparsity, "search": name, "sparsity": plan.summary()["sparsity"],
                     "predicted": search["predicted_sparsity"], "delta": search["delta"],
                     "pass_seconds": search["seconds"]["passes"], "search_s": searched, "ssim": ssim[name].tolist()})
        print(f"{label} {config.target_sparsity} {name}: sparsity {rows[-1]['sparsity']:.4f} (predicted "
              f"{rows[-1]['predicted']:.4f}), passes {search['seconds']['passes']} s, SSIM {ssim[name].mean():.4f}",
              flush=True)
    (first, _), (second, _) = variants
    diff = ssim[second] - ssim[first]
    boot = np.random.default_rng(0).integers(0, len(diff), (10000, len(diff)))
    lo, hi = np.percentile(diff[boot].mean(1), [2.5, 97.5])
    rows[-1].update(difference=float(diff.mean()), interval=[float(lo), float(hi)])
    print(f"{label} {config.target_sparsity}: {second} - {first} {diff.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]", flush=True)
    return rows


def paired_difference(a, b, resamples: int = 2000) -> dict:
    """Mean of ``a - b`` (per-prompt scores) with a 95% paired bootstrap interval over prompts."""
    d = np.asarray(a) - np.asarray(b)
    boot = np.random.default_rng(1).integers(0, len(d), (resamples, len(d)))
    low, high = np.percentile(d[boot].mean(axis=1), [2.5, 97.5])
    return {"mean": float(d.mean()), "low": float(low), "high": float(high)}


def target_parser() -> argparse.ArgumentParser:
    """The arguments of a paired comparison of searches at targets, scored on held-out prompts."""
    parser = argparse.ArgumentParser()
    parser.add_argument("kind")
    parser.add_argument("out")
    parser.add_argument("--targets", default="0.6,0.7")
    parser.add_argument("--embeddings", required=True)
    parser.add_argument("--heldout-seed", type=int, default=2026)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--steps", type=int, default=20)
    return parser


def committed_sensitivity(kind: str, steps: int):
    """The sensitivity measurement of benchmarks/results/quality.json (20 steps), else "measure"."""
    sensitivity = json.loads((Path(__file__).resolve().parents[2] / "benchmarks/results/quality.json").read_text())
    sensitivity = sensitivity["results"][kind]["sensitivity"]
    return sensitivity if len(sensitivity["steps"]["cache"]) == steps else "measure"


def testbed(kind: str, embeddings: Path, device: str):
    """The testbed's float32 pipeline, its prompts encoded from ``embeddings``, no progress bars."""
    q.use_embeddings(embeddings)
    pipe = load_pipeline(kind, device=device, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def recommended_search(kind: str, steps: int, target: float, **fields) -> SearchConfig:
    """The recommended search (generation budget, the committed step and head sensitivity, caching
    per step) at ``target``, as these experiments start from; ``fields`` change it."""
    settings = dict(num_inference_steps=steps, candidates=q.SETS["AA+OC"], seed=0, head_coefficient=None,
                    budget="generation", sensitivity=committed_sensitivity(kind, steps), cache="step",
                    target_sparsity=target)
    return SearchConfig(**{**settings, **fields})


if __name__ == "__main__":
    main()
