"""Persistent warp-specialised Hopper kernel of head-wise attention, written in Gluon (head dims 64, 128).

The same work as the Triton kernel (one launch, every head in its own mode, the longest work items
first, skip heads starting no work), laid out the way FlashAttention-3 runs on Hopper. A work item
is one 128-row query tile of one head and batch. One program per SM takes its first item by its
index and the rest from a launch-wide counter, and splits into three partitions that talk through
mbarriers:

- a producer warp takes the tickets and issues every TMA load: the item's query tile into one of
  two buffers (with the item's record beside it in shared memory), then key and value tiles into
  rings (``K_STAGES`` and ``V_STAGES`` buffers), keys and values in separate rings so a key buffer
  frees as soon as its QK^T has run and a value buffer as soon as its PV has, each value tile after
  the next key tile;
- two consumer warpgroups, 64 query rows each, run QK^T and PV on the tensor cores (wgmma) and the
  online softmax on the CUDA cores. Being independent warps, one warpgroup's softmax runs while the
  other's matrix products do; each also issues PV of tile j-1 right after QK^T of tile j and
  computes softmax j while that PV runs, across item boundaries too.

Key tiles cover three ranges (the global keys before the image, those after it, then the image
band or all image keys) counted from the start of each range, so with ``BLOCK_N`` dividing 128
every band edge is a tile edge; only the last tile of a range can be partial, and there the columns past the range are masked to -inf (its
rows come from the TMA box as they lie in memory, or zeros past the view).

With key padding (``HAS_PAD``: padded keys never attended, every query alike, as a ``(B, 1, 1, S)``
key mask) the kernel reads running counts of padded keys, ``(B, S + 1)``: two scalar loads a key
tile, issued while its QK^T runs, say whether the tile holds any; only such a tile (typically a
text tile of a padded prompt) loads its flags and masks those columns. A row that has seen no
unpadded key yet keeps a running maximum of -inf without turning its sums into NaN, and a row with
none at all outputs 0 (log-sum-exp -inf).

Tile windows run in a second launch of the same kernel (``TILED``), as in the Triton kernel, in
tile order (``_tile_order``: each 128-slot image block one t x h x w grid tile, pad slots where a
tile is partial), with nothing gathered: the producer reads each grid tile in place, as one box of
a 5-D view of the image (frames, rows, cols), whose patches past the grid's edges arrive as zeros
in the pad slots, and each global tile as the plain launch does. A query item is one grid tile; its key
tiles are the global ones, then the window's box of grid tiles, ``(2wt+1)(2wh+1)`` runs of
contiguous blocks. Pad slots are keys that the key mask (``HAS_PAD``) keeps out or, where every
partial tile's pad slots end its block (``PAD_TAIL``: whole along cols, and along rows unless a tile
is one frame deep, as at 720p in 1 x 8 x 16 tiles), keys masked like the columns past a partial key
tile, from the run each key tile lies in (no loads); and query rows the epilogue does not store: it
writes each row at its raster position. Each launch runs only its own
heads (tile heads in the tiled one, the others in the plain one).

Item order and head ranking are computed in the kernel from ``head_modes`` exactly as in the
Triton kernel, so the host never reads the plan; where the caller knows the modes on the host, the
tiled launch on video grids takes each tile head's order of query tiles from a table
(``_item_order``: the largest window boxes first where a box outgrows the L2's share, which keeps
the programs in step). The kernel needs sm_90 (wgmma, setmaxnreg).
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.runtime import driver
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                             warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .._geometry import (IMAGE_BLOCK as _IMAGE_BLOCK, MAX_TILE_WINDOW, MODE_FULL, MODE_SKIP, POOL_FLAG, POOL_SLOT_SHIFT,
                         TILE_BITS, TILE_FLAG)
from ._item_order import order_table
from ._launch import DirectLaunches, launch_key, on_device, rebased

HEAD_DIMS = (64, 128)
TILES_IN_PLACE = True  # the tiled launch reads grid tiles in place (5-D TMA boxes): nothing is gathered
ORDERS_TILES = True  # given the host head modes, the tiled launch orders each head's query tiles (_item_order)
TILE_ROWS = 128  # query rows per work item: one image block, two consumer warpgroups of 64 rows
BLOCK_M = gl.constexpr(TILE_ROWS)
_LOG2E = 1.4426950408889634
LN2 = gl.constexpr(0.6931471805599453)
IMAGE_BLOCK = gl.constexpr(_IMAGE_BLOCK)
FULL = gl.constexpr(MODE_FULL)
SKIP = gl.constexpr(MODE_SKIP)
ABSENT = gl.constexpr(MODE_SKIP - 1)  # a head the other launch runs, or padding past the last head
TILE = gl.constexpr(TILE_FLAG)
BITS = gl.constexpr(TILE_BITS)
POOLED = gl.constexpr(POOL_FLAG)
SLOT_SHIFT = gl.constexpr(POOL_SLOT_SHIFT)
FACTOR_MASK = gl.constexpr((1 << POOL_SLOT_SHIFT) - 1)
HALF_MASK = gl.constexpr(MAX_TILE_WINDOW)
# Registers per thread of the two worker partitions (the second consumer warpgroup, the producer
# warp). The default partition, the first consumer, gets what the kernel-wide cap leaves (_LAUNCH).
CONSUMER_REGS = gl.constexpr(240)
PRODUCER_REGS = gl.constexpr(24)

# (BLOCK_N, K_STAGES, V_STAGES) per head dim. At 128, two query buffers (64 KB), a key ring of
# 128-key tiles three deep and a value ring two deep fill 224 KB of shared memory (the limit is
# 227). The third key buffer and the order (each value tile after the next key tile) let the next
# item's first key tile load two steps ahead: FLUX-1K arrows 2-6% faster than both rings two deep
# in key-value order (H100, docs/history/KERNEL_NOTES.md); 64-key tiles four deep ran 12-16% slower. At 64
# (SD3-1K, H100): both rings three deep 1-3% faster than two, a fourth key buffer no faster, 64-key
# tiles four deep 12-15% slower.
_CONFIGS = {128: [(128, 3, 2)], 64: [(128, 3, 3)]}


def tile_configs(head_dim: int = 128) -> list[dict]:
    """The launch configurations of ``head_dim`` (one each: the alternatives measured slower)."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"the Gluon kernel supports head dims {HEAD_DIMS}; got {head_dim}")
    return [{"BLOCK_N": n, "K_STAGES": k, "V_STAGES": v} for n, k, v in _CONFIGS[head_dim]]


_DEFAULT_CONFIGS = {dim: tile_configs(dim)[0] for dim in HEAD_DIMS}


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Work counters: an int32 pair per stream (up to 64 streams a device), so that launches on concurrent
# streams do not share one, in one block per device allocated at the first launch; 16-byte slots
# keep every counter as aligned as the launch specialises on. A stream first seen while capturing a
# CUDA graph takes a slot of the block instead of memory from the graph's pool, which the graph may
# hand to other tensors later (and which torch.compile's CUDA graph trees refuse to leave
# untracked). Each counter is zero between launches: the last program of a launch resets it.
_COUNTER_SLOTS = 64
_counter_blocks: dict[int, torch.Tensor] = {}
_counter_slots: dict[tuple, int] = {}


def _counter(device_index: int) -> torch.Tensor:
    block = _counter_blocks.get(device_index)
    if block is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the Gluon kernel's first launch on a device cannot be inside CUDA graph capture; "
                               "call it once before capturing (warm-up)")
        # On a stream of its own: a memory pool routed to the current stream (torch.compile's CUDA
        # graph trees warm up that way) would otherwise own the block.
        side = torch.cuda.Stream(device_index)
        with torch.cuda.stream(side):
            block = torch.zeros(_COUNTER_SLOTS, 4, dtype=torch.int32, device=f"cuda:{device_index}")
        torch.cuda.current_stream(device_index).wait_stream(side)
        _counter_blocks[device_index] = block
    key = (device_index, driver.active.get_current_stream(device_index))
    slot = _counter_slots.setdefault(key, len(_counter_slots) % _COUNTER_SLOTS)
    return block[slot]


@gluon.jit
def _window_tiles(modes, counts):
    """Grid tiles a tile mode's window spans (its work, for ranking heads), clipped to the grid."""
    n_t, n_h, n_w = counts
    wt = (modes >> 2 * BITS) & HALF_MASK
    wh = (modes >> BITS) & HALF_MASK
    ww = modes & HALF_MASK
    return gl.minimum(2 * wt + 1, n_t) * gl.minimum(2 * wh + 1, n_h) * gl.minimum(2 * ww + 1, n_w)


@gluon.jit
def _launch_modes(MODES, s_modes, idx, num_heads, counts, num_image, TILED: gl.constexpr):
    """(mode, ranking key) of heads ``idx`` in this launch: the tile heads in the tiled one, the others
    in the plain one; the rest and the padding past the last head are ABSENT. Out-of-range modes
    (below SKIP) rank and run as skip. A pool head ranks as the arrow of about as many image keys."""
    inside = idx < num_heads
    modes = gl.load(MODES + idx * s_modes, mask=inside, other=ABSENT)
    if TILED:
        present = inside & (modes >= TILE)
    else:
        present = inside & (modes < TILE)
    modes = gl.where(present, gl.maximum(modes, SKIP), ABSENT)
    if TILED:
        key = gl.where(present, _window_tiles(modes, counts), ABSENT)
    else:
        factor = gl.maximum(modes & FACTOR_MASK, 1)
        pooled = num_image // (factor * factor) // (2 * IMAGE_BLOCK)
        key = gl.where(modes == FULL, 1 << 30, gl.where(modes >= POOLED, pooled, modes))
    return modes, key


@gluon.jit
def _rank_table(MODES, s_modes, num_heads, counts, num_image, HEADS_POW2: gl.constexpr, TILED: gl.constexpr):
    """This launch's heads ranked by work, descending (ties by index): full > arrow by width (pool
    heads among them by their image key count; tile heads by the grid tiles their window spans) >
    skip > absent.

    Returns (head index at each rank, mode at each rank, number of full, arrow (or tile) and skip heads).
    """
    layout: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [gl.num_warps(), 1], [1, 0])
    idx_r = gl.arange(0, HEADS_POW2, layout=gl.SliceLayout(1, layout))
    idx_c = gl.arange(0, HEADS_POW2, layout=gl.SliceLayout(0, layout))
    modes_r, key_r = _launch_modes(MODES, s_modes, idx_r, num_heads, counts, num_image, TILED)
    modes_c, key_c = _launch_modes(MODES, s_modes, idx_c, num_heads, counts, num_image, TILED)
    ahead = (key_c[None, :] > key_r[:, None]) | ((key_c[None, :] == key_r[:, None]) & (idx_c[None, :] < idx_r[:, None]))
    ranks = gl.sum(ahead.to(gl.int32), 1)
    n_full_heads = gl.sum((modes_r == FULL).to(gl.int32), 0)
    n_arrow_heads = gl.sum((modes_r >= 0).to(gl.int32), 0)
    n_skip_heads = gl.sum((modes_r == SKIP).to(gl.int32), 0)
    # Scatter by rank: entry r holds the head ranked r.
    at_rank = ranks[:, None] == idx_c[None, :]
    head_at = gl.sum(gl.where(at_rank, idx_r[:, None], 0), 0)
    mode_at = gl.sum(gl.where(at_rank, modes_r[:, None], 0), 0)
    return head_at, mode_at, n_full_heads, n_arrow_heads, n_skip_heads


@gluon.jit
def _scalar(ref):
    """The int32 in a one-element shared buffer."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    return gl.sum(ref.load(layout), 0)


@gluon.jit
def _key_tile(j, start1, len1, box, image_start, num_image, seq_len, BLOCK_N: gl.constexpr, TILED: gl.constexpr,
              tail, PAD_TAIL: gl.constexpr, TILE_T: gl.constexpr, TILE_H: gl.constexpr, TILE_W: gl.constexpr,
              IMAGE_POS: gl.constexpr = True):
    """Start row and valid row count of key tile j: the tiles of the global keys before the image,
    then of those after it, then the image range's (``start1``, ``len1``). In the tiled launch the
    image range is ``box`` = (per_run, runs_b, n_h, n_w): runs of ``per_run`` key tiles, ``runs_b``
    of them a frame-tile (each a tile row, ``n_w`` grid tiles, after the last), frame-tiles
    ``n_h * n_w`` grid tiles apart. With ``PAD_TAIL`` (a ragged grid whose partial tiles hold their
    patches in their first slots) an image tile's valid rows are the patches it holds, from
    ``tail`` = (first run in the grid's last frame-tile, row-tile offset of the grid's last
    row-tile, frames in that frame-tile, rows in that row-tile): the pad slots are then masked like
    the columns past a partial tile, with no loads. Without ``IMAGE_POS`` an image tile's start row
    is ``image_start`` (the tiled launch's consumers under ``PAD_GLOBAL`` only test whether a tile is
    global).

    Global keys first: all items of a head read the same global tiles, so the first key tile of an
    item, which the step between items waits on, is likely still in L2. Measured against the band
    first (H100, same run): 1-4 points of the ideal on arrow plans, 1-2 on full mode
    (docs/history/KERNEL_NOTES.md).
    """
    after_start = image_start + num_image
    n_before = gl.cdiv(image_start, BLOCK_N)
    n_global = n_before + gl.cdiv(seq_len - after_start, BLOCK_N)
    before = j < n_before
    after = (j >= n_before) & (j < n_global)
    i = j - n_global
    if TILED:
        per_run, runs_b, n_h, n_w = box
        run = i // per_run
        if IMAGE_POS:
            image = start1 + ((run // runs_b) * n_h + run % runs_b) * n_w * IMAGE_BLOCK + (i - run * per_run) * BLOCK_N
        else:
            image = image_start
    else:
        image = start1 + i * BLOCK_N
    pos = gl.where(before, j * BLOCK_N, gl.where(after, after_start + (j - n_before) * BLOCK_N, image))
    if PAD_TAIL:
        tail_run, tail_row, frames, rows = tail
        image_valid = gl.where(run % runs_b == tail_row, rows, TILE_H) * TILE_W
        if TILE_T > 1:
            image_valid = image_valid * gl.where(run >= tail_run, frames, TILE_T)
    else:
        image_valid = len1 - (j - n_global) * BLOCK_N
    valid = gl.where(before, image_start - j * BLOCK_N,
                     gl.where(after, seq_len - after_start - (j - n_before) * BLOCK_N, image_valid))
    return pos, valid


@gluon.jit
def _rows(tile, n_text_tiles, n_before_tiles, image_start, num_image, seq_len):
    """First and end query row of a query tile: the global rows before the image, those after it,
    then the image rows."""
    is_image = tile >= n_text_tiles
    before = tile < n_before_tiles
    after_start = image_start + num_image
    q_start = gl.where(is_image, image_start + (tile - n_text_tiles) * BLOCK_M,
                       gl.where(before, tile * BLOCK_M, after_start + (tile - n_before_tiles) * BLOCK_M))
    q_end = gl.where(is_image, after_start, gl.where(before, image_start, seq_len))
    return q_start, q_end


@gluon.jit
def _work(t, geometry, table, order, BLOCK_N: gl.constexpr, TILED: gl.constexpr, ORDERED: gl.constexpr,
          POOL: gl.constexpr):
    """Work item t (t below the count of items that compute) as
    (batch, head, first query row, end query row, key range start, its length, key tiles, key tiles
    per run, runs per frame-tile, ``_key_tile``'s first two ``tail`` values, and in the tiled launch
    the query tile's grid tile and the window box's first, packed (:func:`_pack_tile`), where the
    producer reads them in place; then a pool head's factor and slot, or 0, 0); the five before those
    are 1, 1, 0, 0, 0 outside the tiled launch, and those are 0, 0 in it. With ``POOL`` a pool head's
    image tiles take their image keys from the patch-mean buffer: rows [0, patches) of its slot;
    without it (no buffer: modes the host could not read) a pool mode runs as a band wider than the
    image, full attention.
    With ``ORDERED`` a tile head's image tiles run in the order of its row of ``order`` (heads x
    grid tiles, :mod:`._item_order`), else in raster order.

    Items run longest first: every full-row query tile (all tiles of full heads, then the text-query
    tiles of arrow heads, none without ``GLOBAL_ROWS``), then the arrow heads' image tiles by
    decreasing band. Within a head the
    tiles of one batch element run together, so that the items running at once share keys and
    values (batch-fastest, batch 64 x 2048 ran at 79-83% of cuDNN; this order, 95-98%). Key tiles
    cover the text keys, then the image band (or all image keys).
    """
    (batch, n_text_tiles, n_image_tiles, n_full_heads, n_arrow_heads, end3, image_start, num_image,
     n_before_tiles, seq_len, arrow_text_tiles, counts) = geometry
    head_at, mode_at = table
    n_tiles_q = n_text_tiles + n_image_tiles
    end1 = n_full_heads * batch * n_tiles_q
    end2 = end1 + n_arrow_heads * batch * arrow_text_tiles
    in2 = (t >= end1) & (t < end2)
    in3 = t >= end2
    p = t - gl.where(in3, end2, gl.where(in2, end1, 0))
    section_tiles = gl.where(in2, n_text_tiles, gl.where(in3, n_image_tiles, n_tiles_q))  # a head's, per batch
    per_head = batch * section_tiles
    rank = gl.where(in2 | in3, n_full_heads, 0) + p // per_head
    tile = gl.where(in3, n_text_tiles, 0) + (p % per_head) % section_tiles
    h = _scalar(head_at.index(rank))
    if ORDERED:
        image_at = gl.load(order + h * n_image_tiles + (tile - n_text_tiles), mask=in3, other=0)
        tile = gl.where(in3, n_text_tiles + image_at, tile)
    mode = _scalar(mode_at.index(rank))
    q_start, q_end = _rows(tile, n_text_tiles, n_before_tiles, image_start, num_image, seq_len)

    image_tile = tile - n_text_tiles
    banded = in3 & (mode >= 0)
    b = (p % per_head) // section_tiles
    n_global = gl.cdiv(image_start, BLOCK_N) + gl.cdiv(seq_len - image_start - num_image, BLOCK_N)
    if TILED:
        # The window's box of grid tiles around this one (every tile for global queries).
        n_t, n_h, n_w = counts
        at = (image_tile // (n_h * n_w), image_tile // n_w % n_h, image_tile % n_w)
        a_lo, a_end = _axis_range(at[0], (mode >> 2 * BITS) & HALF_MASK, n_t, banded)
        b_lo, b_end = _axis_range(at[1], (mode >> BITS) & HALF_MASK, n_h, banded)
        c_lo, c_end = _axis_range(at[2], mode & HALF_MASK, n_w, banded)
        runs_b = b_end - b_lo
        per_run = (c_end - c_lo) * (IMAGE_BLOCK // BLOCK_N)
        # Where the box meets the grid's last frame-tile and row-tile (for PAD_TAIL).
        tail_run = gl.where(a_end == n_t, (n_t - 1 - a_lo) * runs_b, 1 << 30)
        tail_row = gl.where(b_end == n_h, n_h - 1 - b_lo, -1)
        n_image_keys = (a_end - a_lo) * runs_b * per_run
        start = image_start + ((a_lo * n_h + b_lo) * n_w + c_lo) * IMAGE_BLOCK
        return (b, h, q_start, q_end, start, n_image_keys * BLOCK_N, n_image_keys + n_global, per_run, runs_b,
                tail_run, tail_row, (_pack_tile(*at), _pack_tile(a_lo, b_lo, c_lo)), 0, 0)
    else:
        block = image_tile * BLOCK_M // IMAGE_BLOCK
        w = gl.minimum(gl.maximum(mode, 0), gl.cdiv(num_image, IMAGE_BLOCK))
        lo = gl.where(banded, gl.maximum(block - w, 0) * IMAGE_BLOCK, 0)
        hi = gl.where(banded, gl.minimum((block + w + 1) * IMAGE_BLOCK, num_image), num_image)
        pool = banded & (mode >= POOLED) & POOL
        factor = gl.where(pool, mode & FACTOR_MASK, 0)
        slot = gl.where(pool, (mode - POOLED) >> SLOT_SHIFT, 0)
        start = gl.where(pool, 0, image_start + lo)
        length = gl.where(pool, num_image // gl.maximum(factor * factor, 1), hi - lo)
        return b, h, q_start, q_end, start, length, gl.cdiv(length, BLOCK_N) + n_global, 1, 1, 0, 0, 0, factor, slot


@gluon.jit
def _axis_range(at, half, count, banded):
    """[lo, end) of the grid tiles along one axis that a window of half-width ``half`` around tile
    ``at`` covers (all ``count`` of them unless ``banded``)."""
    lo = gl.where(banded, gl.maximum(at - half, 0), 0)
    end = gl.where(banded, gl.minimum(at + half + 1, count), count)
    return lo, end


# What the producer tells the consumers of an item, in its query buffer's slot of ``sched``:
# (item or -1 when no work is left, key tiles, length of the first key range, batch, head, first
# query row, end query row, start of the first key range, and in the tiled launch key tiles per
# run and runs per frame-tile). The slot stays until the consumers release the query buffer. With
# PAD_TAIL two more per slot follow all slots' fields (:func:`_tail_field`).
ITEM_FIELDS = gl.constexpr(10)


@gluon.jit
def _publish(sched, slot, fields, layout: gl.constexpr, FIRST: gl.constexpr = 0):
    for i in gl.static_range(len(fields)):
        sched.index(slot * ITEM_FIELDS + FIRST + i).store(gl.full([1], fields[i], gl.int32, layout=layout))


@gluon.jit
def _field(sched, slot, i: gl.constexpr):
    return _scalar(sched.index(slot * ITEM_FIELDS + i))


@gluon.jit
def _tail_field(sched, slot, i: gl.constexpr):
    """Field ``i`` of the PAD_TAIL pair (``_key_tile``'s first two ``tail`` values) of a slot."""
    return _scalar(sched.index(2 * ITEM_FIELDS + slot * 2 + i))


@gluon.jit
def _load_ring(desc, smem, ready, empty, g, row, col, STAGES: gl.constexpr):
    """Tile ``g`` (counted over all items) of a key or value ring, once its buffer is free."""
    s = g % STAGES
    mbarrier.wait(empty.index(s), ((g // STAGES) & 1) ^ 1)  # a fresh barrier passes the first lap
    mbarrier.expect(ready.index(s), desc.block_type.nbytes)
    tma.async_copy_global_to_shared(desc, [row, col], ready.index(s), smem.index(s))


# A grid tile (frame-tile a, row-tile b, col-tile c) packed in one int32 as a << 20 | b << 10 | c
# (the producer's registers are few); -1 for none. Grids with more tiles along an axis run on the
# Triton kernel (``grid_reason``).
TILE_FIELD = gl.constexpr(10)
TILE_COUNT_LIMITS = (1 << 31 - 2 * 10, 1 << 10, 1 << 10)


@gluon.jit
def _pack_tile(a, b, c):
    return (a << 2 * TILE_FIELD) | (b << TILE_FIELD) | c


@gluon.jit
def _copy_in_place(desc, grid_desc, where, bar, dst, TILE_T: gl.constexpr, TILE_H: gl.constexpr,
                   TILE_W: gl.constexpr):
    """One tile of the tiled launch straight from the caller's tensor, at ``where`` = (row, packed
    grid tile, column) from :func:`_place`: a global tile by ``desc`` at (row, column), or a grid
    tile by the 5-D ``grid_desc`` at (outer = row, its first frame, row and col, column), its box
    written in slot order into ``dst``. Patches past the grid's edges arrive as zeros: pad slots,
    never attended or stored."""
    row, tile, col = where
    if tile >= 0:
        box: gl.constexpr = grid_desc.block_type.shape
        view = dst._reinterpret(dst.dtype, [1, box[1], box[2], box[3], box[4]], grid_desc.layout)
        mask: gl.constexpr = (1 << TILE_FIELD) - 1
        tma.async_copy_global_to_shared(grid_desc, [row, (tile >> 2 * TILE_FIELD) * TILE_T,
                                                    ((tile >> TILE_FIELD) & mask) * TILE_H, (tile & mask) * TILE_W,
                                                    col], bar, view)
    else:
        tma.async_copy_global_to_shared(desc, [row, col], bar, dst)


@gluon.jit
def _load_ring_in_place(desc, grid_desc, smem, ready, empty, g, where, STAGES: gl.constexpr, TILE_T: gl.constexpr,
                        TILE_H: gl.constexpr, TILE_W: gl.constexpr):
    """:func:`_load_ring` of the tiled launch, from the caller's tensor (:func:`_copy_in_place`)."""
    s = g % STAGES
    mbarrier.wait(empty.index(s), ((g // STAGES) & 1) ^ 1)
    mbarrier.expect(ready.index(s), desc.block_type.nbytes)
    _copy_in_place(desc, grid_desc, where, ready.index(s), smem.index(s), TILE_T, TILE_H, TILE_W)


@gluon.jit
def _outer_unit(rb, rh):
    """Rows of the view per step of a 5-D view's outer dimension (:func:`grid_view`): batch and head
    steps are both whole multiples of it."""
    return gl.maximum(gl.where(rh == 0, rb, gl.where(rb == 0, rh, gl.minimum(rb, rh))), 1)


@gluon.jit
def _place(coeffs, b, h, row, tile):
    """Where the tiled launch reads a tile of one tensor (``coeffs``: rb, rh, ch) in place: the packed
    grid tile ``tile``, or where it is -1 the global tile at ``row`` of the caller's sequence. As
    (view row, or for a grid tile the outer index; ``tile``; column)."""
    rb, rh, ch = coeffs
    base = b * rb + h * rh
    return gl.where(tile >= 0, base // _outer_unit(rb, rh), base + row), tile, h * ch


@gluon.jit
def _producer(geometry, descs, in_place, q_smem, k_smem, v_smem, bars, sched, table, order, counter,
              BLOCK_N: gl.constexpr, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, TILED: gl.constexpr,
              PAD_TAIL: gl.constexpr, TILE_T: gl.constexpr, TILE_H: gl.constexpr, TILE_W: gl.constexpr,
              ORDERED: gl.constexpr, POOL: gl.constexpr):
    """Takes work items, longest first, and issues their TMA loads: the query tile into one of two
    buffers (its item number beside it, for the consumers), then key and value tiles into the rings,
    counted over all items.

    Program p's first item is item p; later ones are tickets from the launch-wide counter, which
    counts from ``num_programs``. A ticket publishes no data, so its atomic is relaxed: the default
    (acq_rel) put a GPU-wide memory barrier before each ticket and an L1 invalidation after it,
    which held up the next key loads (the relaxed first-by-index version: 1-5 points of the ideal
    on short-item plans, H100).

    Each value tile is loaded after the next key tile, across items too: a key buffer frees half a
    step before a value buffer (after QK^T, not PV), so the key tile a step waits on first, the next
    item's first among them, is not held behind a value buffer's release.

    The tiled launch reads every tile in place (``in_place``: the 5-D descriptors of q, k and v
    over the image as (outer, frames, rows, cols, heads x head dim), and the image's patches): a
    grid tile as one box of the grid, a global tile as in the plain launch.

    With ``POOL``, a pool head's image key and value tiles come from the patch-mean buffer
    (``pool_desc``: keys at rows ``b * pool_rows``, values ``batch * pool_rows`` rows further, the
    head's slot as its column block).
    """
    image_start = geometry[6]
    num_image = geometry[7]
    seq_len = geometry[9]
    end3 = geometry[5]
    n_h = geometry[11][1]
    n_w = geometry[11][2]
    q_desc, k_desc, v_desc, q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, v_rb, v_rh, v_ch, pool_desc, pool_rows = descs
    q_ready, q_empty, k_ready, k_empty, v_ready, v_empty = bars
    one: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    c = 0  # key tiles loaded so far
    it = 0  # items taken so far
    v_row = 0  # the value tile still owed (tile c - 1): where it lies in the view
    v_col = 0
    v_pooled = 0  # whether that value tile is a patch mean's
    batch = geometry[0]
    HEAD_DIM: gl.constexpr = k_smem.shape[2]
    n_global = gl.cdiv(image_start, BLOCK_N) + gl.cdiv(seq_len - image_start - num_image, BLOCK_N)
    if TILED:
        q_img, k_img, v_img, image_tokens = in_place
        after_start = image_start + num_image
        n_before = gl.cdiv(image_start, BLOCK_N)
        n_global = n_before + gl.cdiv(seq_len - after_start, BLOCK_N)
        v_where = (0, -1, 0)  # the owed value tile's place (_place)
    t = gl.program_id(0)
    while t < end3:
        b, h, q_start, q_end, start1, len1, n_kv, per_run, runs_b, tail_run, tail_row, grid_at, factor, slot = _work(
            t, geometry, table, order, BLOCK_N, TILED, ORDERED, POOL)
        qs = it % 2
        # Fresh barriers count as having completed the phase before 0, so the first lap passes.
        mbarrier.wait(q_empty.index(qs), ((it // 2) & 1) ^ 1)
        _publish(sched, qs, (t, n_kv, len1, b, h, q_start, q_end, start1), one)
        if TILED:
            _publish(sched, qs, (per_run, runs_b), one, 8)
            if PAD_TAIL:
                for i in gl.static_range(2):
                    sched.index(2 * ITEM_FIELDS + qs * 2 + i).store(gl.full([1], (tail_run, tail_row)[i], gl.int32,
                                                                            layout=one))
        elif POOL:
            _publish(sched, qs, (factor,), one, 8)
        mbarrier.expect(q_ready.index(qs), q_desc.block_type.nbytes)
        if TILED:
            image = (q_start >= image_start) & (q_start < after_start)
            # Global rows after the image sit past its patches, not its slots, in the caller's sequence.
            q_row = gl.where(q_start >= after_start, q_start - num_image + image_tokens, q_start)
            where = _place((q_rb, q_rh, q_ch), b, h, q_row, gl.where(image, grid_at[0], -1))
            _copy_in_place(q_desc, q_img, where, q_ready.index(qs), q_smem.index(qs), TILE_T, TILE_H, TILE_W)
        else:
            tma.async_copy_global_to_shared(q_desc, [b * q_rb + h * q_rh + q_start, h * q_ch], q_ready.index(qs),
                                            q_smem.index(qs))
        # The next ticket's latency hides behind this item's loads.
        t = gl.num_programs(0) + gl.atomic_add(counter, 1, sem="relaxed")
        if TILED:
            for j in range(n_kv):
                # Key tiles as _key_tile orders them: global ones, then the box's grid tiles by runs.
                row = gl.where(j < n_before, j * BLOCK_N, image_start + image_tokens + (j - n_before) * BLOCK_N)
                box_tile = j - n_global
                run = box_tile // per_run
                tile = gl.where(box_tile >= 0, grid_at[1] + _pack_tile(run // runs_b, run % runs_b,
                                                                       box_tile - run * per_run), -1)
                where = _place((k_rb, k_rh, k_ch), b, h, row, tile)
                _load_ring_in_place(k_desc, k_img, k_smem, k_ready, k_empty, c + j, where, K_STAGES, TILE_T, TILE_H,
                                    TILE_W)
                if c + j > 0:
                    _load_ring_in_place(v_desc, v_img, v_smem, v_ready, v_empty, c + j - 1, v_where, V_STAGES, TILE_T,
                                        TILE_H, TILE_W)
                v_where = _place((v_rb, v_rh, v_ch), b, h, row, tile)
        else:
            for j in range(n_kv):
                # Only the position is read here (no valid rows, so PAD_TAIL off and its tail unused).
                pos, valid = _key_tile(j, start1, len1, (per_run, runs_b, n_h, n_w), image_start, num_image,
                                       seq_len, BLOCK_N, TILED, (per_run, runs_b, n_h, n_w), False, 1, 1, 1)
                if POOL:
                    pooled = (factor > 0) & (j >= n_global)
                    if pooled:
                        _load_ring(pool_desc, k_smem, k_ready, k_empty, c + j, b * pool_rows + pos, slot * HEAD_DIM,
                                   K_STAGES)
                    else:
                        _load_ring(k_desc, k_smem, k_ready, k_empty, c + j, b * k_rb + h * k_rh + pos, h * k_ch,
                                   K_STAGES)
                    if c + j > 0:
                        if v_pooled != 0:
                            _load_ring(pool_desc, v_smem, v_ready, v_empty, c + j - 1, v_row, v_col, V_STAGES)
                        else:
                            _load_ring(v_desc, v_smem, v_ready, v_empty, c + j - 1, v_row, v_col, V_STAGES)
                    v_pooled = pooled.to(gl.int32)
                    v_row = gl.where(pooled, (batch + b) * pool_rows + pos, b * v_rb + h * v_rh + pos)
                    v_col = gl.where(pooled, slot * HEAD_DIM, h * v_ch)
                else:
                    _load_ring(k_desc, k_smem, k_ready, k_empty, c + j, b * k_rb + h * k_rh + pos, h * k_ch,
                               K_STAGES)
                    if c + j > 0:
                        _load_ring(v_desc, v_smem, v_ready, v_empty, c + j - 1, v_row, v_col, V_STAGES)
                    v_row = b * v_rb + h * v_rh + pos
                    v_col = h * v_ch
        c += n_kv
        it += 1
    if c > 0:
        if TILED:
            _load_ring_in_place(v_desc, v_img, v_smem, v_ready, v_empty, c - 1, v_where, V_STAGES, TILE_T, TILE_H,
                                TILE_W)
        elif POOL:
            if v_pooled != 0:
                _load_ring(pool_desc, v_smem, v_ready, v_empty, c - 1, v_row, v_col, V_STAGES)
            else:
                _load_ring(v_desc, v_smem, v_ready, v_empty, c - 1, v_row, v_col, V_STAGES)
        else:
            _load_ring(v_desc, v_smem, v_ready, v_empty, c - 1, v_row, v_col, V_STAGES)
    # No work left: item -1 tells the consumers.
    qs = it % 2
    mbarrier.wait(q_empty.index(qs), ((it // 2) & 1) ^ 1)
    sched.index(qs * ITEM_FIELDS).store(gl.full([1], -1, gl.int32, layout=one))
    mbarrier.arrive(q_ready.index(qs), count=1)
    # The last program to finish zeroes the counters for the next launch (every program has taken
    # its last ticket before it counts itself done; this count keeps acq_rel, whose release orders
    # the program's relaxed tickets before it).
    done = gl.atomic_add(counter + 1, 1)
    if done == gl.num_programs(0) - 1:
        gl.store(counter, 0)
        gl.store(counter + 1, 0)


@gluon.jit
def _pack_p(p, dtype: gl.constexpr):
    """P rounded to ``dtype``, adjacent columns paired in one 32-bit register (lower half first).

    The loop carries P from one step's softmax to the next step's PV. Carried as 16-bit values, it
    cost ptxas two PRMT a pair to rebuild the wgmma operand at every step (64 of 626 instructions a
    step at head dim 128); carried packed, none: 2-8 points of the ideal on every plan in graph
    replay (H100, docs/history/KERNEL_NOTES.md), outputs equal bit for bit.
    """
    ROWS: gl.constexpr = p.shape[0]
    COLS: gl.constexpr = p.shape[1]
    lo, hi = gl.split(gl.reshape(p, [ROWS, COLS // 2, 2]))  # a thread holds both columns of a pair
    if dtype == gl.bfloat16:
        asm: gl.constexpr = "cvt.rn.bf16x2.f32 $0, $2, $1;"
    else:
        asm: gl.constexpr = "cvt.rn.f16x2.f32 $0, $2, $1;"
    return gl.inline_asm_elementwise(asm, "=r,r,r", [lo, hi], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _unpack_p(packed, dtype: gl.constexpr, layout: gl.constexpr):
    """The wgmma operand (``layout``) of P packed by :func:`_pack_p`."""
    # 16-bit integers out of the asm, since it cannot return a dtype passed in as a constexpr.
    lo, hi = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [packed], dtype=(gl.int16, gl.int16),
                                       is_pure=True, pack=1)
    p = gl.join(lo, hi).to(dtype, bitcast=True)
    return gl.convert_layout(gl.reshape(p, [p.shape[0], p.shape[1] * 2]), layout)


@gluon.jit
def _key_pad(PAD, pair, slot, b, pos, valid, seq_len, BLOCK_N: gl.constexpr, HAS_PAD: gl.constexpr,
             PAIR: gl.constexpr, PAD_GLOBAL: gl.constexpr, image):
    """What the softmax of the key tile at row ``pos`` needs of the padding: (counts of batch ``b``,
    padded keys among the tile's) from the running counts ``PAD``, or with ``PAIR`` (the flags of
    batch ``b``, that number, the first query row of this warpgroup in the item of ``sched`` slot
    ``slot``, the bias table). Without ``HAS_PAD``, zeros: unused. Issued before the tile's QK^T is
    waited on, which hides the loads. With ``PAD_GLOBAL`` (no image key padded) a tile inside
    ``image`` = (image_start, num_image) counts none and loads nothing."""
    if HAS_PAD:
        counts = PAD + b.to(gl.int64) * (seq_len + 1)
        if PAD_GLOBAL:
            outside = (pos < image[0]) | (pos >= image[0] + image[1])
            n_pad = (gl.load(counts + pos + gl.minimum(valid, BLOCK_N), mask=outside, other=0)
                     - gl.load(counts + pos, mask=outside, other=0))
        else:
            n_pad = gl.load(counts + pos + gl.minimum(valid, BLOCK_N)) - gl.load(counts + pos)
        if PAIR:
            FLAGS, PAIR_BIAS, sched, first = pair
            return FLAGS + b.to(gl.int64) * seq_len, n_pad, _field(sched, slot, 5) + first, PAIR_BIAS
        else:
            return counts, n_pad
    else:
        return PAD, 0


@gluon.jit
def _softmax(s, m_i, l_i, valid, k_pad, pos, qk_scale, seq_len, BLOCK_N: gl.constexpr, layout: gl.constexpr,
             HAS_PAD: gl.constexpr, PAIR: gl.constexpr, pool_bias, POOL: gl.constexpr):
    """Online-softmax step over one score tile, in log2 units; masks columns past a partial tile and
    (``HAS_PAD``) padded keys, of which ``k_pad`` is (running counts, how many in this tile). With
    ``PAIR`` a padded key's score gets its query kind's bias relative to a real key instead (see
    :func:`pair_table`; ``k_pad`` from :func:`_key_pad`), and a pad slot (flag 2) -inf. With ``POOL``
    every score of the tile is raised by ``pool_bias`` (log2 units: a pool head's patch means stand for
    ``p * p`` keys each), folded into the row maximum the exponent subtracts."""
    if valid < BLOCK_N:
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
        s = gl.where((cols < valid)[None, :], s, float("-inf"))
    if PAIR:
        flags, n_pad, first_row, PAIR_BIAS = k_pad
        if n_pad > 0:
            cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
            key_flag = gl.load(flags + pos + cols, mask=cols < valid, other=0)
            rows = first_row + gl.arange(0, s.shape[0], layout=gl.SliceLayout(1, layout))
            query_padded = gl.load(flags + rows, mask=rows < seq_len, other=0) == 1
            # The table is in log2 units and s is not scaled yet.
            relative = gl.where(query_padded, gl.load(PAIR_BIAS + 1), gl.load(PAIR_BIAS)) / qk_scale
            bias = gl.where(key_flag[None, :] == 1, relative[:, None],
                            gl.where(key_flag[None, :] == 0, 0.0, float("-inf")))
            s = s + bias
    elif HAS_PAD:
        counts, n_pad = k_pad
        if n_pad > 0:
            cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
            at = counts + pos + cols
            padded = (gl.load(at + 1, mask=cols < valid, other=0) - gl.load(at, mask=cols < valid, other=0)) != 0
            s = gl.where(padded[None, :], float("-inf"), s)
    if POOL:
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale + pool_bias)
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    if HAS_PAD:
        # A row with no unpadded key so far: subtract 0, so that its -inf scores give 0, not NaN.
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    if POOL:
        p = gl.exp2(s * qk_scale - (m_use - pool_bias)[:, None])
    else:
        p = gl.exp2(s * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _pool_bias(factor):
    """The score bias of a pool head's patch means in log2 units, ``log2(p * p)``; 0 for ``factor`` 0
    (no pool head)."""
    return gl.where(factor > 0, 2.0 * gl.log2(gl.maximum(factor, 1).to(gl.float32)), 0.0)


@gluon.jit
def _out_rows(rows, q_end, tiling, TILE_T: gl.constexpr, TILE_H: gl.constexpr, TILE_W: gl.constexpr):
    """Where tiled launch query rows ``rows`` (tile order) go in the output: image slots at their
    patch's raster row, global rows after the image back by the pad slots; and whether each is
    stored (not past ``q_end``, not a pad slot). Divisions by the run-time grid act on the tile
    index; the per-slot ones are by the compile-time tile shape."""
    image_start, num_image, grid_t, grid_h, grid_w, n_h, n_w = tiling
    image_end = image_start + num_image
    slot = rows - image_start
    tile = slot // IMAGE_BLOCK
    offset = slot % IMAGE_BLOCK
    frame = tile // (n_h * n_w) * TILE_T + offset // (TILE_H * TILE_W)
    row = tile // n_w % n_h * TILE_H + offset // TILE_W % TILE_H
    col = tile % n_w * TILE_W + offset % TILE_W
    in_image = (rows >= image_start) & (rows < image_end)
    at = gl.where(in_image, image_start + (frame * grid_h + row) * grid_w + col,
                  gl.where(rows >= image_end, rows - num_image + grid_t * grid_h * grid_w, rows))
    inside = (frame < grid_t) & (row < grid_h) & (col < grid_w)
    return at, (rows < q_end) & (inside | ~in_image)


@gluon.jit
def _epilogue(acc, m_i, l_i, sched, slot, scratch, q_empty, out_args, pair, WG: gl.constexpr,
              RETURN_LSE: gl.constexpr, OUT_ALIGNED: gl.constexpr, HAS_PAD: gl.constexpr, PAIR: gl.constexpr,
              TILED: gl.constexpr, TILE_T: gl.constexpr, TILE_H: gl.constexpr, TILE_W: gl.constexpr):
    """Normalise one warpgroup's rows of a finished item and store them (and their log-sum-exp). With
    ``PAIR`` each row's log-sum-exp gets its query kind's real-key bias, and a row whose kind attends
    to nothing outputs 0 (log-sum-exp -inf).

    The rows go through ``scratch`` (the warpgroup's rows of the item's query buffer, no longer read)
    so that each thread stores 16-byte vectors instead of the accumulator layout's 4-byte pairs, and
    holds 8 addresses instead of 32.
    """
    O, LSE, sob, sos, soh, sod, seq_len, num_heads, qk_scale, out_seq, tiling = out_args
    b = _field(sched, slot, 3)
    h = _field(sched, slot, 4)
    q_start = _field(sched, slot, 5)
    q_end = _field(sched, slot, 6)
    ROWS: gl.constexpr = acc.shape[0]
    HEAD_DIM: gl.constexpr = acc.shape[1]
    o_row_layout: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    # One reciprocal per row: a division per element costs range fix-ups on each.
    if PAIR:
        FLAGS, PAIR_BIAS = pair[0], pair[1]
        q_rows = q_start + WG * ROWS + gl.arange(0, ROWS, layout=l_i.type.layout)
        query_padded = gl.load(FLAGS + b.to(gl.int64) * seq_len + q_rows, mask=q_rows < q_end, other=0) == 1
        offset = gl.where(query_padded, gl.load(PAIR_BIAS + 3), gl.load(PAIR_BIAS + 2))
        inverse = gl.where((l_i > 0) & (offset > float("-inf")), 1.0 / l_i, 0.0)
    elif HAS_PAD:
        inverse = gl.where(l_i > 0, 1.0 / l_i, 0.0)  # a row whose every key is padding outputs 0
    else:
        inverse = 1.0 / l_i
    scratch.store((acc * gl.convert_layout(inverse, o_row_layout)[:, None]).to(O.dtype.element_ty))
    # 8 elements (16 bytes) a thread, a warp covering whole rows.
    rows_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [gl.num_warps(), 1],
                                                 [1, 0])
    out = scratch.load(rows_layout)
    first_row = q_start + WG * ROWS
    rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, rows_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, rows_layout))
    b64 = b.to(gl.int64)
    h64 = h.to(gl.int64)
    if TILED:  # each row at its raster position
        at, stored = _out_rows(first_row + rows, q_end, tiling, TILE_T, TILE_H, TILE_W)
        base = O + b64 * sob + h64 * soh
        offsets = at.to(gl.int64)[:, None] * sos
    else:
        base = O + b64 * sob + h64 * soh + first_row.to(gl.int64) * sos
        offsets = rows[:, None] * sos
        stored = rows < q_end - first_row
    if OUT_ALIGNED:
        # Said here because what the launch specialised on (unit head-dim stride, 16-byte rows) does
        # not reach worker partitions, and without it their stores go out two bytes at a time.
        ptrs = gl.multiple_of(base + offsets + cols[None, :], [16, 16])
    else:
        ptrs = base + (offsets + cols[None, :] * sod)
    gl.store(ptrs, out, mask=stored[:, None])
    if RETURN_LSE:
        lse_rows = first_row + gl.arange(0, ROWS, layout=l_i.type.layout)
        lse = (m_i + gl.log2(l_i)) * LN2
        if PAIR:
            lse = lse + offset
        if TILED:
            lse_at, lse_stored = _out_rows(lse_rows, q_end, tiling, TILE_T, TILE_H, TILE_W)
        else:
            lse_at = lse_rows
            lse_stored = lse_rows < q_end
        gl.store(LSE + (b64 * num_heads + h64) * out_seq + lse_at, lse, mask=lse_stored)
    # Done with the query buffer (read as scratch just now) and the item's slot.
    fence_async_shared()
    mbarrier.arrive(q_empty.index(slot), count=1)


@gluon.jit
def _consumer(out_args, q_smem, k_smem, v_smem, bars, sched, image_start, num_image, PAD, FLAGS, PAIR_BIAS,
              WG: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, K_STAGES: gl.constexpr,
              V_STAGES: gl.constexpr, RETURN_LSE: gl.constexpr, OUT_ALIGNED: gl.constexpr, HAS_PAD: gl.constexpr,
              PAIR: gl.constexpr, TILED: gl.constexpr, PAD_TAIL: gl.constexpr, TILE_T: gl.constexpr,
              TILE_H: gl.constexpr, TILE_W: gl.constexpr, PAD_GLOBAL: gl.constexpr, POOL: gl.constexpr):
    """One warpgroup's 64 rows of every item the producer hands over, as one stream of key tiles.

    Each step issues QK^T of the next tile, then PV of the previous one, and runs the softmax of the
    next tile while that PV runs. The next tile may be the first of the next item (its query is
    already in the other buffer), so an item's last PV, its epilogue and the next item's first QK^T
    overlap like any other step: no pipeline drains between items. What an item is comes from the
    producer through ``sched``, so the loop carries only counters. With ``POOL`` a pool head's item
    (its factor in the item's field 8) raises the scores of its image key tiles, the patch means, by
    ``log2(p * p)``.
    """
    qk_scale = out_args[8]
    seq_len = out_args[6]
    n_h = out_args[10][5]
    n_w = out_args[10][6]
    q_ready, q_empty, k_ready, k_empty, v_ready, v_empty = bars
    ROWS: gl.constexpr = BLOCK_M // 2
    dtype: gl.constexpr = k_smem.dtype
    pair = (FLAGS, PAIR_BIAS, sched, WG * ROWS)
    # The grid's last frame-tile and row-tile: how many frames and rows of patches they hold.
    frames = out_args[10][2] - (gl.cdiv(out_args[10][2], TILE_T) - 1) * TILE_T
    rows = out_args[10][3] - (n_h - 1) * TILE_H
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_row_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    n_global = gl.cdiv(image_start, BLOCK_N) + gl.cdiv(seq_len - image_start - num_image, BLOCK_N)

    mbarrier.wait(q_ready.index(0), 0)
    if _field(sched, 0, 0) >= 0:
        n_kv = _field(sched, 0, 1)
        len1 = _field(sched, 0, 2)
        b = _field(sched, 0, 3)
        start1 = _field(sched, 0, 7)
        if TILED:
            per_run = _field(sched, 0, 8)
            runs_b = _field(sched, 0, 9)
        else:
            per_run = 1
            runs_b = 1
        if POOL:
            item_bias = _pool_bias(_field(sched, 0, 8))
        else:
            item_bias = 0.0
        if PAD_TAIL:
            tail_run = _tail_field(sched, 0, 0)
            tail_row = _tail_field(sched, 0, 1)
        else:
            tail_run = 0
            tail_row = 0
        # Tile 0 of the first item: QK^T and softmax only; its PV runs under the next step's softmax.
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q_smem.index(0).slice(WG * ROWS, ROWS), k_smem.index(0).permute((1, 0)), s_zero,
                          use_acc=False, is_async=True)
        pos, valid = _key_tile(0, start1, len1, (per_run, runs_b, n_h, n_w), image_start, num_image, seq_len,
                               BLOCK_N, TILED, (tail_run, tail_row, frames, rows), PAD_TAIL, TILE_T, TILE_H, TILE_W,
                               not PAD_GLOBAL)
        k_pad = _key_pad(PAD, pair, 0, b, pos, valid, seq_len, BLOCK_N, HAS_PAD, PAIR, PAD_GLOBAL,
                         (image_start, num_image))
        s = warpgroup_mma_wait(0, deps=(s,))
        mbarrier.arrive(k_empty.index(0), count=1)
        m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
        l_i = gl.zeros([ROWS], gl.float32, layout=row_layout)
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, valid, k_pad, pos, qk_scale, seq_len, BLOCK_N, s_layout,
                                      HAS_PAD, PAIR, gl.where(n_global == 0, item_bias, 0.0), POOL)
        p_op = _pack_p(p, dtype)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
        c = 1  # key tiles whose QK^T has been issued, over all items
        it = 0  # the item in flight
        more = True
        while more:
            q = q_smem.index(it % 2).slice(WG * ROWS, ROWS)
            for j in range(1, n_kv):
                st = c % K_STAGES
                prev = (c - 1) % V_STAGES
                mbarrier.wait(k_ready.index(st), (c // K_STAGES) & 1)
                s = warpgroup_mma(q, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                pos, valid = _key_tile(j, start1, len1, (per_run, runs_b, n_h, n_w), image_start, num_image,
                                       seq_len, BLOCK_N, TILED, (tail_run, tail_row, frames, rows), PAD_TAIL, TILE_T,
                                       TILE_H, TILE_W, not PAD_GLOBAL)
                k_pad = _key_pad(PAD, pair, it % 2, b, pos, valid, seq_len, BLOCK_N, HAS_PAD, PAIR, PAD_GLOBAL,
                                 (image_start, num_image))
                mbarrier.wait(v_ready.index(prev), ((c - 1) // V_STAGES) & 1)
                acc = warpgroup_mma(_unpack_p(p_op, dtype, p_layout), v_smem.index(prev), acc, is_async=True)
                s = warpgroup_mma_wait(1, deps=(s,))
                mbarrier.arrive(k_empty.index(st), count=1)
                p, alpha, m_i, l_i = _softmax(s, m_i, l_i, valid, k_pad, pos, qk_scale, seq_len, BLOCK_N,
                                              s_layout, HAS_PAD, PAIR, gl.where(j >= n_global, item_bias, 0.0), POOL)
                acc = warpgroup_mma_wait(0, deps=(acc,))
                mbarrier.arrive(v_empty.index(prev), count=1)
                acc = acc * gl.convert_layout(alpha, o_row_layout)[:, None]
                p_op = _pack_p(p, dtype)
                c += 1
            # Between items: the next item's first QK^T and softmax run with this item's last PV and
            # its epilogue, like any other step (its query is already in the other buffer).
            nxt = (it + 1) % 2
            mbarrier.wait(q_ready.index(nxt), ((it + 1) // 2) & 1)
            more = _field(sched, nxt, 0) >= 0
            if more:
                n_kv = _field(sched, nxt, 1)
                len1 = _field(sched, nxt, 2)
                b = _field(sched, nxt, 3)
                start1 = _field(sched, nxt, 7)
                if TILED:
                    per_run = _field(sched, nxt, 8)
                    runs_b = _field(sched, nxt, 9)
                if POOL:
                    item_bias = _pool_bias(_field(sched, nxt, 8))
                if PAD_TAIL:
                    tail_run = _tail_field(sched, nxt, 0)
                    tail_row = _tail_field(sched, nxt, 1)
                st = c % K_STAGES
                prev = (c - 1) % V_STAGES
                mbarrier.wait(k_ready.index(st), (c // K_STAGES) & 1)
                s = warpgroup_mma(q_smem.index(nxt).slice(WG * ROWS, ROWS), k_smem.index(st).permute((1, 0)),
                                  s_zero, use_acc=False, is_async=True)
                pos, valid = _key_tile(0, start1, len1, (per_run, runs_b, n_h, n_w), image_start, num_image, seq_len,
                                       BLOCK_N, TILED, (tail_run, tail_row, frames, rows), PAD_TAIL, TILE_T, TILE_H,
                                       TILE_W, not PAD_GLOBAL)
                k_pad = _key_pad(PAD, pair, nxt, b, pos, valid, seq_len, BLOCK_N, HAS_PAD, PAIR, PAD_GLOBAL,
                                 (image_start, num_image))
                mbarrier.wait(v_ready.index(prev), ((c - 1) // V_STAGES) & 1)
                acc = warpgroup_mma(_unpack_p(p_op, dtype, p_layout), v_smem.index(prev), acc, is_async=True)
                s = warpgroup_mma_wait(1, deps=(s,))
                mbarrier.arrive(k_empty.index(st), count=1)
                m_next = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
                l_next = gl.zeros([ROWS], gl.float32, layout=row_layout)
                p, alpha, m_next, l_next = _softmax(s, m_next, l_next, valid, k_pad, pos, qk_scale, seq_len, BLOCK_N,
                                                    s_layout, HAS_PAD, PAIR, gl.where(n_global == 0, item_bias, 0.0),
                                                    POOL)
                p_op = _pack_p(p, dtype)
                acc = warpgroup_mma_wait(0, deps=(acc,))
                mbarrier.arrive(v_empty.index(prev), count=1)
                _epilogue(acc, m_i, l_i, sched, it % 2, q, q_empty, out_args, pair, WG, RETURN_LSE, OUT_ALIGNED,
                          HAS_PAD, PAIR, TILED, TILE_T, TILE_H, TILE_W)
                acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
                m_i = m_next
                l_i = l_next
                c += 1
                it += 1
        last = (c - 1) % V_STAGES
        mbarrier.wait(v_ready.index(last), ((c - 1) // V_STAGES) & 1)
        acc = warpgroup_mma(_unpack_p(p_op, dtype, p_layout), v_smem.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(v_empty.index(last), count=1)
        _epilogue(acc, m_i, l_i, sched, it % 2, q_smem.index(it % 2).slice(WG * ROWS, ROWS), q_empty, out_args,
                  pair, WG, RETURN_LSE, OUT_ALIGNED, HAS_PAD, PAIR, TILED, TILE_T, TILE_H, TILE_W)


# Few compiled variants: only the output strides are specialised (multiples of 16 and a unit
# head-dim stride let the epilogue store whole vectors).
@gluon.jit(do_not_specialize=[
    "s_modes", "q_rb", "q_rh", "q_ch", "k_rb", "k_rh", "k_ch", "v_rb", "v_rh", "v_ch", "pool_rows",
    "batch", "seq_len", "num_heads", "image_start", "num_image", "out_seq", "grid_t", "grid_h", "grid_w",
])
def _headwise_kernel(
    q_desc, k_desc, v_desc, q_img, k_img, v_img, pool_desc, O, LSE, MODES, COUNTER, PAD, FLAGS, PAIR_BIAS, ORDER,
    s_modes, q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, v_rb, v_rh, v_ch, pool_rows, sob, sos, soh, sod,
    batch, seq_len, num_heads, image_start, num_image, out_seq, grid_t, grid_h, grid_w, qk_scale,
    HEADS_POW2: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, K_STAGES: gl.constexpr,
    V_STAGES: gl.constexpr,
    RETURN_LSE: gl.constexpr, OUT_ALIGNED: gl.constexpr, GLOBAL_ROWS: gl.constexpr, HAS_PAD: gl.constexpr,
    PAIR: gl.constexpr, TILED: gl.constexpr, PAD_TAIL: gl.constexpr, TILE_T: gl.constexpr, TILE_H: gl.constexpr,
    TILE_W: gl.constexpr, PAD_GLOBAL: gl.constexpr, ORDERED: gl.constexpr, POOL: gl.constexpr,
):
    # Element (b, s, h, d) of q sits at row b*q_rb + h*q_rh + s, column h*q_ch + d of q_desc's 2-D
    # view (likewise k, v): the host derives the coefficients from the strides. The tiled launch reads
    # image tiles by q_img (k_img, v_img; None in the plain launch): 5-D views of the image, grid tile
    # (a, b, c) of batch b0 and head h at (outer (b0*q_rb + h*q_rh) / unit, a*TILE_T, b*TILE_H,
    # c*TILE_W, h*q_ch), unit the smaller nonzero of q_rb and q_rh. PAD is (B, S + 1)
    # int32, the padded keys before each position (read only with HAS_PAD). With PAIR, FLAGS is the
    # (B, S) uint8 kind of each token (0 real, 1 padding, 2 a pad slot of the tiled launch) and
    # PAIR_BIAS the fp32 table of pair_table. With ORDERED, ORDER is the (heads, grid tiles) int32 run
    # order of each tile head's query tiles (_item_order). With POOL, pool_desc is a 2-D view of the
    # (2B, pool_rows, slots, D) patch-mean buffer (keys, then values) whose slots the pool heads' modes
    # name (POOL_FLAG | slot << SLOT_SHIFT | p); None otherwise.
    # Persistent: a few programs per SM at most, each taking work items from COUNTER until none is
    # left, so the longest-first order holds across the launch and no program idles while work waits.
    # Global (text, reference) rows: [0, image_start) and [image_start + num_image, seq_len).
    # The tiled launch (rows counted in tile order: num_image the image's slots, seq_len the tile
    # order's length; q, k, v read in place and the output's rows in raster order, out_seq of them)
    # reads the grid (frames, rows, cols) and the tile shape; the plain one passes a grid of one
    # token (its tile counts are unused).
    n_before_tiles = gl.cdiv(image_start, BLOCK_M)
    n_text_tiles = n_before_tiles + gl.cdiv(seq_len - image_start - num_image, BLOCK_M)
    n_image_tiles = gl.cdiv(num_image, BLOCK_M)
    counts = (gl.cdiv(grid_t, TILE_T), gl.cdiv(grid_h, TILE_H), gl.cdiv(grid_w, TILE_W))
    if TILED:
        gl.static_assert(TILE_T * TILE_H * TILE_W == IMAGE_BLOCK, "a tile is one image block")
        gl.static_assert(BLOCK_M == IMAGE_BLOCK, "a tiled query item is one grid tile")
    gl.static_assert(TILED or not PAD_TAIL, "pad slots ending each block are a tiled launch's")
    gl.static_assert((TILED and HAS_PAD and not PAIR) or not PAD_GLOBAL, "PAD_GLOBAL is the tiled key mask's")
    gl.static_assert(TILED or not ORDERED, "an order of grid tiles is the tiled launch's")
    gl.static_assert(not (POOL and TILED), "pool heads run in the plain launch")
    head_at, mode_at, n_full_heads, n_arrow_heads, n_skip_heads = _rank_table(MODES, s_modes, num_heads, counts,
                                                                              num_image, HEADS_POW2, TILED)
    # Without GLOBAL_ROWS the arrow heads' text-query tiles are no work items: their rows stay unwritten.
    gl.static_assert(GLOBAL_ROWS or not RETURN_LSE, "log-sum-exps need every row")
    if GLOBAL_ROWS:
        arrow_text_tiles = n_text_tiles
    else:
        arrow_text_tiles = n_text_tiles * 0
    end3 = (n_full_heads * (n_text_tiles + n_image_tiles) + n_arrow_heads * (arrow_text_tiles + n_image_tiles)) * batch
    geometry = (batch, n_text_tiles, n_image_tiles, n_full_heads, n_arrow_heads, end3, image_start, num_image,
                n_before_tiles, seq_len, arrow_text_tiles, counts)
    # The partitions read the ranking from shared memory (worker partitions take no tensors).
    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    vec: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    head_smem = gl.allocate_shared_memory(gl.int32, [HEADS_POW2, 1], flat)
    mode_smem = gl.allocate_shared_memory(gl.int32, [HEADS_POW2, 1], flat)
    head_smem._reinterpret(gl.int32, [HEADS_POW2], flat).store(gl.convert_layout(head_at, vec))
    mode_smem._reinterpret(gl.int32, [HEADS_POW2], flat).store(gl.convert_layout(mode_at, vec))
    table = (head_smem, mode_smem)

    if end3 > 0:
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, BLOCK_M, HEAD_DIM], q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [K_STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [V_STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        if PAD_TAIL:
            sched = gl.allocate_shared_memory(gl.int32, [2 * ITEM_FIELDS + 4, 1], flat)
        else:
            sched = gl.allocate_shared_memory(gl.int32, [2 * ITEM_FIELDS, 1], flat)
        q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
        # Both consumer warpgroups release every buffer.
        for i in gl.static_range(2):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)
        for i in gl.static_range(K_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)
        for i in gl.static_range(V_STAGES):
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(v_empty.index(i), count=2)
        bars = (q_ready, q_empty, k_ready, k_empty, v_ready, v_empty)
        if POOL:
            descs = (q_desc, k_desc, v_desc, q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, v_rb, v_rh, v_ch, pool_desc, pool_rows)
        else:  # partitions take no None
            descs = (q_desc, k_desc, v_desc, q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, v_rb, v_rh, v_ch, k_desc, pool_rows)
        tiling = (image_start, num_image, grid_t, grid_h, grid_w, counts[1], counts[2])
        if TILED:
            in_place = (q_img, k_img, v_img, grid_t * grid_h * grid_w)
        else:
            in_place = 0  # partitions take no None
        out_args = (O, LSE, sob, sos, soh, sod, seq_len, num_heads, qk_scale, out_seq, tiling)
        gl.warp_specialize(
            [
                (_consumer, (out_args, q_smem, k_smem, v_smem, bars, sched, image_start, num_image, PAD, FLAGS,
                             PAIR_BIAS, 0, HEAD_DIM, BLOCK_N, K_STAGES, V_STAGES, RETURN_LSE, OUT_ALIGNED, HAS_PAD,
                             PAIR, TILED, PAD_TAIL, TILE_T, TILE_H, TILE_W, PAD_GLOBAL, POOL)),
                (_consumer, (out_args, q_smem, k_smem, v_smem, bars, sched, image_start, num_image, PAD, FLAGS,
                             PAIR_BIAS, 1, HEAD_DIM, BLOCK_N, K_STAGES, V_STAGES, RETURN_LSE, OUT_ALIGNED, HAS_PAD,
                             PAIR, TILED, PAD_TAIL, TILE_T, TILE_H, TILE_W, PAD_GLOBAL, POOL)),
                (_producer, (geometry, descs, in_place, q_smem, k_smem, v_smem, bars, sched, table, ORDER, COUNTER,
                             BLOCK_N, K_STAGES, V_STAGES, TILED, PAD_TAIL, TILE_T, TILE_H, TILE_W, ORDERED, POOL)),
            ],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )
    if RETURN_LSE:
        # Skip heads compute nothing; their log-sum-exp is -inf. (Skip heads run in the plain launch.)
        out_layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
        per_head = batch * (n_text_tiles + n_image_tiles)
        for t in range(end3 + gl.program_id(0), end3 + n_skip_heads * per_head, gl.num_programs(0)):
            p = t - end3
            h = _scalar(head_smem.index(n_full_heads + n_arrow_heads + p // per_head))
            q_start, q_end = _rows((p % per_head) // batch, n_text_tiles, n_before_tiles, image_start, num_image,
                                   seq_len)
            rows = q_start + gl.arange(0, BLOCK_M, layout=out_layout)
            gl.store(LSE + ((p % batch).to(gl.int64) * num_heads + h) * seq_len + rows,
                     gl.full([BLOCK_M], float("-inf"), gl.float32, layout=out_layout), mask=rows < q_end)


# 12 warps (3 warpgroups) x 168 registers fill the register file; inside the specialised region the
# compiler's setmaxnreg gives the first consumer (default partition, 4 warps) 240 as well, since
# (240 + 240 + 24) x 128 = 168 x 384. Checked in the PTX; a sum over the file would deadlock.
_LAUNCH = {"num_warps": 4, "maxnreg": 168}


def pair_table(bias) -> tuple | None:
    """A padding bias table (``ops.Padding.bias``, ``[query padded][key padded]``) in the form the
    kernel takes it: per query kind (real, padded), a padded key's bias relative to a real key's
    (log2 units, -inf: never attended), then the real keys' bias (natural log; it only shifts the
    log-sum-exp; -inf: the row attends to nothing and outputs 0). None for a table where a query
    kind attends to padded keys only, which the kernel does not take."""
    relative, offset = [], []
    for real, padded in bias:
        if real == float("-inf") and padded != float("-inf"):
            return None
        relative.append(float("-inf") if real == float("-inf") else (padded - real) * _LOG2E)
        offset.append(real)
    return (*relative, *offset)


def pad_tail(tiles) -> bool:
    """Whether every partial tile of ``tiles`` (a ``TileGrid``) holds its patches in its first slots,
    so that its pad slots are the tail of its block: whole along cols, and along rows too unless a
    tile is one frame deep. The tiled launch then masks them as it masks a partial key tile, with no
    loads (PAD_TAIL); other ragged grids mask them as padded keys."""
    frames, rows, cols = tiles.grid
    size_t, size_h, size_w = tiles.tile
    return tiles.ragged and cols % size_w == 0 and (rows % size_h == 0 or size_t == 1)


def global_padding_only(padding, tiled, tail: bool, pair: bool) -> bool:
    """Whether a tile launch may check key padding on the global key tiles alone (``PAD_GLOBAL``):
    the caller says no image token is padded (``padding.global_only``), no pair table reads token
    kinds, and no pad slot sits in the key mask (they end their blocks, ``tail``, or there are none).
    HunyuanVideo's text mask under tile windows: no spills in the step."""
    return (tiled is not None and tiled.key_mask is not None and padding is not None and padding.global_only
            and not pair and (tail or tiled.slot_pad is None))


def key_mask_only(bias) -> bool:
    """Whether the table only keeps padded keys from being attended, every query alike (``ops.KEY_PADDING``),
    which the kernel runs without the pair table."""
    return all(row == (0.0, float("-inf")) for row in bias)


def view_coeffs(t: torch.Tensor):
    """(rows, cols, rb, rh, ch) of a 2-D TMA view of (B, S, H, D) ``t``, or None when none exists.

    Element (b, s, h, d) sits at row ``b*rb + h*rh + s``, column ``h*ch + d`` of a view whose row
    pitch is the sequence stride. Covers contiguous (B, S, H, D), slices of fused QKV projections
    and (B, H, S, D) transposes.
    """
    batch, seq, heads, dim = t.shape
    sb, ss, sh, sd = t.stride()
    elem = t.element_size()
    if sd != 1 or t.data_ptr() % 16 or (ss * elem) % 16 or ss < dim:
        return None
    rb = rh = ch = 0
    if batch > 1:
        if sb % ss:
            return None
        rb = sb // ss
    if heads > 1:
        if sh % ss == 0:
            rh = sh // ss
        elif (sh * elem) % 16 == 0 and (heads - 1) * sh + dim <= ss:
            ch = sh
        else:
            return None
    return (batch - 1) * rb + (heads - 1) * rh + seq, (heads - 1) * ch + dim, rb, rh, ch


# Grid tiles read in place: a (1, t, h, w, head dim) box in 128-byte swizzle, which lays the box's
# t*h*w patches out as the rows of a (128, head dim) tile (the copy's 64-column halves land where
# the 2-D tile's do).
_GRID_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=5)


@functools.lru_cache(maxsize=None)
def _smem_layout(rows: int, dim: int, dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for([rows, dim], gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def _descriptor(t, view, rows):
    n_rows, n_cols = view[:2]
    return TensorDescriptor(t, [n_rows, n_cols], [t.stride(1), 1], [rows, t.shape[-1]],
                            _smem_layout(rows, t.shape[-1], t.dtype))


def grid_view(t: torch.Tensor, grid: tuple) -> tuple | None:
    """(shape, strides) of the 5-D TMA view of (B, S, H, D) ``t``'s image, a ``grid`` of (frames,
    rows, cols) patches in raster order, from its first patch on: (outer, frames, rows, cols, heads x
    head dim). The outer step is the smaller nonzero of the 2-D view's batch and head row steps
    (:func:`view_coeffs`; the kernel's ``_outer_unit``), so batch b and head h sit at outer index
    (b*rb + h*rh) / unit. None where that is not whole or no 2-D view exists."""
    view = view_coeffs(t)
    if view is None:
        return None
    rows, cols, rb, rh, _ = view
    steps = [step for step in (rb, rh) if step]
    unit = min(steps, default=1)
    if any(step % unit for step in steps):
        return None
    frames, height, width = grid
    pitch = t.stride(1)
    outer = (rows - t.shape[1]) // unit + 1
    return [outer, frames, height, width, cols], [unit * pitch, height * width * pitch, width * pitch, pitch, 1]


def _grid_descriptor(t, tiles):
    shape, strides = grid_view(t, tiles.grid)
    return TensorDescriptor(t, shape, strides, [1, *tiles.tile, t.shape[-1]], _GRID_LAYOUT)


def _launch_plan(q, k, v, head_modes, image_start, image_len, out, return_lse, config, programs, global_rows, has_pad,
                 pair, tiles, tail, pad_global, ordered, pooled):
    """What a launch takes from the key alone: descriptor templates, integer arguments, grid, constexprs."""
    batch, seq, heads, dim = q.shape
    views = [view_coeffs(t) for t in (q, k, v)]
    rows = (TILE_ROWS, config["BLOCK_N"], config["BLOCK_N"])
    # Checked here once per key; they keep no tensor alive, each launch rebases them.
    templates = tuple(rebased(_descriptor(t, view, n), None) for t, view, n in zip((q, k, v), views, rows))
    if tiles is not None:  # the image's grid tiles, read in place
        templates += tuple(rebased(_grid_descriptor(t, tiles), None) for t in (q, k, v))
        seq += tiles.slots - tiles.tokens  # the tile order's length
    if pooled is not None:  # the patch means, keys then values, a slot per pool head
        templates += (rebased(_descriptor(pooled, view_coeffs(pooled), config["BLOCK_N"]), None),)
    grid_tokens, tile = ((1, 1, 1), (1, 1, 1)) if tiles is None else (tiles.grid, tiles.tile)
    ints = (head_modes.stride(0), *(c for view in views for c in view[2:]), 0 if pooled is None else pooled.shape[1],
            *out.stride(), batch, seq, heads,
            image_start, image_len, out.shape[1], *grid_tokens)
    after = seq - image_start - image_len
    n_items = heads * batch * sum(triton.cdiv(n, TILE_ROWS) for n in (image_start, after, image_len))
    grid = (programs or min(n_items, _num_sms(q.device.index)),)
    # 16-byte output rows: every row of a tile starts on a 16-byte boundary and its head dim is unit-stride.
    out_aligned = (out.stride(3) == 1 and out.data_ptr() % 16 == 0
                   and all(stride * out.element_size() % 16 == 0 for stride in out.stride()[:3]))
    constexprs = dict(HEADS_POW2=max(32, triton.next_power_of_2(heads)), HEAD_DIM=dim, RETURN_LSE=return_lse,
                      OUT_ALIGNED=out_aligned, GLOBAL_ROWS=global_rows, HAS_PAD=has_pad, PAIR=pair,
                      TILED=tiles is not None, PAD_TAIL=tail, TILE_T=tile[0], TILE_H=tile[1], TILE_W=tile[2],
                      PAD_GLOBAL=pad_global, ORDERED=ordered, POOL=pooled is not None, **config)
    return templates, ints, grid, constexprs


_plans: dict[tuple, tuple] = {}
_launches = DirectLaunches(_headwise_kernel)
_pair_biases: dict[tuple, torch.Tensor] = {}


def _pair_bias(table, device) -> torch.Tensor:
    """The pair table as the kernel reads it, one tensor per table and device, made once (a copy to
    the GPU per call would cost more)."""
    bias = _pair_biases.get((table, device))
    if bias is None:
        if torch.cuda.is_current_stream_capturing():  # a copy from the host cannot be captured
            raise RuntimeError(f"the Gluon kernel's first launch with the padding bias {table} cannot be inside CUDA "
                               "graph capture; call it once before capturing (warm-up)")
        bias = _pair_biases[(table, device)] = torch.tensor(table, dtype=torch.float32, device=device)
    return bias


def attention(q, k, v, head_modes, image_start, image_len, out, scale, return_lse, padding=None, *, tiled=None,
              lse=None, config=None, programs=None, global_rows=True, modes=None, pooled=None):
    """Launch the kernel; no host sync. Returns ``(out, lse or None)``.

    The caller has checked the inputs (CUDA sm_90, fp16/bf16, head dim 64 or 128, TMA views). The
    kernel takes global tokens (text, reference images) before and after the image ``[image_start,
    image_start + image_len)``, and key padding under any bias table that :func:`pair_table` takes
    (``ops.headwise_attention`` sends the others to the Triton kernel). Without ``tiled`` the launch
    runs every head but the tile heads; with it (``_tile_order.TiledKeys`` of this call: the key
    padding flags in tile order; keys and values are read in place) only the tile heads, in tile
    order, and ``lse`` (the plain launch's) is filled in. ``config`` is one of :func:`tile_configs`
    (default: the first). ``programs`` sets the number of programs (default: one per SM, or one per
    work item if fewer), so that small checks can make each program take many items.
    ``global_rows=False`` leaves the text-query rows of arrow and tile heads unwritten (not with
    ``return_lse``). ``modes``, the host values of ``head_modes`` where the caller knows them, let the
    tiled launch run each tile head's query tiles in the order of :func:`._item_order.order_table`
    (raster order without them, or on images); the order changes when a tile runs, not what it
    computes. ``pooled``, the plain launch's (2B, patches, slots, D) patch means of its pool heads
    (keys for batches [0, B), values for [B, 2B); ``ops``' dispatcher builds it), lets the modes name
    pool heads as ``POOL_FLAG | slot << POOL_SLOT_SHIFT | p``; those need every frame's rows and cols
    divisible by ``p`` (no loose tokens).
    """
    if not scale > 0:
        raise ValueError(f"the Gluon kernel needs a positive softmax scale; got {scale}")
    if pooled is not None and tiled is not None:
        raise ValueError("pool heads run in the plain launch: pass pooled without tiled")
    table = None
    if padding is not None and not key_mask_only(padding.bias):
        table = pair_table(padding.bias)
        if table is None:
            raise ValueError(f"the Gluon kernel does not take the padding bias {padding.bias}, under which a query "
                             "attends to padded keys only; use the Triton kernel")
    batch, seq, heads, dim = q.shape
    device = q.device.index
    if return_lse and lse is None:
        lse = torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device)
    if batch * seq * heads == 0:
        if lse is not None:
            lse.fill_(float("-inf"))
        return out, lse
    key_mask = None if padding is None else padding.mask
    flags = None
    tiles = None
    tail = False
    if tiled is not None:
        tiles = tiled.tiles
        key_mask = tiled.key_mask
        # Read in place, from an image view of whole outer steps (other strides: a copy first).
        q, k, v = (t if grid_view(t, tiles.grid) else t.contiguous() for t in (q, k, v))
        image_in_place = [t.narrow(1, image_start, tiles.tokens) for t in (q, k, v)]
        image_len = tiles.slots
        tail = pad_tail(tiles)
        if tiled.slot_pad is not None and not tail:  # pad slots are keys no query attends
            if table is not None:  # under any table: a kind of their own
                flags = key_mask.to(torch.uint8).masked_fill_(tiled.slot_pad, 2)
            key_mask = tiled.slot_pad.expand(batch, -1) if key_mask is None else key_mask | tiled.slot_pad
    if table is not None and flags is None:
        flags = key_mask.contiguous().view(torch.uint8)
    config = config or _DEFAULT_CONFIGS[dim]
    has_pad = key_mask is not None
    pad_global = global_padding_only(padding, tiled, tail, flags is not None)
    order = None if tiles is None or modes is None else order_table(modes, tiles, dim, q.element_size(), q.device)
    key = launch_key(q, k, v, out, head_modes, image_start, image_len, return_lse, config["BLOCK_N"],
                     config["K_STAGES"], config["V_STAGES"], programs, global_rows, has_pad,
                     None if flags is None else flags.data_ptr() % 16,
                     None if tiles is None else (tiles.grid, tiles.tile, out.shape[1]), pad_global, order is not None,
                     None if pooled is None else pooled.shape)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _launch_plan(q, k, v, head_modes, image_start, image_len, out, return_lse, config,
                                          programs, global_rows, has_pad, flags is not None, tiles, tail, pad_global,
                                          order is not None, pooled)
    templates, ints, grid, constexprs = plan
    bases = (q, k, v) if tiled is None else (q, k, v, *image_in_place)
    descs = [rebased(template, t) for template, t in zip(templates, bases)]
    if tiled is None:
        descs += [None] * 3
    descs.append(None if pooled is None else rebased(templates[-1], pooled))
    lse_arg = lse if lse is not None else out  # unused without RETURN_LSE
    # Unused without padding (or a pair table): the same pointer type in every such launch.
    pad = head_modes if key_mask is None else torch.nn.functional.pad(key_mask.cumsum(1, dtype=torch.int32), (1, 0))
    pair = (head_modes, head_modes) if flags is None else (flags, _pair_bias(table, q.device))
    with on_device(device):
        args = (*descs, out, lse_arg, head_modes, _counter(device), pad, *pair,
                head_modes if order is None else order, *ints, scale * _LOG2E)
        _launches(key, grid, args, constexprs, _LAUNCH)
    return out, lse


def compile_sm90(dtype=torch.bfloat16, config=None, return_lse=True, head_dim=128, global_rows=True, has_pad=False,
                 tile=None, pair=False, pad_tail=False, pad_global=False, ordered=False, pool=False):
    """Compile the kernel for sm_90 without a GPU (PTX and cubin via ptxas); returns the compiled kernel
    (``tile``: the tiled launch for that tile shape; ``pool``: the plain launch with pool heads read
    from a patch-mean buffer; ``pair``: padding under a pair table;
    ``pad_tail``: a ragged grid whose pad slots end each block; ``pad_global``: key padding among
    the global tokens only, with ``has_pad`` and ``tile``; ``ordered``: the tile heads' query tiles in
    the order of a table, with ``tile``).

    For checks and resource reports: ``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    config = config or tile_configs(head_dim)[0]
    elem = "bf16" if dtype == torch.bfloat16 else "fp16"
    block_n = config["BLOCK_N"]

    def desc(rows):
        return f"tensordesc<{elem}[{rows}, {head_dim}],{_smem_layout(rows, head_dim, dtype)!r}>"

    box = None if tile is None else ", ".join(map(str, (1, *tile, head_dim)))
    grid_desc = f"tensordesc<{elem}[{box}],{_GRID_LAYOUT!r}>"

    names = list(_headwise_kernel.arg_names)
    scalars = ["q_rb", "q_rh", "q_ch", "k_rb", "k_rh", "k_ch", "v_rb", "v_rh", "v_ch", "pool_rows", "sob", "sos", "soh",
               "batch", "seq_len", "num_heads", "image_start", "num_image", "out_seq", "grid_t", "grid_h", "grid_w",
               "s_modes"]
    signature = {"q_desc": desc(TILE_ROWS), "k_desc": desc(block_n), "v_desc": desc(block_n),
                 **({} if tile is None else dict.fromkeys(("q_img", "k_img", "v_img"), grid_desc)),
                 **({"pool_desc": desc(block_n)} if pool else {}),
                 "O": f"*{elem}", "LSE": "*fp32", "MODES": "*i32", "COUNTER": "*i32",
                 "PAD": "*i32", "FLAGS": "*u8" if pair else "*i32", "PAIR_BIAS": "*fp32" if pair else "*i32",
                 "ORDER": "*i32",
                 "qk_scale": "fp32",
                 **{name: "i32" for name in scalars}}
    # As launched on a contiguous output: the JIT turns the unit stride into a constant.
    constexprs = {"sod": 1, **({} if tile else dict.fromkeys(("q_img", "k_img", "v_img"))),
                  **({} if pool else {"pool_desc": None}), "HEADS_POW2": 32, "HEAD_DIM": head_dim,
                  "RETURN_LSE": return_lse, "OUT_ALIGNED": True, "POOL": pool,
                  "GLOBAL_ROWS": global_rows, "HAS_PAD": has_pad or pair, "PAIR": pair, "TILED": tile is not None,
                  "PAD_TAIL": pad_tail, "PAD_GLOBAL": pad_global, "ORDERED": ordered,
                  **dict(zip(("TILE_T", "TILE_H", "TILE_W"), tile or (1, 1, 1))), **config}
    signature.update({name: "constexpr" for name in constexprs})
    signature = {name: signature[name] for name in names}
    constexprs = {(names.index(name),): value for name, value in constexprs.items()}
    # The alignment the JIT sees on a contiguous launch: 16-byte pointers, output strides of 16k.
    aligned = ("O", "LSE", "MODES", "COUNTER", "PAD", "FLAGS", "PAIR_BIAS", "ORDER", "sob", "sos", "soh")
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = GluonASTSource(_headwise_kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(_LAUNCH))
