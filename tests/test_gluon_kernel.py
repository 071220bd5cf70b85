"""The Gluon (Hopper) kernel on a machine without a GPU: its error paths, its TMA views, and that it
builds for sm_90 with the resources it was designed for (CI has no GPU; the numerical check runs on
an H100 through benchmarks/kernel_check.py)."""

from __future__ import annotations

import math
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from ditfastattn.ops import MODE_FULL, gluon_available, headwise_attention

needs_gluon = pytest.mark.skipif(gluon_available() is not None, reason=f"{gluon_available()}")


def _qkv(shape=(1, 200, 2, 128), dtype=torch.bfloat16):
    return tuple(torch.randn(shape).to(dtype) for _ in range(3))


def test_explicit_gluon_never_falls_back_on_cpu():
    q, k, v = _qkv()
    modes = torch.tensor([MODE_FULL, 0], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"impl='gluon' cannot run: .*compute capability 9\.0.*impl='triton'"):
        headwise_attention(q, k, v, modes, text_start=0, text_len=72, impl="gluon")
    # auto stays on the reference on the CPU
    out = headwise_attention(q, k, v, modes, text_start=0, text_len=72, impl="auto")
    assert torch.isfinite(out).all()


@needs_gluon
def test_tma_views():
    from ditfastattn.ops import _gluon

    batch, seq, heads, dim = 2, 77 + 200, 3, 128
    x = torch.randn(batch, seq, heads, dim, dtype=torch.bfloat16)
    assert _gluon.view_coeffs(x) == (batch * seq, heads * dim, seq, 0, dim)
    bhsd = torch.randn(batch, heads, seq, dim, dtype=torch.bfloat16).transpose(1, 2)
    assert _gluon.view_coeffs(bhsd) == (batch * heads * seq, dim, heads * seq, seq, 0)
    fused = torch.randn(batch, seq, 3, heads, dim, dtype=torch.bfloat16)[:, :, 1]
    rows, cols, rb, rh, ch = _gluon.view_coeffs(fused)
    # element (b, s, h, d) lands where the view says
    flat = fused.as_strided((rows, cols), (fused.stride(1), 1))
    b, s, h, d = 1, 250, 2, 7
    assert flat[b * rb + h * rh + s, h * ch + d] == fused[b, s, h, d]
    assert _gluon.view_coeffs(torch.randn(batch, seq, heads, 2 * dim, dtype=torch.bfloat16)[..., ::2]) is None
    with pytest.raises(ValueError, match="head dims"):
        _gluon.tile_configs(32)


@needs_gluon
@pytest.mark.parametrize("head_dim,tile", [(64, None), (128, None), (64, (1, 8, 16)), (128, (2, 8, 8))])
def test_builds_for_sm90_with_warp_specialisation(head_dim, tile):
    # tile: the tiled launch (tile windows in tile order, grid tiles read in place)
    from ditfastattn.ops import _gluon

    config = _gluon.tile_configs(head_dim)[0]
    try:
        kernel = _gluon.compile_sm90(torch.bfloat16, config, head_dim=head_dim, tile=tile, has_pad=tile is not None)
    except RuntimeError as err:  # no ptxas for sm_90 in this triton build
        if "ptxas" in str(err).lower():
            pytest.skip(f"cannot assemble for sm_90 here: {err}")
        raise
    ptx = kernel.asm["ptx"]
    # three warpgroups: two consumers at 240 registers, the producer at 24, within 168 x 384
    assert kernel.metadata.num_warps == 12
    regs = {int(n) for n in re.findall(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)}
    assert {240, 24} <= regs
    assert re.search(r"\.maxnreg 168", ptx)
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx and "mbarrier.try_wait" in ptx
    # the tiled launch reads grid tiles in place, as boxes of a 5-D view; the plain one has none
    assert ("cp.async.bulk.tensor.5d" in ptx) == (tile is not None)
    # QK^T of the next tile in flight while the softmax waits on it
    assert "wgmma.wait_group.sync.aligned 1" in ptx
    # persistent: programs take work items from a launch-wide counter
    assert re.search(r"atom\.global\.\S*add", ptx)
    # the epilogue stores 16-byte vectors in both consumer warpgroups (the second is a worker partition):
    # 64 rows x head_dim x 2 bytes over 128 threads, at the item boundary and after the last item
    vectors_per_thread = 64 * head_dim * 2 // 128 // 16
    assert len(re.findall(r"st\.global\.v4\.b32", ptx)) == 2 * 2 * vectors_per_thread
    assert "st.global.b16" not in ptx
    assert kernel.metadata.shared <= 227 * 1024


def test_gluon_needs_the_triton_release_of_its_api(monkeypatch):
    import triton

    gluon_available.cache_clear()
    monkeypatch.setattr(triton, "__version__", "3.5.1")
    try:
        reason = gluon_available()
    finally:
        gluon_available.cache_clear()
    if reason is not None and "cannot be imported" in reason:
        pytest.skip(reason)
    assert reason is not None and "triton >= 3.6" in reason and "3.5.1" in reason


# A table under which padded queries attend to padded keys only: the Gluon kernel does not take it.
ONLY_PADDED_KEYS = ((0.0, -math.inf), (-math.inf, 0.0))


def test_explicit_gluon_refuses_a_table_it_does_not_take(monkeypatch):
    # Where the Gluon kernel could run, padding it does not take is an error naming impl='triton';
    # impl='auto' sends such calls to the Triton kernel instead.
    from ditfastattn import ops

    monkeypatch.setattr(ops, "_gluon_unsupported", lambda q, k, v: None)
    q, k, v = _qkv((1, 300, 2, 128))
    modes = torch.tensor([MODE_FULL, 0], dtype=torch.int32)
    padding = ops.Padding(torch.zeros(1, 300, dtype=torch.bool), ONLY_PADDED_KEYS)
    with pytest.raises(RuntimeError, match=r"impl='gluon' cannot run: .*padded keys only.*impl='triton'"):
        headwise_attention(q, k, v, modes, text_start=0, text_len=50, key_padding=padding, impl="gluon")


@needs_gluon
def test_gluon_takes_every_table_but_padded_keys_only():
    # Key masks, Chroma's boolean and float 0/1 pair masks and other finite tables run on the Gluon
    # kernel; a table under which a query kind sees padded keys only goes to the Triton kernel.
    from ditfastattn import ops

    mask = torch.zeros(1, 300, dtype=torch.bool)
    assert ops._gluon_layout_reason(None) is None
    for bias in (ops.KEY_PADDING, ops.PAIR_PADDING, ((1.0, 0.0), (0.0, 0.0)), ((0.5, -2.0), (-1.0, 3.0))):
        assert ops._gluon_layout_reason(ops.Padding(mask, bias)) is None
    reason = ops._gluon_layout_reason(ops.Padding(mask, ONLY_PADDED_KEYS))
    assert reason is not None and "impl='triton'" in reason


@needs_gluon
def test_gluon_refuses_a_grid_of_more_tiles_than_its_packed_coordinates_hold(monkeypatch):
    # The tiled launch packs a grid tile's coordinates in one register (10 bits for rows and cols):
    # a grid with 1024 tiles along cols is refused, naming the Triton kernel, before any launch;
    # 1023 are taken.
    from ditfastattn import ops

    assert ops._gluon_layout_reason(None, ops.TileGrid((1, 8, 16 * 1023), (1, 8, 16))) is None
    reason = ops._gluon_layout_reason(None, ops.TileGrid((1, 8, 16 * 1024), (1, 8, 16)))
    assert reason is not None and "(1, 1, 1024)" in reason and "impl='triton'" in reason
    monkeypatch.setattr(ops, "_gluon_unsupported", lambda q, k, v: None)
    grid = (1, 8, 16 * 1024)
    q, k, v = _qkv((1, math.prod(grid), 1, 64))
    modes = torch.tensor([ops.tile_mode(0, 0, 0)], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"impl='gluon' cannot run: .*1024.*impl='triton'"):
        headwise_attention(q, k, v, modes, text_start=0, text_len=0, grid=grid, tile=(1, 8, 16), impl="gluon")


@needs_gluon
def test_a_pair_table_first_seen_under_graph_capture_is_refused_clearly(monkeypatch):
    # The table goes to the device once per table; that copy cannot be captured, so a first launch
    # inside capture says to warm up, as the work counter does.
    from ditfastattn.ops import _gluon

    monkeypatch.setattr(_gluon, "_pair_biases", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cannot be inside CUDA graph capture.*warm-up"):
        _gluon._pair_bias((0.25, -1.0, 0.0, 0.5), torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    table = _gluon._pair_bias((0.25, -1.0, 0.0, 0.5), torch.device("cpu"))
    assert table.tolist() == [0.25, -1.0, 0.0, 0.5]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _gluon._pair_bias((0.25, -1.0, 0.0, 0.5), torch.device("cpu")) is table  # made before: no copy


TABLES = [
    ((0.0, -math.inf), (0.0, -math.inf)),  # KEY_PADDING
    ((0.0, -math.inf), (-math.inf, -math.inf)),  # PAIR_PADDING: padded queries attend to nothing
    ((1.0, 0.0), (0.0, 0.0)),  # Chroma's float m_q * m_k
    ((0.5, -2.0), (-1.0, 3.0)),
    ((-0.7, -math.inf), (2.0, 1.5)),
]


@needs_gluon
@pytest.mark.parametrize("table", TABLES)
def test_pair_table_arithmetic_matches_the_reference(table):
    # The kernel's arithmetic on a pair table, emulated in float64: online softmax in log2 units over
    # key tiles, a padded key's relative bias added only in tiles that hold padding, pad slots (flag
    # 2) never attended, each row's real-key bias added to its log-sum-exp, rows whose kind attends to
    # nothing stored as 0. It must equal the reference op under the table.
    from ditfastattn import ops
    from ditfastattn.ops import _gluon

    gen = torch.Generator().manual_seed(3)
    batch, seq, dim, block = 2, 300, 16, 128
    q, k, v = (torch.randn(batch, seq, 1, dim, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(batch, seq, generator=gen) < 0.3
    mask[1, :140] = True  # a whole tile of padding, and one tile without any
    mask[1, 140:] = False
    scale = dim ** -0.5
    qk_scale = scale * _gluon._LOG2E
    rel0, rel1, off0, off1 = _gluon.pair_table(table)
    flags = mask.to(torch.int64)
    out = torch.zeros(batch, seq, dim, dtype=torch.float64)
    lse = torch.empty(batch, seq, dtype=torch.float64)
    for b in range(batch):
        query_padded = flags[b] == 1
        relative = torch.where(query_padded, rel1, rel0) / qk_scale
        offset = torch.where(query_padded, off1, off0)
        m = torch.full((seq,), -math.inf, dtype=torch.float64)
        l = torch.zeros(seq, dtype=torch.float64)
        acc = torch.zeros(seq, dim, dtype=torch.float64)
        for pos in range(0, seq, block):
            s = q[b, :, 0] @ k[b, pos:pos + block, 0].T
            key_flag = flags[b, pos:pos + block]
            if bool((key_flag != 0).any()):
                bias = torch.where(key_flag[None] == 1, relative[:, None],
                                   torch.where(key_flag[None] == 0, 0.0, -math.inf))
                s = s + bias
            m_new = torch.maximum(m, s.max(1).values * qk_scale)
            m_use = torch.where(torch.isneginf(m_new), 0.0, m_new)
            p = torch.exp2(s * qk_scale - m_use[:, None])
            alpha = torch.exp2(m - m_use)
            l = l * alpha + p.sum(1)
            acc = acc * alpha[:, None] + p @ v[b, pos:pos + block, 0]
            m = m_new
        live = (l > 0) & ~torch.isneginf(offset)
        out[b] = acc * torch.where(live, 1 / l, 0.0)[:, None]
        lse[b] = (m + torch.log2(l)) * math.log(2) + offset
    modes = torch.tensor([MODE_FULL], dtype=torch.int32)
    ref, ref_lse = headwise_attention(q, k, v, modes, text_start=0, text_len=0, impl="reference", return_lse=True,
                                      key_padding=ops.Padding(mask, table))
    torch.testing.assert_close(out, ref[:, :, 0], rtol=1e-10, atol=1e-12)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse[:, 0]))
    finite = torch.isfinite(ref_lse[:, 0])
    torch.testing.assert_close(lse[finite].float(), ref_lse[:, 0][finite])  # the reference keeps it in float32


@needs_gluon
@pytest.mark.parametrize("head_dim", [64, 128])
def test_builds_with_key_padding(head_dim):
    # The padded variant: two scalar loads of running counts a key tile, the flags only for tiles
    # that hold padding, in both consumer warpgroups; same warps and registers, shared memory within
    # the limit.
    from ditfastattn.ops import _gluon

    try:
        plain = _gluon.compile_sm90(torch.bfloat16, head_dim=head_dim)
        padded = _gluon.compile_sm90(torch.bfloat16, head_dim=head_dim, has_pad=True)
    except RuntimeError as err:  # no ptxas for sm_90 in this triton build
        if "ptxas" in str(err).lower():
            pytest.skip(f"cannot assemble for sm_90 here: {err}")
        raise
    assert padded.metadata.num_warps == plain.metadata.num_warps == 12
    assert padded.metadata.shared <= 227 * 1024
    ptx = padded.asm["ptx"]
    assert len(re.findall(r"ld\.global\S*\.b32", ptx)) > len(re.findall(r"ld\.global\S*\.b32", plain.asm["ptx"]))


@needs_gluon
@pytest.mark.parametrize("head_dim,tile", [(64, None), (128, None), (128, (1, 8, 16))])
def test_builds_with_a_pair_table(head_dim, tile):
    # Padding under a pair table: byte loads of the key and query kinds (only in tiles that hold
    # padding, and in the epilogue), same warps, registers split and shared memory within the limit;
    # and the variants without it compile to the same instructions (the table's code is constexpr).
    from ditfastattn.ops import _gluon

    try:
        pair = _gluon.compile_sm90(torch.bfloat16, head_dim=head_dim, pair=True, tile=tile)
    except RuntimeError as err:  # no ptxas for sm_90 in this triton build
        if "ptxas" in str(err).lower():
            pytest.skip(f"cannot assemble for sm_90 here: {err}")
        raise
    assert pair.metadata.num_warps == 12 and pair.metadata.shared <= 227 * 1024
    ptx = pair.asm["ptx"]
    regs = {int(n) for n in re.findall(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)}
    assert {240, 24} <= regs
    assert re.search(r"ld\.global\S*\.u8", ptx) or re.search(r"ld\.global\S*\.b8", ptx)
    assert re.search(r"\.maxnreg 168", ptx)


@needs_gluon
def test_builds_without_the_text_rows_of_arrow_heads():
    # Calibration's arrow candidates (global_rows=False): the arrow heads' text-query tiles are no work items.
    from ditfastattn.ops import _gluon

    try:
        kernel = _gluon.compile_sm90(torch.bfloat16, return_lse=False, global_rows=False)
    except RuntimeError as err:  # no ptxas for sm_90 in this triton build
        if "ptxas" in str(err).lower():
            pytest.skip(f"cannot assemble for sm_90 here: {err}")
        raise
    assert kernel.metadata.num_warps == 12 and "wgmma.mma_async" in kernel.asm["ptx"]
    with pytest.raises(Exception, match="log-sum-exps need every row"):
        _gluon.compile_sm90(torch.bfloat16, return_lse=True, global_rows=False)


@needs_gluon
def test_builds_with_pad_slots_ending_each_block():
    # PAD_TAIL: a ragged grid whose pad slots end each block runs without the key mask's loads: no
    # more global loads than the whole-grid variant's, same warps, shared memory within the limit.
    from ditfastattn.ops import _gluon

    try:
        whole = _gluon.compile_sm90(torch.bfloat16, tile=(1, 8, 16), return_lse=False)
        tail = _gluon.compile_sm90(torch.bfloat16, tile=(1, 8, 16), return_lse=False, pad_tail=True)
        masked = _gluon.compile_sm90(torch.bfloat16, tile=(1, 8, 16), return_lse=False, has_pad=True)
    except RuntimeError as err:  # no ptxas for sm_90 in this triton build
        if "ptxas" in str(err).lower():
            pytest.skip(f"cannot assemble for sm_90 here: {err}")
        raise
    assert tail.metadata.num_warps == 12 and tail.metadata.shared <= 227 * 1024

    def loads(kernel):
        return len(re.findall(r"ld\.global", kernel.asm["ptx"]))

    assert loads(tail) == loads(whole) < loads(masked)


def _consumer_steps(kernel, head_dim: int) -> list[list[str]]:
    """The SASS of each consumer warpgroup's key-tile step in an sm_90 build, in address order (the
    default partition's first): the loops (a branch back to a label) of fewer than 2000 instructions
    that hold one tile's QK^T and PV (head_dim / 16 + 8 HGMMA)."""
    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    if not nvdisasm.is_file():
        pytest.skip("no nvdisasm in this triton build")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([str(nvdisasm), "-c", cubin.name], capture_output=True, text=True, check=True).stdout
    labels, lines, pending = {}, [], []
    for line in sass.splitlines():
        if label := re.match(r"\s*(\.L_x_\d+):", line):
            pending.append(label.group(1))
        elif address := re.search(r"/\*([0-9a-f]{4,})\*/", line):
            labels.update(dict.fromkeys(pending, int(address.group(1), 16)))
            pending = []
            lines.append((int(address.group(1), 16), line))
    steps = []
    for at, line in lines:
        branch = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if branch and labels.get(branch.group(1), at) < at:
            body = [text for where, text in lines if labels[branch.group(1)] <= where <= at]
            if sum("HGMMA" in text for text in body) == head_dim // 16 + 8 and len(body) < 2000:
                steps.append(body)
    return steps


def _spills(step: list[str]) -> int:
    return sum(("LDL" in text or "STL" in text) for text in step)


@needs_gluon
@pytest.mark.parametrize("options", [
    {"head_dim": 128}, {"head_dim": 64}, {"head_dim": 128, "has_pad": True},
    {"head_dim": 128, "tile": (1, 8, 16), "pad_tail": True}, {"head_dim": 128, "tile": (2, 8, 8)},
    {"head_dim": 64, "tile": (1, 8, 16)}, {"head_dim": 128, "tile": (1, 8, 16), "pad_tail": True, "ordered": True},
    {"head_dim": 128, "pool": True}, {"head_dim": 64, "pool": True},
], ids=str)
def test_consumer_steps_hold_no_spills(options):
    # One local load a step (the barrier base, spilled by a producer edit) cost 4-5 points of the ideal
    # at every 720p tile plan (docs/history/KERNEL_NOTES.md); the variants generation launches without
    # padding or with a key mask hold none in either consumer's step.
    from ditfastattn.ops import _gluon

    try:
        kernel = _gluon.compile_sm90(torch.bfloat16, return_lse=False, **options)
    except RuntimeError as err:  # no ptxas for sm_90 in this triton build
        if "ptxas" in str(err).lower():
            pytest.skip(f"cannot assemble for sm_90 here: {err}")
        raise
    steps = _consumer_steps(kernel, options["head_dim"])
    assert len(steps) >= 2
    assert [_spills(step) for step in steps[:2]] == [0, 0]


@needs_gluon
def test_only_unpadded_images_without_pad_slots_in_the_mask_skip_the_image_checks():
    # PAD_GLOBAL leaves image key tiles unchecked: only where the caller says no image token is padded,
    # under a plain key mask, and with no pad slot among the masked keys (they end their blocks or
    # the grid is whole); a pad slot let through would be attended.
    from ditfastattn.model import TokenLayout
    from ditfastattn.ops import Padding, _gluon
    from ditfastattn.ops._tile_order import tiled_keys

    def keys(grid, tile):
        image = math.prod(grid)
        k = v = torch.zeros(1, image + 16, 1, 8)
        mask = torch.zeros(1, image + 16, dtype=torch.bool)
        mask[:, image + 10 :] = True
        return tiled_keys(k, v, mask, TokenLayout(image + 16, 0, image, grid, tile), gather=False), mask

    ragged_tail, mask = keys((3, 12, 16), (1, 8, 16))  # rows ragged, one frame deep: pad slots end blocks
    ragged, _ = keys((3, 12, 16), (2, 8, 8))  # pad slots inside blocks: in the key mask
    whole, _ = keys((2, 8, 16), (1, 8, 16))
    marked, unmarked = Padding(mask, global_only=True), Padding(mask)
    assert _gluon.pad_tail(ragged_tail.tiles) and not _gluon.pad_tail(ragged.tiles)
    assert _gluon.global_padding_only(marked, ragged_tail, True, False)
    assert _gluon.global_padding_only(marked, whole, False, False)
    assert not _gluon.global_padding_only(marked, ragged, False, False)
    assert not _gluon.global_padding_only(unmarked, ragged_tail, True, False)
    assert not _gluon.global_padding_only(marked, ragged_tail, True, True)  # a pair table
    assert not _gluon.global_padding_only(marked, None, False, False)  # the plain launch


@needs_gluon
def test_text_padding_alone_keeps_the_tile_step_free_of_spills():
    # A key mask over the text only (HunyuanVideo) under tile windows on a ragged grid: checking the
    # padding on the global key tiles alone (PAD_GLOBAL) leaves the default consumer's step without
    # local memory, where checking every tile spills in both consumers' steps.
    from ditfastattn.ops import _gluon

    options = {"tile": (1, 8, 16), "pad_tail": True, "has_pad": True, "return_lse": False}
    try:
        every_tile = _gluon.compile_sm90(torch.bfloat16, **options)
        global_only = _gluon.compile_sm90(torch.bfloat16, pad_global=True, **options)
    except RuntimeError as err:  # no ptxas for sm_90 in this triton build
        if "ptxas" in str(err).lower():
            pytest.skip(f"cannot assemble for sm_90 here: {err}")
        raise
    checked = [_spills(step) for step in _consumer_steps(every_tile, 128)[:2]]
    skipped = [_spills(step) for step in _consumer_steps(global_only, 128)[:2]]
    assert skipped[0] == 0 < min(checked)
    assert sum(skipped) < sum(checked)
    with pytest.raises(Exception, match="PAD_GLOBAL is the tiled key mask's"):
        _gluon.compile_sm90(torch.bfloat16, pad_global=True, return_lse=False)
