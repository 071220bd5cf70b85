"""Model adapters: one module per model family, each satisfying the contract in :mod:`.base`.

Families whose stock processors call diffusers' ``dispatch_attention_fn`` (FLUX.1 and Kontext,
FLUX.2, Chroma, Qwen-Image, Z-Image, HunyuanImage 2.1, HunyuanVideo and 1.5, Wan 2.x) are metadata
only: which transformer, which attention layers, where a call's image (video) tokens are, how its
pipelines batch CFG; :mod:`.dispatch` intercepts their attention, and CogVideoX's SDPA call the same
way. SD3 calls SDPA itself and brings its own processor.
"""

from __future__ import annotations

import importlib

import torch

from .. import model
from ..methods import parse_method
from . import sd3
from .base import Adapter

_FAMILIES = ("flux", "flux2", "chroma", "qwenimage", "zimage", "hunyuanimage", "hunyuanvideo", "hunyuanvideo15",
             "cogvideox", "wan")
_missing: dict[str, str] = {}  # family -> why this diffusers cannot load it


def _load() -> tuple[Adapter, ...]:
    """The adapters this diffusers can load: a family newer than it (FLUX.2, Z-Image and HunyuanImage
    2.1 need diffusers 0.36; HunyuanVideo 1.5 is as recent) is left out, and named when a
    transformer is not supported."""
    adapters: list[Adapter] = [sd3]
    for family in _FAMILIES:
        try:
            adapters.append(importlib.import_module(f".{family}", __name__).ADAPTER)
        except ImportError as err:
            _missing[family] = str(err)
    return tuple(adapters)


_ADAPTERS = _load()


def adapter_for(transformer, *, context_parallel: bool = False) -> Adapter:
    """The adapter that runs ``transformer``; refuses one under diffusers' parallelism, which the
    runtime and calibration do not follow (they would see one rank's tokens or heads), unless
    ``context_parallel`` (the Ulysses sessions of ``apply`` and ``calibrate``, which check the
    configuration themselves)."""
    adapter = _match(transformer)
    if not context_parallel:
        _check_not_parallel(transformer)
    return adapter


def parallel_config(transformer):
    """diffusers' ``ParallelConfig`` of ``transformer`` (``enable_parallelism`` sets it on the model
    and its processors; a processor configured by hand counts too), or None."""
    config = getattr(transformer, "_parallel_config", None)
    if config is None:
        processors = (getattr(module, "processor", None) for module in transformer.modules())
        config = next((p._parallel_config for p in processors if getattr(p, "_parallel_config", None) is not None), None)
    return config


def _check_not_parallel(transformer) -> None:
    """ValueError when diffusers' context or tensor parallelism is enabled on ``transformer``."""
    config = parallel_config(transformer)
    if config is None:
        return
    if getattr(config, "tensor_parallel_config", None) is not None:
        raise ValueError(parallel_error(transformer, "tensor"))
    raise ValueError(
        f"this {type(transformer).__name__} runs under diffusers' context parallelism (enable_parallelism); of "
        "ditfastattn, apply() and calibrate() run there (Ulysses). Evaluation runs one whole model per process: "
        "evaluate on a model loaded without parallel_config / enable_parallelism"
    )


def parallel_error(transformer, kind: str) -> str:
    """Why ditfastattn refuses ``transformer`` under diffusers' ``kind`` parallelism, naming what runs."""
    return (
        f"this {type(transformer).__name__} runs under diffusers' {kind} parallelism (enable_parallelism), which "
        "ditfastattn does not support; it supports one full model per process (a single GPU, or data parallelism "
        "with a whole model on each GPU), and apply() and calibrate() also Ulysses context parallelism "
        "(enable_parallelism(config=ContextParallelConfig(ulysses_degree=N)))"
    )


def _match(transformer) -> Adapter:
    for adapter in _ADAPTERS:
        if adapter.matches(transformer):
            return adapter
    inner = getattr(transformer, "_orig_mod", None)  # torch.compile(model)'s wrapper
    if isinstance(inner, torch.nn.Module) and any(adapter.matches(inner) for adapter in _ADAPTERS):
        raise TypeError(
            f"this is torch.compile's wrapper ({type(transformer).__name__}) of a {type(inner).__name__}, whose "
            "attention ditfastattn cannot reach: put the model back (pipe.transformer = pipe.transformer._orig_mod), "
            "apply the plan, then compile (pipe.transformer.compile(...) or torch.compile(pipe.transformer); apply "
            "with static=True for one graph per generation)"
        )
    supported = ", ".join(adapter.MODEL_CLASS for adapter in _ADAPTERS)
    missing = f"; this diffusers lacks {', '.join(sorted(_missing))} (upgrade diffusers)" if _missing else ""
    raise TypeError(
        f"ditfastattn does not support {type(transformer).__name__}; supported transformers: {supported} "
        f"(pass the pipeline or its `.transformer`){missing}"
    )


def describe(pipe_or_transformer) -> model.ModelSpec:
    """The :class:`~ditfastattn.model.ModelSpec` of a supported transformer, or of a pipeline's."""
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    return _match(transformer).describe(transformer)  # a parallel model's plans are made as any other's


model.register_describer(describe)


def check_cfg_sharing(adapter: Adapter, method_names, pipe=None) -> None:
    """cfg_share needs CFG as one [unconditional; conditional] batch, which not every family uses,
    nor a pipeline ``pipe`` whose guidance is a diffusers guider (modular pipelines)."""
    if not any(parse_method(name).shares_cfg for name in method_names):
        return
    if not adapter.CFG_IN_BATCH:
        raise ValueError(
            f"{adapter.MODEL_CLASS} pipelines run classifier-free guidance as {adapter.CFG}, "
            "so cfg_share cannot apply; drop the cfg_share methods"
        )
    guider = getattr(pipe, "guider", None)
    if guider is not None:  # a guider calls the transformer once per condition: no batch to share across
        raise ValueError(
            f"this pipeline's guider ({type(guider).__name__}) calls the transformer once per condition, not on one "
            "[unconditional; conditional] batch, so cfg_share cannot apply (it would share across prompts); drop the "
            "cfg_share methods, or use the pipeline that batches CFG (StableDiffusion3Pipeline)"
        )
