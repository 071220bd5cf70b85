"""Applies a plan during denoising: per-layer processors, step tracking and persistent buffers."""

from __future__ import annotations

import functools
import inspect
import logging
import math
import numbers
import statistics
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import ops
from ._geometry import MODE_FULL, MODE_SKIP
from .adapters import adapter_for, base, check_cfg_sharing, dispatch
from .methods import parse_method
from .model import TokenLayout
from .plan import Plan, PlanMismatchError, _is_int

logger = logging.getLogger(__name__)

_SESSION_ATTR = "_ditfastattn_session"


@dataclass
class _Row:
    """One layer at one step, compiled for one image length and device."""

    all_full: bool  # every head plain full: run the stock dense attention
    keep: bool  # the next step reads this layer's output buffer (it has cache heads)
    modes: torch.Tensor  # (H,) int32 modes of the main op call
    residual_add: torch.Tensor | None  # (1, 1, H, 1) bool: arrow_residual heads
    capture_modes: torch.Tensor | None  # (H,) windows whose residual is captured now; others skip
    capture_mask: torch.Tensor | None  # (1, 1, H, 1) bool
    uncond_modes: torch.Tensor | None  # (H,) modes of the unconditional half; CFG-shared heads skip
    share_mask: torch.Tensor | None  # (1, 1, H, 1) bool: CFG-shared heads
    full_heads: torch.Tensor | None  # indices of plain-full heads of a mixed row: they run dense SDPA
    sparse_modes: torch.Tensor | None  # (H,) modes with those heads skipped, for the fused op
    # What the row was compiled from, to compile variants in which some heads compute instead.
    methods: tuple
    capture: tuple[int, ...]
    num_image_tokens: int
    device: torch.device
    route_full: bool
    cache_heads: tuple[int, ...]  # heads that read the call slot's previous-step output
    captured_heads: tuple[int, ...]  # heads whose residual is captured now
    # (head, step) of every arrow_residual head and the step whose residual it adds; None when the
    # caller manages residuals itself (calibration).
    residual_from: tuple[tuple[int, int], ...] | None
    variants: dict = field(default_factory=dict, repr=False)

    def computing(self, heads: frozenset[int]) -> "_Row":
        """This row with ``heads`` run ``full``: exact where their cached output or residual is missing."""
        if heads not in self.variants:
            methods = [_FULL if head in heads else m for head, m in enumerate(self.methods)]
            self.variants[heads] = compile_row(
                methods, keep=self.keep, capture=self.capture, num_image_tokens=self.num_image_tokens,
                device=self.device, route_full=self.route_full,
            )
        return self.variants[heads]


@dataclass(frozen=True, eq=False)
class CallGeometry:
    """The token layout and padding of one layer call, in the forms the op and sessions take.

    ``op`` holds the op's keyword arguments. ``text_start`` and ``text_len`` are the original
    (text_start, text_len) form that ``Session.row`` and ``Session.after`` receive: exact when
    ``simple`` (one global segment at the start or the end, no padding); otherwise ``text_len``
    counts every global token and ``text_start`` is 0, so ``q.shape[1] - text_len`` is still the
    image token count.
    """

    layout: TokenLayout
    padding: ops.Padding | None
    op: dict
    text_start: int
    text_len: int

    @property
    def simple(self) -> bool:
        return "text_start" in self.op

    @classmethod
    def of(cls, seq: int, text_start, text_len, layout: TokenLayout | None, key_padding) -> "CallGeometry":
        if layout is None:
            return _text_geometry(seq, text_start, text_len)
        padding = key_padding if key_padding is None or isinstance(key_padding, ops.Padding) else ops.Padding(key_padding)
        legacy = layout.text_range()
        if legacy is not None and padding is None:
            return _text_geometry(seq, *legacy)
        return cls(layout, padding, {"segments": layout, "key_padding": padding}, 0 if legacy is None else legacy[0],
                   layout.num_global)

    def rows(self, batch: slice) -> dict:
        """The op's keyword arguments for the batch elements ``batch``."""
        if self.padding is None:
            return self.op
        return {**self.op, "key_padding": ops.Padding(self.padding.mask[batch], self.padding.bias)}


@functools.lru_cache(maxsize=256)
def _text_geometry(seq: int, text_start: int, text_len: int) -> CallGeometry:
    layout = TokenLayout.from_text(seq, text_start, text_len)
    return CallGeometry(layout, None, {"text_start": text_start, "text_len": text_len}, text_start, text_len)


class _Buffers:
    """Output and residual buffers of one layer for one transformer call slot."""

    __slots__ = ("out", "residual", "step", "captured")

    def __init__(self):
        self.out: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.step: int | None = None  # the step whose output `out` holds
        self.captured: dict[int, int] = {}  # head -> step whose residual `residual` holds


def compile_row(
    methods, *, keep: bool, capture, num_image_tokens: int, device, route_full: bool = False, residual_from=None
) -> _Row:
    """Turn one layer's per-head methods at one step into the op's mode tensors and masks.

    ``capture`` lists, per head, the arrow window whose residual (full - arrow) must be kept now
    for a later ``arrow_residual`` step, or ``MODE_SKIP``. ``residual_from`` maps each
    ``arrow_residual`` head to the step whose residual it adds (None: the caller keeps residuals).
    """
    heads = len(methods)

    def tensor(values, dtype=torch.int32):
        if dtype == torch.int32:  # head modes: checked once here, never read back by the op
            return ops.mode_tensor(values, device)
        return torch.tensor(values, dtype=dtype, device=device)

    def mask(flags):
        return tensor(flags, torch.bool).view(1, 1, heads, 1) if any(flags) else None

    modes = [m.mode(num_image_tokens) for m in methods]
    captured = [mode != MODE_SKIP for mode in capture]
    shared = [m.cfg_share for m in methods]
    plain_full = [m.kind == "full" and not m.cfg_share for m in methods]
    # With route_full, full heads of a mixed row go to torch's dense SDPA (cuDNN on Hopper, where it
    # beats the fused kernel's full mode); the fused op then runs only the other heads.
    split = route_full and any(plain_full) and not all(plain_full) and not any(shared)
    return _Row(
        all_full=all(plain_full),
        keep=keep,
        modes=tensor(modes),
        residual_add=mask([m.kind == "arrow_residual" for m in methods]),
        capture_modes=tensor(capture) if any(captured) else None,
        capture_mask=mask(captured),
        uncond_modes=tensor([MODE_SKIP if s else m for m, s in zip(modes, shared)]) if any(shared) else None,
        share_mask=mask(shared),
        full_heads=tensor([h for h, f in enumerate(plain_full) if f], torch.long) if split else None,
        sparse_modes=tensor([MODE_SKIP if f else m for m, f in zip(modes, plain_full)]) if split else None,
        methods=tuple(methods),
        capture=tuple(capture),
        num_image_tokens=num_image_tokens,
        device=device,
        route_full=route_full,
        cache_heads=tuple(h for h, m in enumerate(methods) if m.kind == "cache"),
        captured_heads=tuple(h for h, c in enumerate(captured) if c),
        residual_from=None if residual_from is None else tuple(residual_from),
    )


def cache_heads(plan: Plan) -> list[list[int]]:
    """Number of ``cache`` heads of every layer at every step: ``[step][layer]``."""
    return [[sum(parse_method(m).kind == "cache" for m in heads) for heads in rows] for rows in plan.methods]


def fit_cache_budget(cached: list[list[int]], layer_bytes: list[int], budget: int, *, static: bool = False):
    """Per layer, the steps whose ``cache`` heads run ``full`` instead, so the buffers they read fit ``budget`` bytes.

    A cache head at step t reads its layer's output of step t - 1, so the layer keeps that buffer
    across the step boundary. While step t runs, a layer holds a buffer if step t or step t + 1
    caches (layers run in order: those already run hold step t's output, the rest step t - 1's).
    Buffers are given up greedily where they save the fewest cached heads per byte. A static
    session holds a buffer for the whole generation if the layer ever caches.
    """
    steps, layers = len(cached), len(layer_bytes)

    def value(layer, step_set):
        return sum(cached[t][layer] for t in step_set) / layer_bytes[layer]

    if static:
        everything = range(steps)
        kept = {l for l in range(layers) if value(l, everything)}
        removed = []
        while sum(layer_bytes[l] for l in kept) > budget:
            layer = min(kept, key=lambda l: value(l, everything))
            kept.discard(layer)
            removed.append(layer)
        # Greedy may give up more than needed: take back what still fits, most valuable first.
        for layer in sorted(removed, key=lambda l: -value(l, everything)):
            if sum(layer_bytes[l] for l in kept) + layer_bytes[layer] <= budget:
                kept.add(layer)
        return [frozenset() if l in kept or not value(l, everything) else frozenset(everything) for l in range(layers)]

    kept = [{l for l in range(layers) if cached[t][l]} for t in range(steps)] + [set()]

    def held(t):
        return sum(layer_bytes[l] for l in kept[t] | kept[t + 1])

    for t in range(1, steps):
        removed = []
        while held(t) > budget:
            layer = min(kept[t] | kept[t + 1], key=lambda l: value(l, [s for s in (t, t + 1) if l in kept[s]]))
            for s in (t, t + 1):
                if layer in kept[s]:
                    kept[s].discard(layer)
                    removed.append((layer, s))
        for layer, s in sorted(removed, key=lambda pair: -value(pair[0], [pair[1]])):
            kept[s].add(layer)
            if held(t - 1) > budget or held(t) > budget:
                kept[s].discard(layer)
    return [frozenset(t for t in range(steps) if cached[t][l] and l not in kept[t]) for l in range(layers)]


_FULL = parse_method("full")


def _compile_rows(
    plan: Plan,
    layer: int,
    num_image_tokens: int,
    device: torch.device,
    dropped: frozenset[int] = frozenset(),
    route_full: bool = False,
) -> list[_Row]:
    heads = plan.model.layers[layer].heads
    methods = [[plan.method(step, layer, head) for head in range(heads)] for step in range(plan.num_steps)]
    for step in dropped:  # over the memory budget: these cache heads compute instead
        methods[step] = [_FULL if m.kind == "cache" else m for m in methods[step]]
    plain_full = [[m.kind == "full" and not m.cfg_share for m in row] for row in methods]
    all_full = [all(row) for row in plain_full]
    rows = []
    last_full = [None] * heads  # per head, the last plain-full step so far
    for step, row in enumerate(methods):
        residual_from = [(head, last_full[head]) for head, m in enumerate(row) if m.kind == "arrow_residual"]
        for head in range(heads):
            if plain_full[step][head]:
                last_full[head] = step
        capture = [MODE_SKIP] * heads
        for head in range(heads):
            for later in range(step + 1, plan.num_steps) if plain_full[step][head] else ():
                if plain_full[later][head]:
                    break
                if methods[later][head].kind == "arrow_residual":
                    capture[head] = methods[later][head].mode(num_image_tokens)
                    break
        # Only cache heads read the buffer; every other head is rewritten, so a layer whose next
        # step caches nothing frees its buffer and holds no memory until it needs one again.
        keep = step + 1 < plan.num_steps and any(m.kind == "cache" for m in methods[step + 1])
        rows.append(
            compile_row(
                row, keep=keep, capture=capture, num_image_tokens=num_image_tokens, device=device,
                route_full=route_full, residual_from=residual_from,
            )
        )
    return rows


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
        dropped = self.session.dropped_steps(self.index, q, num_image_tokens)
        key = (num_image_tokens, q.device, dropped, route_full)
        if key not in self._rows:
            self._rows[key] = _compile_rows(
                self.session.plan, self.index, num_image_tokens, q.device, dropped, route_full
            )
        return self._rows[key][self.session.step]

    def _buffers(self, q: torch.Tensor) -> _Buffers:
        slot = self.slots.setdefault(self.session.call, _Buffers())
        out = slot.out
        if out is None or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            if out is not None and self.session.step > 0:
                raise RuntimeError(
                    f"{self.name}: the attention input changed from {tuple(out.shape)} {out.dtype} to "
                    f"{tuple(q.shape)} {q.dtype} within one generation; cached heads cannot be reused"
                )
            slot.out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return slot

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
        geometry = self.geometry = CallGeometry.of(q.shape[1], text_start, text_len, layout, key_padding)
        if not geometry.simple:
            session.check_layout_support(self)
        row = self._runnable(session.row(self, q, k, v, geometry.text_start, geometry.text_len, dense))
        if row.all_full and row.capture_modes is None and not row.keep:
            return dense()
        if dense_only and not row.all_full:
            what = dense_only if isinstance(dense_only, str) else "attention masks and context parallelism"
            raise NotImplementedError(
                f"{self.name}: {what} runs only the stock attention, but the plan compresses this layer at step "
                f"{session.step}; apply a plan that keeps this layer full, or call the model without it"
            )
        slot = self._buffers(q)
        out = slot.out
        if row.all_full:
            result = session.dense(self, dense)
            if row.keep:
                out.copy_(result)
        else:
            result = out
            self._compute(q, k, v, row, out, geometry)
            if row.residual_add is not None:
                out.add_(torch.where(row.residual_add, slot.residual, 0))
        if row.capture_modes is not None:
            arrow = torch.empty_like(out)
            ops.headwise_attention(q, k, v, row.capture_modes, **geometry.op, out=arrow, impl=session.impl)
            previous = slot.residual if slot.residual is not None else torch.zeros_like(out)
            slot.residual = torch.where(row.capture_mask, result - arrow, previous)
            slot.captured.update(dict.fromkeys(row.captured_heads, session.step))
        slot.step = session.step
        session.after(self, q, k, v, result, geometry.text_start, geometry.text_len)
        if not row.keep:
            slot.out = None  # the caller's reference keeps it alive just as long as it is used
        return result

    def _runnable(self, row: _Row) -> _Row:
        """``row``, or its variant in which the heads that would read what this call slot does not
        hold compute instead: cache heads when the slot did not run at the previous step (a call
        that first appears mid-generation, such as skip-layer guidance), arrow_residual heads whose
        residual this slot never captured."""
        session = self.session
        slot = self.slots.get(session.call)
        missing = set()
        if row.cache_heads and (slot is None or slot.out is None or slot.step != session.step - 1):
            missing.update(row.cache_heads)
        if row.residual_from:
            captured = slot.captured if slot is not None else {}
            missing.update(head for head, step in row.residual_from if captured.get(head) != step)
        return row.computing(frozenset(missing)) if missing else row

    def _compute(self, q, k, v, row: _Row, out, geometry: CallGeometry) -> None:
        impl = self.session.impl
        # Routed full heads run on maskless SDPA: with padding they stay in the fused op.
        if row.full_heads is not None and geometry.padding is None:
            ops.headwise_attention(q, k, v, row.sparse_modes, **geometry.op, out=out, impl=impl)
            picked = [t.index_select(2, row.full_heads).transpose(1, 2) for t in (q, k, v)]
            out.index_copy_(2, row.full_heads, F.scaled_dot_product_attention(*picked).transpose(1, 2))
            return
        # CFG is the first call of a step; later ones (skip-layer guidance) hold conditional rows
        # only, so their cfg_share heads compute the whole batch: the sharing's conditional half.
        if row.uncond_modes is None or self.session.call > 0:
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


class Session:
    """State of one applied plan: the current step, the call slot within it, and the layers."""

    layer_cls = LayerRuntime
    buffers_per_generation = False  # a layer holds its buffer only while its next step caches
    # Whether row() and after() read ``layer.geometry`` (global segments on both sides, padding)
    # rather than only their (text_start, text_len); a subclass that overrides row() says so itself.
    layout_aware = True

    def __init__(self, transformer, plan: Plan, adapter, impl: str, cache_budget: int | None = None):
        self.transformer = transformer
        self.plan = plan
        self.adapter = adapter
        self.impl = impl
        self.cache_budget = cache_budget
        self._dropped: dict[tuple, list[frozenset[int]]] = {}
        self.step = 0
        self.call = 0
        self.calls_per_step = 1
        # Of the current transformer call: where its image tokens are (dispatch families), and what
        # is computed once per call (e.g. a check of its attention mask).
        self.image_segment: tuple[int, int] | str = "no transformer call has started"
        self.call_cache: dict = {}
        self._last_timestep: float | None = None
        self._new_generation = True
        self._running = False  # a generation has started (and may have stopped short of the plan's steps)
        self._counted = False  # the scheduler's step count was checked for the next generation
        self._checked = False  # ... for the current one
        self.layers = [self.layer_cls(self, index, layer.name) for index, layer in enumerate(plan.model.layers)]
        self.originals: dict[str, object] = {}
        self.handles: list = []
        self.pipe = None
        self.scheduler_hook: _SchedulerHook | None = None
        self._parameters = tuple(inspect.signature(transformer.forward).parameters)
        self._timestep = getattr(adapter, "timestep", base.timestep)
        self._cfg_share = any(parse_method(m).cfg_share for rows in plan.methods for heads in rows for m in heads)
        self._inputs_checked: set[tuple] = set()

    def row(self, layer: LayerRuntime, q, k, v, text_start, text_len, dense) -> _Row:
        """The compiled plan row of ``layer`` at the current step (calibration decides it here).

        ``layer.geometry`` is the call's full layout and padding; ``text_start``/``text_len`` its
        original form (see :class:`CallGeometry`).
        """
        geometry = layer.geometry
        return layer.row(q, geometry.layout.image_len, self.route_full(q, k, v, text_start, text_len, geometry))

    def route_full(self, q, k, v, text_start: int, text_len: int, geometry: CallGeometry | None = None) -> bool:
        """Whether full heads of mixed layers run on dense SDPA (impl="auto", where it is faster).

        Never with padding: the routed heads run SDPA without a mask.
        """
        if geometry is not None and geometry.padding is not None:
            return False
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
        key = (batch, seq, q.element_size(), 1 if static else self.calls_per_step)
        if key not in self._dropped:
            # Every call slot (e.g. FLUX's true CFG) keeps its own buffers.
            layer_bytes = [key[3] * batch * seq * spec.heads * spec.head_dim * key[2] for spec in self.plan.model.layers]
            cached = cache_heads(self.plan)
            dropped = fit_cache_budget(cached, layer_bytes, self.cache_budget, static=static)
            self._dropped[key] = dropped
            lost = sum(cached[t][l] for l, steps in enumerate(dropped) for t in steps)
            if lost:
                logger.warning(
                    "the cache buffers of this plan exceed the %s budget at batch %d x %d tokens; "
                    "%d of %d cached head-steps compute instead (raise cache_budget_gib for full speed)",
                    _size(self.cache_budget), batch, seq, lost, sum(map(sum, cached)),
                )
        return self._dropped[key][layer]

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
            self.image_segment = segment(self.transformer, arguments)

    def begin_call(self, module, args, kwargs) -> None:
        arguments = self._arguments(args, kwargs)
        timestep = self._timestep(arguments)
        if timestep is None:
            raise ValueError("ditfastattn tracks denoising steps from the transformer's `timestep` argument; none was passed")
        self._call_layout(arguments)
        self.follow_scheduler()
        # One host read per transformer call: the step index comes from the timestep sequence.
        value = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        last = self._last_timestep
        if self._new_generation or last is None or value > last:
            self._start_generation()
            self._check_inputs(arguments.get("hidden_states"))
        elif value == last:
            self.call += 1
            self.calls_per_step = max(self.calls_per_step, self.call + 1)
        else:
            calls = self.call + 1  # call slots of the step just done
            self.step += 1
            self.call = 0
            if self.step >= self.plan.num_steps:
                self._new_generation = True
                raise _too_many_steps(self.plan.num_steps, "the pipeline")
            # A call slot absent from the last step (skip-layer guidance after its last step)
            # holds nothing a later step may read: its cache heads would compute anyway.
            for layer in self.layers:
                for call in [c for c in layer.slots if c >= calls]:
                    layer.free(call)
        self._last_timestep = value

    def _check_inputs(self, hidden) -> None:
        """At a generation's first call, what would otherwise fail only at step 1 (step 0 computes
        every head with the stock attention): a batch without CFG for cfg_share, an impl that
        cannot run on this device and dtype."""
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
        if self.step == self.plan.num_steps - 1:
            for layer in self.layers:
                layer.free(self.call)

    def _start_generation(self) -> None:
        if self._running and not self._checked and self.step < self.plan.num_steps - 1:
            warn_short_generation(self.step + 1, self.plan.num_steps)
        self._running, self._checked, self._counted = True, self._counted, False
        self.step, self.call, self._new_generation = 0, 0, False
        for layer in self.layers:
            layer.free()

    def scheduler_set(self, num_steps: int) -> None:
        self.plan.check_compatible(self.plan.model, num_steps)
        self._new_generation = True
        self._counted = True

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
        self.scheduler_hook = _SchedulerHook(scheduler, self)
        timesteps = getattr(scheduler, "timesteps", None)
        if check and timesteps is not None:
            self.scheduler_set(len(timesteps))

    def install_layers(self, modules: dict[str, torch.nn.Module]) -> None:
        """Hook for sessions that keep state on the attention modules."""

    def uninstall_layers(self, modules: dict[str, torch.nn.Module]) -> None:
        """Undo :meth:`install_layers`."""


_full_costs: dict[tuple, float] = {}


def full_head_cost(q, k, v, text_start: int, text_len: int, geometry: CallGeometry | None = None) -> float:
    """Time of full heads in the fused op over their time routed to torch's dense SDPA.

    Routed heads are gathered, attended and scattered back (what a mixed layer does with them), so
    the copies count: a fused op level with SDPA keeps its heads. Which is faster depends on the
    GPU, the kernel and the shape, so it is measured once per shape on CUDA, outside graph capture,
    and logged; elsewhere the fused op's full mode is SDPA itself (1.0). ``geometry`` (the call's
    layout, when it has several global segments) replaces ``text_start``/``text_len``.
    """
    if q.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return 1.0
    layout = {"text_start": text_start, "text_len": text_len} if geometry is None else geometry.op
    key = (tuple(q.shape), q.stride(), q.dtype, q.device, text_start, text_len,
           None if geometry is None else geometry.layout)
    if key not in _full_costs:
        modes = torch.full((q.shape[2],), MODE_FULL, dtype=torch.int32, device=q.device)
        heads = torch.arange(q.shape[2], device=q.device)
        out = torch.empty_like(q)

        def fused():
            ops.headwise_attention(q, k, v, modes, **layout, out=out, impl="auto")

        def routed():
            picked = [t.index_select(2, heads).transpose(1, 2) for t in (q, k, v)]
            out.index_copy_(2, heads, F.scaled_dot_product_attention(*picked).transpose(1, 2))

        medians = []
        for run in (fused, routed):
            run()  # compiles and tunes
            events = [torch.cuda.Event(enable_timing=True) for _ in range(8)]
            events[0].record()
            for event in events[1:]:
                run()
                event.record()
            events[-1].synchronize()
            medians.append(statistics.median(a.elapsed_time(b) for a, b in zip(events, events[1:])))
        _full_costs[key] = medians[0] / medians[1]
        logger.info(
            "full heads at %s: fused op %.3f ms, routed to dense SDPA %.3f ms; full heads of mixed "
            "layers run %s", tuple(q.shape), medians[0], medians[1],
            "on dense SDPA" if _full_costs[key] > 1.0 else "in the fused op",
        )
    return _full_costs[key]


def dense_slots(full_counts: list[int], fused_cost: float) -> int:
    """How many full heads a static layer sends to dense SDPA at every step.

    The slots cost one dense head each at every step, used or not; full heads beyond them run in
    the fused kernel at ``fused_cost`` each. Returns the count with the least total.
    """
    def total(slots):
        return sum(slots + fused_cost * max(0, n - slots) for n in full_counts)

    return min(range(max(full_counts, default=0) + 1), key=lambda slots: (total(slots), slots))


_STEP = "_ditfastattn_step"
_LAST_TIMESTEP = "_ditfastattn_last_timestep"
_FAULTS = "_ditfastattn_faults"
# Bits of the faults a compiled call records on the device for the host to report later.
_REPEATED_CALL, _EXTRA_STEP, _SHORT_GENERATION = 1, 2, 4


class _StaticLayer(LayerRuntime):
    """One code path for every step: the step's modes are gathered on the device from a table.

    Nothing depends on the step on the host, so ``torch.compile(fullgraph=True)`` traces one graph
    for the whole denoising loop and CUDA graphs can replay it. Tables and buffers are non-persistent
    buffers of the attention module: they follow ``.to()`` and have static addresses. Only layers
    that ever cache hold an output buffer; layers full at every step run the stock attention.
    """

    module: torch.nn.Module
    built = False
    routed = False

    def build(self, q, k, v, text_start: int, text_len: int) -> None:
        """Tables for this layer at ``q``'s shape; on the first call, which must run uncompiled."""
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"{self.name}: static mode builds its tables and buffers on the first call; run one uncompiled "
                "transformer call (or generation) with these shapes before torch.compile"
            )
        num_image_tokens, device, module = self.session.num_image_tokens, q.device, self.module
        dropped = self.session.dropped_steps(self.index, q, num_image_tokens)
        rows = _compile_rows(self.session.plan, self.index, num_image_tokens, device, dropped)
        heads = rows[0].modes.numel()

        def stack(values):
            return torch.stack(values).to(device)

        none = torch.full((heads,), MODE_SKIP, dtype=torch.int32, device=device)
        flags = torch.zeros(heads, dtype=torch.bool, device=device)
        # The rows' modes were checked on the host as they were made (ops.mode_tensor): the custom
        # op reads none of these tables back, so a compiled or captured step has no host sync.
        tables = {
            "modes": stack([row.modes for row in rows]),
            "residual_add": stack([flags if row.residual_add is None else row.residual_add.view(-1) for row in rows]),
            "capture_modes": stack([none if row.capture_modes is None else row.capture_modes for row in rows]),
            "capture_mask": stack([flags if row.capture_mask is None else row.capture_mask.view(-1) for row in rows]),
        }
        self.residuals = bool(tables["residual_add"].any())
        self.caches = any(row.keep for row in rows)
        self.stock = all(row.all_full for row in rows) and not self.residuals
        if self.session.impl == "auto" and not self.stock:
            tables.update(self._route_full_heads(tables["modes"], full_head_cost(q, k, v, text_start, text_len)))
        for name, table in tables.items():
            module.register_buffer(f"_ditfastattn_{name}", table, persistent=False)
        self.built = True

    def _route_full_heads(self, modes: torch.Tensor, fused_cost: float) -> dict[str, torch.Tensor]:
        """Send up to a fixed number of each step's full heads to dense SDPA (cuDNN on Hopper).

        ``dense_heads[step]`` lists distinct heads: the routed full heads, which the fused op then
        skips, padded with other heads whose current output is written back (``dense_valid`` false).
        """
        full = (modes == MODE_FULL).cpu()
        slots = dense_slots(full.sum(1).tolist(), fused_cost)
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

    def _buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        buffer = self.module._buffers.get(name)
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype or buffer.device != like.device:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    f"{self.name}: the attention input changed to {tuple(like.shape)} {like.dtype} after the first "
                    "call; static mode needs fixed shapes (apply again for the new ones)"
                )
            buffer = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
            self.module.register_buffer(name, buffer, persistent=False)
        return buffer

    def attend(self, q, k, v, *, text_start: int | None = None, text_len: int | None = None, dense,
               dense_only: str | bool = False, layout: TokenLayout | None = None, key_padding=None) -> torch.Tensor:
        if dense_only:
            what = dense_only if isinstance(dense_only, str) else "attention masks or context parallelism"
            raise NotImplementedError(f"{self.name}: static mode does not support {what}; apply without static=True")
        # Shapes are fixed: the geometry of the first (eager) call serves the compiled ones.
        geometry = self.geometry
        if geometry is None or not torch.compiler.is_compiling():
            geometry = self.geometry = CallGeometry.of(q.shape[1], text_start, text_len, layout, key_padding)
        if not geometry.simple:
            raise NotImplementedError(
                f"{self.name}: static mode takes one text segment at the start or the end and no key padding "
                "(this call has reference-image tokens or a text mask); apply without static=True"
            )
        text_start, text_len = geometry.text_start, geometry.text_len
        if q.shape[1] - text_len != self.session.num_image_tokens:
            raise ValueError(
                f"{self.name}: static mode was applied for {self.session.num_image_tokens} image tokens but the "
                f"model sees {q.shape[1] - text_len}; apply again with num_image_tokens={q.shape[1] - text_len}"
            )
        if not self.built:
            self.build(q, k, v, text_start, text_len)
        if self.stock:
            return dense()
        step = self.session.step_tensor()
        module, impl = self.module, self.session.impl
        # Cache heads skip, so their slice must hold last step's output: a persistent buffer. Layers
        # that never cache write every element and take a fresh tensor.
        out = self._buffer("_ditfastattn_out", q) if self.caches else torch.empty_like(q)
        modes = module._ditfastattn_modes.index_select(0, step).view(-1)
        torch.ops.ditfastattn.headwise_attention_(q, k, v, modes, text_start, text_len, out, q.shape[-1] ** -0.5, impl)
        if self.routed:
            heads = module._ditfastattn_dense_heads.index_select(0, step).view(-1)
            valid = module._ditfastattn_dense_valid.index_select(0, step).view(1, 1, -1, 1)
            picked = [t.index_select(2, heads).transpose(1, 2) for t in (q, k, v)]
            dense = F.scaled_dot_product_attention(*picked).transpose(1, 2)
            out.index_copy_(2, heads, torch.where(valid, dense, out.index_select(2, heads)))
        if self.residuals:
            residual = self._buffer("_ditfastattn_residual", q)
            out.add_(torch.where(module._ditfastattn_residual_add.index_select(0, step).view(1, 1, -1, 1), residual, 0))
            arrow = torch.empty_like(out)
            capture = module._ditfastattn_capture_modes.index_select(0, step).view(-1)
            torch.ops.ditfastattn.headwise_attention_(q, k, v, capture, text_start, text_len, arrow, q.shape[-1] ** -0.5, impl)
            keep = module._ditfastattn_capture_mask.index_select(0, step).view(1, 1, -1, 1)
            residual.copy_(torch.where(keep, out - arrow, residual))
        return out

    def free(self, call: int | None = None) -> None:
        for name in ("_ditfastattn_out", "_ditfastattn_residual"):
            self.module._buffers.pop(name, None)


class StaticSession(Session):
    """Session whose step counter lives on the device (no host read per call); one call per step."""

    layer_cls = _StaticLayer
    buffers_per_generation = True  # static addresses: a layer that ever caches holds its buffer throughout

    def __init__(self, transformer, plan: Plan, adapter, impl: str, cache_budget: int | None, num_image_tokens: int):
        super().__init__(transformer, plan, adapter, impl, cache_budget)
        if self._cfg_share:
            raise NotImplementedError("static mode does not support cfg_share methods yet; apply without static=True")
        self.num_image_tokens = num_image_tokens
        device = next(transformer.parameters()).device
        # Shape (1,): index_select with it stays on the device (a 0-d index would be a host int).
        transformer.register_buffer(_STEP, torch.zeros(1, dtype=torch.long, device=device), persistent=False)
        transformer.register_buffer(_LAST_TIMESTEP, torch.full((1,), float("-inf"), device=device), persistent=False)
        transformer.register_buffer(_FAULTS, torch.zeros(1, dtype=torch.int32, device=device), persistent=False)

    def step_tensor(self) -> torch.Tensor:
        return self.transformer._buffers[_STEP]

    def begin_call(self, module, args, kwargs) -> None:
        arguments = self._arguments(args, kwargs)
        timestep = self._timestep(arguments)
        if not torch.is_tensor(timestep):
            raise ValueError("static mode tracks denoising steps from the transformer's `timestep` tensor; pass one")
        buffers = self.transformer._buffers
        step, last, faults = buffers[_STEP], buffers[_LAST_TIMESTEP], buffers[_FAULTS]
        value = timestep.flatten()[:1].to(last.dtype)
        final = self.plan.num_steps - 1
        if torch.compiler.is_compiling() or (value.is_cuda and torch.cuda.is_current_stream_capturing()):
            # No host read here: record what the host cannot see now, reported at the next eager
            # call or the next generation (scheduler.set_timesteps).
            found = (
                torch.where(value == last, _REPEATED_CALL, 0)
                | torch.where((value < last) & (step >= final), _EXTRA_STEP, 0)
                | torch.where((value > last) & (last > float("-inf")) & (step < final), _SHORT_GENERATION, 0)
            )
            faults.copy_(faults | found)
        else:
            # The layout may read the inputs on the host: only on eager calls (shapes are fixed).
            self._call_layout(arguments)
            self.follow_scheduler()
            self._check_call(*torch.cat([value, last, step.to(last.dtype)]).tolist())
        advanced = torch.where(value < last, step + 1, step).clamp(max=final)
        step.copy_(torch.where(value > last, torch.zeros_like(step), advanced))
        last.copy_(value)

    def _check_call(self, value: float, last: float, step: float) -> None:
        """The checks of an eager call, on host copies of the timestep and the device counters."""
        self.report_faults()
        final = self.plan.num_steps - 1
        if value == last:
            raise _second_call(f"the transformer was called again at step {int(step)}")
        if value < last and step >= final:
            raise _too_many_steps(self.plan.num_steps, "the pipeline")
        if value > last and last > float("-inf") and step < final:
            warn_short_generation(int(step) + 1, self.plan.num_steps)

    def report_faults(self) -> None:
        """Raise (or warn) for what compiled or graph-replayed calls recorded since the last report."""
        faults = self.transformer._buffers[_FAULTS]
        found = int(faults)
        if not found:
            return
        faults.zero_()
        if found & _REPEATED_CALL:
            raise _second_call("a compiled or graph-replayed generation called the transformer twice in one step, "
                               "so its output was wrong")
        if found & _EXTRA_STEP:
            raise _too_many_steps(self.plan.num_steps, "a compiled or graph-replayed generation")
        logger.warning(
            "a compiled or graph-replayed generation stopped short of the plan's %d denoising steps (harmless for "
            "a warm-up or an interrupted run); pass num_inference_steps=%d",
            self.plan.num_steps, self.plan.num_steps,
        )

    def end_call(self, module, args, kwargs, output) -> None:
        """Buffers persist across generations in static mode (their addresses must not change)."""

    def scheduler_set(self, num_steps: int) -> None:
        self.plan.check_compatible(self.plan.model, num_steps)
        self.report_faults()
        self.transformer._buffers[_LAST_TIMESTEP].fill_(float("-inf"))

    def install_layers(self, modules: dict[str, torch.nn.Module]) -> None:
        for layer in self.layers:
            layer.module = modules[layer.name]

    def uninstall_layers(self, modules: dict[str, torch.nn.Module]) -> None:
        for module in modules.values():
            for name in [n for n in module._buffers if n.startswith("_ditfastattn_")]:
                del module._buffers[name]
        for name in (_STEP, _LAST_TIMESTEP, _FAULTS):
            del self.transformer._buffers[name]


def cfg_batch_error(batch: int) -> ValueError:
    return ValueError(
        f"cfg_share needs a CFG batch [unconditional; conditional] of even size; got batch {batch} (guidance_scale "
        "<= 1 turns classifier-free guidance off): raise guidance_scale above 1, or use a plan without cfg_share"
    )


def _second_call(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"static mode runs one transformer call per denoising step, but {what} (true CFG, skip-layer guidance): "
        "one set of static buffers cannot replay a second call. Apply the plan without static=True, or run CFG "
        "as one batched call"
    )


def _too_many_steps(planned: int, who: str) -> PlanMismatchError:
    return PlanMismatchError(
        f"{who} ran more than the plan's {planned} denoising steps; "
        f"pass num_inference_steps={planned} or calibrate a plan for your step count"
    )


def _size(num_bytes: int) -> str:
    """Bytes in GiB, or in MiB below one GiB (a small budget is not "0.00 GiB")."""
    if num_bytes >= 2**30:
        return f"{num_bytes / 2**30:.2f} GiB"
    return f"{num_bytes / 2**20:.2f} MiB"


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _transformer_of(pipe_or_transformer):
    if isinstance(pipe_or_transformer, torch.nn.Module):
        return pipe_or_transformer, None
    transformer = getattr(pipe_or_transformer, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer, pipe_or_transformer
    raise TypeError(
        f"expected a diffusers pipeline with a `.transformer` or a transformer module; got {type(pipe_or_transformer).__name__}"
    )


def warn_short_generation(ran: int, planned: int) -> None:
    logger.warning(
        "the last generation stopped after %d of the plan's %d denoising steps, so it ran the plan's rows "
        "for other steps (harmless for a warm-up or an interrupted run); pass num_inference_steps=%d, and apply "
        "the plan to the pipeline rather than its transformer to have the step count checked before denoising",
        ran, planned, planned,
    )


class _SchedulerHook:
    """Tells the session the step count at every ``set_timesteps`` of one scheduler instance.

    Wraps whatever ``set_timesteps`` the instance has (a user's own instance-level patch
    included) and puts exactly that back on :meth:`undo`.
    """

    _ABSENT = object()

    def __init__(self, scheduler, session: Session):
        self.scheduler = scheduler
        self.before = vars(scheduler).get("set_timesteps", self._ABSENT)
        original = scheduler.set_timesteps
        hook = self

        # functools.wraps keeps the signature, which pipelines inspect (retrieve_timesteps).
        @functools.wraps(original)
        def set_timesteps(*args, **kwargs):
            result = original(*args, **kwargs)
            if hook.active:  # a patch wrapped around this one may outlive remove()
                session.scheduler_set(len(scheduler.timesteps))
            return result

        self.active = True
        self.wrapper = set_timesteps
        scheduler.set_timesteps = set_timesteps

    def undo(self) -> None:
        self.active = False
        if vars(self.scheduler).get("set_timesteps") is not self.wrapper:
            return  # patched again since apply: that patch stays (it calls this one, now inactive)
        if self.before is self._ABSENT:
            del self.scheduler.set_timesteps
        else:
            self.scheduler.set_timesteps = self.before


def install(pipe_or_transformer, plan: Plan, impl: str, session_cls=Session, **session_args) -> Session:
    transformer, pipe = _transformer_of(pipe_or_transformer)
    if getattr(transformer, _SESSION_ATTR, None) is not None:
        raise RuntimeError("a ditfastattn plan is already applied to this model; call ditfastattn.remove() first")
    if impl not in ops.IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {ops.IMPLEMENTATIONS}; got {impl!r}")
    if not isinstance(plan, Plan):
        raise TypeError(f"expected a ditfastattn.Plan (e.g. Plan.load(path)); got {type(plan).__name__}")
    adapter = adapter_for(transformer)
    plan.check_compatible(adapter.describe(transformer))
    check_cfg_sharing(adapter, {m for rows in plan.methods for heads in rows for m in heads})
    stock = adapter.stock_processor_types()
    modules = {name: transformer.get_submodule(name) for name in plan.layer_names}
    for name, module in modules.items():
        if not isinstance(module.processor, stock):
            raise TypeError(
                f"{name} uses {type(module.processor).__name__}; ditfastattn works with diffusers' stock "
                f"{', '.join(t.__name__ for t in stock)} only (undo fuse_qkv_projections / custom processors first)"
            )
    session = session_cls(transformer, plan, adapter, impl, **session_args)
    session.install_layers(modules)
    session.handles = [
        transformer.register_forward_pre_hook(session.begin_call, with_kwargs=True),
        transformer.register_forward_hook(session.end_call, with_kwargs=True),
    ]
    if hasattr(adapter, "make_processor"):  # a family that calls SDPA itself: its own processors
        for layer in session.layers:
            module = modules[layer.name]
            session.originals[layer.name] = module.processor
            module.set_processor(adapter.make_processor(layer, module.processor))
    else:
        session.handles += dispatch.intercept(session, modules)
    if pipe is not None:
        session.pipe = pipe
        session.follow_scheduler(check=False)  # its timesteps may be a previous run's
    setattr(transformer, _SESSION_ATTR, session)
    return session


def uninstall(pipe_or_transformer) -> Plan:
    transformer, _ = _transformer_of(pipe_or_transformer)
    session: Session | None = getattr(transformer, _SESSION_ATTR, None)
    if session is None:
        raise RuntimeError("no ditfastattn plan is applied to this model; nothing to remove")
    for name, processor in session.originals.items():
        transformer.get_submodule(name).set_processor(processor)
    for handle in session.handles:
        handle.remove()
    if not hasattr(session.adapter, "make_processor"):
        session.release()
    if session.scheduler_hook is not None:
        session.scheduler_hook.undo()
    for layer in session.layers:
        layer.free()
    session.uninstall_layers({layer.name: transformer.get_submodule(layer.name) for layer in session.layers})
    delattr(transformer, _SESSION_ATTR)
    return session.plan


def apply(
    pipe_or_transformer,
    plan: Plan,
    *,
    impl: str = "auto",
    cache_budget_gib: float | None = None,
    static: bool = False,
    num_image_tokens: int | None = None,
) -> None:
    """Run ``pipe_or_transformer`` under ``plan`` until :func:`remove`.

    Takes over the attention of every layer the plan names (for the families that call diffusers'
    ``dispatch_attention_fn``, by intercepting that call; SD3 through processors of its own, per
    module instance), tracks the denoising step from the transformer's ``timestep``, and, given a
    pipeline, checks the step count whenever the scheduler's timesteps are set (a scheduler
    swapped in later included). More steps than the plan always raise; on the transformer alone, a
    generation that stopped short is logged when the next one starts. ``impl`` picks the attention
    op ("auto", "gluon", "triton", "reference"; see :func:`ditfastattn.ops.headwise_attention`).

    Cache heads read their layer's output of the previous step, which the runtime keeps only while
    the next step caches, per transformer call of a step. A call that did not run at the previous
    step (skip-layer guidance starts mid-generation) computes its cache heads instead, and its
    ``arrow_residual`` heads where it kept no residual: exact, never a read of memory nothing
    wrote. ``cache_budget_gib`` bounds those buffers (all call slots together): where
    the plan would need more, the fewest cached heads per byte compute (``full``) instead, logged
    once with the count. ``None`` keeps every buffer the plan needs.

    ``static=True`` keeps the step counter and the per-step head modes on the device, so
    ``torch.compile(transformer, fullgraph=True)`` compiles one graph for every step and CUDA
    graphs can replay it. It needs the image token count (``num_image_tokens``, or the plan's
    provenance), one transformer call per step (a second is refused: at once in eager calls, at
    the next eager call or generation when compiled or replayed), no ``cfg_share``, and one
    uncompiled call to build its tables and buffers. Layers that are full at every step run the stock attention; the
    others run every head through the fused op, and keep an output buffer for the whole generation
    if they ever cache.
    """
    if impl not in ops.IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {ops.IMPLEMENTATIONS}; got {impl!r}")
    if cache_budget_gib is not None and not (_is_number(cache_budget_gib) and math.isfinite(cache_budget_gib)
                                             and cache_budget_gib >= 0):
        raise ValueError(
            f"cache_budget_gib must be >= 0: a finite number of GiB, or None for no limit; got {cache_budget_gib!r}"
        )
    if num_image_tokens is not None and not (_is_int(num_image_tokens) and num_image_tokens > 0):
        raise ValueError(f"num_image_tokens must be a positive int (e.g. FLUX 1024x1024: 4096); got {num_image_tokens!r}")
    if not isinstance(static, bool):
        raise TypeError(f"static must be True or False; got {static!r}")
    budget = None if cache_budget_gib is None else int(cache_budget_gib * 2**30)
    if static:
        if not isinstance(plan, Plan):
            raise TypeError(f"expected a ditfastattn.Plan (e.g. Plan.load(path)); got {type(plan).__name__}")
        tokens = num_image_tokens or plan.provenance.get("num_image_tokens")
        if not tokens:
            raise ValueError("static=True needs num_image_tokens= (e.g. FLUX 1024x1024: 4096) or a plan that records it")
        install(pipe_or_transformer, plan, impl, StaticSession, cache_budget=budget, num_image_tokens=int(tokens))
    else:
        install(pipe_or_transformer, plan, impl, cache_budget=budget)
    logger.info("applied %s plan (%s)", plan.provenance.get("source", "calibrated"), plan)


def remove(pipe_or_transformer) -> Plan:
    """Restore the model (bit for bit): its processors, diffusers' dispatch function, no hooks or
    buffers; returns the plan."""
    return uninstall(pipe_or_transformer)
