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

__all__ = [
    "headwise_attention", "IMPLEMENTATIONS", "IMAGE_BLOCK", "MODE_FULL", "MODE_SKIP", "check_mode_values", "gluon_available",
    "impl_unsupported", "mode_tensor", "triton_available",
]

logger = logging.getLogger(__name__)

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


def _triton_reason(device: torch.device, dtype: torch.dtype, head_dim: int | None) -> str | None:
    if device.type != "cuda" and not _interpreting():
        return f"tensors are on {device.type}; the Triton kernel needs CUDA (or TRITON_INTERPRET=1)"
    if dtype not in _TRITON_DTYPES:
        return f"dtype {dtype} is not supported by the Triton kernel (use float16 or bfloat16)"
    if head_dim is not None and head_dim not in _TRITON_HEAD_DIMS:
        return f"head dim {head_dim} is not supported by the Triton kernel (supported: {_TRITON_HEAD_DIMS})"
    return triton_available()


def _triton_unsupported(q: torch.Tensor) -> str | None:
    return _triton_reason(q.device, q.dtype, q.shape[-1])


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


def _gluon_reason(device: torch.device, dtype: torch.dtype, head_dim: int | None) -> str | None:
    if device.type != "cuda":
        return f"tensors are on {device.type}; the Gluon kernel needs a CUDA GPU of compute capability 9.0 (Hopper)"
    capability = _capability(device.index if device.index is not None else torch.cuda.current_device())
    if capability != (9, 0):
        return f"the Gluon kernel needs compute capability 9.0 (Hopper: wgmma, setmaxnreg); this GPU has {capability}"
    if dtype not in _TRITON_DTYPES:
        return f"dtype {dtype} is not supported by the Gluon kernel (use float16 or bfloat16)"
    reason = gluon_available()
    if reason is not None:
        return reason
    from . import _gluon

    if head_dim is not None and head_dim not in _gluon.HEAD_DIMS:
        return (f"head dim {head_dim} is not supported by the Gluon kernel (only {_gluon.HEAD_DIMS}; "
                "impl='triton' covers 32/64/128)")
    return None


def impl_unsupported(impl: str, device, dtype: torch.dtype, head_dims=None) -> str | None:
    """Why an explicitly chosen ``impl`` cannot run on ``device`` in ``dtype`` (at ``head_dims``, when
    given), or None. For checks before long work; the Gluon kernel's stride needs are per call."""
    device = torch.device(device)
    reason = {"triton": _triton_reason, "gluon": _gluon_reason}.get(impl)
    if reason is None:
        return None
    dims = sorted(set(head_dims)) if head_dims else [None]
    return next(filter(None, (reason(device, dtype, dim) for dim in dims)), None)


def _gluon_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    reason = _gluon_reason(q.device, q.dtype, q.shape[-1])
    if reason is not None:
        return reason
    from . import _gluon

    for name, t in (("q", q), ("k", k), ("v", v)):
        if _gluon.view_coeffs(t) is None:
            return (f"{name} has strides {tuple(t.stride())} that allow no 2-D TMA view (the Gluon kernel needs "
                    "a unit head-dim stride, 16-byte aligned rows, and batch/head strides that are whole rows "
                    "or fit in one row; impl='triton' takes any strides)")
    return None


def _note_once(message: str) -> None:
    if message not in _auto_notes:
        _auto_notes.add(message)
        logger.info("impl='auto' uses the reference: %s", message)


_MODE_VALUES = "-2 (skip), -1 (full) or w >= 0 (arrow of half-width w blocks)"
# The tensor version at which a head-mode tensor's values were last checked, so that a reused
# tensor costs one host read, not one per call.
_CHECKED = "_ditfastattn_checked_version"


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter: checked at every call
        return None


def check_mode_values(values) -> None:
    """Raise ValueError unless every head mode (host ints) is -2, -1 or >= 0."""
    bad = sorted({int(m) for m in values if int(m) < MODE_SKIP})
    if bad:
        raise ValueError(f"head_modes values must be {_MODE_VALUES}; got {bad}")


def mode_tensor(values, device) -> torch.Tensor:
    """An int32 head-mode tensor made from host values, checked here so that the op never reads it back."""
    check_mode_values(values)
    with torch.inference_mode(False):  # a normal tensor, whose version counter marks it checked
        modes = torch.tensor(list(values), dtype=torch.int32, device=device)
    setattr(modes, _CHECKED, modes._version)
    return modes


def _check_modes_on_host(head_modes: torch.Tensor) -> None:
    # Where no host read is possible (tracing, CUDA graph capture) the kernels skip out-of-range modes.
    if torch.compiler.is_compiling() or (head_modes.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    version = _version(head_modes)
    if version is not None and getattr(head_modes, _CHECKED, None) == version:
        return
    check_mode_values(head_modes.tolist())
    if version is not None:
        setattr(head_modes, _CHECKED, version)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(q, k, v, head_modes, text_start, text_len, out, *, scale=None, check_values=True):
    """The one input check of every implementation; ``check_values`` reads ``head_modes`` on the host."""
    for name, t in (("q", q), ("k", k), ("v", v), ("head_modes", head_modes)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
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
    if not (_is_int(text_start) and _is_int(text_len)):
        raise TypeError(f"text_start and text_len must be ints; got {text_start!r}, {text_len!r}")
    if not 0 <= text_len <= seq:
        raise ValueError(f"text_len must be in [0, {seq}]; got {text_len}")
    if text_start not in (0, seq - text_len):
        raise ValueError(
            f"text tokens must sit at the start or the end so image tokens are contiguous: "
            f"text_start must be 0 or {seq - text_len}, got {text_start}"
        )
    if scale is not None and not (
        isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0
    ):
        raise ValueError(f"scale must be a finite number > 0 (or None for 1 / sqrt(head_dim)); got {scale!r}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor or None; got {type(out).__name__}")
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(
                f"out must match q: {tuple(q.shape)} {q.dtype} on {q.device}; "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}"
            )
    if check_values:
        _check_modes_on_host(head_modes)


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
            Other values raise ValueError; checking them reads the tensor on the host once per
            tensor version (none for tensors from :func:`mode_tensor`, none under tracing or CUDA
            graph capture, where the kernels skip out-of-range modes).
        text_start, text_len: text tokens are ``[text_start, text_start + text_len)``; they must
            sit at the start (FLUX) or the end (SD3) of the sequence. ``text_len`` may be 0.
        out: ``(B, S, H, D)`` output written in place; skip heads leave their slice untouched, so
            plans with skip heads need it. Allocated when omitted.
        scale: softmax scale (finite, > 0), ``1 / sqrt(D)`` by default.
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
    return _attention(q, k, v, head_modes, text_start, text_len, out, scale, impl, return_lse, check_values=True)


def _attention(q, k, v, head_modes, text_start, text_len, out, scale, impl, return_lse, *, check_values: bool):
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}; got {impl!r}")
    _check(q, k, v, head_modes, text_start, text_len, out, scale=scale, check_values=check_values)
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
    """:func:`headwise_attention` into ``out``, as a torch custom op: opaque to torch.compile.

    It does not read ``head_modes`` back (no host sync inside a compiled step): static mode checks
    its mode tables when it builds them, and the kernels skip out-of-range modes.
    """
    _attention(q, k, v, head_modes, text_start, text_len, out, scale, impl, False, check_values=False)


@headwise_attention_.register_fake
def _headwise_attention_fake(q, k, v, head_modes, text_start, text_len, out, scale, impl) -> None:
    return None
