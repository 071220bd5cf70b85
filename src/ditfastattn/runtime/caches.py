"""diffusers' own caches (``transformer.enable_cache(...)``) next to a plan.

All of them but the text K/V cache leave some attention layers uncalled at some steps:
FirstBlockCache, MagCache and SeaCache skip whole blocks, PyramidAttentionBroadcast, FasterCache and
TaylorSeer reuse or predict attention modules' outputs. The dynamic runtime composes with them
exactly: a ``cache`` head whose layer did not run at the step before computes instead, as after
skip-layer guidance, so the plan removes less than it counts (logged once). Static mode would read
such a layer's last output as the previous step's, and calibration must see every layer at every
step: both refuse them before any work.
"""

from __future__ import annotations

# Caches that run every attention layer at every step (exact: the text's keys and values reused).
_EVERY_LAYER = frozenset({"TextKVCacheConfig"})


def layer_skipping_cache(model) -> str | None:
    """The diffusers cache enabled on ``model`` that skips attention layers at some steps, by name
    (``"FirstBlockCache"``); None where there is none, or one that runs every layer."""
    if not getattr(model, "is_cache_enabled", False):
        return None
    name = type(getattr(model, "_cache_config", None)).__name__
    return None if name in _EVERY_LAYER else name.removesuffix("Config")


def refuse_layer_skipping_caches(models: dict[str, object], why: str, fix: str = "") -> None:
    """Raise, naming the fix, where a model of ``models`` (name as the user reaches it -> model) has a
    diffusers cache that skips attention layers; ``why`` says what needs every layer at every step."""
    for name, model in models.items():
        cache = layer_skipping_cache(model)
        if cache is not None:
            raise ValueError(
                f"{name} has diffusers' {cache} enabled, which skips attention layers at some steps, but {why}: "
                f"{fix}call {name}.disable_cache() first (enable_cache(...) again after)"
            )


def named(experts: list, pipe) -> dict[str, object]:
    """The transformers a plan runs on, by the names the user reaches them by."""
    return dict(zip(("pipe.transformer" if pipe is not None else "transformer", "pipe.transformer_2"), experts))
