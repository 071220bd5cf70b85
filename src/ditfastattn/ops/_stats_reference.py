"""PyTorch reference of the per-head statistics calibration scores candidates with: the oracle of
``_stats_triton`` and the implementation on the CPU.

Both reduce in float32 (float64 for float64 inputs) and return float32. The squared error takes
the difference in the inputs' dtype (exact where the two are within a factor of two of each other,
the case that matters), so that no float32 copy of a layer's output is made. The variance takes the
deviations in the reduction's dtype: a mean rounded to bf16 is off by up to half its spacing, which
for data far from zero is as large as the spread.
"""

from __future__ import annotations

import torch


def _accumulation(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def squared_errors(a: torch.Tensor, b: torch.Tensor, row_start: int, row_len: int) -> torch.Tensor:
    """(H,) summed squared difference of (B, S, H, D) ``a`` and ``b`` over rows [row_start, row_start + row_len)."""
    rows = slice(row_start, row_start + row_len)
    norm = torch.linalg.vector_norm(a[:, rows] - b[:, rows], dim=(0, 1, 3), dtype=_accumulation(a))
    return norm.square().to(torch.float32)


def variances(x: torch.Tensor) -> torch.Tensor:
    """(H,) summed squared deviation of each head of (B, S, H, D) ``x`` about the head's own mean."""
    mean = x.mean(dim=(0, 1, 3), keepdim=True, dtype=_accumulation(x))
    return torch.linalg.vector_norm(x - mean, dim=(0, 1, 3)).square().to(torch.float32)
