"""Applies a plan during denoising, split by concern:

- :mod:`.rows`: one layer's methods at one step compiled into the op's modes and masks;
- :mod:`.budget`: the memory budget of the cache buffers;
- :mod:`.routing`: whether full heads of mixed layers run on dense SDPA;
- :mod:`.call_geometry`: one layer call's token layout and padding, in the forms the op takes;
- :mod:`.steps`: the scheduler's step count against the plan's;
- :mod:`.session`: the dynamic session (step tracking on the host, buffers, residuals, CFG sharing);
- :mod:`.static`: the static session (device-side step counter and mode tables, for torch.compile);
- :mod:`.caches`: diffusers' own caches next to a plan (which skip layers, where that is refused);
- :mod:`.layer_skip`: diffusers' attention-score skip (perturbed-attention guidance) runs stock;
- :mod:`.install`: ``apply`` / ``remove`` and the hooks.
"""

from .install import _transformer_of, applied, apply, install, remove, uninstall
from .routing import dense_slots, full_head_cost
from .rows import cache_heads, compile_row
from .budget import fit_cache_budget
from .call_geometry import CallGeometry
from .session import LayerRuntime, Session, _Buffers, cfg_batch_error
from .steps import warn_short_generation
from .static import StaticSession

__all__ = [
    "CallGeometry", "LayerRuntime", "Session", "StaticSession", "applied", "apply", "cache_heads", "cfg_batch_error", "compile_row",
    "dense_slots", "fit_cache_budget", "full_head_cost", "install", "remove", "uninstall", "warn_short_generation",
]
