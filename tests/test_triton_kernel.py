"""The fused Triton kernel against the float32 reference, on the CPU through Triton's interpreter.

Tolerance: a bf16/fp16 tensor-core attention kernel (FlashAttention, cuDNN, ours) rounds the
softmax probabilities to the input dtype before the P @ V product and rounds the output; the
error of that same-precision computation, emulated here in float32 with exactly those two
roundings, is the yardstick, and the kernel must stay within twice it (relative Frobenius error
vs the float32 reference, over the computed heads).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import random
import sys

import pytest
import torch

pytest.importorskip("triton")

from ditfastattn import ops  # noqa: E402
from ditfastattn._geometry import POOL_FLAG, POOL_SLOT_SHIFT  # noqa: E402
from ditfastattn.model import TokenLayout  # noqa: E402
from ditfastattn.ops import MODE_FULL, MODE_SKIP, headwise_attention  # noqa: E402
from ditfastattn.ops import _pool_means, _triton  # noqa: E402
from ditfastattn.ops._dense import dense_attention, patch_means  # noqa: E402

FIRST, LAST = "text_first", "text_last"


def interpreted_stdlib(patch: pytest.MonkeyPatch) -> None:
    """tests/conftest.py imports diffusers, which imports Triton before TRITON_INTERPRET is set
    here, so Triton's own @jit helpers (tl.sum, tl.max, tl.cdiv) were built for the compiler and
    refuse to run in the interpreter. Swap in interpreted twins (undone with ``patch``); one twin
    per function, so the interpreter's fast paths that compare combine functions still match."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    twins = {}
    for module in (tl, tl.standard, tl.math):
        for name, member in list(vars(module).items()):
            if isinstance(member, JITFunction):
                patch.setattr(module, name, twins.setdefault(id(member), InterpretedFunction(member.fn)))


# The kernel modules in import order (_pool_means takes a helper of _triton's).
KERNEL_MODULES = ("ditfastattn.ops._triton", "ditfastattn.ops._pool_means", "ditfastattn.ops._stats_triton")


def _decorate_kernels() -> None:
    """Run the kernel modules imported so far again: Triton decides at ``@triton.jit`` whether a
    kernel is interpreted, from TRITON_INTERPRET as it is then."""
    for name in KERNEL_MODULES:
        if name in sys.modules:
            importlib.reload(sys.modules[name])


def _language_owners() -> tuple:
    """What Triton's interpreter patches while it runs a kernel (triton/runtime/interpreter.py
    ``_patch_lang``): the language modules, the tensor and dtype classes, the descriptor base."""
    import triton.language as tl

    return tl, tl.core, tl.math, tl.core.tensor, tl.core.dtype, tl.core.tensor_descriptor_base


def language_state() -> list[tuple[object, dict]]:
    return [(owner, dict(vars(owner))) for owner in _language_owners()]


def language_changes(state: list[tuple[object, dict]]) -> set[tuple[object, str]]:
    """(owner, name) of every attribute added, removed or replaced since ``state``."""
    missing = object()
    return {(owner, name) for owner, attributes in state for name in set(vars(owner)) | set(attributes)
            if vars(owner).get(name, missing) is not attributes.get(name, missing)}


def restore_language(state: list[tuple[object, dict]]) -> None:
    """Triton 3.6's interpreter undoes its patches after a kernel but never after a device-function
    call (an interpreted tl.cdiv or tl.sum), so tl.core's builtins (add, mul, load...) stayed the
    interpreter's and every kernel compiled later in the process failed (Gluon's builds among them)."""
    before = {id(owner): attributes for owner, attributes in state}
    for owner, name in language_changes(state):
        if name in before[id(owner)]:
            setattr(owner, name, before[id(owner)][name])
        else:
            delattr(owner, name)


@contextlib.contextmanager
def interpreted_kernels():
    """Triton's interpreter for one module's tests, undone after: TRITON_INTERPRET=1, the kernels
    decorated under it, Triton's helpers interpreted, and the language as it was. Set when this
    file was imported, the variable reached every test collected with it, so that on a GPU machine
    the suite's GPU tests ran with the interpreter's kernels."""
    language = language_state()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TRITON_INTERPRET", "1")
            _decorate_kernels()
            interpreted_stdlib(patch)
            yield
    finally:
        restore_language(language)
        _decorate_kernels()


@pytest.fixture(autouse=True, scope="module")
def _interpreted():
    with interpreted_kernels():
        yield


def _inputs(batch, seq, heads, dim, dtype, gen, layout="bshd"):
    def one():
        x = torch.randn(batch, seq, heads, dim, generator=gen) * 1.5
        if layout == "bhsd":  # (B, H, S, D) storage seen through a transpose
            return x.transpose(1, 2).contiguous().transpose(1, 2).to(dtype)
        if layout == "padded":  # row pitch not 16-byte aligned and D strided: the pointer path
            wide = torch.zeros(batch, seq, heads, 2 * dim + 1)
            wide[..., : 2 * dim : 2] = x
            return wide.to(dtype)[..., : 2 * dim : 2]
        return x.to(dtype)

    if layout == "fused":  # slices of one (B, S, 3, H, D) projection, heads in columns
        qkv = (torch.randn(batch, seq, 3, heads, dim, generator=gen) * 1.5).to(dtype)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    return one(), one(), one()


def _check(q, k, v, modes, text_len, where, *, out=None, scale=None, return_lse=True, segments=None, padding=None):
    """The kernel against the reference and the same-precision yardstick; ``segments`` (global
    (start, length) pairs, or a TokenLayout) replaces ``text_len``/``where``, ``padding`` is an
    ``ops.Padding``."""
    batch, seq, heads, dim = q.shape
    if segments is None:
        geometry = {"text_start": 0 if where == FIRST else seq - text_len, "text_len": text_len}
        layout = TokenLayout.from_text(seq, geometry["text_start"], text_len)
    else:
        geometry = {"segments": segments}
        layout = segments if isinstance(segments, TokenLayout) else TokenLayout.from_segments(seq, segments)
    if out is None:
        out = torch.empty_like(q)
    out.fill_(float("nan"))
    before = out.clone()
    result = headwise_attention(q, k, v, modes, **geometry, key_padding=padding, out=out, scale=scale, impl="triton",
                                return_lse=return_lse)
    got, lse = result if return_lse else (result, None)
    assert got is out
    ref, ref_lse = headwise_attention(q.float(), k.float(), v.float(), modes, **geometry, key_padding=padding,
                                      out=torch.zeros(q.shape), scale=scale, impl="reference", return_lse=True)
    kept = modes != MODE_SKIP
    skip = ~kept
    assert torch.equal(out[:, :, skip].view(torch.int16), before[:, :, skip].view(torch.int16)), "skip heads written"
    if not kept.any():
        assert lse is None or bool(torch.isneginf(lse).all())
        return
    assert bool(torch.isfinite(got[:, :, kept]).all()), "unwritten or non-finite output"
    base, base_lse = dense_attention(q, k, v, modes, layout, padding, scale, compute=torch.float32, rounded=q.dtype)
    norm = ref[:, :, kept].norm()
    err = (got[:, :, kept].float() - ref[:, :, kept]).norm() / norm
    base_err = (base - ref[:, :, kept]).norm() / norm
    assert err <= 2.0 * base_err + 1e-6, f"error {err:.3e} vs same-precision {base_err:.3e}"
    if return_lse:
        assert lse.dtype == torch.float32 and lse.shape == (batch, heads, seq)
        assert bool(torch.isneginf(lse[:, skip]).all())
        masked = torch.isneginf(ref_lse[:, kept])  # rows that keep no key: -inf in both
        assert torch.equal(torch.isneginf(lse[:, kept]), masked)
        # pool heads read patch means rounded to the inputs' dtype: twice the yardstick's lse error more
        slack = 2.0 * float((base_lse[~masked] - ref_lse[:, kept][~masked]).abs().max())
        torch.testing.assert_close(lse[:, kept][~masked], ref_lse[:, kept][~masked], atol=2e-4 + slack, rtol=1e-5)


@pytest.mark.parametrize("where", [FIRST, LAST])
@pytest.mark.parametrize("text_len", [0, 77, 154])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_mode_both_layouts(where, text_len, dtype):
    # 300 image tokens: two whole 128-token blocks and a partial one.
    gen = torch.Generator().manual_seed(text_len)
    q, k, v = _inputs(1, text_len + 300, 5, 64, dtype, gen)
    modes = torch.tensor([MODE_FULL, 0, MODE_SKIP, 1, 7], dtype=torch.int32)
    _check(q, k, v, modes, text_len, where)


@pytest.mark.parametrize("seed", range(8))
def test_random_plans(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    heads = rng.randint(1, 4)
    text_len = rng.choice([0, 1, 77, 128, 154])
    seq = text_len + rng.randint(1, 400 - text_len)
    dtype = rng.choice([torch.bfloat16, torch.float16])
    q, k, v = _inputs(rng.randint(1, 2), seq, heads, rng.choice([32, 64]), dtype, gen)
    modes = torch.tensor([rng.choice([MODE_FULL, MODE_SKIP, 0, 1, 2]) for _ in range(heads)], dtype=torch.int32)
    _check(q, k, v, modes, text_len, rng.choice([FIRST, LAST]), return_lse=rng.random() < 0.5)


@pytest.mark.parametrize("layout", ["bhsd", "fused", "padded"])
def test_strided_views(layout):
    gen = torch.Generator().manual_seed(1)
    q, k, v = _inputs(2, 77 + 200, 3, 32, torch.bfloat16, gen, layout)
    out = torch.empty(2, 3, 277, 32, dtype=torch.bfloat16).transpose(1, 2)
    modes = torch.tensor([0, MODE_FULL, 1, MODE_SKIP, 0, 0], dtype=torch.int32)[::2]  # strided modes too
    _check(q, k, v, modes, 77, LAST, out=out)


def test_layout_paths():
    # TMA views where the strides allow one, the pointer path otherwise.
    gen = torch.Generator().manual_seed(0)
    for layout in ("bshd", "bhsd", "fused"):
        assert all(_triton._tma_view(t) is not None for t in _inputs(2, 100, 3, 32, torch.float16, gen, layout))
    assert _triton._tma_view(_inputs(2, 100, 3, 32, torch.float16, gen, "padded")[0]) is None


@pytest.mark.parametrize("block_m,block_n", [(64, 64), (128, 128)])
def test_tile_shapes(monkeypatch, block_m, block_n):
    # Query tiles of 64 put two tiles in one image block; key tiles of 128 are one block each.
    monkeypatch.setattr(_triton, "INTERPRET_CONFIG", {"BLOCK_M": block_m, "BLOCK_N": block_n})
    gen = torch.Generator().manual_seed(block_m)
    q, k, v = _inputs(1, 333 + 260, 4, 32, torch.float16, gen)
    modes = torch.tensor([1, MODE_FULL, 0, MODE_SKIP], dtype=torch.int32)
    _check(q, k, v, modes, 333, LAST)


def test_edges():
    gen = torch.Generator().manual_seed(3)
    q, k, v = _inputs(1, 90, 3, 32, torch.bfloat16, gen)
    _check(q, k, v, torch.tensor([MODE_SKIP] * 3, dtype=torch.int32), 20, FIRST)
    _check(q, k, v, torch.tensor([0, MODE_FULL, 2], dtype=torch.int32), 90, FIRST)  # text only
    _check(q, k, v, torch.tensor([0, 5, MODE_FULL], dtype=torch.int32), 0, FIRST, scale=0.3)  # one partial block


@pytest.mark.parametrize("seed", range(4))
def test_segments_and_padding(seed):
    # Global segments on both sides of an awkward image length (reference images after it), and key
    # padding under each bias table, with random per-head plans.
    rng = random.Random(100 + seed)
    gen = torch.Generator().manual_seed(seed)
    before, image, after = rng.choice([0, 5, 77, 128]), rng.randint(1, 330), rng.choice([0, 3, 64, 130])
    segments = [(0, before), (before + image, after)]
    batch, heads = rng.randint(1, 3), rng.randint(1, 4)
    dtype = rng.choice([torch.bfloat16, torch.float16])
    q, k, v = _inputs(batch, before + image + after, heads, rng.choice([32, 64]), dtype, gen)
    modes = torch.tensor([rng.choice([MODE_FULL, MODE_SKIP, 0, 1, 2]) for _ in range(heads)], dtype=torch.int32)
    padding = None
    if seed:  # seed 0: segments alone
        mask = torch.rand(batch, q.shape[1], generator=gen) < 0.3
        mask[-1, : before + 40] = True  # a long padded run: whole key tiles, and arrow rows that keep no key
        table = [ops.KEY_PADDING, ops.PAIR_PADDING, ((1.0, 0.0), (0.0, 0.0))][seed - 1]
        padding = ops.Padding(mask, table)
    _check(q, k, v, modes, None, None, segments=segments, padding=padding, return_lse=rng.random() < 0.7)


@pytest.mark.parametrize("seed", range(4))
def test_pool_heads_beside_the_kernel_heads(seed):
    # Pool heads whose factor leaves partial patches run on flash attention (the CPU's here), two
    # calls merged by log-sum-exp, after a kernel launch that skips them; the others in the kernel.
    # Awkward grids (partial patches, two frames), text on either side.
    rng = random.Random(200 + seed)
    gen = torch.Generator().manual_seed(seed)
    grid = rng.choice([(1, 9, 11), (2, 6, 8), (1, 12, 10), (1, 2, 3)])
    before, after = rng.choice([(0, 0), (7, 0), (0, 5), (4, 3)])
    image = math.prod(grid)
    layout = TokenLayout(before + image + after, before, image, grid)
    dtype = rng.choice([torch.bfloat16, torch.float16])
    modes = [ops.pool_mode(2), MODE_FULL, ops.pool_mode(3), 1, MODE_SKIP, ops.pool_mode(2)]
    if seed == 3:  # pool heads alone: no kernel launch
        modes = [ops.pool_mode(2), ops.pool_mode(4)]
    q, k, v = _inputs(rng.randint(1, 2), layout.seq_len, len(modes), rng.choice([32, 64]), dtype, gen)
    _check(q, k, v, ops.mode_tensor(modes, "cpu"), None, None, segments=layout, return_lse=seed % 2 == 0)


@pytest.mark.parametrize("seed", range(4))
def test_fused_pool_heads_in_the_kernel(seed, monkeypatch):
    # Grids every factor divides: each pool head runs in the kernel's launch, its image keys and
    # values read from the patch-mean buffer by its slot, none on SDPA. Heads of two factors out of
    # order beside full, skip and arrow heads; two frames; text before, after, both.
    from ditfastattn.ops import _pooled

    def no_sdpa(*args, **kwargs):
        raise AssertionError("a pool head whose factor divides the grid ran on SDPA")

    monkeypatch.setattr(_pooled, "attention", no_sdpa)
    rng = random.Random(300 + seed)
    gen = torch.Generator().manual_seed(seed)
    grid = [(1, 8, 12), (2, 4, 8), (1, 12, 8), (2, 8, 4)][seed]
    before, after = [(7, 0), (0, 5), (4, 3), (0, 0)][seed]
    image = math.prod(grid)
    layout = TokenLayout(before + image + after, before, image, grid)
    modes = [ops.pool_mode(4), MODE_FULL, ops.pool_mode(2), 1, MODE_SKIP, ops.pool_mode(4)]
    if seed == 3:  # pool heads alone
        modes = [ops.pool_mode(2), ops.pool_mode(4)]
    dtype = rng.choice([torch.bfloat16, torch.float16])
    q, k, v = _inputs(rng.randint(1, 2), layout.seq_len, len(modes), rng.choice([32, 64]), dtype, gen,
                      rng.choice(["bshd", "bhsd", "fused"]))
    _check(q, k, v, ops.mode_tensor(modes, "cpu"), None, None, segments=layout, return_lse=seed % 2 == 0)


def test_a_patch_mean_buffer_the_kernel_cannot_read_aligned_is_refused():
    # The kernel reads the buffer's rows 16 bytes at a time, from strides in units of 16 elements: a
    # buffer whose strides are not multiples of 16 would be read at the wrong rows, so it is refused.
    gen = torch.Generator().manual_seed(5)
    text = 3
    q, k, v = _inputs(1, text + 16, 1, 32, torch.bfloat16, gen)
    modes = ops.mode_tensor([ops.pool_mode(2)], "cpu")
    padded = torch.zeros(2, 4, 1, 40, dtype=torch.bfloat16)[..., :32]
    with pytest.raises(ValueError, match="multiples of 16"):
        _triton.attention(q, k, v, modes, text, 16, torch.empty_like(q), 32**-0.5, False, pooled=padded)


def test_one_plan_row_on_grids_it_fuses_on_and_not():
    # A row's pool heads run in the kernel on a grid that p divides and on SDPA on one it does not:
    # the same mode tensor on both, in turn, follows the reference each time.
    gen = torch.Generator().manual_seed(17)
    modes = ops.mode_tensor([ops.pool_mode(4), MODE_FULL, ops.pool_mode(2)], "cpu")
    for grid in [(1, 8, 8), (1, 8, 6), (1, 8, 8)]:
        layout = TokenLayout(5 + math.prod(grid), 5, math.prod(grid), grid)
        q, k, v = _inputs(1, layout.seq_len, 3, 32, torch.bfloat16, gen)
        _check(q, k, v, modes, None, None, segments=layout, return_lse=False)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("padded", [False, True])
def test_pool_modes_the_host_cannot_read_run_as_full_attention(impl, padded):
    # The custom op does not read the modes (no host sync inside a compiled step), so no patch-mean
    # buffer is built: a pool mode reaching the kernel runs as a band wider than the image, full
    # attention, never over keys it was not given; under the call's key padding too. The reference
    # does the same (it pooled such a head, over padded keys alike: 0.69 off the kernel's output).
    gen = torch.Generator().manual_seed(21)
    grid, text = (1, 8, 8), 5
    seq = text + math.prod(grid)
    q, k, v = (t.expand(-1, -1, 2, -1).contiguous() for t in _inputs(1, seq, 1, 32, torch.bfloat16, gen))
    modes = ops.mode_tensor([ops.pool_mode(2), MODE_FULL], "cpu")
    padding = torch.zeros(1, seq, dtype=torch.bool)
    padding[0, 2:text] = padded  # the text's tail
    out = torch.empty_like(q)
    torch.ops.ditfastattn.headwise_attention_(q, k, v, modes, 0, text, out, 32**-0.5, impl, list(grid), None, None,
                                              padding if padded else None)
    assert torch.equal(out[:, :, 0], out[:, :, 1])
    full = headwise_attention(q, k, v, ops.mode_tensor([MODE_FULL] * 2, "cpu"), text_start=0, text_len=text,
                              key_padding=padding if padded else None, impl=impl)
    assert torch.equal(out, full)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_the_custom_op_runs_pool_heads_named_by_static_slots(impl):
    # Static mode's form: the modes name each pool head by its slot of pool_groups, given as ints,
    # and the slots' heads come as a tensor (no host read). Slots cover every head that pools at some
    # step, so a slot's head may run another mode now (head 3's slot, an arrow here): the output is
    # the op's on the plain modes all the same. No tile head: the grid serves the pool heads only.
    gen = torch.Generator().manual_seed(23)
    grid, text = (2, 8, 12), 7
    layout = TokenLayout(text + math.prod(grid), text, math.prod(grid), grid)
    q, k, v = _inputs(2, layout.seq_len, 5, 32, torch.bfloat16, gen, "bhsd")
    plain = [ops.pool_mode(4), MODE_FULL, ops.pool_mode(2), 1, ops.pool_mode(4)]
    groups = [2, 2, 2, 3, 4, 2, 0, 4]  # p = 2: heads 2, 3; p = 4: heads 0, 4
    slotted = [POOL_FLAG | 2 << POOL_SLOT_SHIFT | 4, MODE_FULL, POOL_FLAG | 0 << POOL_SLOT_SHIFT | 2, 1,
               POOL_FLAG | 3 << POOL_SLOT_SHIFT | 4]
    want = headwise_attention(q, k, v, ops.mode_tensor(plain, "cpu"), segments=layout, impl=impl)
    got = torch.full_like(q, float("nan"))
    arguments = (q, k, v, torch.tensor(slotted, dtype=torch.int32), 0, 0, got, 32**-0.5, impl, list(grid), None,
                 [0, text], None, None, groups, torch.tensor([2, 3, 0, 4], dtype=torch.int32), False)
    torch.ops.ditfastattn.headwise_attention_(*arguments)
    assert torch.equal(got, want)
    # Strided views of the modes and of the slots' heads: the patch means' kernel read them
    # unstrided, other heads' entries (heads 2 and 4 0.25 off).
    strided = (torch.tensor(slotted, dtype=torch.int32).repeat_interleave(2)[::2],
               torch.tensor([2, 3, 0, 4], dtype=torch.int32).repeat_interleave(2)[::2])
    again = torch.full_like(q, float("nan"))
    torch.ops.ditfastattn.headwise_attention_(q, k, v, strided[0], 0, 0, again, 32**-0.5, impl, list(grid), None,
                                              [0, text], None, None, groups, strided[1], False)
    assert torch.equal(again, want)
    torch.library.opcheck(torch.ops.ditfastattn.headwise_attention_.default, arguments)
    with pytest.raises(ValueError, match="p = 4 must divide the grid's rows and cols"):
        torch.ops.ditfastattn.headwise_attention_(*arguments[:9], [2, 16, 6], *arguments[10:])
    with pytest.raises(ValueError, match="one head per slot"):
        torch.ops.ditfastattn.headwise_attention_(*arguments[:-2], torch.tensor([2, 3, 0], dtype=torch.int32), False)


def test_patch_means_of_the_slots_the_modes_name_now():
    # Static mode's slots hold every head that pools at some step; given the step's modes, the
    # buffer holds the means of the slots they name and zeros for the rest (no loads for those).
    grid, before = (1, 8, 8), 3
    image = math.prod(grid)
    gen = torch.Generator().manual_seed(12)
    _, k, v = _inputs(1, before + image, 3, 32, torch.bfloat16, gen)
    fused = ((2, (0, 2)), (4, (1,)))
    slot_heads = torch.tensor([0, 2, 1], dtype=torch.int32)
    # head 0 pools now with slot 0, head 2 runs an arrow, head 1 pools with p = 4 in slot 2
    modes = torch.tensor([POOL_FLAG | 0 << POOL_SLOT_SHIFT | 2, POOL_FLAG | 2 << POOL_SLOT_SHIFT | 4, 1],
                         dtype=torch.int32)
    tiles = ops.TileGrid(grid)
    every = _pool_means.kernel_means(k, v, fused, slot_heads, before, tiles)
    now = _pool_means.kernel_means(k, v, fused, slot_heads, before, tiles, modes)
    assert torch.equal(now[:, :, [0, 2]], every[:, :, [0, 2]]) and every[:, :, 1].any()
    assert not now[:, :, 1].any()


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_patch_mean_buffer_of_fused_pool_heads(layout):
    # The buffer the Gluon kernel reads its pool heads' image keys and values from: each slot's
    # patch means (factors 4 and 2 here, heads out of order, two frames, text on both sides) in
    # the inputs' dtype, keys for batches [0, B) and values for [B, 2B), zeros past its patch count.
    grid, before, after = (2, 12, 8), 5, 3
    image = math.prod(grid)
    seq = before + image + after
    token_layout = TokenLayout(seq, before, image, grid)
    gen = torch.Generator().manual_seed(11)
    _, k, v = _inputs(2, seq, 5, 64, torch.bfloat16, gen, layout)
    fused = ((4, (0, 4)), (2, (2,)))
    slot_heads = torch.tensor([0, 4, 2], dtype=torch.int32)
    buffer = _pool_means.kernel_means(k, v, fused, slot_heads, before, ops.TileGrid(grid))
    batch, (frames, rows, cols) = k.shape[0], grid
    assert buffer.shape == (2 * batch, image // 4, 3, 64) and buffer.dtype == k.dtype
    for slot, (p, head) in enumerate([(4, 0), (4, 4), (2, 2)]):
        corners = torch.tensor([before + (f * rows + r) * cols + c for f in range(frames)
                                for r in range(0, rows, p) for c in range(0, cols, p)])
        for half, x in enumerate((k, v)):
            want = patch_means(x[:, :, head].double(), ops.pool_mode(p), token_layout)[:, corners].to(x.dtype)
            got = buffer[half * batch : (half + 1) * batch, : len(corners), slot]
            torch.testing.assert_close(got.double(), want.double(), atol=1e-6, rtol=2**-7)
        assert not buffer[:, len(corners) :, slot].any()


def test_fully_masked_rows_output_zero():
    # Every key of batch element 1 is padding: its rows output 0 (as SDPA's fully masked rows), lse -inf.
    gen = torch.Generator().manual_seed(8)
    q, k, v = _inputs(2, 20 + 150, 2, 32, torch.bfloat16, gen)
    mask = torch.zeros(2, 170, dtype=torch.bool)
    mask[1] = True
    modes = torch.tensor([MODE_FULL, 0], dtype=torch.int32)
    out, lse = headwise_attention(q, k, v, modes, text_start=0, text_len=20, key_padding=mask,
                                  out=torch.full_like(q, float("nan")), impl="triton", return_lse=True)
    assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))
    assert torch.isfinite(out[0]).all() and torch.isfinite(lse[0]).all()


def test_heavy_heads_first_order_is_only_a_schedule():
    # The same plan under every permutation of its heads gives the same per-head result.
    gen = torch.Generator().manual_seed(5)
    q, k, v = _inputs(1, 77 + 256, 4, 32, torch.float16, gen)
    modes = torch.tensor([0, MODE_FULL, MODE_SKIP, 1], dtype=torch.int32)
    out = headwise_attention(q, k, v, modes, text_start=0, text_len=77, out=torch.zeros_like(q), impl="triton")
    perm = torch.tensor([3, 2, 0, 1])
    out_p = headwise_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], modes[perm], text_start=0,
                               text_len=77, out=torch.zeros_like(q), impl="triton")
    assert torch.equal(out[:, :, perm], out_p)


def test_out_of_range_modes_run_as_skip_and_never_write_past_out():
    # The op refuses modes below -2 wherever it can read them; under a compiled step it cannot,
    # so the kernel itself must treat them as skip and keep every write inside `out`.
    gen = torch.Generator().manual_seed(6)
    q, k, v = _inputs(1, 20 + 140, 4, 32, torch.bfloat16, gen)
    modes = torch.tensor([-3, MODE_FULL, -7, 0], dtype=torch.int32)
    # Heads 0..3 of `out` sit inside a wider buffer whose 4 extra heads are a guard band.
    store = torch.full((1, 160, 8, 32), 7.0, dtype=torch.bfloat16)
    out = store[:, :, :4]
    out, lse = _triton.attention(q, k, v, modes, 20, 140, out, 32 ** -0.5, True)  # text first: image [20, 160)
    assert bool((store[:, :, 4:] == 7.0).all()), "written past the last head"
    assert bool((store[:, :, [0, 2]] == 7.0).all()) and bool(torch.isneginf(lse[:, [0, 2]]).all())
    ref = headwise_attention(q.float(), k.float(), v.float(), torch.tensor([MODE_SKIP, MODE_FULL, MODE_SKIP, 0],
                             dtype=torch.int32), text_start=0, text_len=20, out=torch.zeros(q.shape), impl="reference")
    torch.testing.assert_close(out[:, :, [1, 3]].float(), ref[:, :, [1, 3]], atol=3e-2, rtol=2e-2)
    with pytest.raises(ValueError, match=r"-2 \(skip\), -1 \(full\), 0 <= w < 2\*\*29.*\[-7, -3\]"):
        headwise_attention(q, k, v, modes, text_start=0, text_len=20, out=out, impl="triton")


def test_a_head_turned_tile_window_through_numpy_is_computed():
    # The launches follow the modes read on the host: a write that leaves the tensor's version as
    # it was (through .numpy()) once left a head turned tile window out of both launches, its rows
    # never written. A CPU tensor is read at every call.
    layout = TokenLayout(256, 0, 256, (1, 16, 16))
    q, k, v = _inputs(1, 256, 2, 32, torch.float16, torch.Generator().manual_seed(12))
    modes = torch.tensor([MODE_FULL, MODE_FULL], dtype=torch.int32)
    headwise_attention(q, k, v, modes, segments=layout, impl="triton")
    modes.numpy()[0] = ops.tile_mode(0, 0, 0)
    _check(q, k, v, modes, None, None, segments=layout)


@pytest.mark.parametrize("case", ["text last", "both sides, padded", "tiles"])
def test_global_rows_can_be_left_to_the_caller(case):
    from test_reference_op import check_global_rows
    from test_tiles import layout_of

    from ditfastattn._geometry import tile_mode

    gen = torch.Generator().manual_seed(11)
    modes = [MODE_FULL, 0, MODE_SKIP]
    padding = None
    if case == "tiles":  # the plain launch, then the tiled one over keys in tile order
        layout = layout_of((1, 5, 9), (1, 8, 16), 13, 6)
        modes.append(tile_mode(0, 1, 0))
    elif case == "text last":
        layout = TokenLayout.from_segments(170, [(150, 20)])
    else:
        layout = TokenLayout.from_segments(185, [(0, 30), (170, 15)])
    q, k, v = _inputs(1, layout.seq_len, len(modes), 32, torch.bfloat16, gen)
    if case.startswith("both"):
        padding = ops.Padding(torch.rand(1, layout.seq_len, generator=gen) < 0.2, ops.PAIR_PADDING)
    check_global_rows("triton", q, k, v, torch.tensor(modes, dtype=torch.int32), layout, padding)
