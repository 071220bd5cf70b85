"""The head-wise integer program of one layer at one step (scipy's ``milp``).

Choose one candidate per head to minimise the layer's attention cost subject to
``sum_h rse[h, m_h] <= delta`` and, with a head coefficient ``c``, ``rse[h, m_h] <= c * delta / n``.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

# Among equal costs prefer the smaller error; far below any cost difference between methods.
_TIE_BREAK = 1e-7
_HIGHS_TOLERANCE = 1e-7  # HiGHS's primal feasibility tolerance (absolute)


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
    # In units of the budget: HiGHS's feasibility tolerance (1e-7) is absolute, so a budget of 1e-6
    # (small scores: tiny models, early steps) was hardly a constraint at all, and its retries below
    # drove it negative (infeasible).
    scale = delta if 0 < delta < np.inf else 1.0
    scaled = safe_rse / scale
    budget = delta / scale
    for attempt in range(4):
        # HiGHS accepts a row violated by up to its feasibility tolerance: a budget just below a sum
        # of scores (a fitted delta lands on such sums) comes back overspent by less than that, so
        # tighten by more than the tolerance until the budget holds exactly, in the scores' units.
        choice = _solve(scaled, cost, ok, budget)
        spent = safe_rse[np.arange(heads), choice].sum()
        if spent <= delta:
            return choice
        budget = max(0.0, budget - (spent - delta) / scale - _HIGHS_TOLERANCE * 10**attempt)
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


def solve_layer_uniform(
    rse: np.ndarray,
    cost: np.ndarray,
    delta: float,
    head_coefficient: float | None = 1.5,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """The layer-wise baseline: the same program as :func:`solve_layer` (same budget, same per-head
    bound) with one more constraint, every head runs the same candidate."""
    rse = np.asarray(rse, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    heads = rse.shape[0]
    ok = np.ones_like(rse, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    ok = ok & np.isfinite(rse)
    if head_coefficient is not None:
        ok &= rse <= head_coefficient * delta / heads
    fits = ok.all(axis=0) & (np.where(ok, rse, np.inf).sum(axis=0) <= delta)
    if not (fits & (rse == 0).all(axis=0)).any():
        raise ValueError("the layer-wise program needs a zero-error candidate ('full') allowed for every head")
    total = np.where(fits, cost.sum(axis=0) + _TIE_BREAK * np.where(ok, rse, 0).sum(axis=0), np.inf)
    return np.full(heads, int(np.argmin(total)))


def fit_delta(predict, target: float, start: float, *, tolerance: float = 0.005, iterations: int = 24) -> float:
    """The budget at which ``predict(delta)`` (sparsity, non-decreasing in delta) meets ``target``.

    Brackets the target by doubling or halving ``start``, then bisects in log space until the
    prediction is within ``tolerance``. Returns the bracket end nearer the target when the
    prediction jumps over it (sparsity moves in steps: one head's method at a time).
    """
    low, high = None, None
    delta = start if start > 0 else 0.1
    for _ in range(40):
        value = predict(delta)
        if abs(value - target) <= tolerance:
            return delta
        if value < target:
            low = (delta, value)
            if high is not None:
                break
            delta *= 2.0
        else:
            high = (delta, value)
            if low is not None:
                break
            delta /= 2.0
        if delta > 1e6 or delta < 1e-9:
            return delta
    if low is None or high is None:
        return delta
    for _ in range(iterations):
        middle = float(np.sqrt(low[0] * high[0]))
        value = predict(middle)
        if abs(value - target) <= tolerance:
            return middle
        if value < target:
            low = (middle, value)
        else:
            high = (middle, value)
    return low[0] if target - low[1] <= high[1] - target else high[0]


def _priced_inputs(rse, cost, allowed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``rse`` as float64, ``cost`` broadcast to it, and which candidates may run (allowed and
    scored); refused unless every head has an allowed zero-error candidate."""
    rse = np.asarray(rse, dtype=np.float64)
    cost = _shaped(np.asarray(cost, dtype=np.float64), rse.shape)
    ok = np.isfinite(rse) if allowed is None else _shaped(np.asarray(allowed, dtype=bool), rse.shape) & np.isfinite(rse)
    if not (ok & (rse == 0)).any(axis=-1).all():
        raise ValueError("every head needs an allowed zero-error candidate ('full')")
    return rse, cost, ok


def _shaped(array: np.ndarray, shape: tuple) -> np.ndarray:
    """``array`` broadcast to ``shape`` (a layer-step's decision calls this often: as is where it fits)."""
    return array if array.shape == shape else np.broadcast_to(array, shape)


def solve_priced(
    rse: np.ndarray, cost: np.ndarray, delta, allowed: np.ndarray | None = None, *, uniform: bool = False
) -> np.ndarray:
    """One exchange rate for the whole generation: each head takes the candidate that minimises
    ``cost + rse / delta`` (with ``uniform``, the layer takes the one minimising the heads' sum).

    This is the Lagrangian of "least cost under one error budget summed over every layer, step
    and head": the budget goes wherever a unit of error buys the most cost, instead of the same
    ``delta`` at every layer and step. Larger ``delta`` compresses more; 0 keeps everything full.

    ``rse`` is (heads, candidates), or any stack of such (``(..., heads, candidates)``, with
    ``cost`` and ``allowed`` broadcast to it); ``delta`` a number or an array of budgets. Returns
    the chosen candidate per head, shaped ``delta.shape + rse.shape[:-1]``.
    """
    rse, cost, ok = _priced_inputs(rse, cost, allowed)
    deltas = np.asarray(delta, dtype=np.float64)
    budget = deltas.reshape(deltas.shape + (1,) * rse.ndim)
    # cost + rse / delta + tie-break, built in place (many budgets make it large); a budget of 0
    # keeps everything full: its division is replaced below. Candidates not allowed are priced out
    # after the division (an infinite error over an infinite budget would be NaN, which argmin takes).
    safe = np.where(ok, rse, 0.0)
    price = safe / np.where(budget > 0, budget, 1.0)
    price += cost
    price += _TIE_BREAK * safe
    np.copyto(price, np.inf, where=~ok)
    if uniform:
        choice = np.repeat(np.argmin(price.sum(axis=-2), axis=-1)[..., None], rse.shape[-2], axis=-1)
    else:
        choice = np.argmin(price, axis=-1)
    full = np.argmax(ok & (rse == 0), axis=-1)
    return np.where(budget[..., 0] > 0, choice, full)


def priced_counts(rse: np.ndarray, cost: np.ndarray, deltas, allowed: np.ndarray | None = None) -> np.ndarray:
    """How many heads take each candidate under :func:`solve_priced` (per head) at each budget:
    ``(budgets, ..., candidates)`` for ``rse`` ``(..., heads, candidates)`` (``cost`` and ``allowed``
    broadcast to it).

    The same choices as pricing every candidate at every budget, up to ties of price (prices that
    round to the same number, where pricing takes the first candidate and the envelope the lower line), from
    each head's lower envelope: candidate ``c`` wins where ``cost_c + rse_c * y`` (``y = 1/delta``
    plus the tie-break) is below every other allowed line, an interval of ``y`` bounded by where
    the lines cross, so the work grows with the candidates squared instead of with the budgets.
    Many budgets over a whole generation's layer-steps (a target's prediction) come at a fraction
    of the cost.
    """
    rse, cost, ok = _priced_inputs(rse, cost, allowed)
    deltas = np.asarray(deltas, dtype=np.float64).reshape(-1)
    candidates, heads = rse.shape[-1], rse.shape[-2]
    groups = int(np.prod(rse.shape[:-2], dtype=np.int64))
    # Candidate-major rows over every head: the loops below run over pairs of candidates.
    lines = np.where(ok, rse, 0.0).reshape(-1, candidates).T.copy()
    costs = cost.reshape(-1, candidates).T.copy()
    usable = ok.reshape(-1, candidates).T.copy()
    positive = deltas > 0
    y = 1.0 / deltas[positive] + _TIE_BREAK
    order = np.argsort(y, kind="stable")
    ys = y[order]
    slots = len(ys) + 1
    owner = np.arange(groups * heads) // heads
    counts = np.zeros((len(deltas), groups, candidates), dtype=np.int64)
    for c in range(candidates):
        low = np.full(groups * heads, -np.inf)
        high = np.full(groups * heads, np.inf)
        beaten = ~usable[c]
        for d in range(candidates):
            if d == c:
                continue
            gap = lines[c] - lines[d]
            step = costs[d] - costs[c]
            with np.errstate(divide="ignore", invalid="ignore"):
                crossing = step / gap  # the y where the two lines cross
            rival = usable[d]
            np.minimum(high, np.where(rival & (gap > 0), crossing, np.inf), out=high)  # c steeper: wins below
            np.maximum(low, np.where(rival & (gap < 0), crossing, -np.inf), out=low)  # c flatter: wins above
            # Parallel lines: the cheaper wins everywhere, on equal cost the first (argmin's rule).
            beaten |= rival & (gap == 0) & ((step < 0) | ((step == 0) & (d < c)))
        alive = ~beaten & (low < high)
        # Each grid point in (low, high] belongs to c: the intervals of a head's winners tile the line.
        where = owner[alive] * slots
        marks = (np.bincount(where + _grid_index(ys, low[alive], 0), minlength=groups * slots)
                 - np.bincount(where + _grid_index(ys, high[alive], len(ys)), minlength=groups * slots))
        counts[np.flatnonzero(positive)[order], :, c] = marks.reshape(groups, slots).cumsum(axis=-1)[:, :-1].T
    # A budget of 0: every head full (the first allowed zero-error candidate), as solve_priced has it.
    full = np.argmax(ok & (rse == 0), axis=-1).reshape(groups, heads)
    counts[~positive] = (full[..., None] == np.arange(candidates)).sum(axis=1)
    return counts.reshape((len(deltas),) + rse.shape[:-2] + (candidates,))


def _grid_index(grid: np.ndarray, bounds: np.ndarray, unbounded: int) -> np.ndarray:
    """How many points of the sorted ``grid`` lie at or below each of ``bounds``; an infinite bound
    (most heads' first or last winner) is ``unbounded`` without a search."""
    index = np.full(bounds.shape, unbounded, dtype=np.int64)
    finite = np.isfinite(bounds)
    index[finite] = np.searchsorted(grid, bounds[finite], side="right")
    return index


def choose(rse, cost, delta: float, config, allowed=None) -> np.ndarray:
    """The search's choice for one layer at one step under ``config`` (a SearchConfig)."""
    if config.budget == "generation":
        return solve_priced(rse, cost, delta, allowed, uniform=config.granularity == "layer")
    solve = solve_layer_uniform if config.granularity == "layer" else solve_layer
    return solve(rse, cost, delta, config.head_coefficient, allowed)


def choose_many(rse, cost, deltas, config, allowed=None) -> np.ndarray:
    """:func:`choose` at each of ``deltas`` for a stack of layer-steps ``(..., heads, candidates)``
    (``cost`` and ``allowed`` broadcast to it): ``(budgets, ..., heads)``. The generation budget
    solves them all at once; an integer program runs once per budget and layer-step."""
    if config.budget == "generation":
        return solve_priced(rse, cost, np.asarray(deltas, dtype=np.float64), allowed, uniform=config.granularity == "layer")
    rse = np.asarray(rse, dtype=np.float64)
    cost = np.broadcast_to(cost, rse.shape)
    allowed = np.broadcast_to(np.ones(rse.shape, dtype=bool) if allowed is None else allowed, rse.shape)
    stack = rse.reshape(-1, *rse.shape[-2:]), cost.reshape(-1, *rse.shape[-2:]), allowed.reshape(-1, *rse.shape[-2:])
    rows = [[choose(r, c, float(d), config, a) for r, c, a in zip(*stack)] for d in deltas]
    return np.array(rows, dtype=np.int64).reshape(len(deltas), *rse.shape[:-1])
