"""Dense oracle of head-wise attention, written straight from the definition, for the tests and
``benchmarks/kernel_check.py``: an ``(S, S)`` mask per head and a plain softmax over it.

It shares nothing with the implementations (``_reference`` gathers blocks, the kernels tile), so it
checks them all. It builds ``S x S`` scores per head: for checks, not for long sequences.
"""

from __future__ import annotations

import torch

from .._geometry import IMAGE_BLOCK, MODE_FULL, MODE_SKIP, is_pool_mode, is_tile_mode, pool_factor, tile_window
from ..model import TokenLayout


def _tile_near(mode: int, layout: TokenLayout, index: torch.Tensor) -> torch.Tensor:
    """(S, S) bool: whether the tiles of two tokens are within a tile head's window on every axis
    (meaningful between image tokens only)."""
    tiles = layout.tile_grid()
    if tiles is None:
        raise ValueError(f"tile mode {mode} needs a layout with a grid")
    _, height, width = tiles.grid
    patch = (index - layout.image_start).clamp(min=0)
    coords = (patch // (height * width), patch // width % height, patch % width)
    near = torch.ones(len(index), len(index), dtype=torch.bool, device=index.device)
    for coord, size, half in zip(coords, tiles.tile, tile_window(mode)):
        tile = coord // size
        near &= (tile[:, None] - tile[None, :]).abs() <= half
    return near


def patch_means(x: torch.Tensor, mode: int, layout: TokenLayout) -> torch.Tensor:
    """``x`` (B, S, D) with every image token of a whole p x p patch of a frame (p: the pool mode's
    factor) replaced by the mean over its patch: the keys and values a pool head's image queries see,
    each patch's mean once per token it stands for."""
    frames, rows, cols = layout.grid
    factor = pool_factor(mode)
    patch = torch.arange(layout.image_len, device=x.device)
    frame, row, col = patch // (rows * cols), patch // cols % rows, patch % cols
    whole = (row < rows // factor * factor) & (col < cols // factor * factor)
    group = (frame * rows + row // factor) * cols + col // factor  # one id per patch
    image = x[:, layout.image_start : layout.image_end]
    sums = torch.zeros_like(image).index_add_(1, group[whole], image[:, whole])
    counts = torch.zeros(image.shape[1], dtype=x.dtype, device=x.device).index_add_(
        0, group[whole], torch.ones(int(whole.sum()), dtype=x.dtype, device=x.device))
    pooled = torch.where(whole[None, :, None], (sums / counts.clamp(min=1)[None, :, None])[:, group], image)
    return torch.cat([x[:, : layout.image_start], pooled, x[:, layout.image_end :]], dim=1)


def _means(x: torch.Tensor, mode: int, layout: TokenLayout, rounded) -> torch.Tensor:
    means = patch_means(x, mode, layout)
    return means if rounded is None else means.to(rounded).to(x.dtype)


def head_mask(mode: int, layout: TokenLayout, device=None) -> torch.Tensor:
    """(S, S) bool: the (query, key) pairs a head in ``mode`` keeps (a pool head keeps every pair;
    its image queries see :func:`patch_means` keys)."""
    seq = layout.seq_len
    index = torch.arange(seq, device=device)
    is_global = (index < layout.image_start) | (index >= layout.image_end)
    if mode == MODE_FULL or is_pool_mode(mode):
        return torch.ones(seq, seq, dtype=torch.bool, device=device)
    if is_tile_mode(mode):
        near = _tile_near(mode, layout, index)
    else:
        block = torch.div(index - layout.image_start, IMAGE_BLOCK, rounding_mode="floor")
        near = (block[:, None] - block[None, :]).abs() <= mode
    return is_global[:, None] | is_global[None, :] | near


def padding_bias(padding, dtype=torch.float32, device=None) -> torch.Tensor:
    """(B, S, S) additive scores bias of every (query, key) pair under ``padding`` (an ``ops.Padding``)."""
    flags = padding.mask.to(device).long()
    table = torch.tensor(padding.bias, dtype=dtype, device=device)
    return table[flags[:, :, None], flags[:, None, :]]


def score_bias(mode: int, layout: TokenLayout, padding=None, dtype=torch.float32, device=None) -> torch.Tensor:
    """(B or 1, S, S) additive scores bias of a head in ``mode``: -inf outside its mask, plus the
    padding bias of every (query, key) pair. Pooled keys are no mask: see :func:`dense_attention`."""
    if is_pool_mode(mode):
        raise ValueError(f"head mode {mode} (pooled keys) is not a mask over the pairs; use dense_attention")
    bias = torch.zeros(layout.seq_len, layout.seq_len, dtype=dtype, device=device)
    bias = bias.masked_fill_(~head_mask(mode, layout, device), float("-inf"))[None]
    return bias if padding is None else bias + padding_bias(padding, dtype, device)


def dense_attention(q, k, v, modes, layout: TokenLayout, padding=None, scale=None, *, compute=torch.float64,
                    rounded=None):
    """Attention of the computed heads (``modes`` not skip, in order), as ``(out (B, S, H', D),
    lse (B, H', S))`` in ``compute``; one head at a time, to bound memory.

    ``rounded`` (a dtype) rounds the probabilities before P @ V and the output to it, as a
    same-precision tensor-core kernel does, and a pool head's patch means, which such a kernel
    reads in that dtype: the yardstick of the kernels' error. A row that keeps
    no key (all -inf) outputs 0 with log-sum-exp -inf, as torch's SDPA gives a fully masked row.
    """
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    pad = None if padding is None else padding_bias(padding, compute, q.device)
    outs, lses = [], []
    for head, mode in enumerate(int(m) for m in modes):
        if mode == MODE_SKIP:
            continue
        qh, kh, vh = (t[:, :, head].to(compute) for t in (q, k, v))
        scores = qh @ kh.transpose(-1, -2) * scale
        if is_pool_mode(mode):  # image rows see the patch means as keys and values
            image = torch.zeros(layout.seq_len, dtype=torch.bool, device=q.device)
            image[layout.image_start : layout.image_end] = True
            pooled_scores = qh @ _means(kh, mode, layout, rounded).transpose(-1, -2) * scale
            scores = torch.where(image[:, None], pooled_scores, scores)
        scores = scores.masked_fill_(~head_mask(mode, layout, q.device), float("-inf"))
        if pad is not None:
            scores += pad
        lses.append(torch.logsumexp(scores, -1))
        peak = scores.amax(-1, keepdim=True)
        p = torch.exp(scores - torch.where(torch.isneginf(peak), 0, peak))
        total = p.sum(-1, keepdim=True)
        if rounded is not None:
            p = p.to(rounded).to(compute)
        mixed = p @ vh
        if is_pool_mode(mode):
            mixed = torch.where(image[:, None], p @ _means(vh, mode, layout, rounded), mixed)
        out = mixed / torch.where(total == 0, 1, total)
        outs.append(out.to(rounded).to(compute) if rounded is not None else out)
    return torch.stack(outs, 2), torch.stack(lses, 1)
