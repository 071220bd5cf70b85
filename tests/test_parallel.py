"""diffusers' context and tensor parallelism: what ditfastattn refuses, before changing anything."""

from __future__ import annotations

import pytest
from conftest import tiny_flux

import ditfastattn
from ditfastattn.plan import Plan


@pytest.mark.parametrize("where", ["model", "processor", "tensor"])
def test_apply_refuses_parallelism_before_any_change(where):
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig, TensorParallelConfig
    from diffusers.models.transformers import transformer_flux

    model = tiny_flux()
    plan = Plan.uniform(model, 2, "cache")  # describing a parallel model still works: plans are made for it
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    if where == "tensor":
        model._parallel_config = ParallelConfig(tensor_parallel_config=TensorParallelConfig(tp_degree=2))
    elif where == "model":
        model._parallel_config = config
    else:
        model.transformer_blocks[0].attn.processor._parallel_config = config
    stock = transformer_flux.dispatch_attention_fn
    with pytest.raises(ValueError, match=f"{'tensor' if where == 'tensor' else 'context'} parallelism .* supports one full model per process"):
        ditfastattn.apply(model, plan)
    assert not hasattr(model, "_ditfastattn_session") and not model._forward_pre_hooks
    assert transformer_flux.dispatch_attention_fn is stock
    assert not any(module._forward_pre_hooks for module in model.modules())
