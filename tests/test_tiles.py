"""Tile windows: geometry, method names, the reference op against the dense oracle, the op's checks,
the reorder into tile order, and tile plans through the runtime (the kernel: test_tiles_triton.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import flux_pipeline, run_pipeline
from test_families import MiniPipeline, generate
from test_runtime import find, with_methods
from test_video_families import FAMILIES as VIDEO_FAMILIES
from test_video_families import GRID as VIDEO_GRID

import ditfastattn
from ditfastattn import Plan, ops
from ditfastattn._geometry import (
    IMAGE_BLOCK, MAX_TILE_WINDOW, MODE_FULL, MODE_SKIP, TILE_FLAG, TileGrid, default_tile, density, is_tile_mode,
    kept_pairs, tile_mode, tile_window,
)
from ditfastattn.methods import parse_method
from ditfastattn.model import TokenLayout, token_layout
from ditfastattn.ops._dense import dense_attention, head_mask
from ditfastattn.ops._item_order import head_order, order_table
from ditfastattn.ops._tile_order import pad_slots, slot_order, tiled_keys
from ditfastattn.runtime import Session

# (grid, tile, global tokens before the image, after it): ragged on every axis, on some, on none;
# a grid smaller than one tile; text before, after, both, none.
LAYOUTS = [
    ((3, 5, 7), (2, 8, 8), 5, 9),
    ((1, 13, 11), (1, 8, 16), 7, 0),
    ((5, 12, 20), (2, 8, 8), 0, 33),
    ((4, 9, 10), (4, 4, 8), 0, 0),
    ((2, 16, 16), (2, 8, 8), 3, 0),
    ((2, 9, 17), (1, 8, 16), 20, 20),
]


def layout_of(grid, tile, before, after) -> TokenLayout:
    image = math.prod(grid)
    return TokenLayout(before + image + after, before, image, grid, tile)


def windows_for(tiles: TileGrid) -> list[int]:
    """Tile modes from the query's own tile to wider than the grid, each axis in turn."""
    largest = tuple(n for n in tiles.counts)
    return [tile_mode(0, 0, 0), tile_mode(1, 0, 0), tile_mode(0, 1, 0), tile_mode(0, 0, 1), tile_mode(1, 1, 1),
            tile_mode(*largest)]


# --- geometry ---------------------------------------------------------------------------------

def test_tile_modes_pack_three_half_widths_apart_from_every_other_mode():
    for half in [(0, 0, 0), (1, 2, 3), (MAX_TILE_WINDOW, 0, 7), (MAX_TILE_WINDOW,) * 3]:
        mode = tile_mode(*half)
        assert is_tile_mode(mode) and tile_window(mode) == half and mode < 2**31  # fits int32
    for other in (MODE_SKIP, MODE_FULL, 0, 1, 1000, TILE_FLAG - 1):
        assert not is_tile_mode(other)
        with pytest.raises(ValueError, match="not a tile window"):
            tile_window(other)
    for bad in [(-1, 0, 0), (0, MAX_TILE_WINDOW + 1, 0), (0, 0, 1.0), (True, 0, 0)]:
        with pytest.raises(ValueError, match="tile half-widths must be ints"):
            tile_mode(*bad)


@pytest.mark.parametrize("grid,tile,before,after", LAYOUTS)
def test_kept_pairs_count_the_tile_mask(grid, tile, before, after):
    layout = layout_of(grid, tile, before, after)
    tiles = layout.tile_grid()
    text = before + after
    for mode in windows_for(tiles) + [MODE_FULL, MODE_SKIP, 0, 2]:
        counted = 0 if mode == MODE_SKIP else int(head_mask(mode, layout).sum())
        assert kept_pairs(mode, layout.image_len, text, tiles) == counted, mode
        assert density(mode, layout.image_len, text, tiles) == pytest.approx(counted / layout.seq_len**2)
    # A window wider than the grid keeps every pair.
    assert kept_pairs(windows_for(tiles)[-1], layout.image_len, text, tiles) == layout.seq_len**2


def test_tile_grids_count_partial_tiles_and_map_fractions_to_half_widths():
    hunyuan = TileGrid((33, 45, 80), (2, 8, 8))
    assert hunyuan.counts == (17, 6, 10) and hunyuan.ragged and hunyuan.slots == 1020 * IMAGE_BLOCK
    assert hunyuan.windows((0, 0, 0)) == (0, 0, 0)
    assert hunyuan.windows((1, 1, 1)) == (16, 5, 9)  # every tile of every axis, from any query
    assert hunyuan.windows((0.5, 0.5, 0.5)) == (8, 3, 5)  # nearest, ties up: 2.5 -> 3, 4.5 -> 5
    assert not TileGrid((2, 16, 32), (2, 8, 8)).ragged
    # The fewest pad slots, 2 x 8 x 8 first for video and 1 x 8 x 16 for one frame on ties.
    assert default_tile((8, 16, 16)) == (2, 8, 8) and default_tile((1, 64, 64)) == (1, 8, 16)
    assert default_tile((2, 45, 80)) == (2, 8, 8) and default_tile((4, 8, 12)) == (2, 8, 8)
    assert default_tile((21, 45, 80)) == (1, 8, 16) and default_tile((33, 45, 80)) == (1, 8, 16)
    assert default_tile((3, 32, 40)) == (1, 16, 8) and default_tile((1, 32, 40)) == (1, 16, 8)
    assert ops.TileGrid((33, 45, 80)).tile == (1, 8, 16) and ops.TileGrid((1, 64, 64)).tile == (1, 8, 16)
    with pytest.raises(ValueError, match="must hold 128 patches"):
        TileGrid((4, 4, 4), (2, 4, 4))
    with pytest.raises(ValueError, match="3 positive ints"):
        TileGrid((0, 4, 4), (2, 8, 8))
    with pytest.raises(ValueError, match="needs the grid"):
        kept_pairs(tile_mode(0, 0, 0), 100, 0)


def test_layouts_check_their_grid():
    assert TokenLayout(20 + 105, 20, 105, (3, 5, 7)).tile_grid() == TileGrid((3, 5, 7), (2, 8, 8))
    assert TokenLayout(105, 0, 105).tile_grid() is None
    with pytest.raises(ValueError, match=r"holds 104 patches; the image segment has 105"):
        TokenLayout(105, 0, 105, (2, 4, 13))
    with pytest.raises(ValueError, match="a tile shape needs the image grid"):
        TokenLayout(105, 0, 105, None, (2, 8, 8))
    with pytest.raises(ValueError, match="must hold 128"):
        TokenLayout(105, 0, 105, (3, 5, 7), (1, 8, 8))


def test_the_adapters_layouts_are_built_once_per_shape_and_checked():
    layout = token_layout(20 + 105, 20, 105, [3, 5, 7])  # a grid as a list, as shapes give it
    assert layout == TokenLayout(20 + 105, 20, 105, (3, 5, 7)) and token_layout(125, 20, 105, (3, 5, 7)) is layout
    assert token_layout(125, 20, 105) == TokenLayout(125, 20, 105) != layout
    for _ in range(2):  # a refused shape stays refused
        with pytest.raises(ValueError, match=r"holds 104 patches; the image segment has 105"):
            token_layout(105, 0, 105, (2, 4, 13))


def test_tile_methods_parse_name_and_cost():
    method = parse_method(" tile:0.5,0,1 ")
    assert method.kind == "tile" and method.window == (0.5, 0.0, 1.0) and method.name == "tile:0.5,0,1"
    assert parse_method(method.name) == method and method.computes
    tiles = TileGrid((9, 20, 30), (2, 8, 8))  # counts (5, 3, 4)
    assert method.mode(5400, tiles) == tile_mode(2, 0, 3)
    assert method.cost(5400, 77, tiles) == density(tile_mode(2, 0, 3), 5400, 77, tiles)
    with pytest.raises(ValueError, match="needs the image grid"):
        method.mode(5400)
    for bad in ("tile:1.5,0,0", "tile:0.5,0", "tile:-0.1,0,0", "tile:a,0,0", "cfg_share+tile:0,0,0"):
        with pytest.raises(ValueError, match="unknown method"):
            parse_method(bad)


# --- the reference against the dense oracle ---------------------------------------------------

def _qkv(batch, seq, heads, dim=16, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, seq, heads, dim, generator=gen) * 1.5).to(dtype) for _ in range(3)]


def _assert_matches_oracle(q, k, v, modes, layout, padding=None):
    modes_t = torch.tensor(modes, dtype=torch.int32)
    out = torch.full_like(q, 1234.5)
    got, lse = ops.headwise_attention(q, k, v, modes_t, segments=layout, key_padding=padding, out=out,
                                      impl="reference", return_lse=True)
    want, want_lse = dense_attention(q, k, v, modes, layout, padding)
    kept = modes_t != MODE_SKIP
    assert bool((got[:, :, ~kept] == 1234.5).all()), "skip heads written"
    torch.testing.assert_close(got[:, :, kept], want, atol=1e-10, rtol=1e-10)
    assert torch.equal(torch.isneginf(lse[:, kept]), torch.isneginf(want_lse))
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[:, kept][finite], want_lse[finite].float(), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("grid,tile,before,after", LAYOUTS)
def test_reference_matches_the_dense_oracle(grid, tile, before, after):
    layout = layout_of(grid, tile, before, after)
    modes = windows_for(layout.tile_grid()) + [MODE_FULL, MODE_SKIP, 1]  # band heads in the same call
    q, k, v = _qkv(2, layout.seq_len, len(modes), seed=sum(grid))
    _assert_matches_oracle(q, k, v, modes, layout)


@pytest.mark.parametrize("table", [ops.KEY_PADDING, ops.PAIR_PADDING, ((1.0, 0.0), (0.0, 0.0))])
def test_reference_with_padding_matches_the_dense_oracle(table):
    layout = layout_of((3, 10, 12), (2, 8, 8), 12, 4)
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(2, layout.seq_len, generator=gen) < 0.3
    mask[1, : layout.image_start + 200] = True  # whole tiles padded, and tile rows that keep no key
    modes = [tile_mode(0, 0, 0), tile_mode(1, 0, 1), MODE_FULL, 0]
    q, k, v = _qkv(2, layout.seq_len, len(modes), seed=4)
    _assert_matches_oracle(q, k, v, modes, layout, ops.Padding(mask, table))


def test_a_window_over_the_whole_grid_is_full_attention():
    layout = layout_of((3, 10, 12), (2, 8, 8), 9, 0)
    q, k, v = (t.expand(-1, -1, 2, -1) for t in _qkv(1, layout.seq_len, 1))  # one head's inputs, twice
    modes = torch.tensor([tile_mode(*layout.tile_grid().counts), MODE_FULL], dtype=torch.int32)
    out = ops.headwise_attention(q, k, v, modes, segments=layout)
    torch.testing.assert_close(out[:, :, 0], out[:, :, 1], atol=1e-12, rtol=1e-12)


# --- the op's checks ------------------------------------------------------------------------

def test_grid_is_given_once_and_tile_modes_need_one():
    q, k, v = _qkv(1, 10 + 105, 2)
    modes = torch.tensor([tile_mode(0, 0, 0), MODE_FULL], dtype=torch.int32)
    text = {"text_start": 0, "text_len": 10}
    with pytest.raises(ValueError, match=r"heads \[0\] run tile windows, which need the image grid: pass grid="):
        ops.headwise_attention(q, k, v, modes, **text)
    with pytest.raises(ValueError, match=r"the grid \(3, 5, 6\) holds 90 patches; the image segment has 105"):
        ops.headwise_attention(q, k, v, modes, **text, grid=(3, 5, 6))
    with pytest.raises(ValueError, match="give the grid once"):
        ops.headwise_attention(q, k, v, modes, segments=TokenLayout(115, 10, 105, (3, 5, 7)), grid=(3, 5, 7))
    with pytest.raises(ValueError, match="tile= needs the image grid"):
        ops.headwise_attention(q, k, v, modes, **text, tile=(2, 8, 8))
    with pytest.raises(ValueError, match="must hold 128"):
        ops.headwise_attention(q, k, v, modes, **text, grid=(3, 5, 7), tile=(2, 4, 4))
    by_keyword = ops.headwise_attention(q, k, v, modes, **text, grid=(3, 5, 7), tile=(1, 8, 16))
    by_layout = ops.headwise_attention(q, k, v, modes, segments=TokenLayout(115, 10, 105, (3, 5, 7), (1, 8, 16)))
    assert torch.equal(by_keyword, by_layout)
    # Band, full and skip heads ignore the grid.
    bands = torch.tensor([1, MODE_FULL], dtype=torch.int32)
    assert torch.equal(ops.headwise_attention(q, k, v, bands, **text, grid=(3, 5, 7)),
                       ops.headwise_attention(q, k, v, bands, **text))


def test_gluon_runs_tile_heads_in_a_tiled_launch_and_the_rest_in_the_plain_one(monkeypatch):
    # On this CPU the device is the first reason the Gluon kernel cannot run: without it, the op's
    # launches are recorded instead of run.
    from ditfastattn.ops import _gluon

    monkeypatch.setattr(ops, "_gluon_unsupported", lambda q, k, v: None)
    calls = []

    def record(q, k, v, head_modes, image_start, image_len, out, scale, return_lse, padding=None, **options):
        calls.append({**options, "padding": padding})
        return out, options.get("lse")

    monkeypatch.setattr(_gluon, "attention", record)
    layout = layout_of((3, 5, 7), (2, 8, 8), 5, 9)
    q, k, v = _qkv(1, layout.seq_len, 3, dtype=torch.bfloat16)
    mixed = torch.tensor([tile_mode(0, 0, 0), MODE_FULL, MODE_SKIP], dtype=torch.int32)
    ops.headwise_attention(q, k, v, mixed, segments=layout, out=torch.empty_like(q), impl="gluon")
    assert [("tiled" in c) for c in calls] == [False, True]
    # The tiled launch gets the host modes, by which it orders each tile head's query tiles.
    assert "modes" not in calls[0] and calls[1]["modes"] == tuple(mixed.tolist())
    keys = calls[1]["tiled"]
    # The Gluon kernel reads keys and values in place: nothing is gathered for it.
    assert torch.equal(keys.order, slot_order(layout, torch.device("cpu"))) and keys.k is None and keys.v is None
    calls.clear()
    only_tiles = torch.tensor([tile_mode(0, 0, 0), tile_mode(1, 1, 1), tile_mode(0, 0, 0)], dtype=torch.int32)
    ops.headwise_attention(q, k, v, only_tiles, segments=layout, impl="gluon")
    assert [("tiled" in c) for c in calls] == [True]
    # A pair table reaches both launches, whose keys carry the token flags in tile order.
    calls.clear()
    mask = torch.zeros(1, layout.seq_len, dtype=torch.bool)
    mask[0, :3] = True
    pair = ops.Padding(mask, ops.PAIR_PADDING)
    ops.headwise_attention(q, k, v, mixed, segments=layout, key_padding=pair, out=torch.empty_like(q), impl="gluon")
    assert [("tiled" in c) for c in calls] == [False, True]
    assert all(c["padding"].bias == ops.PAIR_PADDING and torch.equal(c["padding"].mask, mask) for c in calls)
    assert torch.equal(calls[1]["tiled"].key_mask, mask[:, keys.order])


def _box_tiles(at, window, counts) -> int:
    """The grid tiles within ``window`` of tile ``at``, counted one by one."""
    return sum(all(abs(x - a) <= w for x, a, w in zip(other, at, window))
               for other in itertools.product(*(range(n) for n in counts)))


@pytest.mark.parametrize("window,counts", [((16, 3, 2), (33, 6, 5)), ((10, 2, 1), (33, 6, 5)),
                                           ((0, 1, 1), (1, 16, 8)), ((2, 0, 3), (4, 3, 7))])
@pytest.mark.parametrize("shared_bytes", [0, 2**62])
def test_tile_heads_run_their_largest_boxes_first_or_frame_by_frame(window, counts, shared_bytes):
    kv_tile_bytes = 2 * IMAGE_BLOCK * 128 * 2
    # Largest first only where the centre box outgrows the shared L2 (none, or all the memory there is).
    longest_first = shared_bytes == 0
    order = head_order(window, counts, kv_tile_bytes, shared_bytes).tolist()
    assert sorted(order) == list(range(math.prod(counts)))  # every query tile once
    at = list(itertools.product(*(range(n) for n in counts)))  # raster order
    sizes = [_box_tiles(at[tile], window, counts) for tile in order]
    frames = [at[tile][0] for tile in order]
    if longest_first:
        runs = [(-size, tile) for size, tile in zip(sizes, order)]
    else:
        runs = [(frame, -size, tile) for frame, size, tile in zip(frames, sizes, order)]
    assert runs == sorted(runs)  # ties in raster order


def test_the_tile_order_turns_longest_first_where_the_centre_box_outgrows_the_shared_l2():
    kv_tile_bytes = 2 * IMAGE_BLOCK * 128 * 2
    centre = 33 * 6 * 5 * kv_tile_bytes  # HunyuanVideo's 720p grid in 1 x 8 x 16 tiles, window (16, 3, 2)
    by_frames = head_order((16, 3, 2), (33, 6, 5), kv_tile_bytes, centre)
    longest = head_order((16, 3, 2), (33, 6, 5), kv_tile_bytes, centre - 1)
    assert by_frames[0] == 2 * 5 + 2 and longest[0] == 16 * 30 + 2 * 5 + 2  # frame 0's centre tile, the grid's
    tiles = TileGrid((33, 45, 80))
    values = (tile_mode(16, 3, 2), MODE_FULL, tile_mode(16, 3, 2), tile_mode(1, 0, 0))
    table = order_table(values, tiles, 128, 2, torch.device("cpu"), shared_bytes=centre - 1)
    assert table.shape == (4, tiles.num_tiles) and table.dtype == torch.int32
    assert torch.equal(table[0], longest) and torch.equal(table[2], table[0])
    assert torch.equal(table[3], head_order((1, 0, 0), tiles.counts, kv_tile_bytes, centre - 1))
    # Images (one frame-tile deep) keep raster order: no table.
    assert order_table(values, TileGrid((1, 128, 128)), 128, 2, torch.device("cpu"), shared_bytes=0) is None


@pytest.mark.parametrize("grid,tile,before,after", LAYOUTS)
def test_pad_slots_are_the_slots_that_partial_tiles_leave(grid, tile, before, after):
    layout = layout_of(grid, tile, before, after)
    tiles = layout.tile_grid()
    flags = pad_slots(layout, torch.device("cpu"))
    assert int(flags.sum()) == tiles.slots - layout.image_len
    # Every token keeps a slot of its own; the pad slots are the others.
    order = slot_order(layout, torch.device("cpu"))
    assert sorted(order[~flags].tolist()) == list(range(layout.seq_len))
    keys = tiled_keys(*_qkv(1, layout.seq_len, 1)[1:], None, layout)
    assert (keys.slot_pad is None) == (not tiles.ragged)
    if tiles.ragged:
        assert torch.equal(keys.slot_pad, flags)


# Ragged grids whose partial tiles hold their patches in their first slots (whole along cols; along
# rows too unless a tile is one frame deep), and two whose pad slots do not end their blocks.
TAIL_GRIDS = [((3, 45, 80), (1, 8, 16), True), ((1, 5, 32), (1, 8, 16), True), ((5, 16, 24), (2, 8, 8), True),
              ((3, 8, 8), (2, 8, 8), True), ((33, 45, 80), (2, 8, 8), False), ((1, 13, 11), (1, 8, 16), False)]


@pytest.mark.parametrize("grid,tile,tail", TAIL_GRIDS)
def test_pad_slots_that_end_each_block_follow_from_the_run(grid, tile, tail):
    # Where _gluon.pad_tail holds, the Gluon tiled launch takes each image key tile's valid slots
    # from its run in the window's box (the row-tile and frame-tile it lies in, from the item's box
    # bounds), as _work and _key_tile compute them, and masks the rest like a partial key tile.
    # That count must be the tile's leading non-pad slots, with only pad slots after them, for
    # every window and query tile.
    from ditfastattn.ops import _gluon

    layout = layout_of(grid, tile, 0, 0)
    tiles = layout.tile_grid()
    assert _gluon.pad_tail(tiles) == tail
    if not tail:
        return
    pad = pad_slots(layout, torch.device("cpu")).view(-1, IMAGE_BLOCK)
    n_t, n_h, n_w = tiles.counts
    frames = grid[0] - (n_t - 1) * tile[0]
    rows = grid[1] - (n_h - 1) * tile[1]
    for mode in windows_for(tiles):
        wt, wh, ww = tile_window(mode)
        for query in range(n_t * n_h * n_w):
            at = (query // (n_h * n_w), query // n_w % n_h, query % n_w)
            (a_lo, a_end), (b_lo, b_end), (c_lo, c_end) = (
                (max(0, c - w), min(n, c + w + 1)) for c, w, n in zip(at, (wt, wh, ww), (n_t, n_h, n_w)))
            runs_b, per_run = b_end - b_lo, c_end - c_lo
            tail_run = (n_t - 1 - a_lo) * runs_b if a_end == n_t else 1 << 30
            tail_row = n_h - 1 - b_lo if b_end == n_h else -1
            start = (a_lo * n_h + b_lo) * n_w + c_lo
            for i in range((a_end - a_lo) * runs_b * per_run):
                run, row = i // per_run, i // per_run % runs_b
                block = start + ((run // runs_b) * n_h + row) * n_w + i - run * per_run
                valid = (rows if row == tail_row else tile[1]) * tile[2]
                if tile[0] > 1:
                    valid *= frames if run >= tail_run else tile[0]
                assert not pad[block, :valid].any() and pad[block, valid:].all(), (mode, query, i)


def _box(view: torch.Tensor, at: tuple, box: tuple) -> torch.Tensor:
    """A TMA box read of ``box`` elements at ``at`` from ``view``: zeros past its bounds, as (rows, cols)."""
    out = torch.zeros(box, dtype=view.dtype)
    inside = tuple(slice(0, max(0, min(b, n - a))) for a, b, n in zip(at, box, view.shape))
    out[inside] = view[tuple(slice(a, a + s.stop) for a, s in zip(at, inside))]
    return out.reshape(-1, box[-1])


# (batch, seq, heads, dim) -> the tensor the op gets: contiguous; heads outermost (a transpose);
# a slice of a fused QKV projection.
TENSOR_LAYOUTS = {
    "bshd": lambda b, s, h, d: torch.randn(b, s, h, d),
    "bhsd": lambda b, s, h, d: torch.randn(b, h, s, d).transpose(1, 2),
    "fused": lambda b, s, h, d: torch.randn(b, s, 3, h, d)[:, :, 1],
}


@pytest.mark.parametrize("grid,tile,before,after", LAYOUTS)
@pytest.mark.parametrize("tensor_layout", list(TENSOR_LAYOUTS))
@pytest.mark.parametrize("batch", [1, 2])
def test_gluon_reads_each_tile_in_place_where_the_tile_order_has_it(grid, tile, before, after, tensor_layout, batch):
    # The Gluon tiled launch gathers nothing: its producer reads a grid tile as one box of a 5-D view
    # of the image (grid_view; outer index by _outer_unit) and a global tile at its row of the call's
    # sequence. Mirrored here as _work and the producer compute them (packed grid tiles included), each
    # tile it reads must be the tile-order block the consumers take it for: the gathered tensor's
    # block at _key_tile's position, with zeros in the pad slots.
    from ditfastattn.ops import _gluon

    layout = layout_of(grid, tile, before, after)
    tiles = layout.tile_grid()
    heads, dim = 3, 64
    t = TENSOR_LAYOUTS[tensor_layout](batch, layout.seq_len, heads, dim)
    rows, cols, rb, rh, ch = _gluon.view_coeffs(t)
    shape, strides = _gluon.grid_view(t, grid)
    image = torch.as_strided(t, shape, strides, t.storage_offset() + before * t.stride(1))
    flat = torch.as_strided(t, (rows, cols), (t.stride(1), 1))  # the 2-D view of the global tiles
    unit = max(min([s for s in (rb, rh) if s], default=1), 1)
    gathered = t[:, slot_order(layout, torch.device("cpu"))]
    pad = pad_slots(layout, torch.device("cpu"))
    n_t, n_h, n_w = tiles.counts
    limits = _gluon.TILE_COUNT_LIMITS
    assert all(n < limit for n, limit in zip(tiles.counts, limits))

    def pack(a, b, c):
        return a << 20 | b << 10 | c

    def read(b, h, row, packed):  # _place, then _copy_in_place
        if packed < 0:
            return flat[b * rb + h * rh + row: b * rb + h * rh + row + IMAGE_BLOCK, h * ch: h * ch + dim]
        a, r, c = packed >> 20, packed >> 10 & 1023, packed & 1023
        at = ((b * rb + h * rh) // unit, a * tile[0], r * tile[1], c * tile[2], h * ch)
        return _box(image, at, (1, *tile, dim))

    def expect(b, h, pos):
        block = gathered[b, pos: pos + IMAGE_BLOCK, h].clone()
        block[pad[pos: pos + IMAGE_BLOCK]] = 0
        return block

    after_start = before + tiles.slots
    n_before = -(-before // IMAGE_BLOCK)
    n_global = n_before + -(-after // IMAGE_BLOCK)
    for b in range(batch):
        for h in (0, heads - 1):
            # Query tiles: global ones at their rows (those after the image back by the pad slots).
            # (Rows past a global segment's end are never stored nor attended.)
            for q_start in list(range(0, before, IMAGE_BLOCK)) + list(range(after_start, layout.seq_len, IMAGE_BLOCK)):
                q_row = q_start - tiles.slots + layout.image_len if q_start >= after_start else q_start
                end = before if q_start < before else gathered.shape[1]
                want = gathered[b, q_start: min(q_start + IMAGE_BLOCK, end), h]
                assert torch.equal(read(b, h, q_row, -1)[: len(want)], want)
            for mode in windows_for(tiles)[::2]:
                wt, wh, ww = tile_window(mode)
                for query in range(tiles.num_tiles):
                    at = (query // (n_h * n_w), query // n_w % n_h, query % n_w)
                    assert torch.equal(read(b, h, 0, pack(*at)), expect(b, h, before + query * IMAGE_BLOCK))
                    (a_lo, a_end), (b_lo, b_end), (c_lo, c_end) = (
                        (max(0, i - w), min(n, i + w + 1)) for i, w, n in zip(at, (wt, wh, ww), tiles.counts))
                    runs_b, per_run = b_end - b_lo, c_end - c_lo
                    start = before + ((a_lo * n_h + b_lo) * n_w + c_lo) * IMAGE_BLOCK
                    for j in range(n_global + (a_end - a_lo) * runs_b * per_run):
                        row = j * IMAGE_BLOCK if j < n_before else (
                            before + layout.image_len + (j - n_before) * IMAGE_BLOCK)
                        box_tile = j - n_global
                        run = box_tile // per_run
                        packed = (pack(a_lo, b_lo, c_lo) + pack(run // runs_b, run % runs_b, box_tile - run * per_run)
                                  if box_tile >= 0 else -1)
                        if box_tile < 0:  # _key_tile's global rows, in tile order
                            pos = j * IMAGE_BLOCK if j < n_before else after_start + (j - n_before) * IMAGE_BLOCK
                            end = before if j < n_before else gathered.shape[1]
                            want = gathered[b, pos: min(pos + IMAGE_BLOCK, end), h]
                            assert torch.equal(read(b, h, row, packed)[: len(want)], want)
                            continue
                        pos = start + ((run // runs_b) * n_h + run % runs_b) * n_w * IMAGE_BLOCK + (
                            box_tile - run * per_run) * IMAGE_BLOCK
                        assert torch.equal(read(b, h, row, packed), expect(b, h, pos)), (mode, query, j)


# --- the reorder into tile order ------------------------------------------------------------

@pytest.mark.parametrize("grid,tile,before,after", LAYOUTS)
def test_slot_order_puts_each_token_at_its_tile_slot(grid, tile, before, after):
    layout = layout_of(grid, tile, before, after)
    tiles = layout.tile_grid()
    order = slot_order(layout, torch.device("cpu"))
    assert order.shape == (layout.num_global + tiles.slots,)
    assert torch.equal(order[:before], torch.arange(before))
    assert torch.equal(order[before + tiles.slots :], torch.arange(layout.image_end, layout.seq_len))
    # Each patch (f, y, x) goes to slot (tile index) * 128 + (offset inside its tile), both in raster order.
    seen = set()
    for token in range(layout.image_len):
        f, y, x = token // (grid[1] * grid[2]), token // grid[2] % grid[1], token % grid[2]
        (a, b, c), (t, r, s) = ((f // tile[0], y // tile[1], x // tile[2]),
                                (f % tile[0], y % tile[1], x % tile[2]))
        slot = ((a * tiles.counts[1] + b) * tiles.counts[2] + c) * IMAGE_BLOCK + (t * tile[1] + r) * tile[2] + s
        assert int(order[before + slot]) == before + token
        seen.add(slot)
    assert len(seen) == layout.image_len  # the other slots are pad slots


def test_tiled_keys_gather_keys_values_and_padding_flags():
    layout = layout_of((3, 5, 7), (2, 8, 8), 5, 9)
    q, k, v = _qkv(2, layout.seq_len, 3)
    mask = torch.rand(2, layout.seq_len) < 0.5
    keys = tiled_keys(k.transpose(1, 2).contiguous().transpose(1, 2), v, mask, layout)  # any strides
    order = slot_order(layout, torch.device("cpu"))
    assert torch.equal(keys.k, k[:, order]) and torch.equal(keys.v, v[:, order])
    assert torch.equal(keys.key_mask, mask[:, order]) and keys.tiles == layout.tile_grid()
    assert keys.k.is_contiguous() and tiled_keys(k, v, None, layout).key_mask is None


# --- tile plans through the runtime ---------------------------------------------------------

STEPS = 3
# 48 x 56 pixels -> 24 x 28 image tokens of the tiny FLUX: one frame, tiles of 1 x 8 x 16, ragged along cols.
ODD = {"height": 48, "width": 56}
GRID = (1, 24, 28)


def hide_grid(patch: pytest.MonkeyPatch) -> None:
    """The calls report their image segment without its grid from now on, as most image families do."""
    call_layout = Session._call_layout

    def without_grid(self, arguments):
        call_layout(self, arguments)
        self.image_segment = tuple(self.image_segment[:2])

    patch.setattr(Session, "_call_layout", without_grid)


METHODS = ["tile:0,0,0", "tile:0,0.5,1", "cache", "arrow:0.5", "full", "tile:1,1,1"]


def tile_plan(transformer) -> Plan:
    return with_methods(Plan.uniform(transformer, STEPS, "full"),
                        lambda step, layer, head: METHODS[(head + layer + step) % len(METHODS)])


def check_heads(plan: Plan, records) -> set[str]:
    """Every recorded call's heads against their method's definition (the dense oracle under the
    call's layout and padding; cache heads: the previous step's output); returns the methods seen."""
    checked = set()
    for record in records:
        layout, step, layer = record["layout"], record["step"], record["layer"]
        index = plan.layer_names.index(layer)
        for head in range(record["out"].shape[2]):
            method = plan.method(step, index, head)
            got = record["out"][:, :, head]
            if method.kind == "cache":
                assert torch.equal(got, find(records, layer, step - 1, record["call"])["out"][:, :, head])
                continue
            checked.add(method.name)
            mode = method.mode(layout.image_len, layout.tile_grid())
            qkv = (record[name][:, :, head : head + 1] for name in ("q", "k", "v"))
            want, _ = dense_attention(*qkv, [mode], layout, record["padding"])
            torch.testing.assert_close(got.double(), want[:, :, 0], atol=3e-5, rtol=1e-4)
    return checked


def test_a_tile_plan_follows_its_definition(recorder):
    pipe = flux_pipeline()  # FLUX reports its image grid, read from the position ids
    plan = tile_plan(pipe.transformer)
    ditfastattn.apply(pipe, plan)
    run_pipeline(pipe, steps=STEPS, **ODD)
    assert all(record["layout"].grid == GRID for record in recorder)
    assert check_heads(plan, recorder) == {"full", "arrow:0.5", "tile:0,0,0", "tile:0,0.5,1", "tile:1,1,1"}


@pytest.mark.parametrize("name", ["hunyuanvideo", "wan"])
def test_tile_plans_on_the_video_families(name, recorder):
    # Their adapters report the grid: 4 x 8 x 12 patches, 2 x 8 x 8 tiles, partial along
    # cols; HunyuanVideo's text is masked (key padding) and comes in a second call for CFG.
    pipe = MiniPipeline(VIDEO_FAMILIES[name])
    methods = {1: ("tile:0,0,0", "tile:1,1,1"), 2: ("cache", "tile:0,0.5,1")}  # per step, per head
    plan = with_methods(Plan.uniform(pipe.transformer, STEPS, "full"), lambda step, layer, head: methods[step][head])
    ditfastattn.apply(pipe, plan)
    assert bool(torch.isfinite(generate(pipe)).all())
    assert {record["layout"].grid for record in recorder} == {VIDEO_GRID}
    assert check_heads(plan, recorder) == {"full", "tile:0,0,0", "tile:1,1,1", "tile:0,0.5,1"}
    assert (name == "hunyuanvideo") == any(record["padding"] is not None for record in recorder)
    # its text key mask pads no video token, and every call's padding says so (the tile launch then
    # checks the text key tiles only)
    assert all(record["padding"].global_only for record in recorder if record["padding"] is not None)


@pytest.mark.parametrize("tile", [(1, 8, 16), (2, 8, 8), None])
def test_a_plan_runs_in_the_tile_shape_it_records_for_the_call_grid(tile, recorder):
    """Whatever the default tile of the grid (2 x 8 x 8 here), a plan that records another for that
    grid computes its windows in it, as the oracle does in that shape; one that records none (made
    before plans recorded it) runs the default."""
    pipe = MiniPipeline(VIDEO_FAMILIES["wan"])
    plan = Plan.uniform(pipe.transformer, STEPS, "tile:0,0,0", grid=VIDEO_GRID, tile=tile)
    if tile is None:
        plan = Plan(plan.model, plan.methods, {k: v for k, v in plan.provenance.items() if k != "tile"})
    ditfastattn.apply(pipe, plan)
    generate(pipe)
    want = tile if tile is not None else default_tile(VIDEO_GRID)
    assert {record["layout"].tile for record in recorder} == {want}
    assert check_heads(plan, recorder) == {"full", "tile:0,0,0"}


def test_band_plans_are_unchanged_by_a_grid(monkeypatch):
    gridded = flux_pipeline()
    ditfastattn.apply(gridded, Plan.uniform(gridded.transformer, STEPS, "arrow:0.5"))
    expected = run_pipeline(gridded, steps=STEPS, **ODD)
    hide_grid(monkeypatch)
    plain = flux_pipeline()
    ditfastattn.apply(plain, Plan.uniform(plain.transformer, STEPS, "arrow:0.5"))
    assert torch.equal(run_pipeline(plain, steps=STEPS, **ODD), expected)


@pytest.mark.parametrize("method", ["tile:0,0,0", "pool:2"])
def test_tile_and_pool_plans_need_a_grid(method, monkeypatch, recorder):
    # Refused at the first call (step 0, all full), before any step runs; static mode's check: test_static.py.
    pipe = flux_pipeline()
    plan = Plan.uniform(pipe.transformer, STEPS, method)
    hide_grid(monkeypatch)
    ditfastattn.apply(pipe, plan)
    with pytest.raises(ValueError, match=f"{method} needs the image grid .* use a plan with arrow:<f> windows"):
        run_pipeline(pipe, steps=STEPS, **ODD)
    assert not recorder  # no layer computed
    ditfastattn.remove(pipe)
    # checked per layer: the first call of the first layer with such a method refuses
    plan = with_methods(Plan.uniform(pipe.transformer, STEPS, "full"),
                        lambda step, layer, head: method if layer == 1 else "arrow:0.5")
    ditfastattn.apply(pipe, plan)
    with pytest.raises(ValueError, match=f"{method} needs the image grid"):
        run_pipeline(pipe, steps=STEPS, **ODD)
    assert [(r["step"], r["layer"]) for r in recorder] == [(0, plan.layer_names[0])]
    ditfastattn.remove(pipe)


@pytest.mark.parametrize("name", ["hunyuanvideo", "wan"])
def test_a_tile_plan_made_for_a_family_grid_summarises_what_its_calls_compute(name, recorder):
    # The plan records the grid its family's calls report, so the summary counts the windows the
    # op ran: per layer, the pairs of each call's mask under its own layout (text, padding aside).
    pipe = MiniPipeline(VIDEO_FAMILIES[name])
    method = parse_method("tile:0,0.5,1")
    plan = Plan.uniform(pipe.transformer, STEPS, method.name, grid=VIDEO_GRID)
    ditfastattn.apply(pipe, plan)
    generate(pipe)
    layouts = {record["layer"]: record["layout"] for record in recorder}
    assert {layout.grid for layout in layouts.values()} == {VIDEO_GRID}
    text = {layout.num_global for layout in layouts.values() if layout.num_global}
    assert len(text) == (name == "hunyuanvideo")  # Wan's self-attention has no text: its plans count 0
    summary = plan.summary(text_len=text.pop() if text else None)
    assert summary["grid"] == VIDEO_GRID and summary["tile"] == (2, 8, 8)
    for layer, layout in layouts.items():
        share = int(head_mask(method.mode(layout.image_len, layout.tile_grid()), layout).sum()) / layout.seq_len**2
        assert 0 < share < 1
        assert summary["sparsity_per_layer"][layer] == pytest.approx((1 - share) * (STEPS - 1) / STEPS)
