"""PyTorch reference of the per-head statistics calibration scores candidates with: the oracle of
``_stats_triton`` and the implementation on the CPU.

Both reduce in float32. The squared error takes the difference in the inputs' dtype (exact where
the two are within a factor of two of each other, the case that matters), so that no float32 copy
of a layer's output is made.
"""

from __future__ import annotations

import torch


def squared_errors(a: torch.Tensor, b: torch.Tensor, row_start: int, row_len: int) -> torch.Tensor:
    """(H,) summed squared difference of (B, S, H, D) ``a`` and ``b`` over rows [row_start, row_start + row_len)."""
    rows = slice(row_start, row_start + row_len)
    return torch.linalg.vector_norm(a[:, rows] - b[:, rows], dim=(0, 1, 3), dtype=torch.float32).square()


def variances(x: torch.Tensor) -> torch.Tensor:
    """(H,) summed squared deviation of each head of (B, S, H, D) ``x`` about the head's own mean."""
    mean = x.mean(dim=(0, 1, 3), keepdim=True, dtype=torch.float32)
    return torch.linalg.vector_norm(x - mean.to(x.dtype), dim=(0, 1, 3), dtype=torch.float32).square()
