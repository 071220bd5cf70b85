"""The head-wise integer program of one layer at one step (scipy's ``milp``).

Choose one candidate per head to minimise the layer's attention cost subject to
``sum_h rse[h, m_h] <= delta`` and, with a head coefficient ``c``, ``rse[h, m_h] <= c * delta / n``.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

# Among equal costs prefer the smaller error; far below any cost difference between methods.
_TIE_BREAK = 1e-7


def solve_layer(
    rse: np.ndarray,
    cost: np.ndarray,
    delta: float,
    head_coefficient: float | None = 1.5,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """Pick a candidate per head.

    Args:
        rse: (heads, candidates) relative squared error of each candidate per head.
        cost: (heads, candidates) attention cost (share of a full head's FLOPs, or measured).
        delta: budget for the summed RSE of the layer.
        head_coefficient: ``c`` of the per-head bound ``c * delta / heads``; None disables it.
        allowed: optional (heads, candidates) bool; False excludes a candidate for a head.

    Returns:
        (heads,) index of the chosen candidate per head. A candidate with zero error (``full``)
        must be allowed for every head, so the program is always feasible.
    """
    rse = np.asarray(rse, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    heads, candidates = rse.shape
    ok = np.ones_like(rse, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool).copy()
    ok &= np.isfinite(rse) & (rse <= delta)
    if head_coefficient is not None:
        ok &= rse <= head_coefficient * delta / heads
    if not (ok & (rse == 0)).any(axis=1).all():
        raise ValueError("every head needs an allowed zero-error candidate ('full') for the program to be feasible")
    if ok.sum(axis=1).max() == 1:
        return ok.argmax(axis=1)
    safe_rse = np.where(ok, rse, 0.0)
    budget = delta
    for _ in range(4):  # HiGHS tolerates ~1e-6 infeasibility: tighten until the budget holds exactly
        choice = _solve(safe_rse, cost, ok, budget)
        spent = safe_rse[np.arange(heads), choice].sum()
        if spent <= delta:
            return choice
        budget -= spent - delta
    raise RuntimeError(f"the integer program kept exceeding the RSE budget {delta} (spent {spent})")


def _solve(rse, cost, ok, budget) -> np.ndarray:
    heads, candidates = rse.shape
    objective = (cost + _TIE_BREAK * rse).ravel()
    one_per_head = np.kron(np.eye(heads), np.ones(candidates))
    constraints = [
        LinearConstraint(one_per_head, 1, 1),
        LinearConstraint(rse.ravel()[None, :], -np.inf, budget),
    ]
    result = milp(
        objective,
        constraints=constraints,
        integrality=np.ones(heads * candidates),
        bounds=Bounds(0, ok.ravel().astype(float)),
        options={"mip_rel_gap": 0.0},
    )
    if result.x is None:
        raise RuntimeError(f"the integer program failed: {result.message}")
    return result.x.reshape(heads, candidates).argmax(axis=1)
