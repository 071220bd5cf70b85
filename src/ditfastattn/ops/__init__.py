"""Head-wise attention op: every head of one launch runs its own mode (full, skip, arrow).

The public entry point validates and dispatches; the implementations live in ``_reference`` (pure
PyTorch, the oracle, any device), ``_triton`` (fused GPU kernel) and ``_gluon`` (warp-specialised
Hopper kernel, head dims 64 and 128). None imports another (``_launch`` is the launch helper the
two GPU kernels share).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re

import torch

from .._geometry import IMAGE_BLOCK, MODE_FULL, MODE_SKIP

__all__ = ["headwise_attention", "IMPLEMENTATIONS", "IMAGE_BLOCK", "MODE_FULL", "MODE_SKIP", "gluon_available", "triton_available"]

logger = logging.getLogger("ditfastattn")

IMPLEMENTATIONS = ("auto", "reference", "triton", "gluon")
_TRITON_DTYPES = (torch.float16, torch.bfloat16)
_TRITON_HEAD_DIMS = (32, 64, 128)
_auto_notes: set[str] = set()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> str | None:
    """None when the Triton kernel can run here, otherwise the reason it cannot."""
    try:
        from . import _triton  # noqa: F401
    except ImportError as err:  # triton missing
        return f"triton cannot be imported ({err})"
    except AttributeError as err:  # a triton older than the APIs the kernel uses (triton.knobs: 3.4)
        return f"this triton lacks an API the kernel uses ({err}); install triton >= 3.4"
    return None


def _triton_unsupported(q: torch.Tensor) -> str | None:
    if q.device.type != "cuda" and not _interpreting():
        return f"tensors are on {q.device.type}; the Triton kernel needs CUDA (or TRITON_INTERPRET=1)"
    if q.dtype not in _TRITON_DTYPES:
        return f"dtype {q.dtype} is not supported by the Triton kernel (use float16 or bfloat16)"
    if q.shape[-1] not in _TRITON_HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not supported by the Triton kernel (supported: {_TRITON_HEAD_DIMS})"
    return triton_available()


# The kernel passes its partitions to gl.warp_specialize as (function, args) pairs, the form Gluon
# took in Triton 3.6; 3.5 imports fine and fails at compile time.
_GLUON_MIN_TRITON = (3, 6)


@functools.cache
def gluon_available() -> str | None:
    """None when the Gluon kernel can be built here (on any device), otherwise the reason it cannot."""
    try:
        import triton

        from . import _gluon  # noqa: F401
    except ImportError as err:  # triton missing, or without Gluon's Hopper API
        return f"triton.experimental.gluon (Hopper) cannot be imported ({err})"
    version = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", triton.__version__).groups())
    if version < _GLUON_MIN_TRITON:
        return (f"the Gluon kernel needs triton >= {'.'.join(map(str, _GLUON_MIN_TRITON))} (its Gluon API); "
                f"triton {triton.__version__} is installed")
    return None


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _gluon_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    if q.device.type != "cuda":
        return f"tensors are on {q.device.type}; the Gluon kernel needs a CUDA GPU of compute capability 9.0 (Hopper)"
    capability = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if capability != (9, 0):
        return f"the Gluon kernel needs compute capability 9.0 (Hopper: wgmma, setmaxnreg); this GPU has {capability}"
    if q.dtype not in _TRITON_DTYPES:
        return f"dtype {q.dtype} is not supported by the Gluon kernel (use float16 or bfloat16)"
    reason = gluon_available()
    if reason is not None:
        return reason
    from . import _gluon

    if q.shape[-1] not in _gluon.HEAD_DIMS:
        return (f"head dim {q.shape[-1]} is not supported by the Gluon kernel (only {_gluon.HEAD_DIMS}; "
                "impl='triton' covers 32/64/128)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if _gluon.view_coeffs(t) is None:
            return (f"{name} has strides {tuple(t.stride())} that allow no 2-D TMA view (the Gluon kernel needs "
                    "a unit head-dim stride, 16-byte aligned rows, and batch/head strides that are whole rows "
                    "or fit in one row; impl='triton' takes any strides)")
    return None


def _note_once(message: str) -> None:
    if message not in _auto_notes:
        _auto_notes.add(message)
        logger.info("ditfastattn.ops: impl='auto' uses the reference: %s", message)


def _check(q, k, v, head_modes, text_start, text_len, out):
    if q.dim() != 4:
        raise ValueError(f"q must be (batch, seq, heads, head_dim); got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"q, k, v must share one floating dtype (fp16, bf16, fp32, fp64); got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == head_modes.device):
        raise ValueError(
            f"q, k, v and head_modes must be on one device; got {q.device}, {k.device}, {v.device}, {head_modes.device}"
        )
    batch, seq, heads, _ = q.shape
    if head_modes.dtype != torch.int32 or head_modes.shape != (heads,):
        raise ValueError(f"head_modes must be int32 of shape ({heads},); got {head_modes.dtype} {tuple(head_modes.shape)}")
    if not 0 <= text_len <= seq:
        raise ValueError(f"text_len must be in [0, {seq}]; got {text_len}")
    if text_start not in (0, seq - text_len):
        raise ValueError(
            f"text tokens must sit at the start or the end so image tokens are contiguous: "
            f"text_start must be 0 or {seq - text_len}, got {text_start}"
        )
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(
                f"out must match q: {tuple(q.shape)} {q.dtype} on {q.device}; "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}"
            )


def headwise_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_modes: torch.Tensor,
    *,
    text_start: int,
    text_len: int,
    out: torch.Tensor | None = None,
    scale: float | None = None,
    impl: str = "auto",
    return_lse: bool = False,
):
    """Joint text+image attention where each head runs its own mode.

    Args:
        q, k, v: ``(B, S, H, D)`` tensors (strided views are fine), one dtype and device.
        head_modes: int32 ``(H,)`` on q's device: ``-1`` full, ``-2`` skip, ``w >= 0`` arrow whose
            image queries in block ``i`` see image key blocks ``|i - j| <= w`` and all text keys.
            Image blocks are ``IMAGE_BLOCK`` (128) tokens counted from the first image token.
        text_start, text_len: text tokens are ``[text_start, text_start + text_len)``; they must
            sit at the start (FLUX) or the end (SD3) of the sequence. ``text_len`` may be 0.
        out: ``(B, S, H, D)`` output written in place; skip heads leave their slice untouched, so
            plans with skip heads need it. Allocated when omitted.
        scale: softmax scale, ``1 / sqrt(D)`` by default.
        impl: ``"reference"``, ``"triton"``, ``"gluon"`` (Hopper only: sm_90, head dim 64 or 128,
            fp16/bf16, q/k/v strides that allow a TMA view), or ``"auto"`` (on CUDA the Gluon
            kernel where it supports the inputs, else Triton where it does, else the reference,
            logged once; the reference on the CPU). An explicit impl never falls back.
            ``"triton"`` runs on the CPU only under ``TRITON_INTERPRET=1``.
        return_lse: also return the float32 log-sum-exp ``(B, H, S)`` of every computed row
            (``-inf`` for skip heads), for merging partial results.

    Returns:
        ``out``, or ``(out, lse)`` when ``return_lse``.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}; got {impl!r}")
    _check(q, k, v, head_modes, text_start, text_len, out)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if out is None:
        # One host sync, only on this convenience path: the runtime always passes `out`.
        if bool((head_modes == MODE_SKIP).any()):
            raise ValueError("head_modes contains skip heads (-2): pass `out`, whose skipped slices are kept")
        out = torch.empty_like(q)

    if impl == "auto":
        # The interpreter is for testing the kernel, never an automatic choice on the CPU.
        if q.device.type != "cuda":
            impl = "reference"
        elif _gluon_unsupported(q, k, v) is None:
            # Measured on an H100 (benchmarks/KERNEL_NOTES.md): faster than the Triton kernel on
            # every head-dim-128 plan, dense 1.12-1.22x, sparse 1.04-1.20x.
            impl = "gluon"
        else:
            reason = _triton_unsupported(q)
            impl = "triton" if reason is None else "reference"
            if reason is not None:
                _note_once(reason)
    elif impl == "triton":
        reason = _triton_unsupported(q)
        if reason is not None:
            raise RuntimeError(f"impl='triton' cannot run: {reason}. Use impl='reference' or impl='auto'.")
    elif impl == "gluon":
        reason = _gluon_unsupported(q, k, v)
        if reason is not None:
            raise RuntimeError(f"impl='gluon' cannot run: {reason}. Use impl='triton', impl='reference' or impl='auto'.")

    if impl == "gluon":
        from . import _gluon

        out, lse = _gluon.attention(q, k, v, head_modes, text_start, text_len, out, scale, return_lse)
    elif impl == "triton":
        from . import _triton

        out, lse = _triton.attention(q, k, v, head_modes, text_start, text_len, out, scale, return_lse)
    else:
        from . import _reference

        if (head_modes < MODE_SKIP).any():
            raise ValueError(f"head_modes values must be -2 (skip), -1 (full) or >= 0 (arrow); got {head_modes.tolist()}")
        out, lse = _reference.attention(q, k, v, head_modes, text_start, text_len, out, scale, return_lse)
    return (out, lse) if return_lse else out


@torch.library.custom_op("ditfastattn::headwise_attention_", mutates_args=("out",))
def headwise_attention_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_modes: torch.Tensor,
    text_start: int,
    text_len: int,
    out: torch.Tensor,
    scale: float,
    impl: str,
) -> None:
    """:func:`headwise_attention` into ``out``, as a torch custom op: opaque to torch.compile."""
    headwise_attention(q, k, v, head_modes, text_start=text_start, text_len=text_len, out=out, scale=scale, impl=impl)


@headwise_attention_.register_fake
def _headwise_attention_fake(q, k, v, head_modes, text_start, text_len, out, scale, impl) -> None:
    return None
