"""The static session: the step counter and each step's head modes on the device, for
``torch.compile`` and CUDA graphs."""

from __future__ import annotations

import math

import torch

from .._geometry import MODE_FULL, MODE_SKIP, POOL_FLAG, POOL_SLOT_SHIFT, TileGrid, pool_factor, pool_mode
from ..ops import KEY_PADDING, Padding
from ..methods import parse_method
from ..model import TokenLayout
from ..plan import Plan
from . import routing
from .caches import named, refuse_layer_skipping_caches
from .layer_skip import attention_scores_skipped
from .rows import _compile_rows
from .call_geometry import CallGeometry
from .session import LayerRuntime, Session, full_head_cost, latents_print, latents_shape, logger, loose_pool_methods
from .steps import too_many_steps, warn_short_generation


_STEP = "_ditfastattn_step"
_LAST_TIMESTEP = "_ditfastattn_last_timestep"
_FAULTS = "_ditfastattn_faults"
_CALL = "_ditfastattn_call"  # the call slot within the step (CFG's second call: 1)
_SLOT_STEP = "_ditfastattn_slot_step"  # per call slot, the step it last ran at
_TICKS = "_ditfastattn_scheduler_steps"  # the denoising steps the hooked scheduler took
_TICKS_SEEN = "_ditfastattn_scheduler_steps_seen"  # ... as of the last transformer call
_FIRST_LATENTS = "_ditfastattn_first_latents"  # latents_print of the generation's first call
_DEGRADED = "_ditfastattn_degraded"  # a degrading fault this generation: every head computes exactly
_FRESH = "_ditfastattn_fresh"  # whether this call's slot ran at the previous step (its outputs may be read)
_SLOT_SIZE = "_ditfastattn_slot_size"  # per call slot, its input's size this generation
# Bits of the faults a compiled call records on the device for the host to report later.
_EXTRA_CALL, _EXTRA_STEP, _SHORT_GENERATION, _RESHAPED, _GRID = 1, 2, 4, 8, 16
# The faults after which heads would read another call's outputs or another grid's windows: from the
# faulting call to the generation's end, every head computes exactly.
_DEGRADING = _EXTRA_CALL | _RESHAPED | _GRID
# A slot that never ran: no step is one after it.
_NEVER = -2


def refuse_static_caches(experts, pipe) -> None:
    """Static mode's freshness is per call slot, not per layer: refuse diffusers' caches that skip
    layers (before apply changes anything, and at each eager generation start)."""
    refuse_layer_skipping_caches(
        named(experts, pipe), "static mode reads a caching layer's last output as the previous step's",
        "run the plan without static=True (the dynamic runtime composes with it: ditfastattn.remove(), then apply "
        "again), or ",
    )


def _normal_tensors():
    """Tensors made here are normal ones even under torch.inference_mode: static mode's buffers
    persist across generations and are written in place, which a tensor made by a first
    generation under inference_mode would refuse in a later one outside it."""
    return torch.inference_mode(False)


class _StaticLayer(LayerRuntime):
    """One code path for every step: the step's modes are gathered on the device from a table.

    Nothing depends on the step on the host, so ``torch.compile(fullgraph=True)`` traces one graph
    for the whole denoising loop and CUDA graphs can replay it. Tables and buffers are non-persistent
    buffers of the attention module: they follow ``.to()`` and have static addresses. Only layers
    that ever cache hold an output buffer; layers full at every step run the stock attention.
    Tile windows and pooled keys are sized for the first call's grid, which layers with a tile or
    pool head at some step pass to the op at every step (as plain ints, constants of the compiled
    graph), with their pool slots. So is the token
    layout of each call length (several global segments: reference images; a step's calls may
    differ); a padding mask is data, read from each call. Each call slot of a step has its buffers.
    """

    routed = False
    tiles: TileGrid | None = None  # the grid the tables' tile windows were sized for
    # The op's grid and tile shape as plain ints, where some head runs a tile window at some step.
    grid_args: tuple[list[int], list[int]] | tuple[None, None] = (None, None)
    tile_heads = True  # whether a head runs a tile window at some step (else the grid is the pool heads')
    # The op's pool_groups (p, count, heads, ...) where some head pools at some step; its slots' heads
    # are the module's _ditfastattn_pool_heads, and the mode tables name pool heads by their slots.
    pool_groups: list[int] | None = None

    def __init__(self, *args):
        super().__init__(*args)
        self.geometries: dict[int, tuple] = {}  # per call length: its CallGeometry and the op's layout arguments
        self.modules: list[torch.nn.Module] = []  # this layer's attention module in each expert
        self.built_on: set[int] = set()  # the experts whose module holds this layer's tables

    @property
    def module(self) -> torch.nn.Module:
        """This layer's attention module in the expert being called (its tables and buffers)."""
        return self.modules[self.session.expert_index]

    def build(self, q, k, v, geometry: CallGeometry) -> None:
        """Tables for this layer at ``q``'s shape and the call's grid; on the first call, which must run
        uncompiled."""
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"{self.name}: static mode builds its tables and buffers on the first call; run one uncompiled "
                "transformer call (or generation) with these shapes before torch.compile"
            )
        num_image_tokens, device, module = self.session.num_image_tokens, q.device, self.module
        tiles = self.geometry.layout.tile_grid()
        dropped = self.session.dropped_steps(self.index, q, num_image_tokens)
        rows = _compile_rows(self.session.plan, self.index, num_image_tokens, device, dropped, tiles=tiles)
        heads = rows[0].modes.numel()
        if any(m.needs_grid for row in rows for m in row.methods):
            self.tiles, self.grid_args = tiles, (list(tiles.grid), list(tiles.tile))
            self.tile_heads = any(m.kind == "tile" for row in rows for m in row.methods)
        pool_slots = self._pool_slots(rows, num_image_tokens, tiles)

        def stack(values):
            return torch.stack(values).to(device)

        none = torch.full((heads,), MODE_SKIP, dtype=torch.int32, device=device)
        flags = torch.zeros(heads, dtype=torch.bool, device=device)
        # The rows' modes were checked on the host as they were made (ops.mode_tensor): the custom
        # op reads none of these tables back, so a compiled or captured step has no host sync.
        tables = {
            "modes": _slotted(stack([row.modes for row in rows]), pool_slots),
            "residual_add": stack([flags if row.residual_add is None else row.residual_add.view(-1) for row in rows]),
            "capture_modes": stack([none if row.capture_modes is None else row.capture_modes for row in rows]),
            "capture_mask": stack([flags if row.capture_mask is None else row.capture_mask.view(-1) for row in rows]),
        }
        if self.session.keeps_apart:  # which heads read what their call slot kept (see _fresh_modes)
            tables["cache_heads"] = torch.tensor([[h in row.cache_heads for h in range(heads)] for row in rows],
                                                 device=device)
            tables["residual_from"] = torch.tensor([_residual_steps(row, heads) for row in rows], device=device)
        if pool_slots:
            tables["pool_heads"] = torch.tensor([h for _, group in pool_slots for h in group], dtype=torch.int32,
                                                device=device)
            self.pool_groups = [n for factor, group in pool_slots for n in (factor, len(group), *group)]
        self.residuals = bool(tables["residual_add"].any())
        self.caches = any(row.keep for row in rows)
        # A rebuild (a second call slot refits the budget) may leave the layer nothing to keep: its old
        # buffers, read no more, would be held past the budget until remove().
        for name in (() if self.caches else ("_ditfastattn_out",)) + (
                () if self.residuals else ("_ditfastattn_residual", "_ditfastattn_captured")):
            module._buffers.pop(name, None)
        self.stock = all(row.all_full for row in rows) and not self.residuals
        if self.session.impl == "auto" and not self.stock:
            cost = full_head_cost(q, k, v, geometry.text_start, geometry.text_len, None if geometry.simple else geometry)
            tables.update(self._route_full_heads(tables["modes"], cost))
        for name, table in tables.items():
            with _normal_tensors():
                table = table.clone() if table.is_inference() else table
            module.register_buffer(f"_ditfastattn_{name}", table, persistent=False)
        self.built_on.add(self.session.expert_index)

    def _pool_slots(self, rows, num_image_tokens: int, tiles: TileGrid | None) -> tuple:
        """The layer's pool heads as the fused kernel's slots, ``((p, heads), ...)``: every head that
        pools at some step, at each factor it pools with, so one patch-mean buffer serves every step
        (each step makes the means of the slots its modes name)."""
        groups: dict[int, set[int]] = {}
        for row in rows:
            for head, method in enumerate(row.methods):
                if method.kind == "pool":
                    groups.setdefault(pool_factor(method.mode(num_image_tokens, tiles)), set()).add(head)
        if not groups:
            return ()
        self.session.refuse_padded_pool(self, self.session.pool_methods)
        return tuple((p, tuple(sorted(groups[p]))) for p in sorted(groups))

    def _route_full_heads(self, modes: torch.Tensor, fused_cost: float) -> dict[str, torch.Tensor]:
        """Send up to a fixed number of each step's full heads to dense SDPA (cuDNN on Hopper).

        ``dense_heads[step]`` lists distinct heads: the routed full heads, which the fused op then
        skips, padded with other heads whose current output is written back (``dense_valid`` false).
        """
        full = (modes == MODE_FULL).cpu()
        slots = routing.dense_slots(full.sum(1).tolist(), fused_cost)
        self.routed = slots > 0
        if not self.routed:
            return {}
        heads, valid = [], []
        for step_full in full.tolist():
            routed = [h for h, f in enumerate(step_full) if f][:slots]
            padding = [h for h in range(len(step_full)) if h not in routed][: slots - len(routed)]
            heads.append(routed + padding)
            valid.append([True] * len(routed) + [False] * len(padding))
        heads = torch.tensor(heads, dtype=torch.long, device=modes.device)
        valid = torch.tensor(valid, dtype=torch.bool, device=modes.device)
        sparse_modes = modes.clone()
        sparse_modes.scatter_(1, heads, torch.where(valid, MODE_SKIP, sparse_modes.gather(1, heads)))
        return {"modes": sparse_modes, "dense_heads": heads, "dense_valid": valid}

    def _check_grid(self, tiles: TileGrid | None) -> None:
        if tiles != self.tiles:
            raise ValueError(
                f"{self.name}: static mode sized this layer's tile windows for {_grid(self.tiles)} but this call has "
                f"{_grid(tiles)}; static mode needs fixed shapes (apply again for the new ones)"
            )

    def _slot(self, name: str, like: torch.Tensor, fill=0) -> tuple[torch.Tensor, torch.Tensor]:
        """This call slot's part of the module's buffer ``name``, shaped like ``like``: (row, view).

        The buffer holds one flat row per call slot (a step's calls may differ in batch or length:
        skip-layer guidance, a negative prompt of its own length). With one slot the view is the
        buffer itself; with several, ``row`` is a copy of the slot's row (the slot index is data on the
        device) that :meth:`_store` writes back. Adding slots or length (eager calls only) keeps what
        the rows hold."""
        session = self.session
        slots, size = session.calls_per_step, like.numel()
        buffer = self.module._buffers.get(name)
        if buffer is None or len(buffer) < slots or buffer.shape[1] < size or buffer.dtype != like.dtype or (
                buffer.device != like.device):
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    f"{self.name}: the attention input changed to {tuple(like.shape)} {like.dtype} after the eager "
                    "calls; static mode needs the shapes of its eager calls (apply again for new ones)"
                )
            kept = buffer if buffer is not None and buffer.dtype == like.dtype and buffer.device == like.device else None
            with _normal_tensors():
                grown = torch.full((slots, max(size, 0 if kept is None else buffer.shape[1])), fill, dtype=like.dtype,
                                   device=like.device)
            if kept is not None:
                grown[:len(kept), :kept.shape[1]] = kept
            self.module.register_buffer(name, grown, persistent=False)
            buffer = grown
        row = buffer.index_select(0, session.call_tensor()) if slots > 1 else buffer
        return row, row[0, :size].view(like.shape)

    def _store(self, name: str, row: torch.Tensor) -> None:
        """Write back a row :meth:`_slot` copied (several call slots)."""
        if self.session.calls_per_step > 1:
            self.module._buffers[name].index_copy_(0, self.session.call_tensor(), row)

    def attend(self, q, k, v, *, text_start: int | None = None, text_len: int | None = None, dense,
               dense_only: str | bool = False, layout: TokenLayout | None = None, key_padding=None) -> torch.Tensor:
        if dense_only:
            what = dense_only if isinstance(dense_only, str) else "attention masks or context parallelism"
            raise NotImplementedError(f"{self.name}: static mode does not support {what}; apply without static=True")
        # Shapes are fixed: the geometry of the eager calls serves the compiled ones of the same length
        # (a step's calls may differ: CFG's negative prompt of another length); the padding mask is
        # each call's own (prompts change it).
        geometries = self.geometries
        if torch.compiler.is_compiling():
            if q.shape[1] not in geometries:
                raise RuntimeError(
                    f"{self.name}: a compiled call of {q.shape[1]} tokens, but no eager call of that length came first; "
                    "static mode learns each call's token layout eagerly: run one whole step (every call of it) "
                    "before compiling"
                )
            geometry, layout_args = geometries[q.shape[1]]
        else:
            geometry = self.geometry = CallGeometry.of(q.shape[1], text_start, text_len, layout, key_padding)
            layout_args = _layout_args(geometry)
            geometries[q.shape[1]] = geometry, layout_args
        if (key_padding is None) != (geometry.padding is None):
            raise ValueError(
                f"{self.name}: static mode was built for calls {'with' if geometry.padding is not None else 'without'} "
                "a padding mask, and this call differs; static mode needs the first call's form (apply again)"
            )
        padding = key_padding if key_padding is None or isinstance(key_padding, Padding) else Padding(key_padding)
        text_start, text_len = geometry.text_start, geometry.text_len
        if q.shape[1] - text_len != self.session.num_image_tokens:
            raise ValueError(
                f"{self.name}: static mode was applied for {self.session.num_image_tokens} image tokens but the "
                f"model sees {q.shape[1] - text_len}; apply again with num_image_tokens={q.shape[1] - text_len}"
            )
        if self.session.expert_index not in self.built_on:
            self.build(q, k, v, geometry)
        elif self.tiles is not None and not torch.compiler.is_compiling():
            self._check_grid(geometry.layout.tile_grid())
        if self.stock:
            return dense()
        if not torch.compiler.is_compiling() and attention_scores_skipped():
            raise NotImplementedError(
                f"{self.name}: static mode does not run under diffusers' attention-score skip (perturbed-attention or "
                "skip-layer guidance with skip_attention_scores); apply without static=True"
            )
        session = self.session
        step = session.step_tensor()
        module, impl = self.module, session.impl
        modes = module._ditfastattn_modes.index_select(0, step).view(-1)
        residual_add = module._ditfastattn_residual_add.index_select(0, step).view(-1)
        if session.keeps_apart:
            modes, residual_add = self._fresh_modes(step, modes, residual_add)
        degraded = session.degraded_tensor()
        modes = torch.where(degraded, MODE_FULL, modes)
        # Cache heads skip, so their slice must hold the call slot's last output: a persistent
        # buffer per slot. Layers that never cache write every element and take a fresh tensor.
        if self.caches:
            outs, out = self._slot("_ditfastattn_out", q)
        else:
            out = torch.empty_like(q)
        scale = q.shape[-1] ** -0.5
        layout_ints, segments = layout_args
        extra = (*self.grid_args, segments, *_padding_args(padding))
        pool = (self.pool_groups, module._ditfastattn_pool_heads, self.tile_heads) if self.pool_groups else ()
        torch.ops.ditfastattn.headwise_attention_(q, k, v, modes, *layout_ints, out, scale, impl, *extra, *pool)
        if self.routed:
            heads = module._ditfastattn_dense_heads.index_select(0, step).view(-1)
            valid = module._ditfastattn_dense_valid.index_select(0, step).view(1, 1, -1, 1)
            dense = routing.dense_heads(q, k, v, heads, padding)
            out.index_copy_(2, heads, torch.where(valid, dense, out.index_select(2, heads)))
        if self.residuals:
            residuals, residual = self._slot("_ditfastattn_residual", q)
            out.add_(torch.where((residual_add & ~degraded).view(1, 1, -1, 1), residual, 0))
            arrow = torch.empty_like(out)
            capture = module._ditfastattn_capture_modes.index_select(0, step).view(-1)
            torch.ops.ditfastattn.headwise_attention_(q, k, v, capture, *layout_ints, arrow, scale, impl, *extra)
            keep = module._ditfastattn_capture_mask.index_select(0, step)
            residual.copy_(torch.where(keep.view(1, 1, -1, 1), out - arrow, residual))
            self._store("_ditfastattn_residual", residuals)
            # The step each head's residual was captured at, per slot: what a slot added later finds.
            rows, captured = self._captured(step)
            captured.copy_(torch.where(keep.view(-1), step, captured))
            self._store("_ditfastattn_captured", rows)
        if self.caches:
            self._store("_ditfastattn_out", outs)
        return out

    def _captured(self, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, view) of the step whose residual this call slot holds for each head."""
        return self._slot("_ditfastattn_captured", step.new_empty(self.module._ditfastattn_modes.shape[1]), _NEVER)

    def _fresh_modes(self, step, modes, residual_add):
        """``modes`` and ``residual_add`` of this step's row for a call slot that may not hold what its
        heads read (on the device): cache heads compute when the slot did not run at the previous step
        (a call that first appears mid-generation, such as skip-layer guidance), ``arrow_residual``
        heads when it did not capture the residual they add; exact, as in the dynamic runtime."""
        module = self.module
        stale = module._ditfastattn_cache_heads.index_select(0, step).view(-1) & ~self.session.fresh_tensor()
        if self.residuals:
            kept = self._captured(step)[1] == module._ditfastattn_residual_from.index_select(0, step).view(-1)
            stale = stale | (residual_add & ~kept)
            residual_add = residual_add & kept
        return torch.where(stale, MODE_FULL, modes), residual_add

    def free(self, call: int | None = None) -> None:
        for module in self.modules:
            for name in ("_ditfastattn_out", "_ditfastattn_residual", "_ditfastattn_captured"):
                module._buffers.pop(name, None)


def _residual_steps(row, heads: int) -> list[int]:
    """Per head, the step whose captured residual the row's ``arrow_residual`` head adds; -1 for other
    heads, and ``_NEVER - 1`` (which no capture matches: the head computes) where no step made one."""
    steps = [-1] * heads
    for head, step in row.residual_from:
        steps[head] = _NEVER - 1 if step is None else step
    return steps


class StaticSession(Session):
    """Session whose step counter and call slot live on the device (no host read per compiled call)."""

    layer_cls = _StaticLayer
    buffers_per_generation = True  # static addresses: a layer that ever caches holds its buffer throughout
    expert_index = 0  # of the expert being called (a constant of each expert's compiled graph)

    def __init__(self, transformer, plan: Plan, adapter, impl: str, cache_budget: int | None, num_image_tokens: int):
        super().__init__(transformer, plan, adapter, impl, cache_budget)
        if self._cfg_share:
            raise NotImplementedError("static mode does not support cfg_share methods yet; apply without static=True")
        methods = [parse_method(m) for m in {m for rows in plan.methods for heads in rows for m in heads}]
        self._grid_methods = sorted(m.name for m in methods if m.needs_grid)
        self._eager_grids: set = set()  # _grid_key of the eager calls (plans with grid methods only)
        self._ids_prints: dict[int, torch.Tensor] = {}  # image-id count -> _ids_print of the eager call
        # Whether a head reads what an earlier step kept (then a call slot's shape must not change).
        self._reads_kept = any(m.reads_previous_output or m.reads_residual for m in methods)
        self.num_image_tokens = num_image_tokens
        device = next(transformer.parameters()).device
        # Shape (1,): index_select with it stays on the device (a 0-d index would be a host int).
        with _normal_tensors():
            self._counters = {
                _STEP: torch.zeros(1, dtype=torch.long, device=device),
                _LAST_TIMESTEP: torch.full((1,), float("-inf"), device=device),
                _FAULTS: torch.zeros(1, dtype=torch.int32, device=device),
                _CALL: torch.zeros(1, dtype=torch.long, device=device),
                _TICKS: torch.zeros(1, dtype=torch.long, device=device),
                _TICKS_SEEN: torch.zeros(1, dtype=torch.long, device=device),
                _FIRST_LATENTS: torch.zeros(3, device=device),
                _DEGRADED: torch.zeros(1, dtype=torch.bool, device=device),
                _FRESH: torch.ones(1, dtype=torch.bool, device=device),
                _SLOT_STEP: torch.full((1, 1), _NEVER, device=device),  # [expert, call slot]
                _SLOT_SIZE: torch.full((1, 1), _NEVER, dtype=torch.long, device=device),  # [expert, call slot]
            }

    @property
    def buffer_copies(self) -> int:
        """Every expert keeps its own buffers for the whole generation, one per call slot."""
        return self.calls_per_step * len(self.experts)

    @property
    def keeps_apart(self) -> bool:
        """Whether the call slots and experts keep buffers apart, each reading only what it kept."""
        return self.calls_per_step > 1 or len(self.experts) > 1

    def set_experts(self, experts) -> None:
        """Every expert holds the same counters (as its own buffers: static addresses in each one's
        graph), and ``_SLOT_STEP`` a row per expert: an expert's first step computes its cache heads."""
        super().set_experts(experts)
        with _normal_tensors():
            for name in (_SLOT_STEP, _SLOT_SIZE):
                ran = self._counters[name]
                self._counters[name] = ran.new_full((len(experts), ran.shape[1]), _NEVER)
        self._register_counters()

    def _register_counters(self) -> None:
        for expert in self.experts:
            for name, tensor in self._counters.items():
                expert.register_buffer(name, tensor, persistent=False)

    def _follow_moves(self, module: torch.nn.Module) -> None:
        """Take the counters of ``module`` after a ``.to()`` of the model since apply: new tensors, each
        expert its own and the timestep cast (in bfloat16 a 50-step schedule has timesteps that round
        alike, which would count as one step); back in float32, and shared by every expert again."""
        counters = self._counters.items()
        if all(expert._buffers.get(name) is tensor for expert in self.experts for name, tensor in counters):
            return
        with _normal_tensors():
            self._counters = {name: module._buffers[name] for name in self._counters}
            self._counters[_LAST_TIMESTEP] = self._counters[_LAST_TIMESTEP].float()
            self._counters[_FIRST_LATENTS] = self._counters[_FIRST_LATENTS].float()
        self._register_counters()

    def step_tensor(self) -> torch.Tensor:
        return self._counter(_STEP)

    def call_tensor(self) -> torch.Tensor:
        return self._counter(_CALL)

    def degraded_tensor(self) -> torch.Tensor:
        return self._counter(_DEGRADED)

    def fresh_tensor(self) -> torch.Tensor:
        return self._counter(_FRESH)

    def _counter(self, name: str) -> torch.Tensor:
        """A shared counter, as a buffer of the expert being called (its compiled graph's own)."""
        return self.experts[self.expert_index]._buffers[name]

    def _add_call_slots(self, slots: int) -> None:
        """Keep ``slots`` transformer calls per step apart (CFG as a second call: 2), each with its own
        buffers (the new ones empty, never run). Only eager calls add slots; every layer then builds its
        tables again (the cache budget counts every slot)."""
        self.calls_per_step = slots
        with _normal_tensors():
            for name in (_SLOT_STEP, _SLOT_SIZE):
                ran = self._counters[name]
                self._counters[name] = torch.cat([ran, ran.new_full((len(ran), slots - ran.shape[1]), _NEVER)], 1)
        self._register_counters()
        for layer in self.layers:
            layer.built_on.clear()

    def begin_call(self, module, args, kwargs) -> None:
        arguments = self._arguments(args, kwargs)
        timestep = self._timestep(arguments)
        if not torch.is_tensor(timestep):
            raise ValueError("static mode tracks denoising steps from the transformer's `timestep` tensor; pass one")
        self.expert_index = next(i for i, expert in enumerate(self.experts) if expert is module)
        compiled = torch.compiler.is_compiling() or (timestep.is_cuda and torch.cuda.is_current_stream_capturing())
        if not compiled:
            self._follow_moves(module)
        buffers = module._buffers  # every expert's are the same tensors
        step, last, faults, call = buffers[_STEP], buffers[_LAST_TIMESTEP], buffers[_FAULTS], buffers[_CALL]
        value = timestep.flatten()[:1].to(last.dtype)
        final = self.plan.num_steps - 1
        # A step the scheduler took since the last call: the next step even where the timestep did not
        # change (bfloat16 rounds neighbouring timesteps near 1000 to one value).
        ticks, seen = buffers[_TICKS], buffers[_TICKS_SEEN]
        same_step = (value == last) & (ticks == seen)
        seen.copy_(ticks)
        # With no scheduler hooked, a tie at the first step on other latents is a new generation (Session._restarted).
        first_print = buffers[_FIRST_LATENTS]
        current = latents_print(arguments, timestep) if self.scheduler_hook is None else None
        if current is None:  # a scheduler hook says where a generation begins (or a bfloat16 timestep hides it)
            restarted = torch.zeros_like(same_step)
        else:
            restarted = same_step & (step == 0) & (current != first_print).any()
        same_step = same_step & ~restarted
        next_call = torch.where(same_step, call + 1, 0)
        starting = (value > last) | restarted
        # the step this call is at, unless starting (then the one the last generation stopped at)
        reached = step + ((value <= last) & ~same_step & ~restarted).long()
        degraded = buffers[_DEGRADED]
        degraded.copy_(degraded & ~starting)  # a degrading fault lasts to its generation's end
        if compiled:
            # No host read here: record what the host cannot see now, reported at the next eager
            # call or the next generation (scheduler.set_timesteps).
            found = (
                torch.where(next_call >= self.calls_per_step, _EXTRA_CALL, 0)
                | torch.where(~starting & (reached > final), _EXTRA_STEP, 0)
                | torch.where(starting & (last > float("-inf")) & (step < final), _SHORT_GENERATION, 0)
                | self._other_grid(arguments)
            )
            faults.copy_(faults | found)
            degraded.copy_(degraded | ((found & _DEGRADING) != 0))
        else:
            # The layout may read the inputs on the host: only on eager calls (shapes are fixed).
            self._call_layout(arguments)
            self._note_grid(arguments)
            self.check_processors()
            self._require_grid()
            self.follow_scheduler()
            starting_, last_, reached_, call_ = torch.cat([starting.to(last.dtype), last, reached.to(last.dtype),
                                                           next_call.to(last.dtype)]).tolist()
            if starting_:
                self.check_scheduled_steps()
                first = self._first_step()
                if first:
                    raise NotImplementedError(
                        f"static mode runs every generation from step 0, but this one starts at step {first} (an "
                        "image-to-image or inpainting pipeline with strength below 1, or a plan applied mid-generation); "
                        "apply without static=True"
                    )
                self.check_experts()
                refuse_static_caches(self.experts, self.pipe)
            self._check_call(bool(starting_), last_, reached_)
            if call_ > 0:
                self._say_unhooked_tie(timestep)
            if call_ >= self.calls_per_step:
                self._add_call_slots(int(call_) + 1)
        step.copy_(torch.where(starting, torch.zeros_like(step), reached.clamp(max=final)))
        last.copy_(value)
        if current is not None:
            first_print.copy_(torch.where(starting, current, first_print))
        # The call's slot, and whether it ran at the previous step of this generation (an extra call
        # under compile shares the last slot, recorded above as a fault).
        call.copy_(next_call.clamp(max=self.calls_per_step - 1))
        ran = buffers[_SLOT_STEP]
        ran.copy_(torch.where(starting, _NEVER, ran))
        ran = ran[self.expert_index]
        buffers[_FRESH].copy_(ran.index_select(0, call) == step - 1)
        ran.index_copy_(0, call, step)
        self._check_size(latents_shape(arguments), starting, call, faults, compiled)
        self.in_call = True

    def _note_grid(self, arguments) -> None:
        """At an eager call of a plan whose windows depend on the image grid: what tells its grid apart
        where the token count does not (the latents' shape, FLUX's img_ids)."""
        if not self._grid_methods:
            return
        self._eager_grids.add(_grid_key(arguments))
        ids = arguments.get("img_ids")
        if torch.is_tensor(ids):
            self._ids_prints[ids.shape[-2]] = _ids_print(ids)

    def _other_grid(self, arguments):
        """For a compiled call: ``_GRID`` where it is on another image grid than the eager calls that
        sized the layers' tile windows and pooled keys: its latents of a shape none of them had (known
        at trace time; raising there would only break the graph, and the call rerun eagerly), or image
        ids other than the eager call's of its length (on the device); else 0."""
        if not self._grid_methods:
            return 0
        if _grid_key(arguments) not in self._eager_grids:
            return _GRID
        ids = arguments.get("img_ids")
        expected = self._ids_prints.get(ids.shape[-2]) if torch.is_tensor(ids) else None
        if expected is None:
            return 0
        return torch.where((_ids_print(ids) != expected).any(), _GRID, 0)

    def _check_size(self, shape, starting, call, faults, compiled: bool) -> None:
        """A call slot's input must keep its shape within a generation: its buffers hold rows of that
        shape (a callback that ends classifier-free guidance early halves the batch, and the smaller
        input would read the first rows: the unconditional half's). Eager calls raise at once,
        compiled ones record a fault."""
        if not (self._reads_kept and shape is not None):
            return
        size = math.prod(shape)
        sizes = self._counter(_SLOT_SIZE)
        sizes.copy_(torch.where(starting, _NEVER, sizes))
        held = sizes[self.expert_index].index_select(0, call)
        reshaped = (held != _NEVER) & (held != size)
        sizes[self.expert_index].index_copy_(0, call, torch.where(reshaped, held, size))
        if compiled:
            faults.copy_(faults | torch.where(reshaped, _RESHAPED, 0))
            degraded = self._counter(_DEGRADED)  # its heads must not read the rows of the old shape
            degraded.copy_(degraded | reshaped)
        elif bool(reshaped):
            raise _reshaped_error()

    def _require_grid(self) -> None:
        """Before any work: a plan with tile windows or pooled keys needs a call that reports the image
        grid, whose tables (sized at the first call) then serve every step."""
        segment = self.image_segment
        if not isinstance(segment, str) and len(segment) == 3:
            grid = getattr(segment[2], "grid", segment[2])  # a TileGrid where the plan records tiles
            ragged = [] if grid is None else loose_pool_methods(self.pool_methods, grid)
            if ragged:
                raise NotImplementedError(
                    f"static mode runs pooled keys in the fused kernel only, where p divides the grid's rows and cols "
                    f"({grid[1]} x {grid[2]}); {ragged[0]} does not (the tokens of its partial patches run on SDPA, "
                    "which reads the head modes on the host): apply without static=True, or a plan whose pool factors "
                    "divide the grid"
                )
            return
        if not self._grid_methods:
            return
        why = f" ({segment})" if isinstance(segment, str) else ""
        kinds = [kind for kind in ("tile", "pool") if any(m.startswith(f"{kind}:") for m in self._grid_methods)]
        what = " and ".join({"tile": "tile windows", "pool": "pooled keys"}[kind] for kind in kinds)
        prefixes = " or ".join(f"{kind}:" for kind in kinds)
        raise ValueError(
            f"the plan runs {what} ({', '.join(self._grid_methods[:3])}{', ...' if len(self._grid_methods) > 3 else ''}"
            f"), which need the image grid (frames x rows x cols), but this {self.adapter.MODEL_CLASS} call reports "
            f"none{why}; apply a plan without {prefixes} methods (arrow:<f> windows; calibrate with SearchConfig "
            f"candidates that have no {prefixes}) for this model"
        )

    def _check_call(self, starting: bool, last: float, reached: float) -> None:
        """The checks of an eager call, on host copies of the device counters (``reached``: the step
        this call is at, or for a generation's first call the one the last generation stopped at)."""
        self.report_faults()
        final = self.plan.num_steps - 1
        if not starting and reached > final:
            raise too_many_steps(self.plan.num_steps, "the pipeline")
        if starting and last > float("-inf") and reached < final:
            warn_short_generation(int(reached) + 1, self.plan.num_steps)

    def report_faults(self) -> None:
        """Raise (or warn) for what compiled or graph-replayed calls recorded since the last report."""
        faults = self._counters[_FAULTS]
        found = int(faults)
        if not found:
            return
        faults.zero_()
        if found & _EXTRA_CALL:
            raise RuntimeError(
                f"a compiled or graph-replayed generation called the transformer more often in one step than the "
                f"{self.calls_per_step} call(s) per step the eager calls before it made, so from that call on it "
                "computed every head exactly (uncompressed): run "
                "one whole step eagerly (every call of it: CFG's second call, skip-layer guidance) before compiling "
                "or capturing"
            )
        if found & _EXTRA_STEP:
            raise too_many_steps(self.plan.num_steps, "a compiled or graph-replayed generation")
        if found & _RESHAPED:
            raise _reshaped_error(" of a compiled or graph-replayed run, which from then on computed every head exactly")
        if found & _GRID:
            raise RuntimeError(
                "a compiled or graph-replayed generation ran on another image grid of the same token count than the "
                "eager calls sized the tile windows and pooled keys for, so it computed every head exactly: static "
                "mode sizes them once, for one grid; apply the plan again for this size"
            )
        logger.warning(
            "a compiled or graph-replayed generation stopped short of the plan's %d denoising steps (harmless for "
            "a warm-up or an interrupted run); pass num_inference_steps=%d",
            self.plan.num_steps, self.plan.num_steps,
        )

    def end_call(self, module, args, kwargs, output) -> None:
        """Buffers persist across generations in static mode (their addresses must not change)."""
        self.in_call = False

    def scheduler_set(self, num_steps: int) -> None:
        self.check_pipeline_transformer()
        self.scheduled_steps = num_steps  # checked at the next eager call (compiled ones record a fault)
        self.in_call = False  # a call that raised never ended
        self._follow_moves(self.experts[0])
        self.report_faults()
        self._counters[_LAST_TIMESTEP].fill_(float("-inf"))

    def scheduler_stepped(self) -> None:
        self._counter(_TICKS).add_(1)  # on the device: compiled calls read it there
        # The step count set for a generation whose calls were all compiled (none checked it on the host):
        # checked once the transformer ran (one device read a generation), after its first step, not
        # after the wrong image; a generation of another pipeline sharing the scheduler leaves it pending.
        if self.scheduled_steps is not None and float(self._counters[_LAST_TIMESTEP]) > float("-inf"):
            self.check_scheduled_steps()

    def install_layers(self, modules: dict[str, torch.nn.Module]) -> None:
        for layer in self.layers:
            layer.modules = [expert.get_submodule(layer.name) for expert in self.experts]

    def uninstall_layers(self, modules: dict[str, torch.nn.Module]) -> None:
        """Remove the layers' buffers and the counters, as far as an apply that failed got with them."""
        for module in (module for layer in self.layers for module in getattr(layer, "modules", ())):
            for name in [n for n in module._buffers if n.startswith("_ditfastattn_")]:
                del module._buffers[name]
        for expert in self.experts:
            for name in self._counters:
                expert._buffers.pop(name, None)


def _grid_key(arguments: dict) -> tuple | None:
    """What shows a call's image grid at trace time: its latents' shape past the batch."""
    shape = latents_shape(arguments)
    return None if shape is None else tuple(shape[1:])


def _ids_print(ids: torch.Tensor) -> torch.Tensor:
    """The sums of FLUX-style image ids (rows, columns, and their squares) per coordinate: two grids of
    one token count differ in them. Batched ids (B, S, 3) give every element the same grid: the first's."""
    values = (ids[0] if ids.dim() == 3 else ids).detach().float().reshape(-1, ids.shape[-1])  # MPS has no float64
    return torch.cat([values.sum(0), values.square().sum(0)])


def _reshaped_error(where: str = "") -> RuntimeError:
    return RuntimeError(
        f"the transformer's input changed shape within a generation{where} (classifier-free guidance ended early, "
        "by a step callback or Z-Image's cfg_truncation?); static mode keeps one shape per call: apply the plan "
        "without static=True (the dynamic runtime computes the heads that would read outputs of the old shape)"
    )


def _layout_args(geometry: CallGeometry) -> tuple[tuple[int, int], list[int] | None]:
    """The custom op's layout arguments for a call of ``geometry``: (text_start, text_len) and None,
    or (0, 0) and every global segment flattened (several segments, or padding)."""
    if geometry.simple:
        return (geometry.text_start, geometry.text_len), None
    return (0, 0), [value for segment in geometry.layout.segments for value in segment]


def _slotted(modes: torch.Tensor, pool_slots) -> torch.Tensor:
    """The mode table ``modes`` (steps, heads) with each pool head named by its slot of ``pool_slots``."""
    slot = 0
    for factor, heads in pool_slots:
        for head in heads:
            named = POOL_FLAG | slot << POOL_SLOT_SHIFT | factor
            modes[:, head] = torch.where(modes[:, head] == pool_mode(factor), named, modes[:, head])
            slot += 1
    return modes


def _padding_args(padding) -> tuple:
    """The custom op's ``key_padding`` and ``padding_bias`` (None for a plain key mask) of ``padding``."""
    if padding is None:
        return None, None
    bias = None if padding.bias == KEY_PADDING else [float(value) for row in padding.bias for value in row]
    return padding.mask, bias


def _grid(tiles: TileGrid | None) -> str:
    return "no image grid" if tiles is None else f"the image grid {tiles.grid} in tiles of {tiles.tile}"
