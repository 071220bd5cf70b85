"""The reference op against an independently built dense mask, and the op's input validation."""

from __future__ import annotations

import pytest
import torch

from ditfastattn import ops
from ditfastattn._geometry import IMAGE_BLOCK, MODE_FULL, MODE_SKIP

SENTINEL = 1234.5


def dense_mask(seq: int, text_start: int, text_len: int, mode: int) -> torch.Tensor:
    """(S, S) bool mask of the pairs a head keeps, written straight from the definition."""
    index = torch.arange(seq)
    is_text = (index >= text_start) & (index < text_start + text_len)
    if mode == MODE_FULL:
        return torch.ones(seq, seq, dtype=torch.bool)
    image_start = text_len if text_start == 0 else 0
    block = torch.div(index - image_start, IMAGE_BLOCK, rounding_mode="floor")
    near = (block[:, None] - block[None, :]).abs() <= mode
    return is_text[:, None] | is_text[None, :] | near


def masked_reference(q, k, v, modes, text_start, text_len):
    """Float64 dense masked attention (and log-sum-exp) per head; skip heads give None."""
    seq, heads = q.shape[1], q.shape[2]
    outs, lses = [], []
    for head in range(heads):
        mode = int(modes[head])
        if mode == MODE_SKIP:
            outs.append(None)
            lses.append(None)
            continue
        qh, kh, vh = (t[:, :, head].double() for t in (q, k, v))
        scores = qh @ kh.transpose(-1, -2) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(~dense_mask(seq, text_start, text_len, mode), float("-inf"))
        outs.append(torch.softmax(scores, -1) @ vh)
        lses.append(torch.logsumexp(scores, -1))
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


def test_auto_uses_the_reference_on_cpu():
    q, k, v, modes = _args()
    auto = ops.headwise_attention(q, k, v, modes, text_start=0, text_len=4)
    reference = ops.headwise_attention(q, k, v, modes, text_start=0, text_len=4, impl="reference")
    assert torch.equal(auto, reference)


@pytest.mark.parametrize("impl", ops.IMPLEMENTATIONS)
def test_out_of_range_modes_are_refused_by_every_impl(impl):
    q, k, v, _ = _args(heads=3)
    for bad in ([-3, -1, 0], [-1, -100, 2]):
        with pytest.raises(ValueError, match=r"must be -2 \(skip\), -1 \(full\) or w >= 0"):
            ops.headwise_attention(q, k, v, torch.tensor(bad, dtype=torch.int32), text_start=0, text_len=4,
                                   out=torch.zeros_like(q), impl=impl)


def test_mode_values_are_read_once_per_tensor_version():
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
