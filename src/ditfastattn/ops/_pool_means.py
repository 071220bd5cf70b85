"""The patch means a fused kernel reads its pool heads' image keys and values from, in one Triton
launch per pool factor.

Built with PyTorch (a head gather, then a mean over a strided view of the grid) it took 115 us a
FLUX 2048² layer for 4 pool heads and 230 us for 24 on an H100, about 8% of the layer's attention;
here each program reads its patches' tokens straight from the caller's keys and values (any
strides) and writes their float32 means, rounded, into the buffer. Repeat launches skip Triton's
per-call dispatch (``_launch``), whose host time would be paid once per pool factor of every layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._geometry import POOL_FLAG as _POOL_FLAG
from .._geometry import POOL_SLOT_SHIFT as _POOL_SLOT_SHIFT
from .._geometry import TileGrid
from ._launch import DirectLaunches, on_device
from ._triton import _round

_INTERPRET = bool(triton.knobs.runtime.interpret)
POOL_FLAG = tl.constexpr(_POOL_FLAG)
POOL_SLOT_SHIFT = tl.constexpr(_POOL_SLOT_SHIFT)

# Patches a program averages: 8 is the fastest or within 5% at FLUX 1K / 2K and SD3 1K on an H100,
# 1.2-2.7x faster than 32 (docs/history/pool_means_block.py).
_BLOCK_P = 8


@triton.jit
def _means_kernel(K, V, OUT, HEADS, MODES, skb, sks, skh, skd, svb, svs, svh, svd, sob, sop, sos,
                  image_start, rows, cols, count, out_rows, first_slot, batch,
                  FACTOR: tl.constexpr, BLOCK_P: tl.constexpr, HEAD_DIM: tl.constexpr, INTERPRET: tl.constexpr,
                  CHECK_MODES: tl.constexpr):
    # Program (patch block, slot in the group, batch element): keys' means at row b of OUT's first
    # dimension, values' at batch + b; rows from count to out_rows get zeros (their loads masked).
    # HEADS holds the head of every slot, the group's from first_slot on. With CHECK_MODES a slot
    # whose head's mode in MODES does not name it now gets zeros, its loads masked.
    b = tl.program_id(2)
    slot = tl.program_id(1)
    head = tl.load(HEADS + first_slot + slot).to(tl.int64)
    patch = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    inside = patch < count
    if CHECK_MODES:
        named = POOL_FLAG | (first_slot + slot) << POOL_SLOT_SHIFT | FACTOR
        inside = inside & (tl.load(MODES + head) == named)
    across = cols // FACTOR
    per_frame = (rows // FACTOR) * across
    frame = patch // per_frame
    first = image_start + (frame * rows + (patch % per_frame) // across * FACTOR) * cols + patch % across * FACTOR
    dims = tl.arange(0, HEAD_DIM)
    k_base = K + b.to(tl.int64) * skb + head * skh
    v_base = V + b.to(tl.int64) * svb + head * svh
    k_sum = tl.zeros([BLOCK_P, HEAD_DIM], tl.float32)
    v_sum = tl.zeros([BLOCK_P, HEAD_DIM], tl.float32)
    for i in range(0, FACTOR * FACTOR):
        token = (first + (i // FACTOR) * cols + i % FACTOR).to(tl.int64)
        k_sum += tl.load(k_base + token[:, None] * sks + dims[None, :] * skd, mask=inside[:, None], other=0.0)
        v_sum += tl.load(v_base + token[:, None] * svs + dims[None, :] * svd, mask=inside[:, None], other=0.0)
    rows_out = patch.to(tl.int64)[:, None] * sop + (first_slot + slot) * sos + dims[None, :]
    stored = (patch < out_rows)[:, None]
    dtype = OUT.dtype.element_ty
    # Rounded to nearest as the GPU converts (the interpreter would truncate: a biased error).
    tl.store(OUT + b.to(tl.int64) * sob + rows_out, _round(k_sum / (FACTOR * FACTOR), dtype, INTERPRET).to(dtype),
             mask=stored)
    tl.store(OUT + (batch + b).to(tl.int64) * sob + rows_out,
             _round(v_sum / (FACTOR * FACTOR), dtype, INTERPRET).to(dtype), mask=stored)


def kernel_means(k, v, fused, slot_heads: torch.Tensor, image_start: int, tiles: TileGrid,
                 modes: torch.Tensor | None = None) -> torch.Tensor:
    """The buffer a fused kernel reads its pool heads' image keys and values from: (2B, patches,
    slots, D), the keys' patch means for batch b at b, the values' at B + b, one slot per pool head
    in the order of ``fused`` ((p, heads), ...), each over every frame's whole ``p x p`` patches (p
    divides the grid's rows and cols); rows past a head's patch count are zeros (read, never
    attended: a masked column times a finite value). ``k``, ``v``: (B, S, H, D), any strides;
    ``slot_heads``: the head of each slot, int32 on their device (made once per plan row by the
    caller: a copy from the host at every call would wait for the GPU). ``modes`` (the kernel's head
    modes, on the device): only the slots they name now are made, the others are zeros (static
    mode's slots hold every head that pools at some step of the layer)."""
    batch, _, _, dim = k.shape
    _, rows, cols = tiles.grid
    counts = [tiles.tokens // (factor * factor) for factor, _ in fused]
    out_rows = max(counts)
    buffer = torch.empty(2 * batch, out_rows, sum(len(heads) for _, heads in fused), dim, dtype=k.dtype,
                         device=k.device)
    # The kernel reads the slots' heads and the modes unstrided: a strided view would hand it others.
    slot_heads = slot_heads.contiguous()
    modes = None if modes is None else modes.contiguous()
    slot = 0
    for (factor, heads), count in zip(fused, counts):
        grid = (triton.cdiv(out_rows, _BLOCK_P), len(heads), batch)
        ints = (*k.stride(), *v.stride(), *buffer.stride()[:3], image_start, rows, cols, count, out_rows, slot, batch)
        constexprs = {"FACTOR": factor, "BLOCK_P": _BLOCK_P, "HEAD_DIM": dim, "INTERPRET": _INTERPRET,
                      "CHECK_MODES": modes is not None}
        pointers = (k, v, buffer, slot_heads, slot_heads if modes is None else modes)
        if _INTERPRET:
            _means_kernel[grid](*pointers, *ints, **constexprs)
        else:
            # Everything the JIT specialises on (int values, pointer alignments, dtype, constexprs) and the grid.
            key = (k.device.index, k.dtype, *(t.data_ptr() % 16 for t in pointers), ints, grid, factor, dim,
                   modes is not None)
            with on_device(k.device.index):
                _launches(key, grid, (*pointers, *ints), constexprs, {})
        slot += len(heads)
    return buffer


_launches = None if _INTERPRET else DirectLaunches(_means_kernel)
