"""Per-head statistics of attention outputs, as calibration scores candidates: validation and the
one choice of implementation (``_stats_reference`` in PyTorch, ``_stats_triton`` on CUDA; neither
imports the other)."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

STATS_IMPLEMENTATIONS = ("auto", "reference", "triton")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_noted: set[str] = set()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_reason(x: torch.Tensor) -> str | None:
    if x.device.type != "cuda" and not _interpreting():
        return f"tensors are on {x.device.type}; the Triton kernels need CUDA (or TRITON_INTERPRET=1)"
    if x.dtype not in _KERNEL_DTYPES:
        return f"dtype {x.dtype} is not supported by the Triton kernels (float16, bfloat16, float32)"
    try:
        from . import _stats_triton  # noqa: F401
    except ImportError as err:
        return f"triton cannot be imported ({err})"
    return None


def _choose(impl: str, x: torch.Tensor) -> str:
    if impl not in STATS_IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {STATS_IMPLEMENTATIONS}; got {impl!r}")
    if impl == "reference" or (impl == "auto" and x.device.type != "cuda"):
        return "reference"
    reason = _triton_reason(x)
    if reason is None:
        return "triton"
    if impl == "triton":
        raise RuntimeError(f"impl='triton' cannot run: {reason}. Use impl='reference' or impl='auto'.")
    if reason not in _noted:
        _noted.add(reason)
        logger.info("per-head statistics use the PyTorch reference: %s", reason)
    return "reference"


def _check_output(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be (batch, seq, heads, head_dim); got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor; got {x.dtype}")


def head_squared_errors(a: torch.Tensor, b: torch.Tensor, *, rows: tuple[int, int] | None = None,
                        impl: str = "auto") -> torch.Tensor:
    """Each head's summed squared difference of ``a`` against ``b`` (over batch, rows and head dim), in float32.

    Args:
        a, b: ``(B, S, H, D)`` tensors of one shape, dtype and device (strided views are fine).
        rows: ``(start, length)``: only the sequence rows ``[start, start + length)`` (for example
            the image segment, where rows outside it are not computed); all rows when None.
        impl: ``"triton"`` (CUDA, fp16/bf16/fp32: one pass, the difference in float32, nothing
            materialised), ``"reference"`` (PyTorch: the difference in the inputs' dtype), or
            ``"auto"`` (Triton on CUDA where it runs, else the reference). An explicit impl never
            falls back.

    Returns:
        ``(H,)`` float32.
    """
    _check_output("a", a)
    _check_output("b", b)
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"a and b must have one shape, dtype and device; got {tuple(a.shape)} {a.dtype} on "
                         f"{a.device} and {tuple(b.shape)} {b.dtype} on {b.device}")
    seq = a.shape[1]
    start, length = (0, seq) if rows is None else rows
    if not (all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (start, length))
            and start + length <= seq):
        raise ValueError(f"rows must be (start, length) ints within the {seq} rows of the sequence; got {rows!r}")
    chosen = _choose(impl, a)
    if length == 0 or a.numel() == 0:
        return torch.zeros(a.shape[2], dtype=torch.float32, device=a.device)
    if chosen == "reference":
        from . import _stats_reference

        return _stats_reference.squared_errors(a, b, start, length)
    from . import _stats_triton

    return _stats_triton.squared_errors(a, b, start, length)


def head_variances(x: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Each head's summed squared deviation about its own mean (over batch, rows and head dim), in float32.

    ``x`` is ``(B, S, H, D)``; ``impl`` as for :func:`head_squared_errors` (the Triton kernel merges
    per-tile moments with Chan's update: no cancellation however large the mean). Returns ``(H,)``.
    """
    _check_output("x", x)
    chosen = _choose(impl, x)
    if x.numel() == 0:
        return torch.zeros(x.shape[2], dtype=torch.float32, device=x.device)
    if chosen == "reference":
        from . import _stats_reference

        return _stats_reference.variances(x)
    from . import _stats_triton

    return _stats_triton.variances(x)
