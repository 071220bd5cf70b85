"""ditfastattn next to what users already have: LoRA, CPU offload, diffusers' attention backends."""

from __future__ import annotations

import pytest
import torch
from conftest import flux_pipeline, run_pipeline, sd3_pipeline

import ditfastattn
from ditfastattn import Plan

STEPS = 3


def compressed(transformer) -> Plan:
    return Plan.uniform(transformer, STEPS, "arrow_residual:0.5")


def test_lora_adapters_run_under_a_plan_and_remove_restores():
    peft = pytest.importorskip("peft")
    pipe = sd3_pipeline(dual=True)
    plain = run_pipeline(pipe, steps=STEPS)
    ditfastattn.apply(pipe, compressed(pipe.transformer))
    without_lora = run_pipeline(pipe, steps=STEPS)
    ditfastattn.remove(pipe)
    config = peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                             target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj"])
    pipe.transformer.add_adapter(config)
    stock = run_pipeline(pipe, steps=STEPS)
    assert not torch.equal(stock, plain)  # the adapter is live
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "full"))
    assert torch.equal(run_pipeline(pipe, steps=STEPS), stock)
    ditfastattn.remove(pipe)
    ditfastattn.apply(pipe, compressed(pipe.transformer))
    with_lora = run_pipeline(pipe, steps=STEPS)
    assert not torch.equal(with_lora, without_lora) and not torch.equal(with_lora, stock)
    ditfastattn.remove(pipe)
    assert torch.equal(run_pipeline(pipe, steps=STEPS), stock)


def test_model_cpu_offload():
    pytest.importorskip("accelerate")
    reference = sd3_pipeline()
    ditfastattn.apply(reference, compressed(reference.transformer))
    expected = run_pipeline(reference, steps=STEPS)
    pipe = sd3_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.transformer, "_hf_hook")  # accelerate's offload hook wraps the forward
    ditfastattn.apply(pipe, compressed(pipe.transformer))
    assert torch.equal(run_pipeline(pipe, steps=STEPS), expected)
    ditfastattn.remove(pipe)


def test_attention_backend_context_reaches_dense_layers(monkeypatch):
    from diffusers.models import attention_dispatch
    from diffusers.models.attention_dispatch import attention_backend

    pipe = flux_pipeline()
    with attention_backend("_native_math"):
        stock = run_pipeline(pipe, steps=STEPS)
        ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "full"))
        assert torch.equal(run_pipeline(pipe, steps=STEPS), stock)
    ditfastattn.remove(pipe)
    chosen = []
    original = attention_dispatch._AttentionBackendRegistry.get_active_backend

    def spy():
        backend = original()
        chosen.append(backend[0])
        return backend

    monkeypatch.setattr(attention_dispatch._AttentionBackendRegistry, "get_active_backend", spy)
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "full"))
    with attention_backend("_native_math"):
        run_pipeline(pipe, steps=STEPS)
    assert chosen and all(str(name.value) == "_native_math" for name in chosen)
