"""The reference op against an independently built dense mask, and the op's input validation."""

from __future__ import annotations

import importlib
import math
import os

import numpy
import pytest
import torch

from ditfastattn import ops
from ditfastattn._geometry import MAX_POOL_FACTOR, MODE_FULL, MODE_SKIP, POOL_FLAG, POOL_SLOT_SHIFT
from ditfastattn.model import TokenLayout
from ditfastattn.ops._dense import dense_attention

SENTINEL = 1234.5


def masked_reference(q, k, v, modes, text_start, text_len, padding=None, *, layout=None):
    """Float64 dense masked attention (and log-sum-exp) per head, from the shared dense oracle; skip heads give None."""
    layout = layout or TokenLayout.from_text(q.shape[1], text_start, text_len)
    out, lse = dense_attention(q, k, v, modes, layout, padding)
    kept = iter(range(out.shape[2]))
    outs, lses = [], []
    for mode in (int(m) for m in modes):
        index = None if mode == MODE_SKIP else next(kept)
        outs.append(None if index is None else out[:, :, index])
        lses.append(None if index is None else lse[:, index])
    return outs, lses


def random_qkv(batch, seq, heads, dim, dtype=torch.float32, seed=0, strided=False):
    generator = torch.Generator().manual_seed(seed)
    if strided:  # (B, H, S, D) storage seen as (B, S, H, D), as SD3's processor passes it
        return [torch.randn(batch, heads, seq, dim, generator=generator).to(dtype).transpose(1, 2) for _ in range(3)]
    return [torch.randn(batch, seq, heads, dim, generator=generator).to(dtype) for _ in range(3)]


CASES = [  # (text_len, image_len): awkward lengths, partial last blocks, text 0
    (0, 64),
    (77, 64),
    (77, 1000),
    (333, 1000),
    (0, 1000),
    (512, 4096),
]


@pytest.mark.parametrize("text_len,image_len", CASES)
@pytest.mark.parametrize("text_first", [True, False])
def test_reference_matches_dense_masked_attention(text_len, image_len, text_first):
    seq = text_len + image_len
    heads = 5
    q, k, v = random_qkv(2 if seq < 2000 else 1, seq, heads, 16, seed=seq + text_first, strided=not text_first)
    modes = torch.tensor([MODE_FULL, 0, MODE_SKIP, 1, 3], dtype=torch.int32)
    text_start = 0 if text_first else image_len
    out = torch.full_like(q, SENTINEL)
    result, lse = ops.headwise_attention(
        q, k, v, modes, text_start=text_start, text_len=text_len, out=out, impl="reference", return_lse=True
    )
    assert result is out
    expected, expected_lse = masked_reference(q, k, v, modes, text_start, text_len)
    for head in range(heads):
        if expected[head] is None:
            assert torch.all(out[:, :, head] == SENTINEL), "a skipped head's output slice was written"
            assert torch.all(lse[:, head] == float("-inf"))
            continue
        torch.testing.assert_close(out[:, :, head].double(), expected[head], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse[:, head].double(), expected_lse[head], atol=2e-5, rtol=1e-5)


SEGMENT_CASES = [  # (seq, global (start, length) segments) around one image segment of awkward length
    (577, [(0, 77), (377, 200)]),  # text, image, reference image (FLUX.1 Kontext)
    (501, [(0, 40), (340, 100), (440, 61)]),  # text, image, two reference images
    (301, [(0, 1)]),
    (305, [(300, 5), (0, 3)]),  # unsorted
]


@pytest.mark.parametrize("seq,segments", SEGMENT_CASES)
def test_reference_matches_the_dense_oracle_with_segments(seq, segments):
    layout = TokenLayout.from_segments(seq, segments)
    assert layout.image_len in (300, 297)
    heads = 5
    q, k, v = random_qkv(2, layout.seq_len, heads, 16, seed=len(segments))
    modes = torch.tensor([MODE_FULL, 0, MODE_SKIP, 1, 3], dtype=torch.int32)
    out = torch.full_like(q, SENTINEL)
    _, lse = ops.headwise_attention(q, k, v, modes, segments=segments, out=out, impl="reference", return_lse=True)
    expected, expected_lse = masked_reference(q, k, v, modes, None, None, layout=layout)
    for head in range(heads):
        if expected[head] is None:
            assert torch.all(out[:, :, head] == SENTINEL) and torch.all(lse[:, head] == float("-inf"))
            continue
        torch.testing.assert_close(out[:, :, head].double(), expected[head], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse[:, head].double(), expected_lse[head], atol=2e-5, rtol=1e-5)


def test_one_global_segment_as_segments_is_the_text_form():
    q, k, v = random_qkv(1, 77 + 300, 3, 16, seed=9)
    modes = torch.tensor([MODE_FULL, 0, 1], dtype=torch.int32)
    for text_start, segments in ((0, [(0, 77)]), (300, [(300, 77)])):
        text = ops.headwise_attention(q, k, v, modes, text_start=text_start, text_len=77)
        assert torch.equal(ops.headwise_attention(q, k, v, modes, segments=segments), text)
        layout = TokenLayout.from_segments(377, segments)
        assert torch.equal(ops.headwise_attention(q, k, v, modes, segments=layout), text)
    # a reference segment after the image changes what arrows see
    kontext = ops.headwise_attention(q, k, v, modes, segments=[(0, 77), (277, 100)])
    assert not torch.allclose(kontext[:, :, 1:], ops.headwise_attention(q, k, v, modes, text_start=0, text_len=77)[:, :, 1:])


PADDING_TABLES = {"keys": ops.KEY_PADDING, "pairs": ops.PAIR_PADDING, "float 0/1": ((1.0, 0.0), (0.0, 0.0))}


def random_padding(batch, seq, seed, all_padded=False):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, seq, generator=generator) < 0.3
    mask[0, :20] = True  # a padded run
    if all_padded:
        mask[-1] = True  # every key of the last batch element
    return mask


@pytest.mark.parametrize("table", list(PADDING_TABLES))
@pytest.mark.parametrize("seq,segments", [(377, [(0, 77)]), (300, [(223, 77)]), (440, [(0, 40), (340, 100)])])
def test_reference_matches_the_dense_oracle_with_padding(table, seq, segments):
    layout = TokenLayout.from_segments(seq, segments)
    heads = 5
    q, k, v = random_qkv(3, layout.seq_len, heads, 16, seed=7)
    padding = ops.Padding(random_padding(3, layout.seq_len, 1, all_padded=True), PADDING_TABLES[table])
    modes = torch.tensor([MODE_FULL, 0, MODE_SKIP, 1, 2], dtype=torch.int32)
    out = torch.full_like(q, SENTINEL)
    _, lse = ops.headwise_attention(q, k, v, modes, segments=layout, key_padding=padding, out=out, impl="reference",
                                    return_lse=True)
    expected, expected_lse = masked_reference(q, k, v, modes, None, None, padding, layout=layout)
    for head in range(heads):
        if expected[head] is None:
            assert torch.all(out[:, :, head] == SENTINEL)
            continue
        assert torch.isfinite(out[:, :, head]).all()
        torch.testing.assert_close(out[:, :, head].double(), expected[head], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse[:, head].double(), expected_lse[head], atol=2e-5, rtol=1e-5)
    if table != "float 0/1":  # every key of the last batch element is padding: rows masked out output 0
        assert torch.all(out[-1, :, [0, 1, 3, 4]] == 0) and torch.all(lse[-1, [0, 1, 3, 4]] == float("-inf"))


@pytest.mark.parametrize("form", ["key mask", "bool pairs", "float 0/1 pairs"])
def test_full_heads_with_padding_match_sdpa_with_the_stock_mask(form):
    """What diffusers hands to SDPA: Qwen-Image / Z-Image / HunyuanImage key masks (B, 1, 1, S),
    Chroma's m_q & m_k (bool) and m_q * m_k (0/1 floats, as its 0.42 pipeline passes them)."""
    batch, seq, heads = 2, 77 + 200, 3
    q, k, v = random_qkv(batch, seq, heads, 16, seed=11)
    keep = ~random_padding(batch, seq, 2)
    keep[:, 77:] = True  # image tokens are never padding
    if form == "key mask":
        mask, table = keep[:, None, None, :], ops.KEY_PADDING
    elif form == "bool pairs":
        mask, table = keep[:, None, None, :] & keep[:, None, :, None], ops.PAIR_PADDING
    else:
        mask, table = keep[:, None, None, :].float() * keep[:, None, :, None].float(), ((1.0, 0.0), (0.0, 0.0))
    stock = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask)
    modes = torch.full((heads,), MODE_FULL, dtype=torch.int32)
    got = ops.headwise_attention(q, k, v, modes, text_start=0, text_len=77, key_padding=ops.Padding(~keep, table))
    torch.testing.assert_close(got, stock.transpose(1, 2), atol=2e-6, rtol=1e-5)
    for numbers in ([list(row) for row in table], numpy.array(table)):  # any 2 x 2 numbers
        as_given = ops.Padding(~keep, numbers)
        assert torch.equal(ops.headwise_attention(q, k, v, modes, text_start=0, text_len=77, key_padding=as_given), got)
    below_float32 = ops.Padding(~keep, [[-1e39 if x == -math.inf else x for x in row] for row in table])
    assert torch.equal(ops.headwise_attention(q, k, v, modes, text_start=0, text_len=77, key_padding=below_float32), got)
    if form == "bool pairs":  # padded queries see nothing: 0, as SDPA gives a fully masked row
        assert torch.all(got[~keep] == 0)


@pytest.mark.parametrize("seed", range(4))
def test_random_plans_in_half_precision(seed):
    generator = torch.Generator().manual_seed(100 + seed)
    text_len = int(torch.randint(0, 200, (1,), generator=generator))
    image_len = int(torch.randint(1, 700, (1,), generator=generator))
    heads = 4
    modes = torch.randint(-2, 4, (heads,), generator=generator, dtype=torch.int32)
    text_first = bool(seed % 2)
    text_start = 0 if text_first else image_len
    q, k, v = random_qkv(1, text_len + image_len, heads, 32, dtype=torch.bfloat16, seed=seed)
    out = torch.full_like(q, SENTINEL)
    ops.headwise_attention(q, k, v, modes, text_start=text_start, text_len=text_len, out=out, impl="reference")
    expected, _ = masked_reference(q, k, v, modes, text_start, text_len)
    for head in range(heads):
        if expected[head] is None:
            assert torch.all(out[:, :, head] == SENTINEL)
        else:
            # float32 math, then one bf16 rounding of the output (relative step 2**-8).
            torch.testing.assert_close(out[:, :, head].double(), expected[head], atol=1e-2, rtol=2**-8)


def test_arrow_covering_all_blocks_equals_full():
    q, k, v = random_qkv(1, 77 + 600, 2, 16, seed=3)
    wide = ops.headwise_attention(q, k, v, torch.tensor([4, 4], dtype=torch.int32), text_start=0, text_len=77)
    full = ops.headwise_attention(q, k, v, torch.tensor([-1, -1], dtype=torch.int32), text_start=0, text_len=77)
    torch.testing.assert_close(wide, full, atol=1e-6, rtol=1e-5)


def test_default_scale_and_explicit_scale():
    q, k, v = random_qkv(1, 130, 2, 16, seed=4)
    modes = torch.tensor([-1, 0], dtype=torch.int32)
    default = ops.headwise_attention(q, k, v, modes, text_start=0, text_len=2)
    explicit = ops.headwise_attention(q, k, v, modes, text_start=0, text_len=2, scale=0.25)
    assert torch.equal(default, explicit)  # 1 / sqrt(16)
    other = ops.headwise_attention(q, k, v, modes, text_start=0, text_len=2, scale=0.5)
    assert not torch.allclose(default, other)


def _args(seq=40, heads=2):
    q, k, v = random_qkv(1, seq, heads, 8)
    return q, k, v, torch.tensor([-1] * heads, dtype=torch.int32)


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda a, kw: a.__setitem__(1, a[1][:, :-1]), ValueError, "one shape"),
        (lambda a, kw: a.__setitem__(0, a[0][0]), ValueError, r"\(batch, seq, heads, head_dim\)"),
        (lambda a, kw: a.__setitem__(2, a[2].double()), TypeError, "one floating dtype"),
        (lambda a, kw: a.__setitem__(3, a[3].long()), ValueError, "int32"),
        (lambda a, kw: a.__setitem__(3, a[3][:1]), ValueError, "int32 of shape"),
        (lambda a, kw: kw.update(text_start=3), ValueError, "start or the end"),
        (lambda a, kw: kw.update(text_len=99), ValueError, r"text_len must be in"),
        (lambda a, kw: kw.update(impl="cuda"), ValueError, "impl must be one of"),
        (lambda a, kw: kw.update(out=torch.empty(1, 40, 2, 8, dtype=torch.float16)), ValueError, "out must match q"),
        (lambda a, kw: a.__setitem__(3, torch.tensor([-2, -1], dtype=torch.int32)), ValueError, "pass `out`"),
        (lambda a, kw: a.__setitem__(3, torch.tensor([-3, -1], dtype=torch.int32)), ValueError, "head_modes values"),
        (lambda a, kw: a.__setitem__(3, [-1, -1]), TypeError, "head_modes must be a torch.Tensor"),
        (lambda a, kw: a.__setitem__(3, a[3].view(1, 2)), ValueError, "int32 of shape"),
        (lambda a, kw: kw.update(text_len=4.0), TypeError, "must be ints"),
        (lambda a, kw: kw.update(text_start=-36, text_len=40), ValueError, "start or the end"),
        (lambda a, kw: kw.update(text_len=-1), ValueError, "text_len must be in"),
        (lambda a, kw: kw.update(scale=float("nan")), ValueError, "scale must be a finite number > 0"),
        (lambda a, kw: kw.update(scale=0.0), ValueError, "scale must be a finite number > 0"),
        (lambda a, kw: kw.update(out=torch.empty(1, 40, 2, 7)), ValueError, "out must match q"),
        (lambda a, kw: kw.update(out="out"), TypeError, "out must be a torch.Tensor"),
        (lambda a, kw: kw.update(segments=[(0, 4)]), ValueError, "not both"),
        (lambda a, kw: kw.update(text_start=None, text_len=None), TypeError, "give the token layout"),
        (lambda a, kw: kw.update(text_start=None, text_len=None, segments=[(0, 4), (20, 4)]), ValueError,
         "one contiguous image segment"),
        (lambda a, kw: kw.update(text_start=None, text_len=None, segments=[(0, 4), (2, 4)]), ValueError, "overlap"),
        (lambda a, kw: kw.update(text_start=None, text_len=None, segments=[(38, 4)]), ValueError, "does not fit"),
        (lambda a, kw: kw.update(text_start=None, text_len=None, segments=TokenLayout(41, 0, 30)), ValueError,
         "layout is for 41 tokens"),
        (lambda a, kw: kw.update(key_padding=torch.zeros(1, 40)), ValueError, "key_padding must be a bool tensor"),
        (lambda a, kw: kw.update(key_padding=torch.zeros(2, 40, dtype=torch.bool)), ValueError, r"\(1, 40\)"),
        (lambda a, kw: kw.update(key_padding=ops.Padding(torch.zeros(1, 40, dtype=torch.bool), ((0, 1),))),
         ValueError, "2 x 2"),
        (lambda a, kw: kw.update(key_padding=ops.Padding(torch.zeros(1, 40, dtype=torch.bool),
                                                         ((0, float("inf")), (0, 0)))), ValueError, "float32's largest"),
        # finite, but inf in the float32 scores (NaN outputs before)
        (lambda a, kw: kw.update(key_padding=ops.Padding(torch.zeros(1, 40, dtype=torch.bool),
                                                         ((1e39, 0), (0, 0)))), ValueError, "float32's largest"),
        (lambda a, kw: [a.__setitem__(i, a[i][..., :0]) for i in range(3)], ValueError, "head dim of at least 1"),
        (lambda a, kw: kw.update(out=torch.empty(1, 40, 1, 8).expand(1, 40, 2, 8)), ValueError,
         r"dims \[2\] have stride 0"),
        (lambda a, kw: kw.update(key_padding=ops.Padding(torch.zeros(1, 40, dtype=torch.bool),
                                                         global_only=torch.tensor(True))), TypeError,
         "global_only must be True or False"),
    ],
)
def test_bad_input_names_the_fix(mutate, error, match):
    args = list(_args())
    kwargs = {"text_start": 0, "text_len": 4}
    mutate(args, kwargs)
    with pytest.raises(error, match=match):
        ops.headwise_attention(*args, **kwargs)


def test_explicit_triton_never_falls_back_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, modes = _args()
    with pytest.raises(RuntimeError, match="impl='triton' cannot run"):
        ops.headwise_attention(q, k, v, modes, text_start=0, text_len=4, impl="triton")


def test_the_kernel_tests_interpreter_reaches_no_other_test():
    # test_triton_kernel.py runs Triton's interpreter for its own tests. It used to set
    # TRITON_INTERPRET when imported, so every test collected with it ran with the interpreter's
    # kernels: on a GPU machine the suite's GPU tests did.
    import conftest

    from ditfastattn.ops import _triton

    importlib.import_module("test_triton_kernel")  # collected already or not: importing it changes nothing here

    assert os.environ.get("TRITON_INTERPRET") == conftest.TRITON_INTERPRET_AT_START
    assert _triton._INTERPRET == (conftest.TRITON_INTERPRET_AT_START == "1")


def test_the_kernel_tests_interpreter_leaves_triton_language_as_it_was():
    # An interpreted device-function call (tl.cdiv, tl.sum) left tl.core's builtins patched, so
    # the Gluon builds that ran after the statistics kernels' tests in one process failed to compile.
    pytest.importorskip("triton")
    kernel_tests = importlib.import_module("test_triton_kernel")

    def changed(state):
        return {(owner.__name__, name) for owner, name in kernel_tests.language_changes(state)}

    before = kernel_tests.language_state()
    with kernel_tests.interpreted_kernels():
        a = torch.randn(1, 40, 2, 16).to(torch.bfloat16)
        ops.head_squared_errors(a, a + 1, impl="triton")
        assert ("triton.language.core", "add") in changed(before)  # the interpreter's, left after the call
    assert changed(before) == set()


def test_auto_uses_the_reference_on_cpu():
    q, k, v, modes = _args()
    auto = ops.headwise_attention(q, k, v, modes, text_start=0, text_len=4)
    reference = ops.headwise_attention(q, k, v, modes, text_start=0, text_len=4, impl="reference")
    assert torch.equal(auto, reference)


@pytest.mark.parametrize("impl", ops.IMPLEMENTATIONS)
def test_out_of_range_modes_are_refused_by_every_impl(impl):
    q, k, v, _ = _args(heads=3)
    for bad in ([-3, -1, 0], [-1, -100, 2]):
        with pytest.raises(ValueError, match=r"must be -2 \(skip\), -1 \(full\), 0 <= w < 2\*\*29"):
            ops.headwise_attention(q, k, v, torch.tensor(bad, dtype=torch.int32), text_start=0, text_len=4,
                                   out=torch.zeros_like(q), impl=impl)


@pytest.mark.parametrize("impl", ops.IMPLEMENTATIONS)
def test_raw_modes_with_the_pool_flag_are_refused_unless_pool_mode_makes_them(impl):
    # Bit 29 marks pooled keys, whatever the value's low bits: factor 0 died dividing by zero, and a
    # kernel's slot-named mode (POOL_FLAG | slot << 8 | p) ran as pooled keys of factor 258.
    q, k, v, _ = _args()  # 36 image tokens: a 4 x 9 grid
    for bad in (POOL_FLAG, POOL_FLAG | 1, POOL_FLAG | MAX_POOL_FACTOR + 1, POOL_FLAG | 1 << POOL_SLOT_SHIFT | 2):
        with pytest.raises(ValueError, match=rf"ops.pool_mode\(p\) \(pooled keys, p in \[2, 64\]\).*got \[{bad}\]"):
            ops.headwise_attention(q, k, v, torch.tensor([bad, -1], dtype=torch.int32), text_start=0, text_len=4,
                                   grid=(1, 4, 9), out=torch.zeros_like(q), impl=impl)
        with pytest.raises(ValueError, match=rf"got \[{bad}\]"):
            ops.mode_tensor([bad], "cpu")
    # The widest arrow, the first and last pool factors and the widest tile window pass.
    ops.check_mode_values([POOL_FLAG - 1, ops.pool_mode(2), ops.pool_mode(MAX_POOL_FACTOR),
                           ops.tile_mode(1023, 1023, 1023)])


def test_cpu_mode_values_are_read_at_every_call():
    # Writes through .numpy() or .data leave the version counter as it was; a CPU tensor is read
    # again at every call (no GPU to wait for), so they are checked too.
    q, k, v, modes = _args()
    out = torch.zeros_like(q)
    ops.headwise_attention(q, k, v, modes, text_start=0, text_len=4, out=out)
    modes.numpy()[0] = -7
    with pytest.raises(ValueError, match=r"\[-7\]"):
        ops.headwise_attention(q, k, v, modes, text_start=0, text_len=4, out=out)
    modes.data[0] = MODE_FULL
    ops.headwise_attention(q, k, v, modes, text_start=0, text_len=4, out=out)
    modes.data[1] = -8
    with pytest.raises(ValueError, match=r"\[-8\]"):
        ops.headwise_attention(q, k, v, modes, text_start=0, text_len=4, out=out)


def test_mode_values_are_checked_again_after_an_in_place_write():
    q, k, v, modes = _args()
    out = torch.zeros_like(q)
    ops.headwise_attention(q, k, v, modes, text_start=0, text_len=4, out=out)
    modes[0] = -5  # in place after a check: the new version is checked again
    with pytest.raises(ValueError, match=r"\[-5\]"):
        ops.headwise_attention(q, k, v, modes, text_start=0, text_len=4, out=out)
    with pytest.raises(ValueError, match=r"\[-4\]"):
        ops.mode_tensor([-1, -4], "cpu")
    with torch.inference_mode():  # tensors made there keep no version counter; still checked once made
        checked = ops.mode_tensor([-1, 0], "cpu")
        ops.headwise_attention(q, k, v, checked, text_start=0, text_len=4, out=out)
        unchecked = torch.tensor([-1, -6], dtype=torch.int32)
        with pytest.raises(ValueError, match=r"\[-6\]"):
            ops.headwise_attention(q, k, v, unchecked, text_start=0, text_len=4, out=out)


@pytest.mark.parametrize("impl", ops.IMPLEMENTATIONS)
def test_an_out_that_shares_memory_with_the_inputs_is_refused_by_every_impl(impl):
    # The kernels write out's rows while other programs still read k and v (out=k gave errors of
    # 0.36 under the Triton kernel), and q's other rows: only q itself may be out.
    q, k, v, modes = _args()
    rows = torch.randn(1, 41, 2, 8)  # k and an out one row further on
    heads = torch.randn(1, 40, 3, 8)  # q and an out one head further on
    other_strides = k.view(1, 2, 40, 8).transpose(1, 2)  # k's memory, read in another order
    cases = [(q, k, v, k, "with k"), (q, k, v, v, "with v"), (q, k, v, other_strides, "with k"),
             (q, rows[:, :40], v, rows[:, 1:], "with k"), (heads[:, :, :2], k, v, heads[:, :, 1:], "with q")]
    for q_, k_, v_, out, shared in cases:
        with pytest.raises(ValueError, match=f"out shares memory {shared}, .*pass a separate tensor as out"):
            ops.headwise_attention(q_, k_, v_, modes, text_start=0, text_len=4, out=out, impl=impl)


def test_out_may_be_q_or_its_slice_of_one_fused_projection():
    # The views of one (B, S, 3, H, D) projection interleave without sharing an element: q's slice
    # may be out beside k's and v's, as q itself may.
    q, k, v, modes = _args()
    want = ops.headwise_attention(q, k, v, modes, text_start=0, text_len=4)
    fused = torch.stack([q, k, v], dim=2)
    fq, fk, fv = fused.unbind(2)
    assert torch.equal(ops.headwise_attention(fq, fk, fv, modes, text_start=0, text_len=4, out=fq), want)
    assert torch.equal(fused[:, :, 1:], torch.stack([k, v], dim=2))
    assert torch.equal(ops.headwise_attention(q, k, v, modes, text_start=0, text_len=4, out=q.clone()), want)
    q_out = q.clone()
    assert torch.equal(ops.headwise_attention(q_out, k, v, modes, text_start=0, text_len=4, out=q_out), want)


def test_fully_masked_rows_have_finite_gradients():
    # Under PAIR_PADDING a padded query attends to nothing (output 0). The backward of logsumexp
    # over its row of -inf alone was NaN, which spread to q and k; now the gradients are SDPA's on
    # the stock boolean mask (zero through the masked rows).
    seq, text = 144, 4
    q, k, v = (t.requires_grad_() for t in random_qkv(1, seq, 2, 8, dtype=torch.float64, seed=9))
    keep = torch.ones(1, seq, dtype=torch.bool)
    keep[0, 140:] = False
    padding = ops.Padding(~keep, ops.PAIR_PADDING)
    modes = torch.tensor([MODE_FULL, 0], dtype=torch.int32)
    got = ops.headwise_attention(q, k, v, modes, text_start=0, text_len=text, key_padding=padding, impl="reference")
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    stock = torch.nn.functional.scaled_dot_product_attention(
        *(t[:, :, :1].transpose(1, 2) for t in (q, k, v)), attn_mask=keep[:, None, :, None] & keep[:, None, None, :])
    stock_grads = torch.autograd.grad((stock.transpose(1, 2) * weights[:, :, :1]).sum(), (q, k, v))
    for grad, want in zip(grads, stock_grads):
        torch.testing.assert_close(grad[:, :, 0], want[:, :, 0])


def check_global_rows(impl, q, k, v, modes, layout, padding=None):
    """``global_rows=False`` writes what the default call writes, except the global-query rows of
    arrow and tile heads, which keep what ``out`` held (bit for bit)."""
    kwargs = dict(segments=layout, key_padding=padding, impl=impl)
    every = ops.headwise_attention(q, k, v, modes, out=torch.full_like(q, SENTINEL), **kwargs)
    out = torch.full_like(q, float("nan"))
    ops.headwise_attention(q, k, v, modes, out=out, global_rows=False, **kwargs)
    windowed, kept = modes >= 0, modes != MODE_SKIP
    image = slice(layout.image_start, layout.image_end)
    glob = torch.ones(q.shape[1], dtype=torch.bool)
    glob[image] = False
    assert torch.equal(out[:, image][:, :, kept], every[:, image][:, :, kept])
    full = modes == MODE_FULL
    assert torch.equal(out[:, :, full], every[:, :, full])
    assert bool(out[:, glob][:, :, windowed].isnan().all()), "global rows of windowed heads written"
    assert bool(out[:, :, modes == MODE_SKIP].isnan().all()), "skip heads written"
    with pytest.raises(ValueError, match="return_lse needs every row computed"):
        ops.headwise_attention(q, k, v, modes, out=out, global_rows=False, return_lse=True, **kwargs)


@pytest.mark.parametrize("segments", [[(0, 77)], [(300, 20)], [(0, 30), (330, 25)]])
def test_global_rows_can_be_left_to_the_caller(segments):
    seq = max(start + length for start, length in segments) + (0 if segments[-1][0] else 300)
    q, k, v = random_qkv(2, seq, 4, 16, seed=seq)
    modes = torch.tensor([MODE_FULL, 0, 1, MODE_SKIP], dtype=torch.int32)
    check_global_rows("reference", q, k, v, modes, TokenLayout.from_segments(seq, segments))
