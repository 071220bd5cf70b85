"""Caches that skip attention layers at some steps, next to a plan.

diffusers' own (``transformer.enable_cache(...)``), all but the text K/V cache: FirstBlockCache,
MagCache and SeaCache skip whole blocks, PyramidAttentionBroadcast, FasterCache and TaylorSeer reuse
or predict attention modules' outputs. The block caches of other libraries (cache-dit's DBCache,
ParaAttention's first-block cache) patch the transformer's forward and mark it
``transformer._is_cached``. The dynamic runtime composes with all of them exactly: a ``cache`` head
whose layer did not run at the step before computes instead, as after skip-layer guidance, so the
plan removes less than it counts (logged once). Static mode would read such a layer's last output as
the previous step's, and calibration must see every layer at every step: both refuse them before any
work.
"""

from __future__ import annotations

# Caches that run every attention layer at every step (exact: the text's keys and values reused).
_EVERY_LAYER = frozenset({"TextKVCacheConfig"})


def layer_skipping_cache(model, name: str = "transformer") -> tuple[str, str] | None:
    """The cache on ``model`` (reached as ``name``) that skips attention layers at some steps: what
    it is (``"diffusers' FirstBlockCache"``) and how to turn it off; None where there is none, or one
    that runs every layer."""
    if getattr(model, "is_cache_enabled", False):
        kind = type(getattr(model, "_cache_config", None)).__name__
        if kind not in _EVERY_LAYER:
            undo = f"call {name}.disable_cache() first (enable_cache(...) again after)"
            return f"diffusers' {kind.removesuffix('Config')}", undo
    if getattr(model, "_is_cached", False) is True:
        return ("a block cache (cache-dit or ParaAttention: it set _is_cached)",
                "turn that cache off first (cache-dit: cache_dit.disable_cache(pipe))")
    return None


def refuse_layer_skipping_caches(models: dict[str, object], why: str, fix: str = "") -> None:
    """Raise, naming the fix, where a model of ``models`` (name as the user reaches it -> model) has a
    cache that skips attention layers; ``why`` says what needs every layer at every step."""
    for name, model in models.items():
        cache = layer_skipping_cache(model, name)
        if cache is not None:
            what, undo = cache
            raise ValueError(f"{name} has {what} enabled, which skips attention layers at some steps, but {why}: "
                             f"{fix}{undo}")


def named(experts: list, pipe) -> dict[str, object]:
    """The transformers a plan runs on, by the names the user reaches them by."""
    return dict(zip(("pipe.transformer" if pipe is not None else "transformer", "pipe.transformer_2"), experts))
