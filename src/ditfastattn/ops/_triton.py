"""Fused Triton kernel of head-wise attention: one launch, every head in its own mode.

Work is cut into query tiles of ``BLOCK_M`` rows counted from the start of each segment (global
queries before the image, global queries after it, image queries), so an image query tile lies
inside one 128-token image block. Each tile attends over three key ranges: an image range that is
every image key for full heads and global queries, and the band of blocks ``|i - j| <= w`` for an
arrow head's image queries; the global keys before the image; those after it. Key tiles are
counted from the start of their range, so with ``BLOCK_N`` dividing 128 every band edge falls on a
tile edge and only the last tile of a range can be partial: the whole tiles of every range run in
one pipelined, unmasked loop, then each range's partial tile once, masked.

Tile windows run in a second launch of the same kernel (``TILED``) over keys and values in tile
order (``_tile_order``): each 128-slot image block is one t x h x w tile, so a head's window is
(2wt+1)(2wh+1) runs of whole blocks, clipped at the grid's edges, and the image range has no
partial key tile. Each query tile is one tile of the grid, read and written at its raster rows
(a partial tile's valid ones only). On a grid that does not divide into whole tiles (``RAGGED``,
compiled out otherwise) only the last tile along each axis is partial, so the whole tiles of a
window are a box, which runs in the unmasked pipelined loop like any whole key tiles; its partial
tiles, up to three faces of the window (the last tile of each run, the last run, the last
frame-tile), run after it in loops of their own that mask the slots they leave, from the tile's
coordinates (divisions by the grid once per key tile, the per-slot ones by the compile-time
tile shape). A launch runs only its own heads (tile heads in the tiled one, the others in the plain
one); the other launch's heads are absent: ranked last, writing nothing.

The ragged path used to mask every key tile of the window, dividing each slot by the run-time grid,
at about 4x the cost of a grid of whole tiles on an H200. Its speed with the split is to be measured
on the GPU: ``PYTHONPATH=src python3 benchmarks/tile_reorder.py OUT.json``.

With key padding (``HAS_PAD``) each score gets the bias of its (query padded, key padded) pair,
and a row whose every key is at ``-inf`` outputs 0; without it that code is compiled out.

The 1-D grid runs the longest programs first: every tile that attends to a whole row (all tiles of
full heads, the global-query tiles of arrow heads), then the arrow heads' image tiles by decreasing
band (tile heads: by the tiles their window spans), then the skip heads' tiles, which exit at once
(writing only ``-inf`` log-sum-exps when asked). Heads are ranked inside the kernel from
``head_modes``, so the host never reads them. Without ``GLOBAL_ROWS`` the global-query tiles of
arrow and tile heads exit at once too: a caller that has full attention's output has those rows.

On Hopper, full key tiles and query tiles come through host-side TMA descriptors over a 2-D view
of q/k/v when their strides allow one; otherwise, and for the masked tails and the query tiles of
the tiled launch, plain pointer loads.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .._geometry import (IMAGE_BLOCK, MAX_TILE_WINDOW, MODE_FULL, MODE_SKIP, POOL_FLAG, POOL_SLOT_SHIFT, TILE_BITS,
                         TILE_FLAG)
from ._launch import DirectLaunches, launch_key, on_device, rebased

_LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)
FULL = tl.constexpr(MODE_FULL)
SKIP = tl.constexpr(MODE_SKIP)
ABSENT = tl.constexpr(MODE_SKIP - 1)  # a head the other launch runs (and padding past the last head)
TILE = tl.constexpr(TILE_FLAG)
BITS = tl.constexpr(TILE_BITS)
HALF_MASK = tl.constexpr(MAX_TILE_WINDOW)
POOLED = tl.constexpr(POOL_FLAG)
SLOT_SHIFT = tl.constexpr(POOL_SLOT_SHIFT)
FACTOR_MASK = tl.constexpr((1 << POOL_SLOT_SHIFT) - 1)
# Decided where the kernel is decorated, so launcher and kernel agree on interpreter mode.
_INTERPRET = bool(triton.knobs.runtime.interpret)
TILES_IN_PLACE = False  # the tiled launch reads keys and values gathered into tile order
ORDERS_TILES = False  # the tiled launch runs each head's query tiles in raster order
# The interpreter is slow per operation, not per element: few large tiles keep CI fast.
INTERPRET_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64}


@triton.jit
def _round(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x rounded to nearest-even in dtype, as the GPU converts. The interpreter truncates float32
    to bf16, a biased error; there the rounding is done on the bits and the value kept in float32."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            y = bits.to(tl.float32, bitcast=True)
        else:
            y = x.to(dtype).to(tl.float32)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _scores(q, k, INTERPRET: tl.constexpr):
    if INTERPRET:
        # The interpreter multiplies bf16 as raw uint16 bits; float32 operands give the exact
        # products the tensor cores form, so the arithmetic matches the GPU's.
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    return tl.dot(q, tl.trans(k))


@triton.jit
def _softmax_pv(acc, m_i, l_i, qk, v, qk_scale, valid, pad, k_pad,
                MASKED: tl.constexpr, HAS_PAD: tl.constexpr, INTERPRET: tl.constexpr, bias=0.0,
                BIASED: tl.constexpr = False):
    """Online-softmax step over one key tile; scores kept in log2 units (exp2, log2e in qk_scale).
    ``BIASED``: every score raised by ``bias`` (log2 units: a pool head's patch means, ``p * p``
    keys each), folded into the row maximum the exponent subtracts."""
    if HAS_PAD:
        # bias[query padded][key padded], in log2 units; a row may have seen no finite score yet,
        # so its running maximum can be -inf, which must not be subtracted from -inf scores.
        q_pad, b00, b01, b10, b11 = pad
        bias = tl.where(q_pad[:, None], tl.where(k_pad[None, :], b11, b10), tl.where(k_pad[None, :], b01, b00))
        s = qk * qk_scale + bias
        if MASKED:
            s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
    elif BIASED:
        if MASKED:
            qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale + bias)
        p = tl.math.exp2(qk * qk_scale - (m_new - bias)[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    else:
        if MASKED:
            qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    p = _round(p, v.dtype, INTERPRET)
    if INTERPRET:
        v = v.to(tl.float32)
    return tl.dot(p, v, acc), m_new, l_i


@triton.jit
def _key_pad(pad_row, start, offs_n, valid, HAS_PAD: tl.constexpr):
    """Whether each key of the tile at ``start`` is padding (False past the tile's valid rows)."""
    if HAS_PAD:
        k_pad = tl.load(pad_row + start + offs_n, mask=valid, other=0) != 0
    else:
        k_pad = valid
    return k_pad


@triton.jit
def _load(src, pos, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """The whole key/value tile at rows [pos, pos + BLOCK_N) of one (batch, head)."""
    desc, ptr, row, col, off, s_s, s_d = src
    if USE_TMA:
        tile = desc.load([row + pos, col])
    else:
        rows = (pos + tl.arange(0, BLOCK_N)).to(tl.int64)
        tile = tl.load(ptr + off + rows[:, None] * s_s + tl.arange(0, HEAD_DIM)[None, :] * s_d)
    return tile


@triton.jit
def _pos(j, ranges, BLOCK_N: tl.constexpr, TILED: tl.constexpr):
    """Start of whole tile j: the image range's whole tiles, then the global keys before the image,
    then those after it. A tiled image range is ``runs`` runs of ``per_run`` key tiles each, the
    runs of one frame-tile row ``step_b`` apart, those of the next frame-tile ``step_a``."""
    start1, n1, n2, start3, per_run, runs_b, step_a, step_b = ranges
    if TILED:
        run = j // per_run
        image = start1 + (run // runs_b) * step_a + (run % runs_b) * step_b + (j - run * per_run) * BLOCK_N
    else:
        image = start1 + j * BLOCK_N
    return tl.where(j < n1, image, tl.where(j < n1 + n2, (j - n1) * BLOCK_N, start3 + (j - n1 - n2) * BLOCK_N))


@triton.jit
def _tile_patches(tile, offset, geo, TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Raster index in the grid of the patches at slots ``offset`` of grid tile ``tile`` (tile order),
    and whether each slot holds one (False at the slots a partial tile leaves). Divisions by the
    run-time grid act on the one tile index; the per-slot ones are by the compile-time tile shape."""
    grid_t, grid_h, grid_w, n_h, n_w = geo
    frame = tile // (n_h * n_w) * TILE_T + offset // (TILE_H * TILE_W)
    row = tile // n_w % n_h * TILE_H + offset // TILE_W % TILE_H
    col = tile % n_w * TILE_W + offset % TILE_W
    return (frame * grid_h + row) * grid_w + col, (frame < grid_t) & (row < grid_h) & (col < grid_w)


@triton.jit
def _whole_end(hi, count, size, TILE: tl.constexpr):
    """End (exclusive) of the whole tiles among a window's tiles up to ``hi`` along an axis of ``count``
    tiles over ``size`` patches: only the axis's last tile can be partial."""
    return hi + 1 - ((hi == count - 1) & (size % TILE != 0)).to(tl.int32)


@triton.jit
def _box(a_lo, a_end, b_lo, b_end, c_lo, c_end, image_start, n_h, n_w, BLOCK_N: tl.constexpr,
         IMAGE_BLOCK: tl.constexpr):
    """The key tiles of the box of grid tiles [a_lo, a_end) x [b_lo, b_end) x [c_lo, c_end) in tile
    order: its first slot, its key tile count, key tiles per run and runs per frame-tile (the last two
    at least 1, so that an empty box's positions divide by nothing)."""
    runs_b = b_end - b_lo
    per_run = (c_end - c_lo) * (IMAGE_BLOCK // BLOCK_N)
    start = image_start + ((a_lo * n_h + b_lo) * n_w + c_lo) * IMAGE_BLOCK
    return start, (a_end - a_lo) * runs_b * per_run, tl.maximum(per_run, 1), tl.maximum(runs_b, 1)


@triton.jit
def _step(acc, m_i, l_i, q, ks, vs, ranges, j, qk_scale, pad, pad_row, geo, image_start,
          BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr, HAS_PAD: tl.constexpr,
          INTERPRET: tl.constexpr, TILED: tl.constexpr, MASKED: tl.constexpr, TILE_T: tl.constexpr,
          TILE_H: tl.constexpr, TILE_W: tl.constexpr, IMAGE_BLOCK: tl.constexpr, bias=0.0,
          BIASED: tl.constexpr = False):
    """One key tile; ``MASKED``: an image key tile of a partial grid tile, its pad slots masked;
    ``BIASED``: its scores raised by ``bias``."""
    pos = _pos(j, ranges, BLOCK_N, TILED)
    qk = _scores(q, _load(ks, pos, BLOCK_N, HEAD_DIM, USE_TMA), INTERPRET)
    v = _load(vs, pos, BLOCK_N, HEAD_DIM, USE_TMA)
    offs_n = tl.arange(0, BLOCK_N)
    k_pad = _key_pad(pad_row, pos, offs_n, offs_n < BLOCK_N, HAS_PAD)
    if MASKED:
        # BLOCK_N divides IMAGE_BLOCK: a key tile lies in one grid tile.
        slot = pos - image_start
        _, valid = _tile_patches(slot // IMAGE_BLOCK, slot % IMAGE_BLOCK + offs_n, geo, TILE_T, TILE_H, TILE_W)
    else:
        valid = 0
    return _softmax_pv(acc, m_i, l_i, qk, v, qk_scale, valid, pad, k_pad, MASKED, HAS_PAD, INTERPRET, bias, BIASED)


@triton.jit
def _loop(acc, m_i, l_i, q, ks, vs, ranges, n, qk_scale, pad, pad_row, geo, image_start,
          BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr, HAS_PAD: tl.constexpr,
          INTERPRET: tl.constexpr, TILED: tl.constexpr, MASKED: tl.constexpr, TILE_T: tl.constexpr,
          TILE_H: tl.constexpr, TILE_W: tl.constexpr, IMAGE_BLOCK: tl.constexpr, bias=0.0,
          BIASED: tl.constexpr = False):
    """Key tiles 0 .. n - 1 of ``ranges``, one ``_step`` each, in a pipelined loop."""
    if INTERPRET:  # the interpreter (numpy 2) cannot take a run-time bound in range()
        j = 0
        while j < n:
            acc, m_i, l_i = _step(acc, m_i, l_i, q, ks, vs, ranges, j, qk_scale, pad, pad_row, geo, image_start,
                                  BLOCK_N, HEAD_DIM, USE_TMA, HAS_PAD, INTERPRET, TILED, MASKED, TILE_T, TILE_H,
                                  TILE_W, IMAGE_BLOCK, bias, BIASED)
            j += 1
    else:
        for j in tl.range(0, n):
            acc, m_i, l_i = _step(acc, m_i, l_i, q, ks, vs, ranges, j, qk_scale, pad, pad_row, geo, image_start,
                                  BLOCK_N, HEAD_DIM, USE_TMA, HAS_PAD, INTERPRET, TILED, MASKED, TILE_T, TILE_H,
                                  TILE_W, IMAGE_BLOCK, bias, BIASED)
    return acc, m_i, l_i


@triton.jit
def _load_rows(base, offs_m, ok, s_s, s_d, HEAD_DIM: tl.constexpr):
    """Rows ``offs_m`` of one (batch, head) (``base`` at its row 0) by pointer loads, 0 where not ``ok``."""
    offs_d = tl.arange(0, HEAD_DIM)
    return tl.load(base + offs_m.to(tl.int64)[:, None] * s_s + offs_d[None, :] * s_d, mask=ok[:, None], other=0.0)


@triton.jit
def _window_tiles(modes, n_t, n_h, n_w):
    """Tiles a tile mode's window spans (its work, for ranking heads), clipped to the grid."""
    wt = (modes >> 2 * BITS) & HALF_MASK
    wh = (modes >> BITS) & HALF_MASK
    ww = modes & HALF_MASK
    return tl.minimum(2 * wt + 1, n_t) * tl.minimum(2 * wh + 1, n_h) * tl.minimum(2 * ww + 1, n_w)


@triton.jit
def _view_coeffs(sb, ss, sh):
    """Rows per batch, rows per head and columns per head of the 2-D TMA view that _tma_view checked."""
    heads_in_rows = sh % ss == 0
    return sb // ss, tl.where(heads_in_rows, sh // ss, 0), tl.where(heads_in_rows, 0, sh)


@triton.jit
def _tail(acc, m_i, l_i, q, ks, vs, start, length, qk_scale, pad, pad_row,
          BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr, INTERPRET: tl.constexpr, bias=0.0,
          BIASED: tl.constexpr = False):
    """The partial last tile of keys [start, start + length), masked; nothing when there is none."""
    tail = length % BLOCK_N
    if tail > 0:
        # Pointer loads with zero fill: the rows past the range may be another segment or memory
        # outside q/k/v, and a zeroed V row keeps a masked column from carrying NaN into acc.
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        valid = offs_n < tail
        first = start + length - tail
        rows = (first + offs_n).to(tl.int64)
        k = tl.load(ks[1] + ks[4] + rows[:, None] * ks[5] + offs_d[None, :] * ks[6], mask=valid[:, None], other=0.0)
        v = tl.load(vs[1] + vs[4] + rows[:, None] * vs[5] + offs_d[None, :] * vs[6], mask=valid[:, None], other=0.0)
        k_pad = _key_pad(pad_row, first, offs_n, valid, HAS_PAD)
        acc, m_i, l_i = _softmax_pv(acc, m_i, l_i, _scores(q, k, INTERPRET), v, qk_scale, valid, pad, k_pad, True,
                                    HAS_PAD, INTERPRET, bias, BIASED)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=[
    "s_modes", "batch", "seq_len", "num_heads", "image_start", "image_len", "grid_t", "grid_h", "grid_w",
    "spb", "sps", "tune_bucket",
])
def _headwise_kernel(
    Q, K, V, O, LSE, MODES, PAD, QPAD, PAD_BIAS, POOL_KV, s_modes,
    q_desc, k_desc, v_desc,
    sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sob, sos, soh, sod,
    batch, seq_len, num_heads, image_start, image_len, grid_t, grid_h, grid_w, spb, sps, qk_scale, tune_bucket,
    HEADS_POW2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IMAGE_BLOCK: tl.constexpr, USE_TMA: tl.constexpr, RETURN_LSE: tl.constexpr, HAS_PAD: tl.constexpr,
    INTERPRET: tl.constexpr, TILED: tl.constexpr, RAGGED: tl.constexpr, TILE_T: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, GLOBAL_ROWS: tl.constexpr, POOL: tl.constexpr,
):
    # Few arguments: each one costs host time at every launch. tune_bucket only keys the autotuner.
    # PAD is (B, S) uint8 (non-zero at padding tokens) in the keys' order, QPAD the same in the
    # queries' (raster) order, PAD_BIAS the 2 x 2 bias table in log2 units. The grid (frames, rows,
    # cols) and the tile shape serve the tiled launch only; there K and V are in tile order. With
    # POOL, POOL_KV is the (2B, patches, slots, D) patch-mean buffer (strides 16 spb, 16 sps; keys, then
    # values B further) whose slots the pool heads' modes name (POOL_FLAG | slot << SLOT_SHIFT | p).
    tl.static_assert(not (POOL and (TILED or HAS_PAD)), "pool heads run in the plain launch, unpadded")
    image_end = image_start + image_len
    post_len = seq_len - image_end
    n_t = tl.cdiv(grid_t, TILE_T)
    n_h = tl.cdiv(grid_h, TILE_H)
    n_w = tl.cdiv(grid_w, TILE_W)
    geo = (grid_t, grid_h, grid_w, n_h, n_w)
    if TILED:
        tl.static_assert(BLOCK_M == IMAGE_BLOCK, "a tiled query tile is one grid tile")
        key_image_len = n_t * n_h * n_w * IMAGE_BLOCK
    else:
        key_image_len = image_len
    key_image_end = image_start + key_image_len
    key_seq_len = key_image_end + post_len
    n_pre_tiles = tl.cdiv(image_start, BLOCK_M)
    n_global_tiles = n_pre_tiles + tl.cdiv(post_len, BLOCK_M)
    n_image_tiles = tl.cdiv(key_image_len, BLOCK_M)
    n_tiles = n_global_tiles + n_image_tiles

    # Rank heads by work, descending (ties by index): full > arrow by width (pool heads among them by
    # their image key count; tile heads by the tiles their window spans) > skip > absent.
    # Out-of-range modes (below SKIP; the host checks them where it can read them) rank and run as
    # skip. Heads of the other launch and the padding past the last head are absent: they rank last
    # and are never written.
    idx = tl.arange(0, HEADS_POW2)
    modes = tl.load(MODES + idx * s_modes, mask=idx < num_heads, other=ABSENT)
    if TILED:
        present = (idx < num_heads) & (modes >= TILE)
    else:
        present = (idx < num_heads) & (modes < TILE)
    modes = tl.where(present, tl.maximum(modes, SKIP), ABSENT)
    if TILED:
        key = tl.where(present, _window_tiles(modes, n_t, n_h, n_w), ABSENT)
    else:
        factors = tl.maximum(modes & FACTOR_MASK, 1)
        pooled = image_len // (factors * factors) // (2 * IMAGE_BLOCK)
        key = tl.where(modes == FULL, 1 << 30, tl.where(modes >= POOLED, pooled, modes))
    ahead = (key[None, :] > key[:, None]) | ((key[None, :] == key[:, None]) & (idx[None, :] < idx[:, None]))
    ranks = tl.sum(ahead.to(tl.int32), 1)
    n_full_heads = tl.sum((modes == FULL).to(tl.int32), 0)
    n_arrow_heads = tl.sum((modes >= 0).to(tl.int32), 0)

    # Program order, longest work first so that the last wave is short: every full-row tile (all
    # tiles of full heads, then the global-query tiles of arrow heads), then the arrow heads' image
    # tiles by decreasing band, then the skip (and absent) heads' tiles, which exit at once. Within a
    # head the tiles of one batch element run together, so that programs running at once share keys
    # and values.
    pid = tl.program_id(0)
    end1 = n_full_heads * batch * n_tiles
    end2 = end1 + n_arrow_heads * batch * n_global_tiles
    end3 = end2 + n_arrow_heads * batch * n_image_tiles
    in2 = (pid >= end1) & (pid < end2)
    in3 = (pid >= end2) & (pid < end3)
    in4 = pid >= end3
    p = pid - tl.where(in4, end3, tl.where(in3, end2, tl.where(in2, end1, 0)))
    section_tiles = tl.where(in2, n_global_tiles, tl.where(in3, n_image_tiles, n_tiles))  # a head's, per batch
    per_head = batch * section_tiles
    rank = tl.where(in4, n_full_heads + n_arrow_heads, tl.where(in2 | in3, n_full_heads, 0)) + p // per_head
    tile = tl.where(in3, n_global_tiles, 0) + (p % per_head) % section_tiles
    b = (p % per_head) // section_tiles
    h = tl.sum(tl.where(ranks == rank, idx, 0), 0)
    mode = tl.sum(tl.where(ranks == rank, modes, 0), 0)
    if not GLOBAL_ROWS:  # the global-query tiles of arrow and tile heads write nothing
        mode = tl.where(in2, ABSENT, mode)

    # Query rows of this tile: tiles 0 .. n_pre_tiles - 1 hold the global queries before the image,
    # then those after it, then the image queries (in the tiled launch: one grid tile each, at its
    # raster rows). Arrow and tile heads' image tiles see their window; all other tiles see every
    # image key.
    is_image = tile >= n_global_tiles
    is_post = (tile >= n_pre_tiles) & (tile < n_global_tiles)
    image_tile = tile - n_global_tiles
    q_start = tl.where(is_image, image_start + image_tile * BLOCK_M,
                       tl.where(is_post, image_end + (tile - n_pre_tiles) * BLOCK_M, tile * BLOCK_M))
    q_end = tl.where(is_image, image_end, tl.where(is_post, seq_len, image_start))
    banded = is_image & (mode >= 0)
    offs_m = q_start + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_end
    if TILED:
        patch, inside = _tile_patches(image_tile, tl.arange(0, BLOCK_M), geo, TILE_T, TILE_H, TILE_W)
        offs_m = tl.where(is_image, image_start + patch, offs_m)
        row_ok = tl.where(is_image, inside, row_ok)
        # The window's box of tiles around this one (every tile for global queries): runs of
        # contiguous blocks along cols, one per (frame-tile, row-tile) pair.
        t_a = image_tile // (n_h * n_w)
        t_b = image_tile // n_w % n_h
        t_c = image_tile % n_w
        w_t = (mode >> 2 * BITS) & HALF_MASK
        w_h = (mode >> BITS) & HALF_MASK
        w_w = mode & HALF_MASK
        a_lo = tl.where(banded, tl.maximum(t_a - w_t, 0), 0)
        a_hi = tl.where(banded, tl.minimum(t_a + w_t, n_t - 1), n_t - 1)
        b_lo = tl.where(banded, tl.maximum(t_b - w_h, 0), 0)
        b_hi = tl.where(banded, tl.minimum(t_b + w_h, n_h - 1), n_h - 1)
        c_lo = tl.where(banded, tl.maximum(t_c - w_w, 0), 0)
        c_hi = tl.where(banded, tl.minimum(t_c + w_w, n_w - 1), n_w - 1)
        # Its whole tiles, a box that ends short of the grid's last tile along each axis where that
        # one is partial, run unmasked; the rest, up to three faces of partial tiles, masked.
        a_cut = _whole_end(a_hi, n_t, grid_t, TILE_T)
        b_cut = _whole_end(b_hi, n_h, grid_h, TILE_H)
        c_cut = _whole_end(c_hi, n_w, grid_w, TILE_W)
        start1, n1, per_run, runs_b = _box(a_lo, a_cut, b_lo, b_cut, c_lo, c_cut, image_start, n_h, n_w, BLOCK_N,
                                           IMAGE_BLOCK)
        len1 = n1 * BLOCK_N
    else:
        block = image_tile * BLOCK_M // IMAGE_BLOCK
        w = tl.minimum(tl.maximum(mode, 0), tl.cdiv(image_len, IMAGE_BLOCK))
        lo = tl.where(banded, tl.maximum(block - w, 0) * IMAGE_BLOCK, 0)
        hi = tl.where(banded, tl.minimum((block + w + 1) * IMAGE_BLOCK, image_len), image_len)
        if POOL:  # a pool head's image keys come from the patch-mean buffer, after the global ones
            pool = banded & (mode >= POOLED)
            factor = mode & FACTOR_MASK
            slot = (mode - POOLED) >> SLOT_SHIFT
            hi = tl.where(pool, lo, hi)
        start1 = image_start + lo
        len1 = hi - lo
        n1 = len1 // BLOCK_N
        runs_b = 1
        per_run = 1
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    if mode >= FULL:
        offs_d = tl.arange(0, HEAD_DIM)
        q_base = Q + b64 * sqb + h64 * sqh
        if USE_TMA:
            k_rb, k_rh, k_ch = _view_coeffs(skb, sks, skh)
            v_rb, v_rh, v_ch = _view_coeffs(svb, svs, svh)
            if TILED:  # a tile's rows are scattered: pointer loads
                q = _load_rows(q_base, offs_m, row_ok, sqs, sqd, HEAD_DIM)
            else:
                q_rb, q_rh, q_ch = _view_coeffs(sqb, sqs, sqh)
                q = q_desc.load([b * q_rb + h * q_rh + q_start, h * q_ch])
        else:
            k_rb, k_rh, k_ch = 0, 0, 0
            v_rb, v_rh, v_ch = 0, 0, 0
            q = _load_rows(q_base, offs_m, row_ok if TILED else offs_m < seq_len, sqs, sqd, HEAD_DIM)
        ks = (k_desc, K, b * k_rb + h * k_rh, h * k_ch, b64 * skb + h64 * skh, sks, skd)
        vs = (v_desc, V, b * v_rb + h * v_rh, h * v_ch, b64 * svb + h64 * svh, svs, svd)
        pad_row = PAD + b64 * key_seq_len
        if HAS_PAD:
            q_pad = tl.load(QPAD + b64 * seq_len + offs_m, mask=row_ok, other=0) != 0
            pad = (q_pad, tl.load(PAD_BIAS), tl.load(PAD_BIAS + 1), tl.load(PAD_BIAS + 2), tl.load(PAD_BIAS + 3))
        else:
            pad = (row_ok, qk_scale, qk_scale, qk_scale, qk_scale)  # unused: no padding code is compiled
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        # One pipelined loop over the whole tiles of the three key ranges (the image window or all
        # image keys, global keys before the image, global keys after it), then, masked, a ragged
        # grid's partial tiles in the window and the partial last tile of each range (a tiled image
        # range has none).
        steps = (n_h * n_w * IMAGE_BLOCK, n_w * IMAGE_BLOCK)
        ranges = (start1, n1, image_start // BLOCK_N, key_image_end, per_run, runs_b, steps[0], steps[1])
        n_full = n1 + image_start // BLOCK_N + post_len // BLOCK_N
        acc, m_i, l_i = _loop(acc, m_i, l_i, q, ks, vs, ranges, n_full, qk_scale, pad, pad_row, geo, image_start,
                              BLOCK_N, HEAD_DIM, USE_TMA, HAS_PAD, INTERPRET, TILED, False, TILE_T, TILE_H, TILE_W,
                              IMAGE_BLOCK)
        if RAGGED:  # then the partial tiles: the last of each run, the last run, the last frame-tile
            faces = (
                _box(a_lo, a_cut, b_lo, b_cut, c_cut, c_hi + 1, image_start, n_h, n_w, BLOCK_N, IMAGE_BLOCK),
                _box(a_lo, a_cut, b_cut, b_hi + 1, c_lo, c_hi + 1, image_start, n_h, n_w, BLOCK_N, IMAGE_BLOCK),
                _box(a_cut, a_hi + 1, b_lo, b_hi + 1, c_lo, c_hi + 1, image_start, n_h, n_w, BLOCK_N, IMAGE_BLOCK),
            )
            for i in tl.static_range(3):
                # Each run starts at a tile's first slot, which always holds a patch: a row's first
                # key tile here keeps a finite score, so the unpadded softmax never subtracts -inf
                # from -inf even when no whole tile came before.
                face = faces[i]  # (start, count, per_run, runs_b): ranges whose keys are all image keys
                ranges = (face[0], face[1], 0, 0, face[2], face[3], steps[0], steps[1])
                acc, m_i, l_i = _loop(acc, m_i, l_i, q, ks, vs, ranges, face[1], qk_scale, pad, pad_row, geo,
                                      image_start, BLOCK_N, HEAD_DIM, USE_TMA, HAS_PAD, INTERPRET, True, True, TILE_T,
                                      TILE_H, TILE_W, IMAGE_BLOCK)
        acc, m_i, l_i = _tail(acc, m_i, l_i, q, ks, vs, start1, len1, qk_scale, pad, pad_row, BLOCK_N, HEAD_DIM,
                              HAS_PAD, INTERPRET)
        acc, m_i, l_i = _tail(acc, m_i, l_i, q, ks, vs, 0, image_start, qk_scale, pad, pad_row, BLOCK_N, HEAD_DIM,
                              HAS_PAD, INTERPRET)
        acc, m_i, l_i = _tail(acc, m_i, l_i, q, ks, vs, key_image_end, post_len, qk_scale, pad, pad_row, BLOCK_N,
                              HEAD_DIM, HAS_PAD, INTERPRET)
        if POOL:
            if pool:  # the patch means, each raised by log2(p * p), by pointer loads
                patches = image_len // (factor * factor)
                column = slot.to(tl.int64) * HEAD_DIM
                # Strides come in units of 16 elements, so the compiler knows the rows' alignment: not
                # knowing it (they are not specialized, to spare recompiles), it made every load here
                # one 2-byte scalar, unpipelined.
                pks = (k_desc, POOL_KV, 0, 0, b64 * (spb * 16) + column, sps * 16, 1)
                pvs = (k_desc, POOL_KV, 0, 0, (batch + b64) * (spb * 16) + column, sps * 16, 1)
                bias = 2.0 * tl.math.log2(factor.to(tl.float32))
                ranges = (0, patches // BLOCK_N, 0, 0, 1, 1, steps[0], steps[1])
                acc, m_i, l_i = _loop(acc, m_i, l_i, q, pks, pvs, ranges, patches // BLOCK_N, qk_scale, pad, pad_row,
                                      geo, image_start, BLOCK_N, HEAD_DIM, False, HAS_PAD, INTERPRET, False, False,
                                      TILE_T, TILE_H, TILE_W, IMAGE_BLOCK, bias, True)
                acc, m_i, l_i = _tail(acc, m_i, l_i, q, pks, pvs, 0, patches, qk_scale, pad, pad_row, BLOCK_N,
                                      HEAD_DIM, HAS_PAD, INTERPRET, bias, True)
        if HAS_PAD:
            l_i = tl.where(l_i == 0.0, 1.0, l_i)  # a fully masked row: acc is 0, so is its output
        out = _round(acc / l_i[:, None], O.dtype.element_ty, INTERPRET).to(O.dtype.element_ty)
        o_ptrs = O + b64 * sob + h64 * soh + offs_m.to(tl.int64)[:, None] * sos + offs_d[None, :] * sod
        tl.store(o_ptrs, out, mask=row_ok[:, None])
        if RETURN_LSE:
            lse = (m_i + tl.math.log2(l_i)) * LN2  # -inf for a fully masked row (m_i stays -inf)
            tl.store(LSE + (b64 * num_heads + h64) * seq_len + offs_m, lse, mask=row_ok)
    elif RETURN_LSE:
        if mode == SKIP:
            tl.store(LSE + (b64 * num_heads + h64) * seq_len + offs_m,
                     tl.full([BLOCK_M], float("-inf"), tl.float32), mask=row_ok)


def _set_block_shapes(nargs):
    """Descriptors carry their box shape, which depends on the tuned tile sizes (the tiled launch
    passes q itself: its query tiles are gathered)."""
    for name, rows in (("q_desc", "BLOCK_M"), ("k_desc", "BLOCK_N"), ("v_desc", "BLOCK_N")):
        if isinstance(nargs[name], TensorDescriptor):
            nargs[name].block_shape = [nargs[rows], nargs["HEAD_DIM"]]


# (BLOCK_N, num_warps, num_stages) per head dim, query tiles of 128 rows (one image block, two
# warpgroups). Key tiles of 64 or 128 rows both divide the image block. Pruned ahead with the
# sm_90 resource report: no register spills, shared memory within 227 KiB.
_TILE_CONFIGS = {
    128: [(128, 8, 2), (128, 8, 3), (64, 8, 3), (64, 8, 4)],
    64: [(128, 8, 2), (128, 8, 3), (64, 8, 3), (64, 4, 3), (64, 4, 4)],
    32: [(128, 8, 3), (64, 4, 3), (64, 4, 4), (128, 4, 3)],
}


def tile_configs(head_dim: int) -> list[dict]:
    """The launch configurations autotuning chooses from for ``head_dim``."""
    return [
        {"BLOCK_M": 128, "BLOCK_N": n, "num_warps": w, "num_stages": s} for n, w, s in _TILE_CONFIGS[head_dim]
    ]


def _as_config(c: dict) -> triton.Config:
    meta = {key: c[key] for key in ("BLOCK_M", "BLOCK_N")}
    return triton.Config(meta, num_warps=c["num_warps"], num_stages=c["num_stages"], pre_hook=_set_block_shapes)


_CONFIGS = {dim: [_as_config(c) for c in tile_configs(dim)] for dim in _TILE_CONFIGS}


def _prune(configs, named_args, **kwargs):
    return _CONFIGS[kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))]


def _bench(fn, quantiles):
    # Short timing per config: tuning runs once per (sequence bucket, head dim, dtype, path).
    return triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=quantiles)


if _INTERPRET:
    _tuned = _headwise_kernel
else:
    _tuned = triton.autotune(
        configs=[c for configs in _CONFIGS.values() for c in configs],
        # POOL compiles another loop: launches with and without pool heads each take their best config.
        key=["tune_bucket", "HEAD_DIM", "USE_TMA", "TILED", "POOL"],
        prune_configs_by={"early_config_prune": _prune},
        do_bench=_bench,
    )(_headwise_kernel)


# Benchmarks set this False to time the pointer-load path on inputs that would take the TMA one.
_PREFER_TMA = True
# Tuned config per (sequence bucket, head dim, TMA path, dtype). Later calls launch the kernel
# directly: the autotuner's own dispatch costs tens of microseconds of host time per call, and
# repeat launches skip the JIT's as well (``_launches``).
_chosen: dict[tuple, dict] = {}


@functools.lru_cache(maxsize=None)
def _has_tma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _tma_view(t: torch.Tensor):
    """(rows, cols) of a 2-D TMA view of (B, S, H, D) ``t``, or None when its strides allow none.

    Element (b, s, h, d) sits at row ``b*rb + h*rh + s``, column ``h*ch + d`` of a 2-D view with the
    sequence stride as row pitch (the kernel derives rb, rh, ch from the strides alike). Covers
    contiguous (B, S, H, D), slices of fused QKV projections and (B, H, S, D) transposes; anything
    else takes the pointer path.
    """
    batch, seq, heads, dim = t.shape
    sb, ss, sh, sd = t.stride()
    elem = t.element_size()
    if sd != 1 or t.data_ptr() % 16 or (ss * elem) % 16 or ss < dim:
        return None
    rb = 0
    if batch > 1:
        if sb % ss:
            return None
        rb = sb // ss
    rh = ch = 0
    if heads > 1:
        if sh % ss == 0:
            rh = sh // ss
        elif (sh * elem) % 16 == 0 and (heads - 1) * sh + dim <= ss:
            ch = sh
        else:
            return None
    return (batch - 1) * rb + (heads - 1) * rh + seq, (heads - 1) * ch + dim


_plans: dict[tuple, tuple] = {}
_launches = None if _INTERPRET else DirectLaunches(_headwise_kernel)
_bias_tables: dict[tuple, torch.Tensor] = {}


def _pad_args(padding, tiled, device):
    """(PAD, QPAD, PAD_BIAS) kernel arguments: the (B, S) uint8 padding flags of the keys (in tile
    order in a tiled launch) and of the queries, and the bias table in log2 units, one tensor per
    table and device, made once (a copy to the GPU per call would cost more)."""
    key = (padding.bias, device)
    table = _bias_tables.get(key)
    if table is None:
        values = [float(x) * _LOG2E for row in padding.bias for x in row]
        table = _bias_tables[key] = torch.tensor(values, dtype=torch.float32, device=device)
    flags = padding.mask.contiguous().view(torch.uint8)
    keys = flags if tiled is None else tiled.key_mask.contiguous().view(torch.uint8)
    return keys, flags, table


def attention(q, k, v, head_modes, image_start, image_len, out, scale, return_lse, padding=None, *, tiled=None,
              lse=None, config=None, warmup=False, global_rows=True, pooled=None):
    """Launch the kernel; no host sync. Returns ``(out, lse or None)``.

    ``padding`` is an ``ops.Padding`` or None. Without ``tiled`` the launch runs every head but the
    tile heads; with it (``_tile_order.TiledKeys``: k, v and the key flags in tile order) only the
    tile heads, whose keys and values it takes from there. ``lse`` is the buffer to write into (a
    previous launch's, so that two launches fill one). ``config`` (one of :func:`tile_configs`)
    bypasses autotuning, for checks of every configuration; ``warmup`` compiles (that config, or
    all of them) without launching, for compiling ahead in threads. ``global_rows=False``: the
    global-query tiles of arrow and tile heads exit at once (no log-sum-exps then). ``pooled``, the
    plain launch's (2B, patches, slots, D) patch means of its pool heads (keys for batches [0, B),
    values for [B, 2B); ``ops``' dispatcher builds it), lets the modes name pool heads as
    ``POOL_FLAG | slot << POOL_SLOT_SHIFT | p``; those need every frame's rows and cols divisible by
    ``p`` (no loose tokens) and no padding.
    """
    if not scale > 0:
        raise ValueError(f"the Triton kernel needs a positive softmax scale; got {scale}")
    if pooled is not None and (tiled is not None or padding is not None):
        raise ValueError("pool heads run in the plain launch, without padding: pass pooled without tiled or padding")
    if pooled is not None and (pooled.stride(3) != 1 or pooled.stride(0) % 16 or pooled.stride(1) % 16):
        raise ValueError(f"the patch-mean buffer needs unit head-dim stride and the other strides in multiples of 16 "
                         f"elements (the kernel's loads assume them); got {pooled.stride()}: pass a contiguous buffer")
    batch, seq, heads, dim = q.shape
    if return_lse and not warmup and lse is None:
        lse = torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device)
    if batch * seq * heads == 0:
        if lse is not None:
            lse.fill_(float("-inf"))
        return out, lse
    if tiled is not None:
        k, v = tiled.k, tiled.v
    # Unused without padding: any pointer of the same type in every such launch.
    pads = (head_modes, head_modes, head_modes) if padding is None else _pad_args(padding, tiled, q.device)
    geometry = (1, 1, 1, 1, 1, 1) if tiled is None else (*tiled.tiles.grid, *tiled.tiles.tile)

    key = None
    if not (_INTERPRET or warmup):
        key = launch_key(q, k, v, out, head_modes, image_start, image_len, return_lse, _PREFER_TMA,
                         None if config is None else tuple(config.items()), padding is not None,
                         *(t.data_ptr() % 16 for t in pads), geometry, global_rows,
                         None if pooled is None else (pooled.stride(), pooled.data_ptr() % 16))
        plan = _plans.get(key)
        if plan is not None:
            _launch_planned(key, plan, q, k, v, out, lse, head_modes, pads, pooled, scale)
            return out, lse

    views = None
    # The tiled launch gathers its query tiles with pointer loads: only k and v need a view there.
    viewed = (q, k, v) if tiled is None else (k, v)
    if _PREFER_TMA and (
        _INTERPRET or _has_tma(q.device.index if q.device.index is not None else torch.cuda.current_device())
    ):
        views = [_tma_view(t) for t in viewed]
        if any(view is None for view in views):
            views = None
    descs = (q, k, v)
    if views is not None:
        made = tuple(
            TensorDescriptor(t, [rows, cols], [t.stride(1), 1], [IMAGE_BLOCK, dim]) for t, (rows, cols) in zip(viewed, views)
        )
        descs = descs[: 3 - len(made)] + made

    post_len = seq - image_start - image_len
    image_tiles = None if tiled is None else tiled.tiles.num_tiles

    def grid(meta):
        block_m = meta["BLOCK_M"]
        image = triton.cdiv(image_len, block_m) if image_tiles is None else image_tiles
        return (heads * batch * (triton.cdiv(image_start, block_m) + triton.cdiv(post_len, block_m) + image),)

    lse_arg = lse
    if lse_arg is None:  # unused without RETURN_LSE; a warmup needs only the pointer's type
        lse_arg = torch.empty(0, dtype=torch.float32, device=q.device) if return_lse else out
    ints = (*q.stride(), *k.stride(), *v.stride(), *out.stride(), batch, seq, heads, image_start, image_len,
            *geometry[:3], *((0, 0) if pooled is None else (pooled.stride(0) // 16, pooled.stride(1) // 16)))
    tune_bucket = triton.next_power_of_2(k.shape[1])
    args = _args(q, k, v, out, lse_arg, head_modes, pads, pooled, head_modes.stride(0), descs, ints, scale, tune_bucket)
    meta = dict(
        # At least 32 so that head counts up to 32 share one compiled kernel.
        HEADS_POW2=max(32, triton.next_power_of_2(heads)), HEAD_DIM=dim, IMAGE_BLOCK=IMAGE_BLOCK,
        USE_TMA=views is not None, RETURN_LSE=return_lse, HAS_PAD=padding is not None, INTERPRET=_INTERPRET,
        TILED=tiled is not None, RAGGED=tiled is not None and tiled.tiles.ragged, TILE_T=geometry[3],
        TILE_H=geometry[4], TILE_W=geometry[5], GLOBAL_ROWS=global_rows, POOL=pooled is not None,
    )
    if _INTERPRET:
        c = config or dict(INTERPRET_CONFIG)
        _set_block_shapes({"q_desc": descs[0], "k_desc": descs[1], "v_desc": descs[2], "HEAD_DIM": dim, **c})
        _headwise_kernel[grid](*args, **meta, **c)
        return out, lse
    if warmup:
        for c in [config] if config is not None else tile_configs(dim):
            _set_block_shapes({"q_desc": descs[0], "k_desc": descs[1], "v_desc": descs[2], "HEAD_DIM": dim, **c})
            _headwise_kernel.warmup(*args, grid=grid, **meta, **c)
        return out, lse
    if config is None:
        tune_key = (tune_bucket, dim, meta["USE_TMA"], meta["TILED"], meta["POOL"], q.dtype)
        if tune_key not in _chosen:
            with on_device(q.device.index):
                _tuned[grid](*args, **meta)  # tunes on first use, then runs the best
            best = _tuned.best_config
            _chosen[tune_key] = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
            return out, lse
        config = _chosen[tune_key]
    constexprs = {**meta, "BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"]}
    # Checked here once per key; they keep no tensor alive, each launch rebases them.
    templates = None
    if views is not None:
        _set_block_shapes({"q_desc": descs[0], "k_desc": descs[1], "v_desc": descs[2], **constexprs})
        templates = tuple(rebased(d, None) if isinstance(d, TensorDescriptor) else None for d in descs)
    options = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    plan = _plans[key] = (templates, (head_modes.stride(0), ints, tune_bucket), grid(constexprs), constexprs, options)
    _launch_planned(key, plan, q, k, v, out, lse, head_modes, pads, pooled, scale)
    return out, lse


def _args(q, k, v, out, lse, head_modes, pads, pooled, s_modes, descs, ints, scale, tune_bucket):
    """The kernel's leading (non-constexpr) arguments, in order (without ``pooled``, any pointer of
    the same type in its place: unused)."""
    return (q, k, v, out, lse, head_modes, *pads, q if pooled is None else pooled, s_modes, *descs, *ints,
            scale * _LOG2E, tune_bucket)


def _launch_planned(key, plan, q, k, v, out, lse, head_modes, pads, pooled, scale):
    templates, (s_modes, ints, tune_bucket), grid, constexprs, options = plan
    descs = (q, k, v)
    if templates is not None:
        descs = tuple(x if t is None else rebased(t, x) for t, x in zip(templates, descs))
    args = _args(q, k, v, out, out if lse is None else lse, head_modes, pads, pooled, s_modes, descs, ints, scale,
                 tune_bucket)
    with on_device(q.device.index):
        _launches(key, grid, args, constexprs, options)
