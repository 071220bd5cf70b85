"""What makes calibration's scoring cheap: the one-pass per-head statistics (``ops.head_squared_errors``,
``ops.head_variances``; the Triton kernels through Triton's interpreter), arrow candidates scored
on their image rows only, and cfg_share candidates scored without building their output.

Yardstick for the kernels: the error against a float64 computation must stay within twice that of
the PyTorch reference (which takes the difference in the inputs' dtype) plus a few float32
roundings of the result.
"""

from __future__ import annotations

import types

import pytest
import torch
from test_tiles_triton import _interpreted  # noqa: F401 (the interpreter for this module's kernels)

from ditfastattn import ops
from ditfastattn._calibration_session import _CalibrationSession, _Candidate
from ditfastattn.model import TokenLayout

EPS32 = torch.finfo(torch.float32).eps


def _tensor(shape, dtype, gen, layout="bshd", scale=1.0, offset=0.0):
    batch, seq, heads, dim = shape
    if layout == "bhsd":  # (B, H, S, D) storage seen as (B, S, H, D)
        x = torch.randn(batch, heads, seq, dim, generator=gen).transpose(1, 2)
    elif layout == "strided":  # every other element of the head dim
        x = torch.randn(batch, seq, heads, 2 * dim, generator=gen)[..., ::2]
    else:
        x = torch.randn(batch, seq, heads, dim, generator=gen)
    return (x * scale + offset).to(dtype)


def _relative(got, truth):
    return ((got.double() - truth).abs().max() / truth.abs().max()).item()


# (shape, layout, rows): awkward sizes (heads across a block of 8, head dims that are no power of
# two), strided storage, a row range and a single row.
SHAPES = [
    ((3, 37, 5, 24), "bshd", None),
    ((2, 131, 9, 64), "bhsd", (7, 100)),
    ((1, 70, 3, 40), "strided", (69, 1)),
    ((4, 19, 1, 128), "bshd", (0, 19)),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape,layout,rows", SHAPES)
def test_squared_errors_match_float64(shape, layout, rows, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    a = _tensor(shape, dtype, gen, layout)
    b = (a.float() + 0.05 * _tensor(shape, torch.float32, gen, layout)).to(dtype)
    start, length = rows or (0, shape[1])
    truth = (a.double() - b.double())[:, start : start + length].square().sum(dim=(0, 1, 3))
    got = ops.head_squared_errors(a, b, rows=rows, impl="triton")
    reference = ops.head_squared_errors(a, b, rows=rows, impl="reference")
    assert got.dtype == torch.float32 and got.shape == (shape[2],)
    assert _relative(got, truth) <= 2 * _relative(reference, truth) + 8 * EPS32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape,layout,rows", SHAPES)
def test_variances_match_float64(shape, layout, rows, dtype):
    gen = torch.Generator().manual_seed(sum(shape) + 1)
    x = _tensor(shape, dtype, gen, layout, scale=2.0, offset=3.0)
    xd = x.double()
    truth = (xd - xd.mean(dim=(0, 1, 3), keepdim=True)).square().sum(dim=(0, 1, 3))
    got = ops.head_variances(x, impl="triton")
    reference = ops.head_variances(x, impl="reference")
    assert got.dtype == torch.float32 and got.shape == (shape[2],)
    assert _relative(got, truth) <= 2 * _relative(reference, truth) + 8 * EPS32


def test_variances_survive_a_mean_far_from_zero():
    # Mean 1e4, spread 1: the one-pass sum of squares in float32 loses every digit here. Each tile's
    # mean carries a float32 rounding of about log2(tile) * eps * 1e4 ~ 1e-2, which enters the squared
    # deviations only squared: 1e-4 relative at most.
    gen = torch.Generator().manual_seed(3)
    x = _tensor((2, 300, 3, 64), torch.float32, gen, offset=1e4)
    xd = x.double()
    truth = (xd - xd.mean(dim=(0, 1, 3), keepdim=True)).square().sum(dim=(0, 1, 3))
    n = x.shape[0] * x.shape[1] * x.shape[3]
    one_pass = x.square().sum(dim=(0, 1, 3)) - x.sum(dim=(0, 1, 3)).square() / n
    assert _relative(one_pass, truth) > 0.5
    assert _relative(ops.head_variances(x, impl="triton"), truth) < 1e-4


def test_reference_variances_subtract_the_mean_unrounded():
    # bf16 holds 1024 and 1032 but not their mean 1028 (spacing 8 there): rounded to bf16 (1024) before
    # the subtraction, it made every deviation 0 or 8, a sum of 4096 for the true 128 * 4**2 = 2048.
    x = torch.tensor([1024.0, 1032.0], dtype=torch.bfloat16).repeat(64).reshape(1, 128, 1, 1)
    torch.testing.assert_close(ops.head_variances(x, impl="reference"), torch.tensor([2048.0]))


def test_statistics_of_float64_outputs_reduce_in_float64():
    # Accepted as floating outputs, they crashed: vector_norm takes no float32 reduction of float64.
    gen = torch.Generator().manual_seed(8)
    a = _tensor((2, 37, 3, 24), torch.float64, gen, offset=1e4)
    b = a + _tensor((2, 37, 3, 24), torch.float64, gen, scale=1e-3)
    truth = (a - a.mean(dim=(0, 1, 3), keepdim=True)).square().sum(dim=(0, 1, 3))
    variances, errors = ops.head_variances(a), ops.head_squared_errors(a, b, rows=(5, 30))
    assert variances.dtype == errors.dtype == torch.float32
    assert _relative(variances, truth) <= EPS32
    assert _relative(errors, (a - b)[:, 5:35].square().sum(dim=(0, 1, 3))) <= EPS32


def test_statistics_check_their_inputs(monkeypatch):
    a = torch.randn(2, 10, 3, 8)
    with pytest.raises(ValueError, match=r"rows must be \(start, length\) ints within the 10 rows"):
        ops.head_squared_errors(a, a, rows=(4, 7))
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        ops.head_squared_errors(a, a[:, :9])
    with pytest.raises(ValueError, match=r"\(batch, seq, heads, head_dim\)"):
        ops.head_variances(a[0])
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.head_variances(a, impl="gluon")
    with pytest.raises(RuntimeError, match=r"impl='triton' cannot run: dtype torch.float64 .*impl='reference'"):
        ops.head_variances(a.double(), impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="impl='triton' cannot run: tensors are on cpu"):
        ops.head_squared_errors(a, a, impl="triton")
    # auto is the reference on the CPU; empty row ranges and tensors are exact zeros
    assert ops.head_variances(a).shape == (3,)
    assert torch.equal(ops.head_squared_errors(a, a + 1, rows=(3, 0)), torch.zeros(3))
    assert torch.equal(ops.head_variances(a[:, :0]), torch.zeros(3))


def _errors(candidate, exact, layout):
    session = types.SimpleNamespace(impl="reference")
    return _CalibrationSession._squared_errors(session, candidate, exact, layout)


def test_arrow_candidates_count_their_image_rows_only():
    # Global rows are left unwritten (here NaN): they are not read.
    gen = torch.Generator().manual_seed(5)
    layout = TokenLayout.from_segments(40, [(0, 6), (31, 9)])
    exact = torch.randn(2, 40, 3, 8, generator=gen)
    out = exact + 0.1 * torch.randn(2, 40, 3, 8, generator=gen)
    out[:, :6] = out[:, 31:] = float("nan")
    rows = (layout.image_start, layout.image_len)
    got = _errors(_Candidate(0, out, rows=rows), exact, layout)
    torch.testing.assert_close(got, (out - exact)[:, 6:31].square().sum(dim=(0, 1, 3)))
    assert torch.equal(_errors(_Candidate(0, exact), exact, layout), torch.zeros(3))


@pytest.mark.parametrize("arrow", [True, False])
def test_cfg_share_candidates_score_the_output_they_stand_for(arrow):
    # [unconditional; conditional]: both halves take the conditional half's output; where an arrow's
    # global rows are not computed, the conditional half's exact rows, which they equal.
    gen = torch.Generator().manual_seed(6)
    layout = TokenLayout.from_segments(40, [(0, 6), (31, 9)])
    exact = torch.randn(4, 40, 3, 8, generator=gen)
    if arrow:
        out = exact + 0.1 * torch.randn(4, 40, 3, 8, generator=gen)
        full = out.clone()
        full[:, :6], full[:, 31:] = exact[:, :6], exact[:, 31:]
        out[:, :6] = out[:, 31:] = float("nan")
        candidate = _Candidate(0, out, rows=(layout.image_start, layout.image_len), shared=True)
    else:
        out = full = exact
        candidate = _Candidate(0, exact, shared=True)
    shared = torch.cat([full[2:], full[2:]])
    torch.testing.assert_close(_errors(candidate, exact, layout), (shared - exact).square().sum(dim=(0, 1, 3)))

