"""Triton kernels of the per-head statistics calibration scores candidates with: one pass over
(B, S, H, D) tensors, nothing materialised.

Calibration scores every candidate of every layer at every step against the exact output, so these
reductions run over a whole layer output several times per layer; in torch each took a difference
tensor (a full write and read) and a strided reduction. Here each program reads ``ITERS`` tiles of
``BLOCK_S`` rows x ``BLOCK_H`` heads x the head dim of one batch element, in any strides, accumulates
in float32 registers and writes one partial per head; torch sums the few partials, in a fixed order
(no atomics: the same inputs give the same bits, so calibration decisions are reproducible).

- :func:`squared_errors`: each head's summed squared difference, taken in float32.
- :func:`variances`: each head's summed squared deviation about its own mean. Each tile's mean and
  deviations are computed from the tile in registers (two passes over registers, not over memory),
  and tiles, then programs, are merged with Chan's pairwise update: no sum-of-squares cancellation,
  whatever the mean.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._launch import on_device

BLOCK_S = 8
MAX_ITERS = 8  # tiles a program reads: 64 rows a program, a few programs per SM at FLUX sizes
NUM_WARPS = 8


@triton.jit
def _tile(base, rows, heads, dims, row_end, n_heads, n_dims, s_s, s_h, s_d):
    """A (rows, heads, dims) tile of one batch element in float32 (0 outside) and its mask."""
    ok = (rows < row_end)[:, None, None] & (heads < n_heads)[None, :, None] & (dims < n_dims)[None, None, :]
    offsets = (rows.to(tl.int64)[:, None, None] * s_s + heads.to(tl.int64)[None, :, None] * s_h
               + dims[None, None, :] * s_d)
    return tl.load(base + offsets, mask=ok, other=0.0).to(tl.float32), ok


@triton.jit
def _program(BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's chunk of rows, batch element, heads and the head dim's offsets."""
    heads = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    return tl.program_id(0), tl.program_id(1), heads, tl.arange(0, BLOCK_D)


@triton.jit
def _squared_error_kernel(
    A, B, OUT, row_start, n_rows, n_heads, n_dims,
    s_ab, s_as, s_ah, s_ad, s_bb, s_bs, s_bh, s_bd,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, ITERS: tl.constexpr,
):
    chunk, batch, heads, dims = _program(BLOCK_H, BLOCK_D)
    a_base = A + batch.to(tl.int64) * s_ab
    b_base = B + batch.to(tl.int64) * s_bb
    acc = tl.zeros([BLOCK_S, BLOCK_H, BLOCK_D], tl.float32)
    for i in range(ITERS):
        rows = row_start + (chunk * ITERS + i) * BLOCK_S + tl.arange(0, BLOCK_S)
        a, _ = _tile(a_base, rows, heads, dims, row_start + n_rows, n_heads, n_dims, s_as, s_ah, s_ad)
        b, _ = _tile(b_base, rows, heads, dims, row_start + n_rows, n_heads, n_dims, s_bs, s_bh, s_bd)
        diff = a - b
        acc += diff * diff
    per_head = tl.sum(tl.sum(acc, 2), 0)
    tl.store(OUT + (chunk * tl.num_programs(1) + batch) * n_heads + heads, per_head, mask=heads < n_heads)


@triton.jit
def _moments_kernel(
    X, COUNT, MEAN, M2, n_rows, n_heads, n_dims, s_xb, s_xs, s_xh, s_xd,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, ITERS: tl.constexpr,
):
    chunk, batch, heads, dims = _program(BLOCK_H, BLOCK_D)
    base = X + batch.to(tl.int64) * s_xb
    count = tl.zeros([BLOCK_H], tl.float32)
    mean = tl.zeros([BLOCK_H], tl.float32)
    m2 = tl.zeros([BLOCK_H], tl.float32)
    for i in range(ITERS):
        rows = (chunk * ITERS + i) * BLOCK_S + tl.arange(0, BLOCK_S)
        x, ok = _tile(base, rows, heads, dims, n_rows, n_heads, n_dims, s_xs, s_xh, s_xd)
        n_i = tl.sum(tl.sum(ok.to(tl.float32), 2), 0)
        mean_i = tl.sum(tl.sum(x, 2), 0) / tl.maximum(n_i, 1.0)
        dev = tl.where(ok, x - mean_i[None, :, None], 0.0)
        m2_i = tl.sum(tl.sum(dev * dev, 2), 0)
        # Chan's update: the running (count, mean, m2) and this tile's, exact for any means.
        total = count + n_i
        share = n_i / tl.maximum(total, 1.0)
        delta = mean_i - mean
        mean += delta * share
        m2 += m2_i + delta * delta * count * share
        count = total
    at = (chunk * tl.num_programs(1) + batch) * n_heads + heads
    ok = heads < n_heads
    tl.store(COUNT + at, count, mask=ok)
    tl.store(MEAN + at, mean, mask=ok)
    tl.store(M2 + at, m2, mask=ok)


def _grid(x: torch.Tensor, n_rows: int):
    """(grid, constexprs) of a pass over ``n_rows`` rows of (B, S, H, D) ``x``."""
    batch, _, heads, dim = x.shape
    block_h = min(triton.next_power_of_2(heads), 8)
    iters = min(MAX_ITERS, triton.next_power_of_2(triton.cdiv(n_rows, BLOCK_S)))
    grid = (triton.cdiv(n_rows, BLOCK_S * iters), batch, triton.cdiv(heads, block_h))
    meta = dict(BLOCK_S=BLOCK_S, BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(dim), ITERS=iters)
    return grid, meta


def squared_errors(a: torch.Tensor, b: torch.Tensor, row_start: int, row_len: int) -> torch.Tensor:
    """(H,) float32 summed squared difference of ``a`` and ``b`` over rows [row_start, row_start + row_len).

    The caller has checked the inputs (same shape, device, a float dtype, rows within the sequence,
    at least one row, no empty dimension)."""
    grid, meta = _grid(a, row_len)
    partial = torch.empty((grid[0], a.shape[0], a.shape[2]), dtype=torch.float32, device=a.device)
    with _on(a):
        _squared_error_kernel[grid](a, b, partial, row_start, row_len, a.shape[2], a.shape[3], *a.stride(), *b.stride(),
                                    num_warps=NUM_WARPS, **meta)
    return partial.sum((0, 1))


def variances(x: torch.Tensor) -> torch.Tensor:
    """(H,) float32 summed squared deviation of each head about its own mean (inputs checked by the caller)."""
    grid, meta = _grid(x, x.shape[1])
    count, mean, m2 = torch.empty((3, grid[0] * x.shape[0], x.shape[2]), dtype=torch.float32, device=x.device)
    with _on(x):
        _moments_kernel[grid](x, count, mean, m2, x.shape[1], x.shape[2], x.shape[3], *x.stride(), num_warps=NUM_WARPS,
                              **meta)
    # Chan's merge of the programs' partials, in float64 (a few thousand per head).
    count, mean, m2 = count.double(), mean.double(), m2.double()
    total = count.sum(0)
    grand = (count * mean).sum(0) / total
    return (m2.sum(0) + (count * (mean - grand).square()).sum(0)).float()


def _on(t: torch.Tensor):
    """The tensor's device as the current one (the interpreter runs on the CPU)."""
    return on_device(t.device.index) if t.is_cuda else contextlib.nullcontext()
