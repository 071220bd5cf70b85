"""Full-head routing: whether full heads of mixed layers run on torch's dense SDPA or in the fused op."""

from __future__ import annotations

import logging
import math
import statistics
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .. import ops
from .._geometry import MODE_FULL

if TYPE_CHECKING:
    from .session import CallGeometry

logger = logging.getLogger("ditfastattn.runtime")


_full_costs: dict[tuple, float] = {}


def sdpa_mask(padding: ops.Padding | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``padding`` as the ``attn_mask`` of torch's SDPA, in the form the stock processors pass.

    A bias of only 0 and -inf becomes a boolean mask (True: attend), bit for bit the stock one
    (Qwen-Image's key mask, Chroma's m_q & m_k); another (Chroma's float m_q * m_k) an additive
    mask of ``dtype``. A bias that depends on the key alone gives a key mask (B, 1, 1, S), any
    other a token-pair mask (B, 1, S, S). Built on the device from scalars: no host transfer.
    """
    if padding is None:
        return None
    boolean = all(value in (0.0, -math.inf) for row in padding.bias for value in row)
    table = [[value == 0.0 for value in row] for row in padding.bias] if boolean else padding.bias
    padded = padding.mask

    def by_key(row):  # (B, S): the bias of every key for queries of one kind
        return torch.where(padded, row[1], row[0])

    if table[0] == table[1]:
        mask = by_key(table[0])[:, None, None, :]
    else:
        mask = torch.where(padded[:, :, None], by_key(table[1])[:, None, :], by_key(table[0])[:, None, :])[:, None]
    return mask if boolean else mask.to(dtype)


def _sdpa(q, k, v, padding: ops.Padding | None) -> torch.Tensor:
    """(B, S, H, D) ``q``, ``k``, ``v`` attended by torch's dense SDPA under ``padding``."""
    heads = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(*heads, attn_mask=sdpa_mask(padding, q.dtype)).transpose(1, 2)


def _queries_padded_apart(padding: ops.Padding | None) -> bool:
    """Whether ``padding`` treats padded queries apart (a token-pair mask: Chroma, HunyuanVideo 1.5),
    which SDPA takes only as an S x S mask."""
    return padding is not None and padding.bias[0] != padding.bias[1]


def dense_heads(q, k, v, heads: torch.Tensor, padding: ops.Padding | None = None) -> torch.Tensor:
    """Heads ``heads`` of (B, S, H, D) ``q``, ``k``, ``v`` attended by torch's dense SDPA under
    ``padding``, as (B, S, len(heads), D)."""
    return _sdpa(*(t.index_select(2, heads) for t in (q, k, v)), padding)


def exact_attention(q, k, v, op: dict, impl: str) -> torch.Tensor:
    """(B, S, H, D): every head of (B, S, H, D) ``q``, ``k``, ``v`` attended exactly, the token layout
    and key padding as ``op`` gives them to :func:`ops.headwise_attention`: on torch's dense SDPA, as
    the stock attention runs, except under padding that treats padded queries apart, where SDPA would
    need an S x S mask (see :func:`full_head_cost`): there in the fused op's full mode."""
    padding = op.get("key_padding")
    if _queries_padded_apart(padding):
        # Made from host values: the op would read a tensor made on the device back (a wait).
        modes = ops.mode_tensor((MODE_FULL,) * q.shape[2], q.device)
        return ops.headwise_attention(q, k, v, modes, **op, impl=impl)
    return _sdpa(q, k, v, padding)


def attend_dense(q, k, v, heads: torch.Tensor, out: torch.Tensor, padding: ops.Padding | None = None) -> None:
    """:func:`dense_heads` written into the same heads of ``out``: a mixed layer's routed full heads."""
    out.index_copy_(2, heads, dense_heads(q, k, v, heads, padding))


def full_head_cost(q, k, v, text_start: int, text_len: int, geometry: CallGeometry | None = None) -> float:
    """Time of full heads in the fused op over their time routed to torch's dense SDPA.

    Routed heads are gathered, attended and scattered back (what a mixed layer does with them), so
    the copies count: a fused op level with SDPA keeps its heads. Which is faster depends on the
    GPU, the kernel and the shape, so it is measured once per shape on CUDA, outside graph capture,
    and logged; elsewhere the fused op's full mode is SDPA itself (1.0). ``geometry`` (the call's
    layout, when it has several global segments or padding) replaces ``text_start``/``text_len``;
    with padding both sides run under its mask, measured once per form of padding (not per mask).
    Under padding that treats padded queries apart (a token-pair mask: Chroma, HunyuanVideo 1.5) the
    routed heads would need an S x S mask (24 GiB at HunyuanVideo 1.5's 720p x 121 frames) on a slow
    SDPA backend, so full heads stay in the fused op (0.0), unmeasured.
    """
    padding = None if geometry is None else geometry.padding
    if _queries_padded_apart(padding):
        return 0.0
    if q.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return 1.0
    layout = {"text_start": text_start, "text_len": text_len} if geometry is None else geometry.op
    key = (tuple(q.shape), q.stride(), q.dtype, q.device, text_start, text_len,
           None if geometry is None else geometry.layout,
           None if padding is None else (padding.bias, tuple(padding.mask.shape)))
    if key not in _full_costs:
        modes = torch.full((q.shape[2],), MODE_FULL, dtype=torch.int32, device=q.device)
        heads = torch.arange(q.shape[2], device=q.device)
        out = torch.empty_like(q)

        def fused():
            ops.headwise_attention(q, k, v, modes, **layout, out=out, impl="auto")

        def routed():
            attend_dense(q, k, v, heads, out, padding)

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
            "full heads at %s%s: fused op %.3f ms, routed to dense SDPA %.3f ms; full heads of mixed "
            "layers run %s", tuple(q.shape), "" if padding is None else " with key padding", medians[0], medians[1],
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
