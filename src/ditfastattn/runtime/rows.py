"""Row compilation: one layer's per-head methods at one step turned into the op's mode tensors and masks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import ops
from .._geometry import MODE_SKIP, TileGrid
from ..methods import parse_method
from ..ops._host_copy import device_tensor
from ..plan import Plan


@dataclass
class _Row:
    """One layer at one step, compiled for one image length and device."""

    all_full: bool  # every head plain full: run the stock dense attention
    keep: bool  # the next step reads this layer's output buffer (it has cache heads)
    modes: torch.Tensor  # (H,) int32 modes of the main op call
    residual_add: torch.Tensor | None  # (1, 1, H, 1) bool: arrow_residual heads
    residual_index: slice | torch.Tensor | None  # the same heads, for _heads_index's slices or gathers
    capture_modes: torch.Tensor | None  # (H,) windows whose residual is captured now; others skip
    capture_mask: torch.Tensor | None  # (1, 1, H, 1) bool
    capture_index: slice | torch.Tensor | None  # the captured heads, likewise
    uncond_modes: torch.Tensor | None  # (H,) modes of the unconditional half; CFG-shared heads skip
    share_mask: torch.Tensor | None  # (1, 1, H, 1) bool: CFG-shared heads
    full_heads: torch.Tensor | None  # indices of plain-full heads of a mixed row: they run dense SDPA
    sparse_modes: torch.Tensor | None  # (H,) modes with those heads skipped, for the fused op
    # What the row was compiled from, to compile variants in which some heads compute instead.
    methods: tuple
    capture: tuple[int, ...]
    num_image_tokens: int
    tiles: TileGrid | None
    device: torch.device
    route_full: bool
    cache_heads: tuple[int, ...]  # heads that read the call slot's previous-step output
    cache_index: slice | torch.Tensor | None  # the same heads, for _heads_index's slices or gathers
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
                device=self.device, route_full=self.route_full, tiles=self.tiles,
            )
        return self.variants[heads]


def compile_row(
    methods, *, keep: bool, capture, num_image_tokens: int, device, route_full: bool = False, residual_from=None,
    tiles: TileGrid | None = None,
) -> _Row:
    """Turn one layer's per-head methods at one step into the op's mode tensors and masks.

    ``capture`` lists, per head, the arrow window whose residual (full - arrow) must be kept now
    for a later ``arrow_residual`` step, or ``MODE_SKIP``. ``residual_from`` maps each
    ``arrow_residual`` head to the step whose residual it adds (None: the caller keeps residuals).
    ``tiles`` (the call's grid in tiles) sizes tile windows; without it they raise ValueError.
    """
    heads = len(methods)

    # A row is first compiled mid-step, at its layer's first call: its tensors are queued from
    # pinned memory (a pageable copy would wait for all the GPU's queued work).
    def tensor(values, dtype=torch.int32):
        if dtype == torch.int32:  # head modes: checked once here, never read back by the op
            return ops.mode_tensor(values, device)
        return device_tensor(values, dtype, device)

    def mask(flags):
        return tensor(flags, torch.bool).view(1, 1, heads, 1) if any(flags) else None

    modes = [m.mode(num_image_tokens, tiles) for m in methods]
    captured = [mode != MODE_SKIP for mode in capture]
    reads_residual = [m.reads_residual for m in methods]
    shared = [m.shares_cfg for m in methods]
    plain_full = [m.exact for m in methods]
    # With route_full, full heads of a mixed row go to torch's dense SDPA (cuDNN on Hopper, where it
    # beats the fused kernel's full mode); the fused op then runs only the other heads.
    split = route_full and any(plain_full) and not all(plain_full) and not any(shared)
    return _Row(
        all_full=all(plain_full),
        keep=keep,
        modes=tensor(modes),
        residual_add=mask(reads_residual),
        residual_index=_heads_index(reads_residual, device),
        capture_modes=tensor(capture) if any(captured) else None,
        capture_mask=mask(captured),
        capture_index=_heads_index(captured, device),
        uncond_modes=tensor([MODE_SKIP if s else m for m, s in zip(modes, shared)]) if any(shared) else None,
        share_mask=mask(shared),
        full_heads=tensor([h for h, f in enumerate(plain_full) if f], torch.long) if split else None,
        sparse_modes=tensor([MODE_SKIP if f else m for m, f in zip(modes, plain_full)]) if split else None,
        methods=tuple(methods),
        capture=tuple(capture),
        num_image_tokens=num_image_tokens,
        tiles=tiles,
        device=device,
        route_full=route_full,
        cache_heads=tuple(h for h, m in enumerate(methods) if m.reads_previous_output),
        cache_index=_heads_index([m.reads_previous_output for m in methods], device),
        captured_heads=tuple(h for h, c in enumerate(captured) if c),
        residual_from=None if residual_from is None else tuple(residual_from),
    )


def _heads_index(flags, device) -> slice | torch.Tensor | None:
    """The flagged heads of a (B, S, H, D) output, to work on their bytes only where a mask would
    touch every head's: a slice (a view, one launch) where they are adjacent, else their indices
    (gathers, a fixed number of launches however scattered they are). None where none is flagged."""
    heads = [head for head, flag in enumerate(flags) if flag]
    if not heads:
        return None
    if heads[-1] - heads[0] + 1 == len(heads):
        return slice(heads[0], heads[-1] + 1)
    return device_tensor(heads, torch.long, device)


def cache_heads(plan: Plan) -> list[list[int]]:
    """Number of ``cache`` heads of every layer at every step: ``[step][layer]``."""
    return [[sum(parse_method(m).reads_previous_output for m in heads) for heads in rows] for rows in plan.methods]


_FULL = parse_method("full")


def _compile_rows(
    plan: Plan,
    layer: int,
    num_image_tokens: int,
    device: torch.device,
    dropped: frozenset[int] = frozenset(),
    route_full: bool = False,
    tiles: TileGrid | None = None,
) -> list[_Row]:
    heads = plan.model.layers[layer].heads
    methods = [[plan.method(step, layer, head) for head in range(heads)] for step in range(plan.num_steps)]
    for step in dropped:  # over the memory budget: these cache heads compute instead
        methods[step] = [_FULL if m.reads_previous_output else m for m in methods[step]]
    plain_full = [[m.exact for m in row] for row in methods]
    rows = []
    last_full = [None] * heads  # per head, the last plain-full step so far
    for step, row in enumerate(methods):
        residual_from = [(head, last_full[head]) for head, m in enumerate(row) if m.reads_residual]
        for head in range(heads):
            if plain_full[step][head]:
                last_full[head] = step
        capture = [MODE_SKIP] * heads
        for head in range(heads):
            for later in range(step + 1, plan.num_steps) if plain_full[step][head] else ():
                if plain_full[later][head]:
                    break
                if methods[later][head].reads_residual:
                    capture[head] = methods[later][head].mode(num_image_tokens)
                    break
        # Only cache heads read the buffer; every other head is rewritten, so a layer whose next
        # step caches nothing frees its buffer and holds no memory until it needs one again.
        keep = step + 1 < plan.num_steps and any(m.reads_previous_output for m in methods[step + 1])
        rows.append(
            compile_row(
                row, keep=keep, capture=capture, num_image_tokens=num_image_tokens, device=device,
                route_full=route_full, residual_from=residual_from, tiles=tiles,
            )
        )
    return rows
