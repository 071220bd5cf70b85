"""The order in which the Gluon kernel's tiled launch runs a tile head's query tiles.

Each query tile of a tile window reads the keys and values of its window's box of grid tiles,
frame by frame, and the programs running at once share them through the L2. Hopper's L2 is two
partitions, each caching what the SMs beside it read, so keys and values that every SM reads are
held twice: at most half the L2 serves them. Where a head's box at the grid's centre holds more
than that, tiles stay in the L2 only while the programs walk their boxes in step, and in raster
order they soon fall out of step: the boxes of neighbouring tiles differ in size by up to 2.5x at
the grid's edges. Running the largest boxes first keeps the items running at once of one length,
so in step. Smaller boxes keep the frame order (what runs at once shares frames), the largest
boxes of each frame-tile first.

Measured on an H200 at 720p in 1 x 8 x 16 tiles, graph replay, share of the ideal against raster
order (docs/history/KERNEL_NOTES.md): the largest first at HunyuanVideo's (16, 3, 2) 92.0-93.0%
against 88.8-89.4%, Wan's (16, 2, 2) 97.8-98.0% against 91.2-91.7%; on a grid kept out of the
choice of this rule (32 x 48 x 80 in 2 x 8 x 8 tiles) 95.9% against 89.5% at (7, 5, 4). One window
measured below raster order: HunyuanVideo's (12, 2, 2), 91.1-91.9% against 91.5-91.8%.

The order is a permutation of each head's grid tiles: it changes when a query tile runs, not what
it computes (outputs bit for bit equal).
"""

from __future__ import annotations

import functools

import torch

from .._geometry import IMAGE_BLOCK, TileGrid, is_tile_mode, tile_window


def _extents(half: int, count: int, device) -> torch.Tensor:
    """(count,) the grid tiles a window of half-width ``half`` spans along one axis, at each tile."""
    at = torch.arange(count, device=device)
    return (at + half + 1).clamp(max=count) - (at - half).clamp(min=0)


@functools.lru_cache(maxsize=256)
def head_order(window: tuple[int, int, int], counts: tuple[int, int, int], kv_tile_bytes: int, shared_bytes: int,
               device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """(tiles,) int32 on ``device``: a head's grid tiles (raster indices) in the order the tiled
    launch runs them, made there (no copy from the host, so no sync) once per window and grid.

    ``window`` the half-widths (wt, wh, ww); ``counts`` the tiles along frames, rows and cols;
    ``kv_tile_bytes`` the keys and values of one grid tile; ``shared_bytes`` the L2 that keys and
    values read by every SM can use. Largest box first (ties in raster order) where the box at the
    grid's centre outgrows ``shared_bytes``, else frame-tile by frame-tile, the largest boxes of
    each first.
    """
    frames, rows, cols = (_extents(half, count, device) for half, count in zip(window, counts))
    area = (rows[:, None] * cols[None, :]).flatten().repeat(counts[0])  # per tile, raster order
    frame = torch.arange(counts[0], device=device).repeat_interleave(counts[1] * counts[2])
    # The centre's extents, on the host (reading them off the device would sync).
    widest = [min(2 * half + 1, count) for half, count in zip(window, counts)]
    largest_area = widest[1] * widest[2]
    if widest[0] * largest_area * kv_tile_bytes > shared_bytes:
        key = -(frames[frame] * area)
    else:
        key = frame * (largest_area + 1) - area
    return torch.argsort(key, stable=True).to(torch.int32)


@functools.lru_cache(maxsize=16)
def _shared_l2_bytes(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).L2_cache_size // 2


def order_table(values: tuple[int, ...], tiles: TileGrid, head_dim: int, element_size: int,
                device: torch.device, shared_bytes: int | None = None) -> torch.Tensor | None:
    """(heads, tiles) int32 on ``device``: row h is head h's grid tiles in run order
    (:func:`head_order`; rows of heads that are no tile windows are never read). ``values`` are the
    host head modes; ``shared_bytes`` by default half the device's L2. None for a grid one
    frame-tile deep: images keep raster order, as they were measured (the order was measured on
    video)."""
    if tiles.counts[0] == 1:
        return None
    kv_tile_bytes = 2 * IMAGE_BLOCK * head_dim * element_size
    device = torch.device(device)
    if shared_bytes is None:
        shared_bytes = _shared_l2_bytes(torch.cuda.current_device() if device.index is None else device.index)
    return _stacked(tuple(values), tiles.counts, kv_tile_bytes, shared_bytes, device)


@functools.lru_cache(maxsize=256)
def _stacked(values: tuple[int, ...], counts: tuple[int, int, int], kv_tile_bytes: int, shared_bytes: int,
             device: torch.device) -> torch.Tensor:
    # Once per set of head modes, not per call: a call's host work stays one lookup, no loop over heads.
    # Heads that are no tile windows do not run in the tiled launch: any row will do.
    return torch.stack([head_order(tile_window(mode) if is_tile_mode(mode) else (0, 0, 0), counts, kv_tile_bytes,
                                   shared_bytes, device) for mode in values])
