"""A plan's sparsity predicted from a calibration pass's scores, and the second pass steered onto a
target: the budget that meets it (:func:`predicted_sparsity`, fitted by
:func:`ditfastattn.search.fit_delta`), the most the candidates allow (:func:`reachable_sparsity`),
the steps ``cache="step"`` caches whole (:func:`cached_schedule`), and the per-step budget of the
second pass (:class:`TargetController`).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Callable

import numpy as np

from ._calibration_session import whole_step_cache
from ._geometry import TileGrid
from .methods import distinct_candidates, parse_method
from .search import choose, choose_many, priced_counts, solve_priced

if TYPE_CHECKING:
    from .search_config import SearchConfig

logger = logging.getLogger("ditfastattn")


# Layer-steps re-solved per budget where each solve is an integer program; more are subsampled by step.
_PREDICT_LAYER_STEPS = 600


def _sampled_steps(steps: int, layers: int, config: SearchConfig) -> list[int]:
    if config.budget == "generation":  # a closed-form choice: every step, all budgets at once
        return list(range(1, steps))
    stride = max(1, -(-((steps - 1) * layers) // _PREDICT_LAYER_STEPS))
    return list(range(1, steps, stride))


def _allowed(session, by_step: bool) -> np.ndarray:
    """(candidates,) bool: the distinct candidates at a finished pass's resolution; ``by_step``
    (``cache="step"``): none that reuses the previous output, which only whole cached steps do."""
    allowed = np.array(distinct_candidates(session.candidates, session.geometry[0], session.tiles))
    if by_step:
        allowed &= ~np.array([m.reads_previous_output for m in session.candidates])
    return allowed


def _charged_computed(rse, cost, flops, deltas, config: SearchConfig, allowed, candidates, locked, whole=None):
    """The choices at each of ``deltas`` of one layer's steps (``rse``: (steps, heads, candidates))
    made step by step, as a pass makes them where candidates read a residual: an arrow_residual
    candidate that would be a head's first since its last exact step also pays for the capture
    (the pass's ``_captures``), and a head that reads one keeps its window until it next computes
    exactly. ``locked`` (heads,): each head's residual window at the first of these steps (NaN:
    none); ``whole`` (steps,) bool: steps cached whole. Returns the FLOP share each head computes
    (budgets, steps, heads), captures included."""
    fractions = np.array([m.fraction if m.reads_residual else np.nan for m in candidates])
    residual, exact = np.isfinite(fractions), np.array([m.exact for m in candidates])
    state = np.broadcast_to(np.asarray(locked, dtype=np.float64), (len(deltas), rse.shape[1])).copy()
    computed = np.zeros((len(deltas), *rse.shape[:2]))
    for step in range(len(rse)):
        free = np.isnan(state)[..., None] & residual  # (budgets, heads, candidates): would pay the capture
        if whole is not None and whole[step]:
            pick = np.broadcast_to(whole_step_cache(rse[step], candidates), state.shape)
        else:
            ok = allowed[step] & (~residual | free | (fractions == state[..., None]))
            paid = cost + np.where(free, cost, 0.0)
            if config.budget == "generation":  # the exchange rate folded into the errors: one solve
                with np.errstate(divide="ignore", invalid="ignore"):  # a budget of 0 leaves only error-free candidates
                    scaled = np.where(rse[step] == 0, 0.0, rse[step] / np.asarray(deltas, dtype=np.float64)[:, None, None])
                pick = solve_priced(scaled, paid, 1.0, ok, uniform=config.granularity == "layer")
            else:
                pick = np.stack([choose(rse[step], c, float(d), config, a) for d, c, a in zip(deltas, paid, ok)])
        charged = np.take_along_axis(free, pick[..., None], axis=-1)[..., 0]
        computed[:, step] = flops[pick] * (1 + charged)
        state = np.where(exact[pick], np.nan, np.where(residual[pick], fractions[pick], state))
    return computed


def _curve(session, spec, config: SearchConfig, scores: np.ndarray, deltas, cached=None, locked=None) -> np.ndarray:
    """(budgets, steps, layers) each layer's share of the sparsity of steps whose ``scores``
    (steps, layers, heads, candidates: a pass's, or a prediction of them) are solved at each of
    ``deltas`` (summed over layers: the steps' sparsity); ``session`` (a finished pass) gives the
    resolution (its image grid too) and the candidates' costs. ``cached`` (steps,) bool: the steps
    cached whole (``cache="step"``), where no other step caches. With arrow_residual candidates the
    steps are solved in order and pay for their captures, from ``locked`` (layers, heads): the
    residual window each head reads at the first step (NaN: none)."""
    removed = np.zeros((len(deltas), len(scores), len(spec.layers)))
    shares = _head_shares(session, spec)
    if config.budget == "generation" and config.granularity == "head" and not any(
            m.reads_residual for m in session.candidates):
        # One exchange rate, a choice per head and no state carried between steps: every layer-step at
        # every budget at once, as counts of heads per candidate (a target's prediction at every step).
        alike: dict[tuple[int, bool], list[int]] = {}
        for index, layer in enumerate(spec.layers):
            alike.setdefault((layer.heads, bool(layer.text)), []).append(index)
        allowed = _allowed(session, cached is not None)
        for (heads, _), indices in alike.items():
            cost, flops = _prices(session, spec.layers[indices[0]])
            rse = scores[:, indices, :heads]
            kept = priced_counts(rse, cost, deltas, np.isfinite(rse) & allowed) @ flops  # (budgets, steps, layers)
            if cached is not None:
                whole = whole_step_cache(rse.reshape(-1, rse.shape[-1]), session.candidates).reshape(rse.shape[:-1])
                kept = np.where(np.asarray(cached, dtype=bool)[:, None], flops[whole].sum(axis=-1), kept)
            removed[..., indices] = shares[indices] * (heads - kept)
        return removed
    for index, layer in enumerate(spec.layers):
        removed[..., index] = _layer_curve(session, spec, config, index, shares[index], scores[:, index, : layer.heads],
                                           deltas, cached, None if locked is None else locked[index, : layer.heads])
    return removed


def _prices(session, layer) -> tuple[np.ndarray, np.ndarray]:
    """(candidates,) each candidate's cost in ``layer`` as the search weighs it (measured costs where
    the config gives them) and its FLOP share, at a finished pass's resolution."""
    image_tokens, text_len = session.geometry
    layer_text = text_len if layer.text else 0
    cost = np.array([session._cost(m, image_tokens, layer_text, session.tiles) for m in session.candidates])
    flops = np.array([m.cost(image_tokens, layer_text, session.tiles) for m in session.candidates])
    return cost, flops


def _head_shares(session, spec) -> np.ndarray:
    """(layers,) one head's attention FLOPs in each layer over a whole step's, at a finished pass's resolution."""
    per_head = np.array(_head_flops(spec, *session.geometry)[0])
    return per_head / (per_head * [layer.heads for layer in spec.layers]).sum()


def _layer_curve(session, spec, config: SearchConfig, index: int, share: float, rse: np.ndarray, deltas, cached=None,
                 locked=None, allowed=None, prices=None) -> np.ndarray:
    """(budgets, steps) layer ``index``'s share of each step's sparsity (see :func:`_curve`), from its
    ``rse`` (steps, heads, candidates), its heads' residual windows ``locked`` (heads,) and ``share``,
    one of its heads' FLOPs over the step's (:func:`_head_shares`). ``allowed`` and ``prices``:
    :func:`_allowed`'s and :func:`_prices`' of ``session`` where already known."""
    candidates = session.candidates
    allowed = _allowed(session, cached is not None) if allowed is None else allowed
    layer = spec.layers[index]
    cost, flops = _prices(session, layer) if prices is None else prices
    if any(m.reads_residual for m in candidates):
        locked = np.full(rse.shape[1], np.nan) if locked is None else locked
        kept = _charged_computed(rse, cost, flops, deltas, config, np.isfinite(rse) & allowed, candidates, locked,
                                 cached).sum(axis=2)
    else:
        choice = choose_many(rse, cost, deltas, config, np.isfinite(rse) & allowed)  # (budgets, steps, heads)
        kept = flops[choice].sum(axis=2)
    if cached is not None:
        whole = whole_step_cache(rse.reshape(-1, rse.shape[-1]), candidates).reshape(rse.shape[:-1])
        kept = np.where(np.asarray(cached, dtype=bool), flops[whole].sum(axis=1), kept)
    return share * (layer.heads - kept)


def _curves(session, spec, config: SearchConfig, deltas, cached: frozenset[int] | None = None) -> np.ndarray:
    """(steps, budgets, layers) each layer's share of each step's sparsity at each budget on a
    finished pass's scores; steps between samples take the nearest sample's row, and step 0
    always computes everything."""
    steps = session.plan.num_steps
    sampled = _sampled_steps(steps, len(spec.layers), config)
    whole = None if cached is None else np.isin(sampled, sorted(cached))
    rows = _curve(session, spec, config, session.rse[sampled], deltas, whole).transpose(1, 0, 2)
    curves = np.zeros((steps, len(deltas), len(spec.layers)))
    for step in range(1, steps):
        curves[step] = rows[int(np.argmin([abs(step - s) for s in sampled]))]
    return curves


def cached_schedule(steps: int, target: float) -> frozenset[int]:
    """The steps ``cache="step"`` caches whole: every other step after step 0 (the step cache
    that computes every 2nd step), or, where ``target`` holds fewer whole steps, as many as it
    holds, spread evenly over those."""
    every_other = np.arange(1, steps, 2)
    count = min(len(every_other), int(np.floor(target * steps + 1e-9)))
    if count == 0:
        return frozenset()
    picked = np.unique(np.round(np.linspace(0, len(every_other) - 1, count)).astype(int))
    return frozenset(int(step) for step in every_other[picked])


def _head_flops(spec, image_tokens: int, text_len: int) -> tuple[tuple[float, ...], float]:
    """One head's attention FLOPs (up to a constant) in each layer of ``spec``, and a step's in all."""
    per_head, total = [], 0.0
    for layer in spec.layers:
        tokens = image_tokens + (text_len if layer.text else 0)
        per_head.append(float(tokens * tokens * layer.head_dim))
        total += per_head[-1] * layer.heads
    return tuple(per_head), total


def layer_sparsity(spec, rows: list[list[str]], image_tokens: int, text_len: int, tiles: TileGrid | None = None,
                   charged=frozenset(), layers=None, head_flops=None) -> np.ndarray:
    """(layers,) each layer's share of the fraction of one step's attention FLOPs that ``rows``
    (one list of methods per layer) remove (summed: the step's sparsity); tile windows are counted
    on the image grid ``tiles``; the (layer, head) pairs ``charged`` also pay their residual's
    capture (their method's cost once more). ``layers``: only these layers' shares (the others 0).
    ``head_flops``: :func:`_head_flops` of these arguments, where already known."""
    per_head, total = _head_flops(spec, image_tokens, text_len) if head_flops is None else head_flops
    removed = np.zeros(len(spec.layers))
    for index in range(len(spec.layers)) if layers is None else layers:
        layer = spec.layers[index]
        layer_text = text_len if layer.text else 0
        kept = sum(parse_method(m).cost(image_tokens, layer_text, tiles) * (1 + ((index, head) in charged))
                   for head, m in enumerate(rows[index]))
        removed[index] = per_head[index] * (layer.heads - kept)
    return removed / total


def step_sparsity(spec, rows: list[list[str]], image_tokens: int, text_len: int, tiles: TileGrid | None = None,
                  charged=frozenset()) -> float:
    """Fraction of one step's attention FLOPs that ``rows`` remove (see :func:`layer_sparsity`)."""
    return float(layer_sparsity(spec, rows, image_tokens, text_len, tiles, charged).sum())


def reachable_sparsity(session, spec, config: SearchConfig, cached: frozenset[int] | None = None) -> float:
    """The most sparsity a finished pass's candidates allow: every head of every step after the
    first at its cheapest candidate that could run there, and the capture at step 0 of a head
    whose cheapest reads a residual (with ``cached``, the steps cached whole of ``cache="step"``:
    those cached, no head of the others)."""
    image_tokens, text_len = session.geometry
    candidates = session.candidates
    allowed = _allowed(session, cached is not None)
    residual = np.array([m.reads_residual for m in candidates])
    whole = np.isin(np.arange(1, session.plan.num_steps), sorted(cached or ()))
    kept = total = 0.0
    for index, layer in enumerate(spec.layers):
        layer_text = text_len if layer.text else 0
        flops = np.array([m.cost(image_tokens, layer_text, session.tiles) for m in candidates])
        rse = session.rse[1:, index, : layer.heads]  # (steps - 1, heads, candidates)
        per_head = float((image_tokens + layer_text) ** 2 * layer.head_dim)
        cheapest = np.where(np.isfinite(rse) & allowed, flops, np.inf).min(axis=-1)  # (steps - 1, heads)
        if cached is not None:
            cheapest[whole] = flops[whole_step_cache(rse[whole].reshape(-1, rse.shape[-1]), candidates)].reshape(-1, layer.heads)
        # Only step 0 computes exactly, so a head whose cheapest reads a residual pays one capture there.
        plain = np.where(np.isfinite(rse) & allowed & ~residual, flops, np.inf).min(axis=-1)
        capture = np.where(cheapest < plain, cheapest, np.inf).min(axis=0)
        kept += per_head * (layer.heads + cheapest.sum() + capture[np.isfinite(capture)].sum())  # step 0: all full
        total += per_head * layer.heads * session.plan.num_steps
    return 1.0 - kept / total


# How close calibrate brings the plan's sparsity to a target (warned about beyond).
TOLERANCE = 0.02


class TargetController:
    """The second pass's budget per layer and step, so that the plan's sparsity lands on the target.

    The first pass's scores predict each step's sparsity at any budget, but they were measured on
    its own trajectory. Arrow errors hardly depend on it; ``cache`` errors do, several times over:
    a cached head reuses what its layer last produced, which is older (or approximate) when the
    head did not compute exactly at the step before. So a second pass that compresses less (or
    more) than the first sees smaller (or larger) cache errors where the first pass had not
    computed the head, and about the same ones where it had. At each step the controller measures
    the second pass's scores of the last few steps against the first's, per candidate and per
    that distinction, predicts the remaining steps from the first pass's scores scaled
    accordingly, and picks the budget at which they add what the target still needs.

    The budget is picked again at each layer of a step, from what the step's layers already
    decided: where the search compresses some steps almost whole and others hardly at all (late
    steps weigh more), the target rests on the step between them, and a budget fixed for the
    whole of that step could only land to within a step's share. Under one exchange rate the
    layer being decided is priced on its own scores, just measured, rather than predicted: with
    few steps each of its heads is a large share of the target.

    Integer-program budgets (``budget="layer"``) are re-solved only once, on the first pass's
    scores: there the drift is taken as one move of every step's sparsity curve along the (log)
    budget axis, the move that best explains the steps already decided.

    With ``cache="step"`` the steps cached whole (``cached``) are fixed before the second pass;
    the budget moves only the other steps' windows.
    """

    GRID = 2.0 ** (np.arange(-20, 21) / 2)  # budgets: the fitted one times 2^-10 .. 2^10
    SHIFTS = np.arange(-8, 9)  # moves tried, in grid points (factors 2^-4 .. 2^4)
    RECENT = 3  # steps whose scores measure the drift between the passes
    SPREAD = 2  # grid points either side of a budget over which its miss is averaged (the prediction's error)

    def __init__(self, first, spec, config: SearchConfig, fitted: float, cached: frozenset[int] | None = None):
        self.first, self.spec, self.config, self.target = first, spec, config, config.target
        self.whole = None if cached is None else np.isin(np.arange(first.plan.num_steps), sorted(cached))
        self.geometry = first.geometry
        self.tiles = first.tiles
        self.steps = first.plan.num_steps
        self.resolve = config.budget == "generation"  # a closed-form choice: cheap to re-solve every step
        # Under one exchange rate a budget of 0 (every head exact) is a choice too: where the last steps'
        # errors are below every budget of the grid, it is the only way not to compress them whole.
        self.deltas = np.concatenate([[0.0], fitted * self.GRID]) if self.resolve else fitted * self.GRID
        self.predicted = None if self.resolve else _curves(first, spec, config, self.deltas, cached)
        # (budgets, 2 SPREAD + 1) each budget's grid neighbours, clipped at the ends
        self._around = np.clip(np.arange(len(self.deltas))[:, None] + np.arange(-self.SPREAD, self.SPREAD + 1), 0,
                               len(self.deltas) - 1)
        self.head_shares = _head_shares(first, spec)
        # What each layer's closed-form curve reads of the first pass, at the resolution both passes share.
        self._residual = any(m.reads_residual for m in first.candidates)
        self._allowed = _allowed(first, cached is not None)
        self._prices = [_prices(first, layer) for layer in spec.layers]
        self._head_flops = _head_flops(spec, *first.geometry)
        # (steps, layers, heads): whether the first pass ran the head exactly at the step before
        self.computed = np.zeros(first.rse.shape[:3], dtype=bool)
        for step in range(1, self.steps):
            for index, row in enumerate(first.plan.methods[step - 1]):
                self.computed[step, index, : len(row)] = [parse_method(name).exact for name in row]
        self.realized: dict[int, float] = {}
        self._step = None  # the step whose prediction is held: its layers' shares and the later steps'
        self._now = self._later = self._needed = None
        self._shares: dict[int, float] = {}  # the held step's decided layers' shares, each counted once

    def _scores(self, step: int, session) -> np.ndarray:
        """The first pass's scores of steps ``step`` on, scaled to the second pass's: per candidate
        and per whether the first pass had computed the head, by the geometric mean ratio of the
        two passes' scores over the last ``RECENT`` steps."""
        recent = list(range(max(1, step - self.RECENT), step))
        now, before = session.rse[recent], self.first.rse[recent]
        valid = np.isfinite(now) & np.isfinite(before) & (now > 0) & (before > 0)
        logs = np.where(valid, np.log(np.where(valid, now, 1.0) / np.where(valid, before, 1.0)), 0.0)
        ratios = np.ones((2, now.shape[-1]))  # (first pass had not computed / had, candidates)
        for computed in (False, True):
            counted = valid & (self.computed[recent, ..., None] == computed)
            ratios[int(computed)] = np.exp(logs.sum(axis=(0, 1, 2), where=counted) / np.maximum(counted.sum(axis=(0, 1, 2)), 1))
        logger.debug("ditfastattn calibrate: step %d, second-pass over first-pass scores %s", step, np.round(ratios, 3))
        return self.first.rse[step:] * ratios[self.computed[step:].astype(int)]

    def _locked(self, session) -> np.ndarray:
        """(layers, heads) the residual window each head of the second pass reads so far (NaN: none)."""
        locked = np.full(self.first.rse.shape[1:3], np.nan)
        for (layer, head), fraction in session.locked.items():
            locked[layer, head] = fraction
        return locked

    def _moved(self, shift: int) -> np.ndarray:
        return self.predicted[:, np.clip(np.arange(len(self.deltas)) + shift, 0, len(self.deltas) - 1)]

    def _shift(self, step: int, session, realized: np.ndarray) -> int:
        done = np.arange(1, step)
        if not len(done):
            return 0
        nearest: dict[int, list[int]] = {}  # each step's layers' budgets as grid points; the step's: their mean
        for (t, _), delta in session.layer_delta.items():
            nearest.setdefault(t, []).append(int(np.argmin(abs(np.log(self.deltas / delta)))))
        used = np.array([int(round(np.mean(nearest[t]))) for t in done])
        moved = [self._moved(j).sum(axis=-1) for j in self.SHIFTS]
        misses = [float(np.abs(curves[done, used] - realized).sum()) for curves in moved]
        return int(self.SHIFTS[np.lexsort((np.abs(self.SHIFTS), misses))[0]])  # ties: the smallest move

    def _predict(self, step: int, session) -> None:
        """At a step's first layer: the steps before it as realized, and the predicted shares of
        this step's layers (budgets, layers) and the later steps' sparsity (budgets,)."""
        for done in range(1, step):
            if done not in self.realized:
                self.realized[done] = step_sparsity(self.spec, session.plan.methods[done], *self.geometry, self.tiles,
                                                    session.charged.get(done, frozenset()))
        realized = np.array([self.realized[t] for t in range(1, step)])
        if self.resolve:
            whole = None if self.whole is None else self.whole[step:]
            rest = _curve(self.first, self.spec, self.config, self._scores(step, session), self.deltas, whole,
                          self._locked(session))
            self._now, self._later = rest[:, 0], rest[:, 1:].sum(axis=(1, 2))
        else:
            shift = self._shift(step, session, realized)
            moved = self._moved(shift)
            self._now, self._later = moved[step], moved[step + 1:].sum(axis=(0, 2))
            logger.debug("ditfastattn calibrate: step %d, first-pass curves moved by 2^%g", step, shift / 2)
        self._step, self._needed, self._shares = step, self.target * self.steps - realized.sum(), {}

    def _this_layer(self, step: int, layer: int, rse: np.ndarray, locked: np.ndarray | None) -> np.ndarray:
        """(budgets,) the share of the step's sparsity of ``layer``, being decided: from its scores
        ``rse`` (heads, candidates), measured just now, under one exchange rate (a closed-form solve
        per budget, its heads' residual windows ``locked``), else as predicted."""
        if not self.resolve:
            return self._now[:, layer]
        whole = None if self.whole is None else self.whole[step: step + 1]
        return _layer_curve(self.first, self.spec, self.config, layer, self.head_shares[layer], rse[None], self.deltas,
                            whole, locked, self._allowed, self._prices[layer])[:, 0]

    def prepare(self, step: int, session) -> None:
        """Predict ``step`` (once): the session calls it when every layer of the step before is decided."""
        if step != self._step:
            self._predict(step, session)

    def __call__(self, step: int, layer: int, session) -> Callable[[np.ndarray], float]:
        """The budget of ``layer`` at ``step`` as a function of its scores (heads, candidates): all
        that does not read them is worked out now, while the GPU still computes them, so that the
        host's work between their arrival and the layer's row is only this layer's own curve."""
        self.prepare(step, session)
        decided = np.array([(step, index) in session.decided for index in range(len(self.spec.layers))])
        fresh = {int(index) for index in np.flatnonzero(decided)} - set(self._shares)
        if fresh:
            shares = layer_sparsity(self.spec, session.plan.methods[step], *self.geometry, self.tiles,
                                    session.charged.get(step, frozenset()), layers=fresh, head_flops=self._head_flops)
            self._shares.update({index: shares[index] for index in fresh})
        needed = self._needed - sum(self._shares.values())
        others = ~decided
        others[layer] = False
        rest = self._later + self._now[:, others].sum(axis=1)
        heads = self.spec.layers[layer].heads
        locked = self._locked(session)[layer, :heads] if self.resolve and self._residual else None
        return functools.partial(self._budget, step, layer, needed, rest, locked)

    def _budget(self, step: int, layer: int, needed: float, rest: np.ndarray, locked: np.ndarray | None,
                rse: np.ndarray) -> float:
        """The budget whose predicted sparsity of the remaining layer-steps, ``rest`` (budgets,) from
        the others and this layer's curve on ``rse``, lands nearest what the target still ``needed``."""
        rest = rest + self._this_layer(step, layer, rse, locked)
        # Of the budgets whose prediction lands within half the tolerance of the best one, the one
        # whose neighbours miss least: where the remaining steps' sparsity changes fast with the
        # budget (a step half compressed), a prediction an octave off misses by much.
        miss = np.abs(rest - needed)
        if step == self.steps - 1 and self.resolve:
            # The last step under one exchange rate: no later step is predicted and this layer is priced
            # on its scores just measured (only the step's undecided layers are), so the least miss lands
            # best (the neighbours' mean kept a budget missing 0.100 over one missing 0.077).
            return float(self.deltas[int(np.argmin(miss))])
        robust = np.where(miss <= miss.min() + 0.5 * TOLERANCE * self.steps, miss[self._around].mean(axis=1), np.inf)
        return float(self.deltas[int(np.argmin(robust))])


def predicted_sparsity(session, spec, config: SearchConfig, delta: float, cached: frozenset[int] | None = None) -> float:
    """Sparsity the program would reach at ``delta`` on a finished pass's scores (integer-program
    budgets with more than ``_PREDICT_LAYER_STEPS`` layer-steps: steps subsampled evenly), with
    ``cached`` the steps cached whole (``cache="step"``)."""
    return float(_curves(session, spec, config, [delta], cached).sum() / session.plan.num_steps)
