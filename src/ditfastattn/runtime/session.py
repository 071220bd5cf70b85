"""The dynamic session: step tracking on the host, per-layer buffers, residuals, CFG sharing."""

from __future__ import annotations

import inspect
import logging
import sys

import torch

from .. import ops
from ..adapters import base
from ..methods import parse_method
from .._geometry import TileGrid
from ..model import TokenLayout
from ..plan import Plan
from .budget import _size, fit_cache_budget
from .call_geometry import CallGeometry
from .caches import layer_skipping_cache, named
from .layer_skip import attention_scores_skipped
from .routing import attend_dense
from .rows import _compile_rows, _Row, cache_heads
from .steps import SchedulerHook, steps_of, too_many_steps, warn_short_generation, warn_unhooked_tie

logger = logging.getLogger("ditfastattn.runtime")


def full_head_cost(*args) -> float:
    """:func:`.routing.full_head_cost`, looked up on the package at each call: callers (and tests)
    replace ``ditfastattn.runtime.full_head_cost`` to model another GPU."""
    return sys.modules[__package__].full_head_cost(*args)


class _Buffers:
    """Output and residual buffers of one layer for one transformer call slot."""

    __slots__ = ("out", "residual", "step", "captured")

    def __init__(self):
        self.out: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.step: int | None = None  # the step whose output `out` holds
        self.captured: dict[int, int] = {}  # head -> step whose residual `residual` holds


def _fits(kept: torch.Tensor | None, q: torch.Tensor) -> bool:
    """Whether ``kept`` (a slot's output or residual, if any) has the rows of a call on ``q``."""
    return kept is None or (kept.shape == q.shape and kept.dtype == q.dtype and kept.device == q.device)


class LayerRuntime:
    """The runtime side of one attention layer; adapters' processors call :meth:`attend`."""

    def __init__(self, session: "Session", index: int, name: str):
        self.session = session
        self.index = index
        self.name = name
        self.spec = session.plan.model.layers[index]
        self.slots: dict[int, _Buffers] = {}
        self._rows: dict[tuple[int, torch.device], list[_Row]] = {}
        self.geometry: CallGeometry | None = None  # of the call being attended

    def row(self, q: torch.Tensor, num_image_tokens: int, route_full: bool) -> _Row:
        """The plan's row at this step, compiled for this call (tile windows: for its grid)."""
        dropped = self.session.dropped_steps(self.index, q, num_image_tokens)
        tiles = None if self.geometry is None else self.geometry.layout.tile_grid()
        key = (num_image_tokens, q.device, dropped, route_full, tiles)
        if key not in self._rows:
            self._rows[key] = _compile_rows(
                self.session.plan, self.index, num_image_tokens, q.device, dropped, route_full, tiles
            )
        return self._rows[key][self.session.step]

    def attend(self, q, k, v, *, text_start: int | None = None, text_len: int | None = None, dense,
               dense_only: str | bool = False, layout: TokenLayout | None = None, key_padding=None) -> torch.Tensor:
        """Attention of one layer call under the plan; q, k, v are (B, S, H, D) views.

        The token layout is ``text_start``/``text_len`` (one text segment at the start or the end)
        or ``layout``; ``key_padding`` is a (B, S) bool mask or an ``ops.Padding``. ``dense()``
        computes the stock attention (B, S, H, D); it serves layers whose heads are all ``full`` at
        this step, which keeps an all-full plan bitwise equal to stock diffusers. ``dense_only``
        says why this call can run only the stock attention (an input the op cannot express).
        """
        session = self.session
        if attention_scores_skipped():  # the identity on v, which the stock call gives (see .layer_skip)
            return dense()
        geometry = self.geometry = CallGeometry.of(q.shape[1], text_start, text_len, layout, key_padding)
        if not geometry.simple:
            session.check_layout_support(self)
        row = self._runnable(session.row(self, q, k, v, geometry.text_start, geometry.text_len, dense), q)
        if dense_only:
            # At the first call that shows it, not at the step that compresses (after the work before it).
            step = session.step if not row.all_full else session.compressed_step_after(self.index)
            if step is not None:
                what = dense_only if isinstance(dense_only, str) else "attention masks and context parallelism"
                raise NotImplementedError(
                    f"{self.name}: {what} runs only the stock attention, but the plan compresses this layer at step "
                    f"{step}; apply a plan that keeps this layer full, or call the model without it"
                )
        if row.all_full and row.capture_modes is None and not row.keep:
            return dense()
        slot = self.slots.setdefault(session.call, _Buffers())
        if row.all_full:
            out = result = session.dense(self, dense)
        else:
            # A new buffer at every call: an output returned once is never written again (caches and
            # hooks keep module outputs across steps: TaylorSeer's differences of two steps' outputs).
            out = result = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            if row.cache_index is not None:  # the op leaves their rows as they are: the previous step's
                _copy_heads(out, slot.out, row.cache_index)
            self._compute(q, k, v, row, out, geometry)
            if row.residual_index is not None:
                _add_heads(out, slot.residual, row.residual_index)
        if row.capture_modes is not None:
            arrow = torch.empty_like(out)
            ops.headwise_attention(q, k, v, row.capture_modes, **geometry.op, out=arrow, impl=session.impl)
            if slot.residual is None:
                # Rows of heads this slot never captured are never read (_runnable computes those heads).
                slot.residual = torch.empty_like(out)
            _store_difference(slot.residual, result, arrow, row.capture_index)
            slot.captured.update(dict.fromkeys(row.captured_heads, session.step))
        slot.out = out if row.keep else None  # else the caller's reference keeps it alive as long as it is used
        slot.step = session.step
        session.after(self, q, k, v, result, geometry.text_start, geometry.text_len)
        return result

    def _runnable(self, row: _Row, q: torch.Tensor) -> _Row:
        """``row``, or its variant in which the heads that would read what this call slot does not
        hold compute instead: cache heads when the slot did not run at the previous step (a call
        that first appears mid-generation, such as skip-layer guidance), arrow_residual heads whose
        residual this slot never captured, and both where the slot holds another shape than ``q``'s
        (a callback ending CFG early halves the batch: what it holds belongs to other rows)."""
        session = self.session
        slot = self.slots.get(session.call)
        if slot is not None and not (_fits(slot.out, q) and _fits(slot.residual, q)):
            self.slots[session.call] = slot = _Buffers()
            if row.cache_heads or row.residual_from:
                session.reshaped_layer_steps += 1
        missing = set()
        if row.cache_heads and (slot is None or slot.out is None or slot.step != session.step - 1):
            missing.update(row.cache_heads)
            if slot is not None and slot.step is not None and slot.step < session.step - 1:
                session.skipped_layer_steps += 1  # ran in this slot before, not at the step before
        if row.residual_from:
            captured = slot.captured if slot is not None else {}
            missing.update(head for head, step in row.residual_from if captured.get(head) != step)
        return row.computing(frozenset(missing)) if missing else row

    def _compute(self, q, k, v, row: _Row, out, geometry: CallGeometry) -> None:
        impl = self.session.impl
        if row.full_heads is not None:
            ops.headwise_attention(q, k, v, row.sparse_modes, **geometry.op, out=out, impl=impl)
            attend_dense(q, k, v, row.full_heads, out, geometry.padding)
            return
        # CFG is the first call of a step; later ones (skip-layer guidance), and every call once CFG
        # ended (see Session._check_cfg_batch), hold conditional rows only, so their cfg_share heads
        # compute the whole batch: the sharing's conditional half.
        if row.uncond_modes is None or not self.session.cfg_halves:
            if row.uncond_modes is not None and self.session.call == 0:
                self.session.unshared_layer_steps += 1
            ops.headwise_attention(q, k, v, row.modes, **geometry.op, out=out, impl=impl)
            return
        batch = q.shape[0]
        if batch % 2:
            raise cfg_batch_error(batch)
        half = batch // 2
        cond, uncond = slice(half, batch), slice(0, half)
        ops.headwise_attention(q[cond], k[cond], v[cond], row.modes, **geometry.rows(cond), out=out[cond], impl=impl)
        ops.headwise_attention(
            q[uncond], k[uncond], v[uncond], row.uncond_modes, **geometry.rows(uncond), out=out[uncond], impl=impl,
        )
        out[uncond] = torch.where(row.share_mask, out[cond], out[uncond])

    def free(self, call: int | None = None) -> None:
        if call is None:
            self.slots.clear()
        else:
            self.slots.pop(call, None)


def _copy_heads(out: torch.Tensor, source: torch.Tensor, heads: slice | torch.Tensor) -> None:
    """``out = source`` on ``heads`` (dim 2) only."""
    if isinstance(heads, slice):
        out[:, :, heads].copy_(source[:, :, heads])
    else:
        out.index_copy_(2, heads, source.index_select(2, heads))


def _add_heads(out: torch.Tensor, residual: torch.Tensor, heads: slice | torch.Tensor) -> None:
    """``out += residual`` on ``heads`` (dim 2) only."""
    if isinstance(heads, slice):
        out[:, :, heads].add_(residual[:, :, heads])
    else:
        out.index_add_(2, heads, residual.index_select(2, heads))


def _store_difference(residual, result, arrow, heads: slice | torch.Tensor) -> None:
    """``residual = result - arrow`` on ``heads`` (dim 2) only; other heads keep what they hold."""
    if isinstance(heads, slice):
        torch.sub(result[:, :, heads], arrow[:, :, heads], out=residual[:, :, heads])
    else:
        residual.index_copy_(2, heads, result.index_select(2, heads).sub_(arrow.index_select(2, heads)))


def _latents(arguments: dict) -> list[torch.Tensor] | None:
    """A transformer call's latents: ``hidden_states`` (its first argument where it has none), a
    tensor or, as Z-Image takes them, a list of one per batch element; as a list, None if neither."""
    latents = arguments.get("hidden_states", next(iter(arguments.values()), None))
    if torch.is_tensor(latents):
        return [latents]
    if isinstance(latents, (list, tuple)) and latents and all(torch.is_tensor(t) for t in latents):
        return list(latents)
    return None


def latents_shape(arguments: dict) -> tuple | None:
    """The shape of a transformer call's latents (a list's: batch first)."""
    latents = _latents(arguments)
    if latents is None:
        return None
    hidden = arguments.get("hidden_states", next(iter(arguments.values()), None))
    return tuple(latents[0].shape) if torch.is_tensor(hidden) else (len(latents), *latents[0].shape)


def latents_print(arguments: dict, timestep) -> torch.Tensor | None:
    """Three numbers that tell a call's latents from other latents: their element count, sum and sum
    of squares (float32, which every device has; on their device: no host read). None where the
    latents cannot tell a new generation from the next step: a bfloat16 timestep, where neighbouring
    steps near 1000 round to one value on other latents (float16's spacing there is 0.5)."""
    latents = _latents(arguments)
    if latents is None or (torch.is_tensor(timestep) and timestep.dtype == torch.bfloat16):
        return None
    values = [tensor.detach().float() for tensor in latents]
    device = values[0].device
    count = torch.full((), float(sum(v.numel() for v in values)), dtype=torch.float32, device=device)
    total = sum(v.sum().to(device) for v in values)
    squares = sum(v.square().sum().to(device) for v in values)
    return torch.stack([count, total, squares])


def experts_of(transformer, pipe) -> list[torch.nn.Module]:
    """The transformers a plan applied to ``pipe`` runs on: ``pipe.transformer`` and, where the
    pipeline hands the low-noise steps to a second expert (Wan 2.2 A14B's ``transformer_2``; one
    with ``boundary_ratio=None`` never does), that one too. Given a transformer alone, that one."""
    second = getattr(pipe, "transformer_2", None) if pipe is not None else None
    config = getattr(pipe, "config", None) or {}
    if not isinstance(second, torch.nn.Module) or second is transformer or (
            "boundary_ratio" in config and config["boundary_ratio"] is None):
        return [transformer]
    return [transformer, second]


def loose_pool_methods(pooled: list[str], grid: tuple[int, int, int]) -> list[str]:
    """The pool methods of ``pooled`` whose factor leaves partial patches of ``grid`` (frames, rows,
    cols): their edge tokens stay keys of their own, which only the SDPA path computes."""
    return [name for name in pooled if grid[1] % parse_method(name).factor or grid[2] % parse_method(name).factor]


def _not_copyable() -> TypeError:
    # A copy would share this model's hooks and layers (FLUX's ran stock, SD3's could not be copied at all).
    return TypeError(
        "a model with a ditfastattn plan applied cannot be copied or pickled (the plan's hooks and buffers belong to "
        "this model): call ditfastattn.remove() first, copy or save the model, then apply the plan to each copy"
    )


class Session:
    """State of one applied plan: the current step, the call slot within it, and the layers."""

    layer_cls = LayerRuntime
    buffers_per_generation = False  # a layer holds its buffer only while its next step caches
    # Whether row() and after() read ``layer.geometry`` (global segments on both sides, padding)
    # rather than only their (text_start, text_len); a subclass that overrides row() says so itself.
    layout_aware = True
    # Whether this session runs under diffusers' parallelism (False: one whole model); see .parallel
    context_parallel = False

    def __deepcopy__(self, memo):
        raise _not_copyable()

    def __reduce_ex__(self, protocol):
        raise _not_copyable()

    def __init__(self, transformer, plan: Plan, adapter, impl: str, cache_budget: int | None = None):
        self.transformer = transformer
        self.plan = plan
        self.applied_plan = plan  # what apply() was given (a parallel session runs its rank's slice of it)
        self.adapter = adapter
        self.impl = impl
        self.cache_budget = cache_budget
        self._dropped: dict[tuple, list[frozenset[int]]] = {}
        self._global_tokens = 0  # the text (global) tokens of the last call of a layer that has them
        self._budget_said: set[tuple[int, int, int]] = set()  # (batch, tokens, head-steps computed) logged
        self._loose_pool_said: set[tuple[int, int, int]] = set()  # grids whose partial pool patches were said
        self.step = 0
        self.call = 0
        self.calls_per_step = 1
        # Of the current transformer call: where its image tokens are (dispatch families), and what
        # is computed once per call (e.g. a check of its attention mask).
        self.image_segment: tuple[int, int] | str = "no transformer call has started"
        self.call_cache: dict = {}
        # Between a transformer call's start and end: the plan's layers run it only then, since another
        # model may run the same modules (Z-Image's controlnet runs the transformer's noise refiner).
        self.in_call = False
        self.scheduled_steps: int | None = None  # set by the hooked scheduler, checked at the next call
        self._last_timestep: float | None = None
        # With no scheduler hooked: a print of the latents of the generation's first call (see _restarted).
        self._first_latents: torch.Tensor | None = None
        # Denoising steps the hooked scheduler took, and how many of them the last transformer call had seen.
        self._scheduler_steps = self._steps_seen = 0
        self._tie_said = self._unfollowed_said = False
        self._new_generation = True
        self._running = False  # a generation has started (and may have stopped short of the plan's steps)
        self._counted = False  # the scheduler's step count was checked for the next generation
        self._checked = False  # ... for the current one
        self.layers = [self.layer_cls(self, index, layer.name) for index, layer in enumerate(plan.model.layers)]
        # Per layer, the steps whose row compresses it (of the plan as applied: a search decides later rows).
        self._compressed_steps = [[step for step, rows in enumerate(plan.methods) if any(m != "full" for m in rows[index])]
                                  for index in range(len(self.layers))]
        self.originals: list[tuple[torch.nn.Module, object]] = []  # (attention module, its processor at apply)
        self.handles: list = []
        self.experts = [transformer]  # the transformers the hooks are on (install sets them)
        self._expert: torch.nn.Module | None = None  # the one of the last call
        self.switch_steps: list[int] = []  # the steps another expert took over at, this generation
        self._switch_warned = False
        self.skipped_layer_steps = 0  # this generation's: see _report_skipped_layers
        self._skipped_said = False
        self.reshaped_layer_steps = self.unshared_layer_steps = 0  # this generation's: see _report_reshaped_calls
        self._reshaped_said = False
        self.pipe = None
        self.scheduler_hook: SchedulerHook | None = None
        self._parameters = tuple(inspect.signature(transformer.forward).parameters)
        self._timestep = getattr(adapter, "timestep", base.timestep)
        methods = [parse_method(m) for m in {m for rows in plan.methods for heads in rows for m in heads}]
        self._cfg_share = any(m.shares_cfg for m in methods)
        self._first_call_batch: int | None = None  # of the current step (see _check_cfg_batch)
        self._cfg_batch: int | None = None  # of the generation's first call: the CFG batch
        self.cfg_halves = True  # whether this call's batch is [unconditional; conditional]
        # Whether any head runs a tile window (dispatch marks text masks for the tile launch only then).
        self.tile_windows = any(m.needs_grid for m in methods)
        self.pool_methods, self._grid_methods = refused_without_grid(plan)
        grid, tile = plan.provenance.get("grid"), plan.provenance.get("tile")
        self._plan_tiles = None if grid is None or tile is None else TileGrid(tuple(grid), tuple(tile))
        self._inputs_checked: set[tuple] = set()
        self._processors: list[tuple] = []

    def row(self, layer: LayerRuntime, q, k, v, text_start, text_len, dense) -> _Row:
        """The compiled plan row of ``layer`` at the current step (calibration decides it here).

        ``layer.geometry`` is the call's full layout and padding; ``text_start``/``text_len`` its
        original form (see :class:`CallGeometry`).
        """
        geometry = layer.geometry
        self.check_pool_call(layer)
        self.check_grid_call(layer)
        return layer.row(q, geometry.layout.image_len, self.route_full(q, k, v, text_start, text_len, geometry))

    def check_grid_call(self, layer: LayerRuntime) -> None:
        """Refuse, at the layer's first call rather than at the step that runs them, methods that
        need the image grid on a call without one."""
        needs_grid = self._grid_methods.get(layer.index)
        if needs_grid and layer.geometry.layout.grid is None:
            raise ValueError(
                f"{needs_grid[0]} needs the image grid (frames x rows x cols), which {layer.name} of this "
                f"{type(self.transformer).__name__} call does not get ({self.adapter.FAMILY}): use a plan with "
                "arrow:<f> windows in its place for this model"
            )

    def check_pool_call(self, layer: LayerRuntime) -> None:
        """This call against the plan's pooled keys: refused under padding, said once where partial."""
        self.refuse_padded_pool(layer, self.pool_methods)
        self.say_loose_pool(layer, self.pool_methods)

    def refuse_padded_pool(self, layer: LayerRuntime, pooled: list[str]) -> None:
        """Pooled keys on a call that pads its tokens: refused at the first call (step 0), before the
        steps that would run them; a patch mean would mix padded keys in."""
        if pooled and layer.geometry.padding is not None:
            raise ValueError(
                f"pooled keys ({', '.join(pooled[:3])}{', ...' if len(pooled) > 3 else ''}) take no key padding, but "
                f"{layer.name} of {type(self.transformer).__name__} gets a padding mask in this call ({self.adapter.FAMILY}); "
                "use a plan, or SearchConfig candidates, without pool: methods for this model"
            )

    def say_loose_pool(self, layer: LayerRuntime, pooled: list[str]) -> None:
        """Say once per grid when pooled keys' patches do not tile it: those heads then run on SDPA
        beside the fused kernel (their loose edge tokens are keys of their own), several times slower."""
        grid = layer.geometry.layout.grid
        if not pooled or grid is None or grid in self._loose_pool_said:
            return
        self._loose_pool_said.add(grid)
        loose = loose_pool_methods(pooled, grid)
        if loose:
            logger.warning(
                "%s: this call's image grid, %d x %d patches a frame, leaves partial patches for %s: those heads "
                "run on PyTorch's SDPA beside the fused kernel, at a fraction of its speed (image sizes whose "
                "patch rows and cols each factor divides run them inside it)",
                type(self.transformer).__name__, grid[1], grid[2], ", ".join(loose),
            )

    def route_full(self, q, k, v, text_start: int, text_len: int, geometry: CallGeometry | None = None) -> bool:
        """Whether full heads of mixed layers run on dense SDPA (impl="auto", where it is faster);
        with padding, under its mask as the stock attention takes it."""
        return self.impl == "auto" and full_head_cost(q, k, v, text_start, text_len, geometry) > 1.0

    def check_layout_support(self, layer: LayerRuntime) -> None:
        """Say once when ``layer``'s layout (several global segments, padding) reaches a row()
        that reads only (text_start, text_len): its decisions then see the layout approximately."""
        owner = next(cls for cls in type(self).__mro__ if "row" in vars(cls))
        if vars(owner).get("layout_aware", False) or "layout_warned" in vars(self):
            return
        self.layout_warned = True
        logger.warning(
            "%s: %s scores candidates with one text segment and no padding, but this model's layers have %s; "
            "its decisions are approximate there (the plan is applied with the exact layout)",
            layer.name, type(self).__name__,
            "global tokens on both sides of the image" if layer.geometry.layout.text_range() is None else "padding",
        )

    def dropped_steps(self, layer: int, q: torch.Tensor, num_image_tokens: int) -> frozenset[int]:
        """Steps at which ``layer``'s cache heads compute instead, to keep the buffers within the budget."""
        if self.cache_budget is None:
            return frozenset()
        batch, seq, _, _ = q.shape
        static = self.buffers_per_generation
        layers = self.plan.model.layers
        if layers[layer].text:
            self._global_tokens = seq - num_image_tokens
        # One fit per call geometry over every layer, each priced at its own length (SD3.5's attn2
        # holds the image alone): fitted apart per call length, each fit priced every layer at the
        # caller's and the buffers held past the budget.
        key = (batch, num_image_tokens, self._global_tokens, q.element_size(), self.buffer_copies)
        if key not in self._dropped:
            # Every call slot (e.g. FLUX's true CFG) keeps its own buffers.
            layer_bytes = [key[4] * batch * (num_image_tokens + (key[2] if spec.text else 0)) * spec.heads
                           * spec.head_dim * key[3] for spec in layers]
            cached = cache_heads(self.plan)
            heads = [spec.heads for spec in layers]
            whole = frozenset(t for t, per_layer in enumerate(cached) if per_layer == heads)
            dropped = fit_cache_budget(cached, layer_bytes, self.cache_budget, static=static, whole=whole)
            self._dropped[key] = dropped
            lost = sum(cached[t][l] for l, steps in enumerate(dropped) for t in steps)
            tokens = num_image_tokens + key[2]
            # Said once: a step's later calls refit the same shape for their own buffers.
            if lost and (batch, tokens, lost) not in self._budget_said:
                self._budget_said.add((batch, tokens, lost))
                logger.warning(
                    "the cache buffers of this plan exceed the %s budget at batch %d x %d tokens; "
                    "%d of %d cached head-steps compute instead (raise cache_budget_gib for full speed)",
                    _size(self.cache_budget), batch, tokens, lost, sum(map(sum, cached)),
                )
        return self._dropped[key][layer]

    @property
    def buffer_copies(self) -> int:
        """How many buffers each caching layer holds at once: one per call slot of a step (an expert
        switch frees the other expert's)."""
        return self.calls_per_step

    def after(self, layer: LayerRuntime, q, k, v, out, text_start, text_len) -> None:
        """Called after a layer's attention when its buffers are in use (calibration keeps residuals)."""

    def dense(self, layer: LayerRuntime, dense) -> torch.Tensor:
        """The stock attention of an all-full row (calibration hands back the one it already has)."""
        return dense()

    def _arguments(self, args, kwargs) -> dict:
        """The transformer call's arguments by name."""
        return {**dict(zip(self._parameters, args)), **kwargs}

    def _call_layout(self, arguments: dict) -> None:
        """The image segment of this call, for the dispatch families' joint layers."""
        self.call_cache = {}
        segment = getattr(self.adapter, "image_segment", None)
        if segment is not None:
            self.image_segment = self._planned_tiles(segment(self.transformer, arguments))

    def _planned_tiles(self, segment):
        """``segment`` with its grid in the tile shape the plan records for that grid, if any: a plan
        computes the windows it was made with, whatever the default tile of a later version."""
        planned = self._plan_tiles
        if planned is None or isinstance(segment, str) or len(segment) < 3 or segment[2] is None:
            return segment
        return (*segment[:2], planned) if tuple(segment[2]) == planned.grid else segment

    def begin_call(self, module, args, kwargs) -> None:
        if getattr(module, "_parallel_config", None) is not self.parallel_config_of(module):
            raise RuntimeError(
                "diffusers' parallelism on this transformer changed after ditfastattn.apply (enable_parallelism "
                "after apply); call ditfastattn.remove(), then apply the plan again"
            )
        arguments = self._arguments(args, kwargs)
        timestep = self._timestep(arguments)
        if timestep is None:
            raise ValueError("ditfastattn tracks denoising steps from the transformer's `timestep` argument; none was passed")
        self._call_layout(arguments)
        self.follow_scheduler()
        # One host read per transformer call: the step index comes from the timestep sequence (and the
        # scheduler's steps, where it is hooked).
        value = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        last = self._last_timestep
        # A step the scheduler took since the last call: the next step even where the timestep did not
        # change (bfloat16 rounds neighbouring timesteps near 1000 to one value).
        stepped = self._scheduler_steps != self._steps_seen
        self._steps_seen = self._scheduler_steps
        tie = value == last and not stepped
        starting = self._new_generation or last is None or value > last or (
            tie and self._restarted(arguments, timestep))
        if starting:
            if self.scheduler_hook is None:
                self._first_latents = latents_print(arguments, timestep)
            self.check_scheduled_steps()
            self._start_generation()
            self.check_experts()
            self.check_processors()
            if module is not self.experts[0]:  # the second expert from the first step on
                self.switch_steps.append(self.step)
            self._check_inputs(arguments.get("hidden_states"))
        elif tie:
            self._say_unhooked_tie(timestep)
            self.call += 1
            self.calls_per_step = max(self.calls_per_step, self.call + 1)
        else:
            if not stepped:
                self._say_unfollowed_step()
            calls = self.call + 1  # call slots of the step just done
            self.step += 1
            self.call = 0
            if self.step >= self.plan.num_steps:
                self._new_generation = True
                raise too_many_steps(self.plan.num_steps, "the pipeline")
            # A call slot absent from the last step (skip-layer guidance after its last step)
            # holds nothing a later step may read: its cache heads would compute anyway.
            for layer in self.layers:
                for call in [c for c in layer.slots if c >= calls]:
                    layer.free(call)
        if module is not self._expert:
            if not starting:  # a generation's start has freed everything already
                self.switch_steps.append(self.step)
                self.switch_expert()
            self._expert = module
        self._last_timestep = value
        if self._cfg_share:
            self._check_cfg_batch(arguments.get("hidden_states"))
        self.in_call = True

    def compressed_step_after(self, index: int) -> int | None:
        """The first step after the current one whose row compresses layer ``index``; None if none."""
        return next((step for step in self._compressed_steps[index] if step > self.step), None)

    def _restarted(self, arguments, timestep) -> bool:
        """With no scheduler to say that a generation began (a plan applied to the transformer alone), a
        call at the first step's timestep is the step's next call (true CFG's, on the same latents) or
        a new generation after one that stopped there (an interrupt, a one-step warm-up), whose outputs
        the new one's cache heads must not read: told apart by the latents. (Two generations from
        equal latents look alike; their first steps' outputs differ only by the prompts.)"""
        if self.scheduler_hook is not None or self.step != 0 or self._first_latents is None:
            return False
        current = latents_print(arguments, timestep)
        if current is None:  # a bfloat16 timestep: a tie is said once in the log (_say_unhooked_tie)
            return False
        return current.device != self._first_latents.device or not torch.equal(current, self._first_latents)

    def _check_cfg_batch(self, hidden) -> None:
        """cfg_share splits a call's batch into [unconditional; conditional] halves. A pipeline that
        calls the transformer once per condition (a diffusers guider) makes a step's calls of one
        batch size, where skip-layer guidance's extra call has half the first's: refuse the second."""
        if not torch.is_tensor(hidden):
            return
        batch = hidden.shape[0]
        if self.call == 0 and self._cfg_batch is None:
            self._cfg_batch = batch
        # A step whose first call has another batch than the generation's first (a callback that ended
        # CFG early, as diffusers documents) holds conditional rows only: nothing to share there.
        self.cfg_halves = self.call == 0 and batch == self._cfg_batch
        if self.call == 0:
            self._first_call_batch = batch
        elif batch == self._first_call_batch:
            self._new_generation = True
            raise ValueError(
                f"cfg_share shares attention between the halves of one [unconditional; conditional] batch, but this "
                f"pipeline called the transformer again at step {self.step} on a batch of {hidden.shape[0]}, as its "
                "first call (a guider calling once per condition?), so the halves are not those; drop the cfg_share "
                "methods, or use the pipeline that batches CFG (StableDiffusion3Pipeline)"
            )

    def set_experts(self, experts: list[torch.nn.Module]) -> None:
        """Follow the calls of ``experts`` (the transformer first), as install hooks them; raises,
        before install changes anything, where the session cannot run on them all."""
        self.experts = experts

    def parallel_config_of(self, expert: torch.nn.Module):
        """The diffusers parallel config ``expert`` ran under at apply (None: one whole model)."""
        return None

    def _check_switches(self) -> None:
        """Say once when a generation's experts took over at other steps than in the plan's
        calibration run: the plan's rows there were searched on the other expert."""
        planned = self.plan.provenance.get("expert_switch_steps")
        if planned is None or self.switch_steps == planned or self._switch_warned:
            return
        self._switch_warned = True

        def at(steps):
            return f"at step {', '.join(map(str, steps))}" if steps else "at no step"

        logger.warning(
            "the pipeline's second expert (transformer_2) took over %s, but %s in the plan's calibration run (another "
            "boundary_ratio, scheduler shift or pipeline?), so some steps run rows searched on the other expert; "
            "calibrate for this setting", at(self.switch_steps), at(planned),
        )

    def check_pipeline_transformer(self) -> None:
        """Raise, as a generation starts, where ``pipe.transformer`` was replaced since apply: the new
        one would run stock, with no sign that the plan is off. A wrapper that holds it (torch.compile's,
        PEFT's) runs it: that is no replacement."""
        current = getattr(self.pipe, "transformer", None)
        if self.pipe is not None and not (isinstance(current, torch.nn.Module) and any(
                module is self.transformer for module in current.modules())):
            raise RuntimeError(
                "pipe.transformer was replaced after ditfastattn.apply, and the plan stays on the transformer it was "
                "applied to, so this generation would run without it; call ditfastattn.remove(pipe), then apply the "
                "plan again"
            )

    def check_experts(self) -> None:
        """Raise where the pipeline's experts changed since apply (``pipe.transformer_2`` set or
        replaced, ``boundary_ratio`` set), which would leave one running stock."""
        if self.pipe is not None and experts_of(self.transformer, self.pipe) != self.experts:
            raise RuntimeError(
                "the pipeline's second expert (transformer_2, or whether boundary_ratio calls it) changed after "
                "ditfastattn.apply; call ditfastattn.remove(), then apply the plan again"
            )

    def switch_expert(self) -> None:
        """A call by another transformer than the last one (a second expert taking over): no head
        reads the other's outputs or residuals, which another model's weights made; its cache and
        ``arrow_residual`` heads compute until it has kept its own (exact, as after a skipped call)."""
        for layer in self.layers:
            layer.free()

    def _check_inputs(self, hidden) -> None:
        """At a generation's first call, what would otherwise fail only at step 1 (step 0 computes
        every head with the stock attention): a batch without CFG for cfg_share, an impl that
        cannot run on this device and dtype."""
        if self._cfg_share and getattr(self.pipe, "do_classifier_free_guidance", True) is False:
            # An even batch of prompts would pass the check below and share across prompts.
            raise ValueError(
                "cfg_share needs a CFG batch [unconditional; conditional], but this generation runs without "
                "classifier-free guidance (guidance_scale <= 1), so its batch holds the prompts themselves: raise "
                "guidance_scale above 1, or use a plan without cfg_share"
            )
        if not torch.is_tensor(hidden):
            return
        if self._cfg_share and hidden.shape[0] % 2:
            raise cfg_batch_error(hidden.shape[0])
        device_type = hidden.device.type
        dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                 else getattr(self.transformer, "dtype", hidden.dtype))
        if (hidden.device, dtype) not in self._inputs_checked:
            reason = ops.impl_unsupported(self.impl, hidden.device, dtype, [l.head_dim for l in self.plan.model.layers])
            if reason is not None:
                raise RuntimeError(f"impl={self.impl!r} cannot run: {reason}. Use impl='auto' or impl='reference'.")
            self._inputs_checked.add((hidden.device, dtype))

    def end_call(self, module, args, kwargs, output) -> None:
        self.in_call = False
        if self.step == self.plan.num_steps - 1:
            self._check_switches()
            self._report_skipped_layers()
            self._report_reshaped_calls()
            for layer in self.layers:
                layer.free(self.call)

    def _report_skipped_layers(self) -> None:
        """Say once when layers that the plan caches at some step had not run at the step before
        (a diffusers cache such as FirstBlockCache skipping them): their cache heads computed."""
        if not self.skipped_layer_steps or self._skipped_said:
            return
        self._skipped_said = True
        caches = [f"{cache[0]} on {name}" for name, model in named(self.experts, self.pipe).items()
                  if (cache := layer_skipping_cache(model, name)) is not None]
        why = ", ".join(caches) or "a hook that skips them"
        logger.warning(
            "%d layer-steps of this generation computed their cache heads because the layer had not run at the step "
            "before (%s): exact, but the plan removed less attention than its sparsity says", self.skipped_layer_steps,
            why,
        )

    def _report_reshaped_calls(self) -> None:
        """Say once when a generation's calls changed shape midway (a callback ending classifier-free
        guidance early halves the batch): the heads that would read the old shape's outputs computed,
        and cfg_share heads, with no halves left to share between, computed the conditional half's method."""
        if self._reshaped_said or not (self.reshaped_layer_steps or self.unshared_layer_steps):
            return
        self._reshaped_said = True
        what = []
        if self.reshaped_layer_steps:
            what.append(f"{self.reshaped_layer_steps} layer-steps computed their cache and arrow_residual heads, which "
                        "would have read outputs of the old shape")
        if self.unshared_layer_steps:
            what.append(f"{self.unshared_layer_steps} layer-steps ran their cfg_share heads' conditional method on the "
                        "whole batch, which holds no [unconditional; conditional] halves any more")
        logger.warning(
            "the transformer's input changed shape within a generation (classifier-free guidance ended early, by a "
            "step callback or Z-Image's cfg_truncation?): %s; exact, but the plan removed less attention than its "
            "sparsity says", "; ".join(what),
        )

    def _start_generation(self) -> None:
        if self._running and not self._checked and self.step < self.plan.num_steps - 1:
            warn_short_generation(self.step + 1, self.plan.num_steps)
        self._running, self._checked, self._counted = True, self._counted, False
        self.step, self.call, self._new_generation = self._first_step(), 0, False
        self.skipped_layer_steps = self.reshaped_layer_steps = self.unshared_layer_steps = 0
        self._cfg_batch = None
        self.switch_steps = []
        for layer in self.layers:
            layer.free()

    def _first_step(self) -> int:
        """The denoising step a generation starts at, so that every step runs the plan's row for it:
        0, where an image-to-image or inpainting pipeline starts its scheduler (``begin_index``, which
        ``strength`` below 1 sets past the first steps), or, for a plan applied mid-generation (from a
        step callback), the step the scheduler is at (``step_index``, None until its first step)."""
        scheduler = self.scheduler_hook.scheduler if self.scheduler_hook is not None else None
        for index in (getattr(scheduler, "step_index", None), getattr(scheduler, "begin_index", None)):
            if isinstance(index, int) and 0 < index < self.plan.num_steps:
                return index
        return 0

    def scheduler_set(self, num_steps: int) -> None:
        self.check_pipeline_transformer()
        # Checked at this transformer's next call: pipelines made with from_pipe share the scheduler,
        # and another one's generation must not be held to this plan's step count.
        self.scheduled_steps = num_steps
        self._new_generation = True
        self._counted = True
        self.in_call = False  # a call that raised never ended

    def check_scheduled_steps(self) -> None:
        """At a generation's first call: the step count the scheduler was last set to fits the plan."""
        if self.scheduled_steps is not None:
            steps, self.scheduled_steps = self.scheduled_steps, None
            self.plan.check_compatible(self.plan.model, steps)

    def _say_unhooked_tie(self, timestep) -> None:
        """Once: a low-precision timestep seen twice in a row with no scheduler to tell a step's second
        call from the next step (a plan applied to the transformer alone)."""
        low = torch.is_tensor(timestep) and timestep.dtype in (torch.float16, torch.bfloat16)
        if self.scheduler_hook is None and low and not self._tie_said:
            self._tie_said = True
            warn_unhooked_tie(timestep.dtype)

    def _say_unfollowed_step(self) -> None:
        """Once: the timestep moved on though the scheduler followed took no step."""
        if self.scheduler_hook is None or self._unfollowed_said:
            return
        self._unfollowed_said = True
        logger.warning(
            "the transformer's timestep moved on to the next denoising step, but %s, the scheduler ditfastattn "
            "follows, took no step: the pipeline generating has a scheduler of its own (made with from_pipe(..., "
            "scheduler=...)?), so a strength below 1 or bfloat16 timesteps that round alike would run the wrong plan "
            "rows; call ditfastattn.remove() and apply the plan to the pipeline that generates",
            type(self.scheduler_hook.scheduler).__name__,
        )

    def scheduler_stepped(self) -> None:
        """The hooked scheduler finished a denoising step."""
        self._scheduler_steps += 1

    def follow_scheduler(self, check: bool = True) -> None:
        """Hook ``pipe.scheduler``'s ``set_timesteps``, whichever scheduler the pipeline holds now.

        A scheduler swapped in after :func:`apply` had its timesteps set before it was hooked, so
        with ``check`` its step count is checked at once (this is the generation's first call).
        """
        scheduler = getattr(self.pipe, "scheduler", None)
        hooked = self.scheduler_hook.scheduler if self.scheduler_hook is not None else None
        if scheduler is hooked:
            return
        if self.scheduler_hook is not None:
            self.scheduler_hook.undo()
            self.scheduler_hook = None
        if scheduler is None or not callable(getattr(scheduler, "set_timesteps", None)):
            return
        self.scheduler_hook = SchedulerHook(scheduler, self)
        if check and getattr(scheduler, "timesteps", None) is not None:
            self.scheduler_set(steps_of(scheduler))

    def watch_processors(self, modules: list[tuple[str, torch.nn.Module]], exact: bool) -> None:
        """Remember each (name, attention module)'s processor as apply left it: ditfastattn's own
        (``exact``) or the stock one whose attention call it intercepts, which any stock processor makes."""
        self._processors = [(name, module, module.processor, exact) for name, module in modules]

    def check_processors(self) -> None:
        """Raise where a layer's processor was replaced since apply (``fuse_qkv_projections``,
        ``set_attn_processor``), which would silently stop the plan there."""
        stock = self.adapter.stock_processor_types()
        for name, module, processor, exact in self._processors:
            current = module.processor
            if current is processor or (not exact and isinstance(current, stock)):
                continue
            replaced = f"{name}'s attention processor was replaced after ditfastattn.apply (now {type(current).__name__}"
            if type(current).__name__.startswith("PAG"):
                # diffusers' PAG pipelines set these on their pag_applied_layers at every call.
                raise RuntimeError(
                    f"{replaced}): this is a perturbed-attention guidance (PAG) pipeline, which runs its own processors "
                    "on its pag_applied_layers, and ditfastattn does not run under PAG; call ditfastattn.remove(), or "
                    "apply the plan to the same components without PAG (StableDiffusion3Pipeline.from_pipe(pipe))"
                )
            raise RuntimeError(
                f"{replaced}: fuse_qkv_projections or set_attn_processor?), so the plan would no longer run there; call "
                "ditfastattn.remove() first, then apply the plan again (ditfastattn works with diffusers' stock "
                "processors, unfused)"
            )

    def install_layers(self, modules: dict[str, torch.nn.Module]) -> None:
        """Hook for sessions that keep state on the attention modules."""

    def uninstall_layers(self, modules: dict[str, torch.nn.Module]) -> None:
        """Undo :meth:`install_layers`."""


def refused_without_grid(plan: Plan) -> tuple[list[str], dict[int, list[str]]]:
    """The plan's pooled-keys methods (refused on a padded call), and per layer its methods that
    need the image grid (tile windows, pooled keys) at any step."""
    names = {m for rows in plan.methods for heads in rows for m in heads}
    pooled = sorted(m for m in names if parse_method(m).kind == "pool")
    grid_methods = {layer: sorted({m for rows in plan.methods for m in rows[layer] if parse_method(m).needs_grid})
                    for layer in range(len(plan.model.layers))}
    return pooled, grid_methods


def cfg_batch_error(batch: int) -> ValueError:
    return ValueError(
        f"cfg_share needs a CFG batch [unconditional; conditional] of even size; got batch {batch} (guidance_scale "
        "<= 1 turns classifier-free guidance off): raise guidance_scale above 1, or use a plan without cfg_share"
    )
