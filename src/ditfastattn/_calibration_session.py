"""The calibration session: a runtime session that scores every candidate and decides each
layer's methods on the fly (or, for the sensitivity probe, only measures under a given plan).

At every step after the first, each attention layer (in execution order) computes its exact
output and every candidate's output, scores each head by its share of the layer's relative squared
error (the head's squared error over the layer's variance, times the head count), and solves the
head-wise integer program (:mod:`ditfastattn.search`); a ``lagged`` pass (a target's first, which
only gives the scores its second predicts from, over 8 steps or more) decides each layer on its
scores of the step before, copied to the host without waiting for the GPU. When a step calls the
transformer more than once (true CFG, skip-layer guidance), every call is scored: the decision,
made at the step's first call, adds the errors each later call measured at the previous step, the
latest it can know.
Each call is scored on what the runtime runs in it: later calls compute ``cfg_share`` heads
unshared, and a call without a head's previous output or residual computes that head exactly.
Every candidate is scored on a quarter of the batch (:data:`SCORE_STRIDE`), the exact output too,
which is computed for the whole batch only where the row is known to run every head full and so
reuses it (a forced plan's, a step's later call).
Where CFG or residual sharing is among the candidates (they read the other CFG half or every
element's residual), the exact output and those candidates take the whole batch, and the
candidates that run their own attention a quarter of it, scaled to the whole (:func:`sampled_errors`).
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from . import ops
from ._geometry import MODE_SKIP, TileGrid
from ._host_outputs import HostOutputs, pinned_used
from .methods import Method, distinct_candidates, parse_method
from .plan import Plan
from .runtime import LayerRuntime, Session, _Buffers, compile_row, install, routing, uninstall
from .runtime.session import latents_shape
from .runtime.parallel import Ulysses, context_parallel
from .search import choose

logger = logging.getLogger("ditfastattn")

# Scoring is what a pass costs beyond plain denoising: the exact attention (which a compressed row
# does not reuse) and the candidates' own (FLUX: the three arrows 0.31 of the exact attention's
# FLOPs, pool:2 and pool:4 another 0.37). Both run on every SCORE_STRIDE-th batch element (two at
# least), rotating with the layer and step; a quarter of the batch scores a plan as well as all of it
# (docs/history/CALIBRATION_NOTES.md, stops 59 and 66).
SCORE_STRIDE = 4


def stats_impl(impl: str) -> str:
    """The implementation of the scores' reductions (:func:`ops.head_squared_errors`) for the op's ``impl``."""
    return impl if impl in ("reference", "triton") else "auto"


def layer_variance(exact: torch.Tensor, impl: str = "auto", head_variances: torch.Tensor | None = None) -> torch.Tensor:
    """The layer output's summed squared deviation, each head about its own mean (a float32 scalar),
    from its heads' (``head_variances``, where already measured)."""
    if head_variances is None:
        head_variances = ops.head_variances(exact, impl=impl)
    return head_variances.sum().clamp_min(torch.finfo(torch.float32).tiny)


def combine_scores(errors: torch.Tensor, variance: torch.Tensor, later=()) -> torch.Tensor:
    """(candidates, heads) scores: each head's squared error over the layer's variance, times the
    head count, pooled over the calls of a step.

    ``later`` holds (errors, variance) of the step's later calls; a candidate a later call could
    not run yet (NaN) counts as this call's error, scaled by the ratio of variances. A head's score
    is its share of the layer's relative squared error times the head count, so heads of very
    different variance are judged by what they add to the layer's output.
    """
    total_errors, total_variance = errors, variance
    for later_errors, later_variance in later:
        later_errors = torch.where(torch.isnan(later_errors), errors * (later_variance / variance), later_errors)
        total_errors, total_variance = total_errors + later_errors, total_variance + later_variance
    return total_errors * (errors.shape[1] / total_variance)


def score_sample(batch: int, turn: int) -> slice | None:
    """The batch elements an attention candidate is scored on at the ``turn``-th layer-step of a pass:
    every ``stride``-th from ``turn % stride`` (None: all of them), a view of the batch. Where the
    stride divides half the batch (8 prompts under CFG), each sampled prompt comes with its other
    CFG half."""
    stride = min(SCORE_STRIDE, batch // 2)
    if stride < 2:
        return None
    return slice(turn % stride, batch, stride)


def sampled_errors(errors: torch.Tensor, head_variances: torch.Tensor, sample_variances: torch.Tensor) -> torch.Tensor:
    """(heads,) squared errors measured on a sample of the batch, scaled to the whole batch by
    each head's variance over it against over the sample: a ratio estimate, exact where each
    element's error is proportional to its variance (scaling by the elements' count is not)."""
    return errors * (head_variances / sample_variances.clamp_min(torch.finfo(torch.float32).tiny))


class _Candidate(NamedTuple):
    """One candidate's output in one call, as :meth:`_CalibrationSession._candidate_outputs` yields it.

    ``out`` holds every row, or only the image segment's where ``rows`` is that segment's (start,
    length): an arrow or tile head's global-query rows attend to every key, as the exact output's
    do, so they are not computed and count no error (it would be the kernel's rounding against the
    stock attention). ``shared``: a cfg_share candidate at the step's first call, whose batch halves
    both take the conditional half of ``out`` (and, in the rows ``out`` lacks, of the exact output).
    ``unmeasured`` is None or a (heads,) bool mask of heads whose error stays unknown (NaN).
    ``sample``: the batch elements ``out`` holds (:func:`score_sample`) where the exact output holds
    the whole batch's; None: the same elements as the exact output.
    """

    index: int
    out: torch.Tensor
    unmeasured: torch.Tensor | None = None
    rows: tuple[int, int] | None = None
    shared: bool = False
    sample: slice | None = None


class _CalibrationSession(Session):
    """A session whose plan rows are decided on the fly from the candidates' errors.

    Candidates run with each call's exact token layout and key padding (``layer.geometry``).

    ``weights`` (steps, layers, candidates), or (steps, layers, heads, candidates) with a weight per
    head (heads up to the model's most), scales each score by how much that method's local error at
    that layer and step reaches the output (the sensitivity). With ``forced``, a plan whose
    methods are taken as given, the session only measures: at the layers in ``measure`` (all when
    None), as the sensitivity probe needs. With ``cached_steps`` (a set of steps; ``SearchConfig(cache=
    "step")``), caching is decided per step: at those steps every head reuses its previous output,
    at the others none does. ``weigh_steps(scheduler, num_steps)``, called whenever the pipeline
    sets the timesteps (before any step is decided; with None at the first decision when it never
    did), gives (steps, candidates) factors by which the weights are multiplied
    (``sensitivity="schedule"``: from the scheduler's noise levels).
    """

    layout_aware = True

    def __init__(
        self,
        transformer,
        plan,
        adapter,
        impl,
        *,
        config,  # SearchConfig
        progress: tqdm | None,
        weights: np.ndarray | None = None,
        forced: Plan | None = None,
        measure: set[int] | None = None,
        measure_steps: set[int] | None = None,
        delta_for=None,
        cached_steps: frozenset[int] | None = None,
        weigh_steps=None,
        lagged: bool = False,
    ):
        super().__init__(transformer, plan, adapter, impl)
        self.config = config
        self.candidates: list[Method] = [parse_method(name) for name in config.candidates]
        self._tile_candidates = [m.name for m in self.candidates if m.needs_grid]
        self.tile_windows = bool(self._tile_candidates)
        self.pool_methods = sorted(m.name for m in self.candidates if m.kind == "pool")
        # An odd batch is refused at the generation's first call, before any work (Session._check_inputs).
        self._cfg_share = any(m.shares_cfg for m in self.candidates)
        self.progress = progress
        heads = max(layer.heads for layer in plan.model.layers)
        shape = (plan.num_steps, len(plan.model.layers), heads, len(self.candidates))
        weights = np.ones(shape) if weights is None else np.asarray(weights, dtype=np.float64)
        self.weights = np.broadcast_to(weights[:, :, None] if weights.ndim == 3 else weights, shape)
        self._given_weights = self.weights
        self.weigh_steps = weigh_steps
        self._steps_weighed = False
        self.forced = forced
        self.measure = measure
        self.measure_steps = measure_steps
        # (step, layer index, session) -> a function of the layer's scores giving its budget; None: config.delta
        self.delta_for = delta_for
        self.cached_steps = cached_steps
        self.lagged = lagged
        # (step, layer index) -> a lagged pass's scores on their way to the host (see _defer)
        self._pending: dict[tuple[int, int], tuple[torch.Tensor, Any]] = {}
        self._reuses = np.array([m.reads_previous_output for m in self.candidates])
        # Whether every candidate can be scored on part of the batch (CFG and residual sharing read the
        # other CFG half or every element's residual), the exact output with them.
        self._scored_on_part = not any(m.reads_beyond_qkv and not m.reads_previous_output for m in self.candidates)
        self._residual = np.array([m.reads_residual for m in self.candidates])
        self.layer_delta: dict[tuple[int, int], float] = {}  # (step, layer index) -> the budget it was decided at
        self.solver_seconds = 0.0  # host time in the programs (reported in the plan's provenance)
        shape = (plan.num_steps, len(plan.model.layers), max(l.heads for l in plan.model.layers), len(self.candidates))
        self.rse = np.full(shape, np.nan)
        self.decided: set[tuple[int, int]] = set()
        # (layer, call) -> (squared errors (candidates, heads), variance) of a later call of a step
        self.later_calls: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.compiled: dict[tuple, Any] = {}  # a row's content -> its compiled row
        self.residuals: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
        self.locked: dict[tuple[int, int], float] = {}  # (layer, head) -> residual window since last full
        self.last_full: dict[tuple[int, int], int] = {}  # (layer, head) -> last plain-full step; absent: 0
        # step -> (layer, head) whose choice there paid for its residual's capture (see _captures)
        self.charged: dict[int, set[tuple[int, int]]] = {}
        self.geometry: tuple[int, int] | None = None
        self.tiles: TileGrid | None = None  # the image grid of the calls whose resolution the plan records
        self._stock: torch.Tensor | None = None  # the whole batch's exact output of the layer just scored, for its row
        self.offload: HostOutputs | None = None
        self._offload_decided = config.offload_outputs is False
        self._call_shapes: dict[int, torch.Size] = {}  # call slot -> its input's shape, this generation
        self._mode_tensors: dict[tuple, torch.Tensor] = {}  # (modes, device) -> ops.mode_tensor of them
        # Per resolution, what every layer-step's decision reads: the candidates' costs, and which are distinct.
        self._cost_rows: dict[tuple, np.ndarray] = {}
        self._distinct: dict[tuple, np.ndarray] = {}

    def scheduler_set(self, num_steps: int) -> None:
        super().scheduler_set(num_steps)
        # Another step count is refused at the first transformer call (check_scheduled_steps), by name.
        if self.weigh_steps is not None and num_steps == self.plan.num_steps:
            self._weigh(self.scheduler_hook.scheduler, num_steps)

    def _weigh(self, scheduler, num_steps: int) -> None:
        factors = self.weigh_steps(scheduler, num_steps)
        self.weights = self._given_weights * factors[:, None, None, :]
        self._steps_weighed = True

    # decisions -----------------------------------------------------------------------------
    def row(self, layer: LayerRuntime, q, k, v, text_start, text_len, dense):
        key = (self.step, layer.index)
        tiles = layer.geometry.layout.tile_grid()
        if self._tile_candidates and tiles is None:
            self._refuse_tiles(layer)
        self.check_pool_call(layer)
        self._stock = None
        if self.offload is not None and self.step > 0:
            restored = self.offload.take((layer.index, self.call), q.device)
            if restored is not None:
                layer.slots.setdefault(self.call, _Buffers()).out = restored
            if layer.index + 1 < len(self.layers) or self.step < self.plan.num_steps - 1:
                self.offload.prefetch(((layer.index + 1) % len(self.layers), self.call), q.device)
        measured = (self.measure is None or layer.index in self.measure) and (
            self.measure_steps is None or self.step in self.measure_steps
        )
        if self.step > 0 and key not in self.decided:
            self._decide(layer, q, k, v, text_start, text_len, dense, measured)
        elif self.call > 0 and measured and self.step < self.plan.num_steps - 1:
            # Scored now, counted in the next step's decision.
            exact, part = self._exact(layer, q, k, v, dense, self.plan.methods[self.step][layer.index])
            self.later_calls[(layer.index, self.call)] = self._errors(layer, q, k, v, text_start, text_len, exact, part)
        image_tokens = q.shape[1] - text_len
        # The resolution a plan records is that of the layers over text; a model without any
        # (Wan's self-attention) records its image-only calls.
        if self.geometry is None and (text_len or not any(spec.text for spec in self.plan.model.layers)):
            self.geometry = (image_tokens, text_len)
            self.tiles = tiles
        names = tuple(self._own_row(layer.index))
        methods = [parse_method(name) for name in names]
        route_full = self.route_full(q, k, v, text_start, text_len, layer.geometry)
        residual_from = tuple(self._residual_from(layer.index, methods))
        # By content: many layer-steps run the same row (all full, all cached), compiled once.
        compiled_key = (names, image_tokens, q.device, route_full, tiles, residual_from)
        if compiled_key not in self.compiled:
            capture = [MODE_SKIP] * len(methods)
            self.compiled[compiled_key] = compile_row(
                methods, keep=True, capture=capture, num_image_tokens=image_tokens, device=q.device, route_full=route_full,
                residual_from=residual_from, tiles=tiles,
            )
        row = self.compiled[compiled_key]
        if row.residual_add is not None:
            self._load_residuals(layer, methods, image_tokens)
        return row

    def _refuse_tiles(self, layer: LayerRuntime) -> None:
        """Tile or pool candidates on a call without an image grid: refused at its first call, before the pass's work."""
        shown = ", ".join(self._tile_candidates[:3]) + (", ..." if len(self._tile_candidates) > 3 else "")
        raise ValueError(
            f"the tile and pool candidates ({shown}) need the image grid (frames x rows x cols of latent patches), which "
            f"{layer.name} of {type(self.transformer).__name__} does not get in this call ({self.adapter.FAMILY} gives "
            "no grid for it): search with arrow:<f> candidates instead (SearchConfig(candidates=...) without tile: or pool:)"
        )

    def _residual_from(self, layer: int, methods: list[Method]) -> list[tuple[int, int]]:
        """(head, last plain-full step) of every arrow_residual head: the runtime's rule for which
        residual a head adds (a call slot that did not keep it computes the head instead)."""
        first = self.own_heads(layer).start
        return [(h, self.last_full.get((layer, first + h), 0)) for h, m in enumerate(methods) if m.reads_residual]

    def _kept(self, layer: LayerRuntime, heads: int) -> torch.Tensor:
        """(heads,) bool on the host: whether this call slot kept each head's residual at the head's
        last plain-full step (``slot.captured``, which :meth:`_keep_residuals` fills)."""
        slot = layer.slots.get(self.call)
        captured = slot.captured if slot is not None else {}
        first = self.own_heads(layer.index).start
        return torch.tensor([captured.get(h) == self.last_full.get((layer.index, first + h), 0) for h in range(heads)])

    def _candidate_outputs(self, layer: LayerRuntime, q, k, v, text_start, text_len, exact, part=None):
        """Yield each candidate's :class:`_Candidate` one at a time, so memory stays bounded.

        Each output is what the runtime runs in this call if every head took the candidate; a
        head it would compute exactly (no residual kept in this call slot) gets the exact output.
        ``cache`` yields nothing where the call slot did not run at the previous step (one that
        first appears mid-generation, or step 0): it can run there from the next step on.
        ``part``: the batch elements ``exact`` holds, on which every candidate is then scored
        (None: ``exact`` is the whole batch's).
        """
        layout = layer.geometry.layout
        tiles = layout.tile_grid()
        image_rows = (layout.image_start, layout.image_len)
        heads = q.shape[2]
        slot = layer.slots.get(self.call)
        residuals = self.residuals.get((layer.index, self.call), {})
        kept = unmeasured = None
        if any(m.reads_residual for m in self.candidates):
            kept = self._kept(layer, heads)
            unmeasured = ~kept
            if self.call > 0:
                # Later calls are scored a step ahead: a head not kept computes exactly then, unless
                # it runs full now and so keeps its residual for the next step (not measurable yet).
                full_now = torch.tensor(
                    [parse_method(name).exact for name in self._own_row(layer.index)]
                )
                unmeasured = ~kept & full_now
            kept_mask = kept.to(q.device).view(1, 1, -1, 1)
        by_mode: dict[int, list[int]] = {}
        for index, method in enumerate(self.candidates):
            if method.reads_previous_output:
                if slot is not None and slot.out is not None and slot.step == self.step - 1:
                    yield _Candidate(index, slot.out if part is None else slot.out[part])
            else:
                by_mode.setdefault(method.mode(layout.image_len, tiles), []).append(index)
        for mode, indices in by_mode.items():
            if mode < 0:
                if all(self.candidates[i].exact for i in indices):
                    continue  # exact by definition: its error row stays 0
                base, rows, sample = exact, None, None
            else:
                modes = self._modes((mode,) * heads, q.device)
                if part is not None:
                    sample, view = None, part
                else:
                    # What the others read (a residual, the other CFG half) is the whole batch's.
                    whole = any(self.candidates[i].reads_beyond_qkv for i in indices)
                    sample = None if whole else score_sample(q.shape[0], self._turn(layer))
                    view = slice(None) if sample is None else sample
                base = ops.headwise_attention(q[view], k[view], v[view], modes, **layer.geometry.rows(view),
                                              impl=self.impl, global_rows=False)
                rows = image_rows
            for index in indices:
                method = self.candidates[index]
                if method.reads_residual:
                    if mode in residuals:
                        yield _Candidate(index, torch.where(kept_mask, base + residuals[mode], exact), unmeasured, rows)
                    elif self.call > 0:  # no full step of this call kept one: every head computes
                        yield _Candidate(index, exact, unmeasured)
                    continue
                # CFG is the step's first call; later ones (skip-layer guidance) run it unshared.
                yield _Candidate(index, base, None, rows, method.shares_cfg and self.call == 0, sample)

    def _modes(self, modes: tuple[int, ...], device) -> torch.Tensor:
        """The op's head-mode tensor of ``modes``, made once per pass: one made on the device would be
        read back by the op at every call, a wait for the GPU's queued work at every layer-step."""
        key = (modes, device)
        if key not in self._mode_tensors:
            self._mode_tensors[key] = ops.mode_tensor(modes, device)
        return self._mode_tensors[key]

    def _squared_errors(self, candidate: _Candidate, exact: torch.Tensor, layout, variances=None) -> torch.Tensor:
        """(heads,) float32 squared error of one candidate's output against the exact one.
        ``variances``: the exact output's head variances, None -> over the batch, (start, step) ->
        over that sample (filled here, once per sample: the pool candidates of a call share it),
        which scale a sampled candidate's error to the batch."""
        out, rows, impl = candidate.out, candidate.rows, stats_impl(self.impl)
        if candidate.sample is not None:
            part, key = exact[candidate.sample], (candidate.sample.start, candidate.sample.step)
            if key not in variances:
                variances[key] = ops.head_variances(part, impl=impl)
            errors = ops.head_squared_errors(out, part, rows=rows, impl=impl)
            return sampled_errors(errors, variances[None], variances[key])
        if not candidate.shared:
            if out is exact:
                return torch.zeros(exact.shape[2], dtype=torch.float32, device=exact.device)
            return ops.head_squared_errors(out, exact, rows=rows, impl=impl)
        half = exact.shape[0] // 2
        cond, uncond = slice(half, None), slice(None, half)
        # Both halves take the conditional half's output.
        error = ops.head_squared_errors(out[cond], exact[uncond], rows=rows, impl=impl)
        if out is not exact:
            error = error + ops.head_squared_errors(out[cond], exact[cond], rows=rows, impl=impl)
        if rows is not None:  # the rows out lacks: the conditional half's exact output, which they equal
            for segment in layout.segments:
                error = error + ops.head_squared_errors(exact[cond], exact[uncond], rows=segment, impl=impl)
        return error

    def _turn(self, layer: LayerRuntime) -> int:
        """Which of the batch's parts this layer-step scores on (:func:`score_sample`)."""
        return self.step * len(self.layers) + layer.index

    def _exact(self, layer: LayerRuntime, q, k, v, dense, row: list[str] | None) -> tuple[torch.Tensor, slice | None]:
        """The exact output to score on, and the batch elements it holds (None: all of them).

        ``row``: the call's row where it is known before its scores (a forced plan's, a step's later
        call's), else None. Where it runs every head full, the stock attention of the whole batch
        serves it too (:meth:`dense`) and the scores take their part of it; else only the scored part
        is computed. The scores are the same either way. A row decided from the scores seldom runs
        every head full (2-34% of the layer-steps of the testbeds' plans), and then computes the
        whole batch's after them: less in all than guessing from the previous step's row.
        """
        part = score_sample(q.shape[0], self._turn(layer)) if self._scored_on_part else None
        if part is None or (row is not None and all(parse_method(name).exact for name in row)):
            self._stock = dense()
            return (self._stock if part is None else self._stock[part]), part
        return routing.exact_attention(q[part], k[part], v[part], layer.geometry.rows(part), self.impl), part

    def _errors(self, layer: LayerRuntime, q, k, v, text_start, text_len, stock, part=None):
        """Squared error per candidate and head (NaN where a candidate cannot run yet), and the
        layer's variance, both on the device (one host read per layer-step, in :meth:`_scores`).
        ``stock``: the exact output of the batch elements ``part`` (None: all)."""
        errors = torch.full((len(self.candidates), q.shape[2]), float("nan"), dtype=torch.float32, device=q.device)
        for index, method in enumerate(self.candidates):
            if method.exact:
                errors[index] = 0.0
        variances = {None: ops.head_variances(stock, impl=stats_impl(self.impl))}
        for candidate in self._candidate_outputs(layer, q, k, v, text_start, text_len, stock, part):
            errors[candidate.index] = self._squared_errors(candidate, stock, layer.geometry.layout, variances)
            if candidate.unmeasured is not None:
                errors[candidate.index, candidate.unmeasured.to(q.device)] = float("nan")
        variance = layer_variance(stock, head_variances=variances[None])
        if part is not None:  # sums over the part, as over the batch: a step's calls of other batches pool by their batch
            scale = q.shape[0] / len(range(*part.indices(q.shape[0])))
            errors, variance = errors * scale, variance * scale
        return self._whole_layer(errors, variance)

    def _whole_layer(self, errors: torch.Tensor, variance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's (squared errors (candidates, heads), variance) from those of this session's heads."""
        return errors, variance

    def own_heads(self, layer: int) -> range:
        """The heads of ``layer`` this session computes (context parallelism: its rank's)."""
        return range(self.plan.model.layers[layer].heads)

    def _own_row(self, layer: int) -> list[str]:
        """The current step's methods of this session's heads of ``layer``."""
        heads = self.own_heads(layer)
        return self.plan.methods[self.step][layer][heads.start:heads.stop]

    def _combined(self, layer: LayerRuntime, errors: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
        """(heads, candidates) unweighted float64 scores on the device, of this call plus the step's
        later calls as last measured."""
        later = [value for (index, _call), value in sorted(self.later_calls.items()) if index == layer.index]
        return combine_scores(errors, variance, later).T.double()

    def _scores(self, layer: LayerRuntime, combined: torch.Tensor) -> np.ndarray:
        """(heads, candidates) scores of :meth:`_combined`'s, weighted, on the host (waits for the GPU)."""
        scores = combined.cpu().numpy()
        return scores * self.weights[self.step, layer.index, : scores.shape[0]]

    def _defer(self, layer: LayerRuntime, errors: torch.Tensor, variance: torch.Tensor) -> None:
        """A lagged pass's scores of this layer-step, copied to the host without waiting for them:
        read when the layer decides at the next step (long arrived by then), or by :meth:`resolve`."""
        scores, ready = self._combined(layer, errors, variance), None
        if scores.is_cuda:
            host = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
            pinned_used()
            host.copy_(scores, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(scores.device))
            scores = host
        elif scores.device.type != "cpu":  # another accelerator: read now, as an unlagged pass does
            scores = scores.cpu()
        self._pending[(self.step, layer.index)] = (scores, ready)

    def resolve(self, step: int | None = None, index: int | None = None) -> np.ndarray | None:
        """A lagged pass's scores of (``step``, layer ``index``) into :attr:`rse` (all that are
        pending when both are None); returns those of the one asked for (None: not scored)."""
        keys = sorted(self._pending) if step is None else [(step, index)]
        rse = None
        for key in keys:
            if key not in self._pending:
                return None
            scores, ready = self._pending.pop(key)
            if ready is not None:
                ready.synchronize()
            rse = scores.numpy() * self.weights[key[0], key[1], : scores.shape[0]]
            self.rse[key[0], key[1], : rse.shape[0]] = rse
        return rse

    def _lagged_scores(self, layer: LayerRuntime, step: int, index: int) -> np.ndarray | None:
        """What a lagged pass decides ``layer`` on: its scores of the step before (None where it
        was not scored then: step 1, a layer skipped), without the candidates that read what this
        call slot kept at the step before where it did not run then (another expert took over)."""
        rse = self.resolve(step - 1, index)
        if rse is None:
            return None
        slot = layer.slots.get(self.call)
        if slot is None or slot.out is None or slot.step != step - 1:
            rse = np.where(self._reuses | self._residual, np.nan, rse)
        return rse

    def _decide(self, layer: LayerRuntime, q, k, v, text_start, text_len, dense, measured: bool = True) -> None:
        if self.weigh_steps is not None and not self._steps_weighed:  # no timesteps set: refused, or unweighted
            self._weigh(None, self.plan.num_steps)
        step, index, heads = self.step, layer.index, layer.spec.heads  # every head of the layer, wherever computed
        image_tokens, layer_text = q.shape[1] - text_len, text_len
        tiles = layer.geometry.layout.tile_grid()
        if measured:
            known = self.forced.methods[step][index] if self.forced is not None else None
            exact, part = self._exact(layer, q, k, v, dense, known)
            errors, variance = self._errors(layer, q, k, v, text_start, text_len, exact, part)
            if self.lagged:
                self._defer(layer, errors, variance)
            else:  # errors stay on the device until all candidates are scored: one host read per layer-step
                scores = self._combined(layer, errors, variance)
                if self.forced is not None:  # nothing to decide: read at once
                    self.rse[step, index, :heads] = self._scores(layer, scores)
        if self.forced is not None:
            chosen = [parse_method(name) for name in self.forced.methods[step][index]]
        elif self.lagged and (rse := self._lagged_scores(layer, step, index)) is None:  # nothing scored before
            chosen = [next(m for m in self.candidates if m.exact)] * heads
        else:
            # All that does not read the scores first, while the GPU still computes them.
            cost = self._costs(image_tokens, layer_text, tiles)[None, :].repeat(heads, 0)
            cost += self._captures(index, heads, cost)
            allowed = self._allowed(index, heads, image_tokens, tiles)
            budget = None if self.delta_for is None else self.delta_for(step, index, self)
            if not self.lagged:
                rse = self._scores(layer, scores)
                self.rse[step, index, :heads] = rse
            allowed &= np.isfinite(rse)
            self.layer_delta[step, index] = self.config.delta if budget is None else budget(rse)
            started = time.perf_counter()
            if self.cached_steps is not None and step in self.cached_steps:
                choice = whole_step_cache(rse, self.candidates)
            else:
                if self.cached_steps is not None:
                    allowed &= ~self._reuses
                choice = choose(rse, cost, self.layer_delta[step, index], self.config, allowed)
            self.solver_seconds += time.perf_counter() - started
            chosen = [self.candidates[c] for c in choice]
        for head, method in enumerate(chosen):
            if method.reads_residual and (index, head) not in self.locked:
                self.charged.setdefault(step, set()).add((index, head))
            if method.exact:
                self.locked.pop((index, head), None)
                self.last_full[(index, head)] = step
            elif method.reads_residual:
                self.locked[(index, head)] = method.fraction
        self.plan.methods[step][index] = [m.name for m in chosen]
        self.decided.add((step, index))
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(step=step, refresh=False)

    def _captures(self, layer: int, heads: int, cost: np.ndarray) -> np.ndarray:
        """(heads, candidates) what each candidate adds for the residual capture: an arrow_residual
        candidate that would be the head's first since its last exact step also pays for the window
        that step computes to keep the residual (the runtime's capture; its later ones share it)."""
        if not self._residual.any():
            return np.zeros_like(cost)
        free = np.array([(layer, head) not in self.locked for head in range(heads)])
        return np.where(free[:, None] & self._residual[None, :], cost, 0.0)

    def _costs(self, image_tokens: int, text_len: int, tiles: TileGrid | None = None) -> np.ndarray:
        """(candidates,) :meth:`_cost` of every candidate, worked out once per resolution and text length."""
        key = (image_tokens, text_len, tiles)
        if key not in self._cost_rows:
            self._cost_rows[key] = np.array([self._cost(m, image_tokens, text_len, tiles) for m in self.candidates])
        return self._cost_rows[key]

    def _cost(self, method: Method, image_tokens: int, text_len: int, tiles: TileGrid | None = None) -> float:
        """A candidate's cost at this resolution: the measured one given in the config, else its FLOP
        share (tile windows: on the image grid ``tiles``)."""
        if self.config.costs is not None and method.name in self.config.costs:
            return float(self.config.costs[method.name])
        return method.cost(image_tokens, text_len, tiles)

    def _allowed(self, layer: int, heads: int, image_tokens: int, tiles: TileGrid | None = None) -> np.ndarray:
        key = (image_tokens, tiles)
        if key not in self._distinct:
            self._distinct[key] = np.array(distinct_candidates(self.candidates, image_tokens, tiles))
        allowed = np.repeat(self._distinct[key][None, :], heads, axis=0)
        for index, method in enumerate(self.candidates):
            if method.reads_residual:
                for head in range(heads):
                    locked = self.locked.get((layer, head))
                    allowed[head, index] &= locked is None or locked == method.fraction
        return allowed

    def dense(self, layer: LayerRuntime, dense) -> torch.Tensor:
        stock, self._stock = self._stock, None
        return stock if stock is not None else dense()

    # residuals -----------------------------------------------------------------------------
    def _residual_modes(self, image_tokens: int) -> set[int]:
        return {m.mode(image_tokens) for m in self.candidates if m.reads_residual}

    def after(self, layer: LayerRuntime, q, k, v, out, text_start, text_len) -> None:
        self._keep_residuals(layer, q, k, v, out, text_start, text_len)
        if not self._offload_decided:
            self._decide_offload(layer.slots[self.call].out)
        if self.offload is not None:
            slot = layer.slots[self.call]
            if self.step < self.plan.num_steps - 1:  # the last step's outputs are never read
                self.offload.store((layer.index, self.call), slot.out)
            slot.out = None

    def _decide_offload(self, output: torch.Tensor) -> None:
        self._offload_decided = True
        need = output.nbytes * len(self.layers)
        offload = self.config.offload_outputs
        if offload is None and output.device.type == "cuda":
            free = torch.cuda.mem_get_info(output.device)[0]
            offload = need > free / 2
            logger.info(
                "ditfastattn calibrate: previous-step outputs need %.1f GiB, %.1f GiB free on the GPU: %s",
                need / 2**30, free / 2**30, "kept in host memory" if offload else "kept on the GPU",
            )
        if offload:
            self.offload = HostOutputs(output.device)

    def _keep_residuals(self, layer: LayerRuntime, q, k, v, out, text_start, text_len) -> None:
        """Keep full - arrow for every residual window on heads that ran plain full at this step."""
        windows = self._residual_modes(q.shape[1] - text_len)
        if not windows:
            return
        methods = [parse_method(name) for name in self._own_row(layer.index)]
        full = [m.exact for m in methods]
        if not any(full):
            return
        mask = torch.tensor(full, device=q.device).view(1, 1, -1, 1)
        store = self.residuals.setdefault((layer.index, self.call), {})
        # Which residual this call slot holds per head; freed with the slot, as in the runtime.
        layer.slots[self.call].captured.update((h, self.step) for h, f in enumerate(full) if f)
        for mode in windows:
            modes = self._modes(tuple(mode if f else MODE_SKIP for f in full), q.device)
            arrow = torch.empty_like(out)
            ops.headwise_attention(q, k, v, modes, **layer.geometry.op, out=arrow, impl=self.impl)
            previous = store.get(mode)
            store[mode] = torch.where(mask, out - arrow, previous if previous is not None else torch.zeros_like(out))

    def _load_residuals(self, layer: LayerRuntime, methods: list[Method], image_tokens: int) -> None:
        """The slot's residual for this row's arrow_residual heads that this call slot kept; the
        others compute exactly (the runtime's rule), so their rows of it are never read."""
        slot = layer.slots.get(self.call)
        if slot is None:
            return  # a call slot that first appears now kept nothing: its arrow_residual heads compute
        store = self.residuals.get((layer.index, self.call), {})
        kept = self._kept(layer, len(methods)).tolist()
        residual = None
        for mode in {m.mode(image_tokens) for m in methods if m.reads_residual} & set(store):
            flags = [m.reads_residual and m.mode(image_tokens) == mode and kept[h] for h, m in enumerate(methods)]
            mask = torch.tensor(flags, device=store[mode].device).view(1, 1, -1, 1)
            residual = torch.where(mask, store[mode], residual if residual is not None else torch.zeros_like(store[mode]))
        slot.residual = residual

    def _start_generation(self) -> None:
        super()._start_generation()
        self.residuals.clear()
        if self.offload is not None:
            self.offload.drop()
        self.later_calls.clear()
        self._call_shapes.clear()

    def begin_call(self, module, args, kwargs) -> None:
        super().begin_call(module, args, kwargs)
        shape = latents_shape(self._arguments(args, kwargs))
        if shape is None:
            return
        first = self._call_shapes.setdefault(self.call, shape)
        if shape != first:
            # The candidates' errors and the kept outputs are of one shape per call slot.
            self._new_generation = True
            raise ValueError(
                f"calibrate measures each transformer call of a step at one shape, but at step {self.step} the input "
                f"changed from {first} to {shape} (classifier-free guidance ended early, by a "
                "step callback or Z-Image's cfg_truncation?); calibrate without that: the plan then runs under it, "
                "computing the heads that would read outputs of the old shape"
            )

    def switch_expert(self) -> None:
        super().switch_expert()  # the other expert's outputs: no cache candidate at this step
        self.residuals.clear()
        self.later_calls.clear()  # scored on the other expert's weights

    def end_call(self, module, args, kwargs, output) -> None:
        super().end_call(module, args, kwargs, output)
        prepare = getattr(self.delta_for, "prepare", None)
        if (prepare is not None and 0 < self.step < self.plan.num_steps - 1
                and all((self.step, index) in self.decided for index in range(len(self.layers)))):
            # The next step's budgets depend only on the steps decided so far: worked out now, while
            # the GPU still runs this call's queued layers, rather than at the next step's first
            # decision, where it waits on the host (tens of milliseconds a step at 50 steps).
            prepare(self.step + 1, self)
        if self.step == self.plan.num_steps - 1:
            for key in [key for key in self.residuals if key[1] == self.call]:
                del self.residuals[key]
            if self.offload is not None:
                self.offload.drop(self.call)


class _UlyssesCalibrationSession(Ulysses, _CalibrationSession):
    """Calibration on one rank of diffusers' Ulysses context parallelism: the rank scores its own
    heads over the whole sequence (as the applied plan runs them), the layer's errors and variance
    are pooled over the ranks (one all-gather per layer call), and every rank solves the same
    program over all the layer's heads, then runs its own heads' methods."""

    def __init__(self, transformer, plan, adapter, impl, **kwargs):
        self.join(transformer, plan, adapter)
        super().__init__(transformer, plan, adapter, impl, **kwargs)

    def _whole_layer(self, errors: torch.Tensor, variance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        candidates, heads = errors.shape
        gathered = self.all_gather(torch.cat([errors.flatten(), variance.view(1)]))  # (ranks, errors + variance)
        errors = gathered[:, :-1].unflatten(1, (candidates, heads)).transpose(0, 1).flatten(1)  # heads in rank order
        return errors, gathered[:, -1].sum()


def whole_step_cache(rse: np.ndarray, candidates: list[Method]) -> np.ndarray:
    """(heads,) every head's choice at a step cached whole: ``cache``, or ``full`` for a head with
    nothing to reuse (``rse`` (heads, candidates): NaN where a candidate could not run)."""
    names = [m.name for m in candidates]
    cache, full = names.index("cache"), names.index("full")
    return np.where(np.isfinite(rse[:, cache]), cache, full)


def _clone(output):
    """A copy of a transformer's output (a tensor, a tuple of them, or a diffusers output class)."""
    if torch.is_tensor(output):
        return output.clone()
    if isinstance(output, tuple):
        return tuple(_clone(item) for item in output)
    if isinstance(output, dict):
        return type(output)(**{key: _clone(value) for key, value in output.items()})
    return output


def run_pass(
    pipe, spec, call: dict[str, Any], config, bar: tqdm | None, *, record: dict | None = None,
    replay: tuple[dict, int] | None = None, **session_kwargs,
):
    """One calibration pass over ``call`` (the pipeline's keyword arguments); returns the session
    and the pipeline's output latents. The session is uninstalled even when the pass fails.

    ``record`` collects the transformer's output of every (step, call). ``replay=(recorded,
    until)`` hands back a recorded pass's outputs for the steps before ``until`` instead of running
    the transformer, so the pass follows that pass's trajectory exactly up to there at almost no
    cost (the sensitivity probes, which only change later steps).
    """
    config = config._resolved()  # idempotent: calibrate() hands it resolved already
    steps = config.num_inference_steps
    initial = Plan(spec, [[["full"] * layer.heads for layer in spec.layers] for _ in range(steps)])

    transformer = pipe.transformer
    session_cls = _UlyssesCalibrationSession if context_parallel(transformer) else _CalibrationSession
    session = install(pipe, initial, config.impl, session_cls=session_cls, config=config, progress=bar, **session_kwargs)
    handles = []
    if record is not None:
        def keep(module, args, kwargs, output):
            record[(session.step, session.call)] = _clone(output)

        handles += [expert.register_forward_hook(keep, with_kwargs=True) for expert in session.experts]
    # e.g. an offload wrapper: restored as it was
    own_forwards = [(expert, expert.__dict__.get("forward")) for expert in session.experts]
    # One progress bar at a time: calibration's own, not the pipeline's per pass.
    bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(**{**bar_config, "disable": True})
    if replay is not None:
        recorded, until = replay

        def replaying(forward):
            def replayed(*args, **kwargs):
                if session.step < until:
                    return _clone(recorded[(session.step, session.call)])
                return forward(*args, **kwargs)

            return replayed

        for expert in session.experts:
            expert.forward = replaying(expert.forward)
    try:
        with torch.no_grad():
            output = pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(config.seed),
                          **latent_output(pipe), **call)
    finally:
        for handle in handles:
            handle.remove()
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(**bar_config)
        if replay is not None:
            for expert, own_forward in own_forwards:
                if own_forward is None:
                    del expert.forward
                else:
                    expert.forward = own_forward
        uninstall(pipe)
    session.resolve()
    first = max(replay[1], 1) if replay is not None else 1  # step 0 decides nothing; replayed steps run nothing
    missing = (steps - first) * len(spec.layers) - len(session.decided)
    if missing and session.step < steps - 1:
        raise RuntimeError(
            f"the calibration pass ended after {session.step + 1} of its {steps} steps (a step callback in "
            "pipeline_kwargs that interrupts the pipeline?); calibration measures every step, so let it run them all"
        )
    if missing:
        raise RuntimeError(
            f"calibration decided only {len(session.decided)} layer-steps; {missing} were never run: calibration "
            "measures every attention layer at every step, so remove what skips layers or blocks first (a diffusers "
            "cache: transformer.disable_cache())"
        )
    return session, _final_latents(output)


def latent_output(pipe) -> dict[str, str]:
    """The argument that makes ``pipe`` return its latents undecoded: ``output_type="latent"``. A
    diffusers modular pipeline takes it only where one of its blocks reads it (a decode step; others
    warn that it is ignored), and returns its state, latents included, either way."""
    block_inputs = getattr(getattr(pipe, "blocks", None), "input_names", None)
    if block_inputs is not None:
        return {"output_type": "latent"} if "output_type" in block_inputs else {}
    try:
        accepts = "output_type" in inspect.signature(type(pipe).__call__).parameters
    except (TypeError, ValueError):
        accepts = True
    return {"output_type": "latent"} if accepts else {}


def _final_latents(output) -> torch.Tensor:
    """A pass's final latents (``output_type="latent"``): ``.images`` of image pipelines, ``.frames``
    of diffusers' video ones, ``latents`` of a modular pipeline's state."""
    for name in ("frames", "images"):
        if hasattr(output, name):
            return getattr(output, name)
    latents = output.get("latents") if callable(getattr(output, "get", None)) else None
    if not torch.is_tensor(latents):
        raise TypeError(f"the pipeline returned a {type(output).__name__} without images, frames or latents; calibrate "
                        "reads the final latents of a pipeline that returns them (output_type='latent')")
    return latents
