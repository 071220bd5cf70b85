"""Keys and values in tile order: the one reordering the GPU kernels' tile windows run on.

The image segment of a gridded layout is laid out tile by tile (tiles in raster order of their
coordinates, patches inside a tile in raster order), each tile in one ``IMAGE_BLOCK`` of slots;
the slots a partial tile leaves are pad slots, which copy an arbitrary image token and which the
kernel masks as keys. Global tokens keep their places before and after the image. So a tile
window's keys are whole blocks in (2wt+1)(2wh+1) contiguous runs. The Triton kernel reads keys,
values and the key padding flags reordered; each query tile is read, and its output written, once,
straight at its raster rows (the kernel computes them from the grid), which saves copying q and the
output. The Gluon kernel reads every grid tile in place (a 5-D box of the grid by TMA), so only
the padding flags are reordered for it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .._geometry import IMAGE_BLOCK, TileGrid
from ..model import TokenLayout


class TiledKeys(NamedTuple):
    """``k`` and ``v`` as (B, S', H, D) in tile order (None for a kernel that reads them in place), S' =
    global tokens + ``tiles.slots``; ``key_mask``
    the key padding flags (B, S') in the same order, or None; ``order`` the (S',) sequence index each
    position copies (:func:`slot_order`), for a kernel that reads queries in tile order too;
    ``slot_pad`` the (S',) flags of the pad slots (:func:`pad_slots`), None when every tile is whole."""

    k: torch.Tensor | None
    v: torch.Tensor | None
    key_mask: torch.Tensor | None
    tiles: TileGrid
    order: torch.Tensor
    slot_pad: torch.Tensor | None


@functools.lru_cache(maxsize=64)
def slot_order(layout: TokenLayout, device: torch.device) -> torch.Tensor:
    """(S',) int64: the sequence index each position of the tile-ordered sequence copies."""
    tiles = layout.tile_grid()
    slot = torch.arange(tiles.slots, device=device)
    tile, offset = slot // IMAGE_BLOCK, slot % IMAGE_BLOCK
    _, count_h, count_w = tiles.counts
    size_t, size_h, size_w = tiles.tile
    frame = tile // (count_h * count_w) * size_t + offset // (size_h * size_w)
    row = tile // count_w % count_h * size_h + offset // size_w % size_h
    col = tile % count_w * size_w + offset % size_w
    frames, height, width = tiles.grid
    inside = (frame < frames) & (row < height) & (col < width)
    # Pad slots copy the first image token: any token would do, the kernel never attends them.
    image = layout.image_start + torch.where(inside, (frame * height + row) * width + col, 0)
    everything = torch.arange(layout.seq_len, device=device)
    return torch.cat([everything[: layout.image_start], image, everything[layout.image_end :]])


@functools.lru_cache(maxsize=64)
def pad_slots(layout: TokenLayout, device: torch.device) -> torch.Tensor:
    """(S',) bool: the positions of the tile-ordered sequence that are pad slots of partial tiles."""
    order = slot_order(layout, device)
    position = torch.arange(len(order), device=device)
    # Pad slots copy the first image token, whose own slot is the image's first position.
    return (order == layout.image_start) & (position != layout.image_start)


def tiled_keys(k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, layout: TokenLayout,
               gather: bool = True) -> TiledKeys:
    """``k``, ``v`` (unless not ``gather``) and the key padding flags of one call in tile order (one
    gather each)."""
    order = slot_order(layout, k.device)
    mask = None if key_mask is None else key_mask.index_select(1, order)
    tiles = layout.tile_grid()
    slot_pad = pad_slots(layout, k.device) if tiles.ragged else None
    if not gather:
        return TiledKeys(None, None, mask, tiles, order, slot_pad)
    return TiledKeys(k.index_select(1, order), v.index_select(1, order), mask, tiles, order, slot_pad)
