"""Tile windows in the fused Triton kernel against the float32 reference, through Triton's interpreter.

Same yardstick as test_triton_kernel.py (within twice the error of a same-precision computation).
Shapes are small and awkward: partial tiles along every axis, grids smaller than one tile, global
tokens before and after the image, padding, and every kind of head in one call.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_tiles import layout_of
from test_triton_kernel import _check, _inputs, _triton, interpreted_kernels

from ditfastattn import ops
from ditfastattn._geometry import MODE_FULL, MODE_SKIP, tile_mode
from ditfastattn.model import TokenLayout


@pytest.fixture(autouse=True, scope="module")
def _interpreted():
    with interpreted_kernels():
        yield


# (grid, tile, before, after, modes, batch, dtype): ragged on every axis with text on both sides and
# every kind of head; one frame with a partial tile; no text and only tile heads (the plain launch
# left out); text after the image and a grid of whole tiles (no pad slots); a window wider than the grid.
CASES = [
    ((3, 5, 7), (2, 8, 8), 5, 9, [tile_mode(0, 0, 0), MODE_FULL, 1, MODE_SKIP, tile_mode(1, 1, 1)], 1, torch.bfloat16),
    ((1, 13, 11), (1, 8, 16), 7, 0, [tile_mode(0, 1, 0), 0, MODE_FULL], 2, torch.float16),
    ((3, 9, 9), (2, 8, 8), 0, 0, [tile_mode(1, 0, 0), tile_mode(0, 1, 1), tile_mode(0, 0, 0)], 1, torch.bfloat16),
    ((2, 8, 16), (2, 8, 8), 0, 20, [tile_mode(0, 0, 0), MODE_SKIP, tile_mode(0, 0, 1)], 1, torch.float16),
    ((2, 5, 17), (1, 8, 16), 3, 4, [tile_mode(5, 5, 5), tile_mode(0, 0, 0)], 1, torch.bfloat16),
]


@pytest.mark.parametrize("grid,tile,before,after,modes,batch,dtype", CASES)
def test_tile_windows_match_the_reference(grid, tile, before, after, modes, batch, dtype):
    layout = layout_of(grid, tile, before, after)
    q, k, v = _inputs(batch, layout.seq_len, len(modes), 32, dtype, torch.Generator().manual_seed(sum(grid)))
    _check(q, k, v, torch.tensor(modes, dtype=torch.int32), None, None, segments=layout)


def test_tile_windows_with_padding():
    # Pair padding reads both flags: the keys' in tile order, the queries' at their raster rows.
    layout = layout_of((3, 5, 7), (2, 8, 8), 6, 3)
    gen = torch.Generator().manual_seed(7)
    q, k, v = _inputs(2, layout.seq_len, 3, 32, torch.bfloat16, gen)
    mask = torch.rand(2, layout.seq_len, generator=gen) < 0.3
    mask[1, : layout.image_start + 70] = True  # a whole padded tile's worth of keys, rows that keep none
    modes = torch.tensor([tile_mode(0, 0, 0), MODE_FULL, tile_mode(0, 1, 0)], dtype=torch.int32)
    _check(q, k, v, modes, None, None, segments=layout, padding=ops.Padding(mask, ops.PAIR_PADDING))


@pytest.mark.parametrize("layout_kind", ["bhsd", "fused", "padded"])
def test_tile_windows_take_any_strides(layout_kind):
    layout = layout_of((3, 5, 7), (2, 8, 8), 4, 0)
    q, k, v = _inputs(2, layout.seq_len, 3, 32, torch.bfloat16, torch.Generator().manual_seed(2), layout_kind)
    out = torch.empty(2, 3, layout.seq_len, 32, dtype=torch.bfloat16).transpose(1, 2)
    modes = torch.tensor([tile_mode(1, 0, 0), 0, tile_mode(0, 0, 0)], dtype=torch.int32)
    _check(q, k, v, modes, None, None, segments=layout, out=out)


def test_each_launch_writes_only_its_own_heads():
    # The plain launch leaves tile heads absent (no output, no log-sum-exp), the tiled one every other head.
    layout = layout_of((3, 5, 7), (2, 8, 8), 5, 9)
    q, k, v = _inputs(1, layout.seq_len, 4, 32, torch.bfloat16, torch.Generator().manual_seed(1))
    modes = torch.tensor([tile_mode(0, 0, 0), MODE_FULL, MODE_SKIP, 1], dtype=torch.int32)
    tile, others = [0], [1, 2, 3]
    segment = (layout.image_start, layout.image_len)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((1, 4, layout.seq_len), 7.0)
    _triton.attention(q, k, v, modes, *segment, out, 0.2, True, lse=lse)
    assert bool(out[:, :, tile].isnan().all()) and bool((lse[:, tile] == 7.0).all())
    assert bool(out[:, :, [1, 3]].isfinite().all()) and bool(lse[:, 2].isneginf().all())
    from ditfastattn.ops._tile_order import tiled_keys

    out = torch.full_like(q, float("nan"))
    lse = torch.full((1, 4, layout.seq_len), 7.0)
    _triton.attention(q, k, v, modes, *segment, out, 0.2, True, tiled=tiled_keys(k, v, None, layout), lse=lse)
    assert bool(out[:, :, others].isnan().all()) and bool((lse[:, others] == 7.0).all())
    assert bool(out[:, :, tile].isfinite().all()) and bool(lse[:, tile].isfinite().all())


def test_unread_modes_run_both_launches(monkeypatch):
    # Under tracing or graph capture the host cannot read the modes: on a gridded layout both launches
    # run, each skipping the other's heads; the result is the same.
    layout = TokenLayout(10 + 105, 10, 105, (3, 5, 7))
    q, k, v = _inputs(1, layout.seq_len, 3, 32, torch.float16, torch.Generator().manual_seed(3))
    modes = torch.tensor([tile_mode(0, 1, 0), 0, MODE_FULL], dtype=torch.int32)
    known = ops.headwise_attention(q, k, v, modes, segments=layout, impl="triton")
    launches = []
    attention = _triton.attention
    monkeypatch.setattr(_triton, "attention", lambda *a, **kw: launches.append("tiled" in kw) or attention(*a, **kw))
    monkeypatch.setattr(ops, "_mode_values", lambda head_modes: None)
    unread = ops.headwise_attention(q, k, v, modes, segments=layout, impl="triton")
    assert launches == [False, True] and torch.equal(unread, known)


def test_the_plain_launch_is_left_out_when_every_head_is_a_tile(monkeypatch):
    layout = layout_of((1, 13, 11), (1, 8, 16), 0, 0)
    q, k, v = _inputs(1, layout.seq_len, 2, 32, torch.float16, torch.Generator().manual_seed(4))
    launches = []
    attention = _triton.attention
    monkeypatch.setattr(_triton, "attention", lambda *a, **kw: launches.append("tiled" in kw) or attention(*a, **kw))
    modes = ops.mode_tensor([tile_mode(0, 0, 0), tile_mode(0, 1, 1)], "cpu")
    ops.headwise_attention(q, k, v, modes, segments=layout, impl="triton")
    assert launches == [True]
    # Skip heads' log-sum-exps (-inf) come from the plain launch.
    skip = ops.mode_tensor([tile_mode(0, 0, 0), MODE_SKIP], "cpu")
    _, lse = ops.headwise_attention(q, k, v, skip, segments=layout, out=torch.zeros_like(q), impl="triton",
                                    return_lse=True)
    assert launches == [True, False, True] and bool(lse[:, 1].isneginf().all())
    assert math.isfinite(float(lse[:, 0].max()))


# Grids ragged along one axis each, then all three (2 x 8 x 8 tiles): whole tiles run unmasked and
# partial ones masked, so each axis's partial tiles, and windows holding none, some or only
# partial tiles, are their own case.
RAGGED_GRIDS = [(3, 8, 8), (2, 11, 8), (2, 8, 13), (3, 9, 10)]


@pytest.mark.parametrize("grid", RAGGED_GRIDS)
@pytest.mark.parametrize("text_first", [True, False])
def test_ragged_axes_match_the_reference(grid, text_first):
    layout = layout_of(grid, (2, 8, 8), 77 if text_first else 0, 0 if text_first else 77)
    gen = torch.Generator().manual_seed(sum(grid) + text_first)
    q, k, v = _inputs(1, layout.seq_len, 5, 32, torch.bfloat16, gen)
    modes = torch.tensor([tile_mode(0, 0, 0), MODE_FULL, 1, MODE_SKIP, tile_mode(1, 1, 1)], dtype=torch.int32)
    padding = None
    if not text_first:  # key padding with text after the image; none with it before (the unpadded softmax)
        mask = torch.rand(1, layout.seq_len, generator=gen) < 0.3
        mask[:, layout.image_start] = False  # pad slots copy this token: a padded copy would hide them
        padding = ops.Padding(mask, ops.PAIR_PADDING)
    _check(q, k, v, modes, None, None, segments=layout, padding=padding)


def test_ragged_grid_with_key_tiles_of_one_block(monkeypatch):
    # Key tiles of 128 slots: each is one grid tile, so a partial one is a single masked key tile.
    monkeypatch.setattr(_triton, "INTERPRET_CONFIG", {"BLOCK_M": 128, "BLOCK_N": 128})
    layout = layout_of((3, 9, 10), (2, 8, 8), 5, 40)
    q, k, v = _inputs(1, layout.seq_len, 3, 32, torch.float16, torch.Generator().manual_seed(11))
    modes = torch.tensor([tile_mode(0, 0, 1), 0, tile_mode(1, 0, 0)], dtype=torch.int32)
    _check(q, k, v, modes, None, None, segments=layout)


@pytest.mark.parametrize("modes", [[tile_mode(0, 1, 0), MODE_FULL, 1, MODE_SKIP], [tile_mode(0, 0, 0)] * 2,
                                   [0, MODE_FULL]])
def test_the_static_custom_op_launches_as_the_public_op(modes):
    # Static mode's op never reads the modes on the host, so with a grid both launches always run:
    # each must leave the other's heads alone, and the result is the public op's bit for bit.
    layout = layout_of((3, 5, 7), (2, 8, 8), 5, 0)
    q, k, v = _inputs(1, layout.seq_len, len(modes), 32, torch.bfloat16, torch.Generator().manual_seed(3))
    head_modes = torch.tensor(modes, dtype=torch.int32)
    want = ops.headwise_attention(q, k, v, head_modes, segments=layout, out=torch.zeros_like(q), impl="triton")
    got = torch.zeros_like(q)
    torch.ops.ditfastattn.headwise_attention_(q, k, v, head_modes, 0, 5, got, 32**-0.5, "triton", [3, 5, 7], [2, 8, 8])
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
