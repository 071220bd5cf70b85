"""PyTorch reference of head-wise attention: the oracle every other implementation is checked against.

Runs on any device. It computes in float32 (float64 for float64 inputs) and only the pairs the
definition keeps: full heads attend over all keys; arrow heads gather the global keys and the band
of image blocks for each image query block; tile heads, for each tile of image queries, the global
keys and the image keys of the box of tiles in their window, indexed straight from the raster grid
(no reordering); pool heads' image queries, the global keys, the image tokens outside whole patches
and each whole patch's mean key and value with a log(p * p) score bias. Global queries attend over
all keys. Each kept region is one scaled-dot-product
attention; when the log-sum-exp or a padding bias is asked for, the scores are formed explicitly,
with query rows chunked so that no score tensor grows past ``_MAX_SCORES`` elements. Nothing of
size S x S is built for long sequences.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from .._geometry import (
    IMAGE_BLOCK, MODE_FULL, MODE_SKIP, TileGrid, is_pool_mode, is_tile_mode, num_image_blocks, pool_factor, tile_window,
)

_MAX_SCORES = 1 << 25


def _attend(q, k, v, scale, want_lse, bias=None):
    """q (B, h, Sq, D), k/v (B, h, Sk, D) in the compute dtype -> out (B, h, Sq, D), lse (B, h, Sq)
    or None. ``bias(r0, r1)`` gives the (B, 1, r1 - r0, Sk) scores bias of query rows [r0, r1), or is
    None. Rows whose every score is -inf give 0 and -inf."""
    if not want_lse and bias is None:
        # Same math without materialising the scores: much faster on the CPU, where the runtime uses it.
        return F.scaled_dot_product_attention(q, k, v, scale=scale), None
    batch, heads, rows, _ = q.shape
    chunk = max(1, _MAX_SCORES // max(1, batch * heads * k.shape[2]))
    outs, lses = [], []
    for start in range(0, rows, chunk):
        scores = torch.matmul(q[:, :, start : start + chunk], k.transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + bias(start, min(rows, start + chunk))
        # A fully masked row outputs 0 and lse -inf, as SDPA gives. Its scores are zeroed first: over
        # -inf alone, logsumexp's gradient exp(s - lse) is NaN, which backward would spread to q and k.
        dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
        scores = scores.masked_fill(dead, 0)
        lse = torch.logsumexp(scores, dim=-1)
        p = torch.exp(scores - lse[..., None]).masked_fill(dead, 0)
        outs.append(torch.matmul(p, v))
        lses.append(lse.masked_fill(dead[..., 0], -math.inf))
    return torch.cat(outs, dim=2), (torch.cat(lses, dim=2) if want_lse else None)


def _band_regions(mode: int, image_start: int, image_len: int, everything: torch.Tensor):
    """For each image block of queries: its rows (a slice) and the image keys of its band."""
    image_end = image_start + image_len
    for block in range(num_image_blocks(image_len)):
        q0 = image_start + block * IMAGE_BLOCK
        k0 = image_start + max(0, block - mode) * IMAGE_BLOCK
        k1 = min(image_end, image_start + (block + mode + 1) * IMAGE_BLOCK)
        yield slice(q0, min(image_end, q0 + IMAGE_BLOCK)), everything[k0:k1]


def _box(tiles: TileGrid, lo, hi, image_start: int, device) -> torch.Tensor:
    """Sequence indices of the patches of tiles ``lo`` to ``hi`` (inclusive, per axis), in raster order."""
    frames, rows, cols = (
        torch.arange(a * size, min((b + 1) * size, extent), device=device)
        for a, b, size, extent in zip(lo, hi, tiles.tile, tiles.grid)
    )
    _, height, width = tiles.grid
    index = (frames[:, None, None] * height + rows[None, :, None]) * width + cols[None, None, :]
    return image_start + index.flatten()


def _tile_regions(tiles: TileGrid, mode: int, image_start: int, device):
    """For each tile of queries: its tokens and the image keys of its window (sequence indices)."""
    half = tile_window(mode)
    for tile in itertools.product(*(range(n) for n in tiles.counts)):
        lo = [max(0, c - w) for c, w in zip(tile, half)]
        hi = [min(n - 1, c + w) for c, w, n in zip(tile, half, tiles.counts)]
        yield _box(tiles, tile, tile, image_start, device), _box(tiles, lo, hi, image_start, device)


def _pooled_keys(k, v, tiles: TileGrid, factor: int, image_start: int, global_keys: torch.Tensor):
    """Keys and values (B, h, K, D) a pool head's image queries attend to, and their (K,) score bias:
    the global keys and the image tokens outside whole patches (bias 0), then each whole
    ``factor x factor`` patch's mean (bias log(factor ** 2))."""
    frames, rows, cols = tiles.grid
    whole_rows, whole_cols = rows // factor * factor, cols // factor * factor
    loose = torch.ones(frames, rows, cols, dtype=torch.bool, device=k.device)
    loose[:, :whole_rows, :whole_cols] = False
    own = torch.cat([global_keys, image_start + loose.flatten().nonzero().flatten()])
    batch, heads, _, dim = k.shape

    def means(x):
        grid = x[:, :, image_start : image_start + tiles.tokens].reshape(batch, heads, frames, rows, cols, dim)
        grid = grid[:, :, :, :whole_rows, :whole_cols].reshape(
            batch, heads, frames, whole_rows // factor, factor, whole_cols // factor, factor, dim)
        return torch.cat([x[:, :, own], grid.mean(dim=(4, 6)).reshape(batch, heads, -1, dim)], dim=2)

    keys = means(k)
    bias = torch.zeros(keys.shape[2], dtype=k.dtype, device=k.device)
    bias[len(own):] = math.log(factor * factor)
    return keys, means(v), bias


def attention(q, k, v, head_modes, image_start, image_len, out, scale, return_lse, padding=None, tiles=None, *,
              global_rows=True):
    """``tiles`` is the image segment's TileGrid, for the tile and pool heads; ``global_rows=False``
    leaves the global-query rows of arrow, tile and pool heads unwritten. Pool heads take no padding
    (the op refuses it)."""
    batch, seq, _, _ = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse_out = None
    if return_lse:
        lse_out = torch.full((batch, q.shape[2], seq), float("-inf"), dtype=torch.float32, device=q.device)
    image_end = image_start + image_len
    global_slices = [rows for rows in (slice(0, image_start), slice(image_end, seq)) if rows.stop > rows.start]
    modes = [int(m) for m in head_modes.tolist()]
    flags = table = None
    if padding is not None:
        flags = padding.mask.long()
        table = torch.tensor(padding.bias, dtype=compute, device=q.device)

    def bias(rows, keys):
        """The padding bias of query rows ``rows`` (a slice or indices) against key indices ``keys``, for _attend."""
        if flags is None:
            return None
        index = everything[rows] if isinstance(rows, slice) else rows
        return lambda r0, r1: table[flags[:, index[r0:r1], None], flags[:, None, keys]][:, None]

    def write(rows, heads, result, lse):
        if isinstance(rows, slice):
            out[:, rows, heads] = result.transpose(1, 2).to(out.dtype)
            if lse is not None:
                lse_out[:, heads, rows] = lse.to(torch.float32)
        else:  # token indices (a tile's): index rows and heads as a grid
            out[:, rows[:, None], heads[None]] = result.transpose(1, 2).to(out.dtype)
            if lse is not None:
                lse_out[:, heads[:, None], rows[None]] = lse.to(torch.float32)

    everything = torch.arange(seq, device=q.device)
    global_keys = torch.cat([everything[rows] for rows in global_slices]) if global_slices else everything[:0]
    for mode in sorted(set(modes)):
        # Skip; out-of-range modes and tile windows or pooled keys without a grid too, as the kernels
        # do (the op refuses these wherever it reads the modes).
        if mode <= MODE_SKIP or ((is_tile_mode(mode) or is_pool_mode(mode)) and tiles is None):
            continue
        heads = torch.tensor([h for h, m in enumerate(modes) if m == mode], device=q.device)
        qg, kg, vg = (t.index_select(2, heads).transpose(1, 2).to(compute) for t in (q, k, v))
        if mode == MODE_FULL:
            write(slice(0, seq), heads, *_attend(qg, kg, vg, scale, return_lse, bias(slice(0, seq), everything)))
            continue
        for rows in global_slices if global_rows else ():
            write(rows, heads, *_attend(qg[:, :, rows], kg, vg, scale, return_lse, bias(rows, everything)))
        if is_pool_mode(mode):
            kp, vp, pooled = _pooled_keys(kg, vg, tiles, pool_factor(mode), image_start, global_keys)
            rows = slice(image_start, image_end)
            write(rows, heads, *_attend(qg[:, :, rows], kp, vp, scale, return_lse, lambda r0, r1: pooled))
            continue
        if is_tile_mode(mode):
            regions = _tile_regions(tiles, mode, image_start, q.device)
        else:
            regions = _band_regions(mode, image_start, image_len, everything)
        for rows, keys in regions:
            keys = torch.cat([global_keys, keys])
            write(rows, heads, *_attend(qg[:, :, rows], kg[:, :, keys], vg[:, :, keys], scale, return_lse,
                                        bias(rows, keys)))
    return out, lse_out
