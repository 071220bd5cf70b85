"""Model adapters: one module per model family, each satisfying the contract in :mod:`.base`.

Families whose stock processors call diffusers' ``dispatch_attention_fn`` (FLUX.1 and Kontext,
FLUX.2, Chroma, Qwen-Image, Z-Image, HunyuanImage 2.1) are metadata only: which transformer, which
attention layers, where a call's image tokens are, how its pipelines batch CFG; :mod:`.dispatch`
intercepts their attention. SD3 calls SDPA itself and brings its own processor.
"""

from __future__ import annotations

from .. import model
from . import chroma, flux, flux2, hunyuanimage, qwenimage, sd3, zimage
from .base import Adapter

_ADAPTERS: tuple[Adapter, ...] = (sd3, flux.ADAPTER, flux2.ADAPTER, chroma.ADAPTER, qwenimage.ADAPTER, zimage.ADAPTER,
                                  hunyuanimage.ADAPTER)


def adapter_for(transformer) -> Adapter:
    for adapter in _ADAPTERS:
        if adapter.matches(transformer):
            return adapter
    supported = ", ".join(adapter.MODEL_CLASS for adapter in _ADAPTERS)
    raise TypeError(
        f"ditfastattn does not support {type(transformer).__name__}; supported transformers: {supported} "
        "(pass the pipeline or its `.transformer`)"
    )


def describe(pipe_or_transformer) -> model.ModelSpec:
    """The :class:`~ditfastattn.model.ModelSpec` of a supported transformer, or of a pipeline's."""
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    return adapter_for(transformer).describe(transformer)


model.register_describer(describe)


def check_cfg_sharing(adapter: Adapter, method_names) -> None:
    """cfg_share needs CFG as one [unconditional; conditional] batch, which not every family uses."""
    if not adapter.CFG_IN_BATCH and any(name.startswith("cfg_share") for name in method_names):
        raise ValueError(
            f"{adapter.MODEL_CLASS} pipelines run classifier-free guidance as {adapter.CFG}, "
            "so cfg_share cannot apply; drop the cfg_share methods"
        )
