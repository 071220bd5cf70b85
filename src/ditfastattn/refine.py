"""Step weights corrected in the searched plan's own context (``SearchConfig(refine=n)``).

The sensitivity probes (:mod:`ditfastattn.sensitivity`) compress one step at a time with every
other step exact. Inside a plan, which compresses most steps, a step's compression does different
damage: on the FLUX testbed (10 steps, a head-wise plan at 0.5 sparsity) making one step's arrow
heads exact again lowered the final error by 0.002-0.34 per unit of weighted local error that the
search had counted for them, early steps cheapest, a 150x spread the probes did not see; caching
every other step cost a tenth of what the probes' weights predict.

A refinement round measures that directly. The steps after the first are cut into at most
``MAX_GROUPS`` runs; for each run and each kind of method (``cache``; ``arrow``: every approximate
computation) one denoising pass makes the plan's heads of that kind in that run exact and measures
how much the final latents' relative squared error against the uncompressed pass drops (the
steps before the run replay the plan's own transformer outputs wherever the plan lets a replayed
run start). Each kind's step weights in that run are multiplied by the drop over the weighted
local error the search counted there, and the search runs again with the corrected weights.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ._calibration_session import run_pass
from .methods import parse_method
from .plan import Plan
from .sensitivity import KINDS, kind_of, relative_squared_error

logger = logging.getLogger(__name__)

MAX_GROUPS = 10
# A run whose exact recomputation does not lower the final error (or raises it: interactions)
# keeps this share of the plan's final error as its drop, so its weight stays positive.
FLOOR = 1e-3


def step_groups(steps: int) -> list[range]:
    """The steps after the first, cut into at most ``MAX_GROUPS`` consecutive runs of near-equal length."""
    return [range(int(part[0]), int(part[-1]) + 1) for part in np.array_split(np.arange(1, steps), min(MAX_GROUPS, steps - 1))]


def kind_contributions(methods, rse: np.ndarray, weights: np.ndarray, candidates) -> np.ndarray:
    """(steps, kinds) the weighted local error the search counted for the plan ``methods`` (a
    plan's rows) on a pass's scores ``rse`` and ``weights`` (steps, layers, heads, candidates),
    per kind of method (``KINDS`` order); unmeasured scores count 0."""
    column = {parse_method(name).name: c for c, name in enumerate(candidates)}
    out = np.zeros((len(methods), len(KINDS)))
    for step, rows in enumerate(methods):
        for layer, heads in enumerate(rows):
            for head, name in enumerate(heads):
                kind = kind_of(parse_method(name))
                if kind is None or name not in column:
                    continue
                value = weights[step, layer, head, column[name]] * rse[step, layer, head, column[name]]
                out[step, KINDS.index(kind)] += value if np.isfinite(value) else 0.0
    return out


def corrected_steps(steps: dict[str, list[float]], groups, counted: np.ndarray, drops: dict) -> dict[str, list[float]]:
    """Step weights times each (run, kind)'s measured drop over its ``counted`` weighted local error
    ((steps, kinds)); ``drops`` maps (run index, kind) to the drop. Runs of a kind without a
    measurement (the plan used the kind there too little) take the kind's geometric mean ratio.
    Renormalised to a geometric mean of 1 over all kinds and steps after the first, as measured."""
    corrected = {}
    for kind, per_step in steps.items():
        ratios = {}
        for index, group in enumerate(groups):
            counted_here = float(counted[list(group), KINDS.index(kind)].sum())
            if (index, kind) in drops and counted_here > 0:
                ratios[index] = drops[(index, kind)] / counted_here
        fill = float(np.exp(np.mean(np.log(list(ratios.values()))))) if ratios else 1.0
        scale = np.ones(len(per_step))
        for index, group in enumerate(groups):
            scale[list(group)] = ratios.get(index, fill)
        corrected[kind] = np.asarray(per_step, dtype=np.float64) * scale
    later = np.concatenate([w[1:] for w in corrected.values()])
    mean = float(np.exp(np.log(np.maximum(later, 1e-300)).mean())) if later.size else 1.0
    return {kind: [float(per_step[0])] + [float(f"{max(w / mean, 1e-12):.6g}") for w in ws[1:]]
            for (kind, per_step), ws in zip(steps.items(), corrected.values())}


def _replay_start(methods, first: int, history: bool) -> int:
    """The latest step up to ``first`` from which a pass can run while the steps before replay:
    one where no head reads an earlier step's output (a replayed step leaves none), else 0."""
    if history:  # residual heads read what the head's last full step kept: never replay
        return 0
    for step in range(first, 0, -1):
        if not any(parse_method(name).reads_previous_output for heads in methods[step] for name in heads):
            return step
    return 0


def refine_sensitivity(pipe, spec, call: dict[str, Any], config, session, weights: np.ndarray,
                       sensitivity: dict | None, *, progress: bool = True) -> tuple[dict, dict]:
    """(corrected sensitivity, report) for the plan a finished search ``session`` decided, whose
    scores were weighted by ``weights``. One pass records the plan, one the uncompressed run, then
    one per (run of steps, kind) that the plan compresses."""
    steps = config.num_inference_steps
    methods = [[list(heads) for heads in rows] for rows in session.plan.methods]
    candidates = [m.name for m in session.candidates]
    kinds = [k for k in KINDS if any(kind_of(parse_method(n)) == k for n in candidates)]
    measured = dict(sensitivity) if isinstance(sensitivity, dict) and ("steps" in sensitivity or "layers" in sensitivity) else (
        {"layers": dict(sensitivity)} if isinstance(sensitivity, dict) else {})
    base_steps = {kind: list((measured.get("steps") or {}).get(kind, [1.0] * steps)) for kind in kinds}
    counted = kind_contributions(methods, session.rse, weights, candidates)
    groups = step_groups(steps)
    history = any(parse_method(n).reads_residual for rows in methods for heads in rows for n in heads)
    todo = [(index, kind) for index, group in enumerate(groups) for kind in kinds
            if counted[list(group), KINDS.index(kind)].sum() > 0]
    probe_config = dataclasses.replace(config, sensitivity=None, refine=0)
    with tqdm(total=2 + len(todo), desc="ditfastattn refine", unit="pass", disable=not progress) as bar:
        full = Plan(spec, [[["full"] * layer.heads for layer in spec.layers] for _ in range(steps)])
        _, reference = run_pass(pipe, spec, call, probe_config, None, forced=full, measure=set())
        bar.update(1)
        recorded: dict = {}
        _, latents = run_pass(pipe, spec, call, probe_config, None, forced=Plan(spec, methods), measure=set(), record=recorded)
        final = relative_squared_error(latents, reference)
        bar.update(1)
        drops = {}
        for index, kind in todo:
            group = groups[index]
            exact = [[[("full" if step in group and kind_of(parse_method(n)) == kind else n) for n in heads] for heads in rows]
                     for step, rows in enumerate(methods)]
            start = _replay_start(exact, group[0], history)
            _, latents = run_pass(pipe, spec, call, probe_config, None, forced=Plan(spec, exact), measure=set(),
                                  replay=(recorded, start) if start > 0 else None)
            drops[(index, kind)] = max(final - relative_squared_error(latents, reference), FLOOR * final)
            bar.update(1)
    steps_weights = corrected_steps(base_steps, groups, counted, drops)
    refined = {**measured, "steps": steps_weights}
    report = {
        "final_rse": float(f"{final:.6g}"),
        "groups": [[g[0], g[-1]] for g in groups],
        "ratios": {kind: [None if (i, kind) not in drops else
                          float(f"{drops[(i, kind)] / counted[list(g), KINDS.index(kind)].sum():.4g}")
                          for i, g in enumerate(groups)] for kind in kinds},
    }
    logger.info("ditfastattn refine: final relative squared error %.4g; drop per counted error %s", final,
                "; ".join(f"{k} " + " ".join("-" if r is None else f"{r:.2g}" for r in rs) for k, rs in report["ratios"].items()))
    return refined, report
