"""Model adapters: one module per model family. Each knows its token layout and how to hook it.

An adapter exposes ``FAMILY``, ``matches(transformer)``, ``describe(transformer) -> ModelSpec``,
``stock_processor_types()`` and ``make_processor(layer, original)``, where ``layer`` is the
runtime's per-layer object with ``attend(q, k, v, *, text_start, text_len, dense)`` and
``text_len()`` (the text length of the current transformer call).
"""

from __future__ import annotations

from types import ModuleType

from . import flux, sd3

_ADAPTERS: tuple[ModuleType, ...] = (sd3, flux)


def adapter_for(transformer) -> ModuleType:
    for adapter in _ADAPTERS:
        if adapter.matches(transformer):
            return adapter
    supported = ", ".join(adapter.MODEL_CLASS for adapter in _ADAPTERS)
    raise TypeError(
        f"ditfastattn does not support {type(transformer).__name__}; supported transformers: {supported} "
        "(pass the pipeline or its `.transformer`)"
    )
