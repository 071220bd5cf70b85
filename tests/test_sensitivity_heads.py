"""Head weights of the sensitivity measurement: the diagonal Fisher of every head's attention output,
their normalisation, and the score weights they give."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import embeds, make_pipeline, negative_embeds

import ditfastattn
from ditfastattn import SearchConfig, sensitivity
from ditfastattn.adapters import adapter_for
from ditfastattn._prompts import prompt_kwargs
from ditfastattn.model import LayerSpec, ModelSpec
from ditfastattn.sensitivity import head_weights, measure_head_fisher, weights_array

STEPS = 4
SIZE = {"height": 48, "width": 56}
CANDIDATES = ("full", "cache", "arrow:0.25")


def sd3_fisher(pipe) -> tuple[ModelSpec, np.ndarray]:
    spec = adapter_for(pipe.transformer).describe(pipe.transformer)
    call, _ = prompt_kwargs([{**embeds(1, seed=i), **negative_embeds(1, seed=20 + i)} for i in range(2)])
    config = SearchConfig(num_inference_steps=STEPS, guidance_scale=4.0, **SIZE)
    return spec, measure_head_fisher(pipe, spec, {**call, **SIZE, "guidance_scale": 4.0}, config)


def head_columns(attn, head: int) -> slice:
    dim = attn.inner_dim // attn.heads
    return slice(head * dim, (head + 1) * dim)


def test_fisher_sees_what_reaches_the_output_and_leaves_the_model_as_it_was():
    pipe = make_pipeline("sd3")
    attn = pipe.transformer.transformer_blocks[0].attn
    with torch.no_grad():  # head 1 of the first layer reaches nothing; head 2 reaches it tenfold
        for linear in (attn.to_out[0], attn.to_add_out):
            linear.weight[:, head_columns(attn, 1)] = 0.0
            linear.weight[:, head_columns(attn, 2)] *= 10.0
    spec, fisher = sd3_fisher(pipe)
    assert fisher.shape == (STEPS, len(spec.layers), max(layer.heads for layer in spec.layers))
    assert (fisher[0] == 0).all()  # step 0 runs every head full: nothing to weigh
    assert (fisher[1:, 0, 1] == 0).all()
    assert (np.delete(fisher[1:], 1, axis=2) > 0).all()
    assert (fisher[1:, 0, 2] > fisher[1:, 0, 0]).all()
    # The model is as it was: trainable, its own forward, no plan applied.
    assert all(p.requires_grad for p in pipe.transformer.parameters())
    assert "forward" not in pipe.transformer.__dict__
    ditfastattn.apply(pipe, ditfastattn.Plan.uniform(pipe.transformer, STEPS, "full"))
    ditfastattn.remove(pipe)


def flux_fisher(pipe) -> np.ndarray:
    spec = adapter_for(pipe.transformer).describe(pipe.transformer)
    call, _ = prompt_kwargs([embeds(1, seed=i) for i in range(2)])
    return measure_head_fisher(pipe, spec, {**call, **SIZE}, SearchConfig(num_inference_steps=STEPS, **SIZE))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_fisher_checkpoints_the_blocks_and_measures_what_it_measured_without(kind, monkeypatch):
    # The backward pass through every block would hold all their activations: FLUX.1-dev at 1024²
    # x 8 prompts ran out of an H100's memory. Checkpointed, each block runs again in it.
    fisher_of = sd3_fisher if kind == "sd3" else lambda pipe: (None, flux_fisher(pipe))
    pipe = make_pipeline(kind)
    runs = []
    # A pre-hook: the run in the backward pass stops once it has what the gradient needs.
    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *args: runs.append(torch.is_grad_enabled()))
    _, checkpointed = fisher_of(pipe)
    # Step 0 (no gradient) once; then each step's forward with gradients, and its run in the backward pass.
    assert len(runs) == 1 + 2 * (STEPS - 1)
    runs.clear()
    monkeypatch.setattr(sensitivity, "_checkpoint_blocks", lambda experts: [])
    _, whole = fisher_of(pipe)
    assert len(runs) == STEPS
    assert (whole[1:] > 0).any() and np.allclose(checkpointed, whole, rtol=1e-5, atol=0.0)


def test_fisher_leaves_the_models_own_checkpointing_as_it_was():
    pipe = make_pipeline("flux")
    transformer = pipe.transformer
    flags = [m for m in transformer.modules() if hasattr(m, "gradient_checkpointing")]
    before = [m.__dict__.get("_gradient_checkpointing_func") for m in flags]
    flux_fisher(pipe)
    assert not transformer.is_gradient_checkpointing
    assert [m.__dict__.get("_gradient_checkpointing_func") for m in flags] == before

    def own(module, *args):  # a training script's own function
        return module(*args)

    transformer.enable_gradient_checkpointing(own)
    flux_fisher(pipe)
    assert transformer.is_gradient_checkpointing
    assert all(m.gradient_checkpointing and m._gradient_checkpointing_func is own for m in flags)


def test_fisher_out_of_memory_names_the_fix_and_leaves_the_model_as_it_was(monkeypatch):
    pipe = make_pipeline("flux")
    transformer = pipe.transformer

    def out_of_memory(self, index, grad):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.55 GiB.")

    monkeypatch.setattr(sensitivity._FisherSession, "_square", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match=r"(?s)1\.55 GiB.*measure on fewer.*sensitivity=\.\.\."):
        flux_fisher(pipe)
    assert not transformer.is_gradient_checkpointing
    assert all(p.requires_grad for p in transformer.parameters()) and "forward" not in transformer.__dict__
    ditfastattn.apply(pipe, ditfastattn.Plan.uniform(transformer, STEPS, "full"))  # no session was left
    ditfastattn.remove(pipe)


def two_layer_spec(heads=(3, 2)) -> ModelSpec:
    return ModelSpec("test", "Model", tuple(LayerSpec(f"l{i}", h, 8, True) for i, h in enumerate(heads)))


def test_head_weights_have_mean_one_per_layer_and_step():
    spec = two_layer_spec()
    fisher = np.zeros((3, 2, 3))
    fisher[1, 0] = [1.0, 2.0, 3.0]
    fisher[2, 0] = [4.0, 4.0, 1.0]
    fisher[1:, 1, :2] = [[1.0, 3.0], [2.0, 0.0]]
    fisher[:, 1, 2] = 99.0  # beyond the layer's heads: never read
    weights = head_weights(fisher, spec)
    assert set(weights) == {"l0", "l1"}
    # Stored to 6 significant digits, as the probes' weights.
    np.testing.assert_allclose(weights["l0"], [[1, 1, 1], [0.5, 1, 1.5], [4 / 3, 4 / 3, 1 / 3]], rtol=1e-5)
    assert weights["l1"] == [[1.0, 1.0], [0.5, 1.5], [2.0, 0.0]]


def test_weights_array_multiplies_head_weights_into_layer_and_step_weights():
    spec = two_layer_spec()
    heads = {"l0": [[1.0] * 3, [0.5, 1.0, 1.5], [2.0, 0.5, 0.5]], "l1": [[1.0] * 2, [0.25, 1.75], [1.0, 1.0]]}
    sensitivity = {"layers": {"l0": 2.0, "l1": 0.5}, "steps": {"cache": [1.0, 3.0, 0.1]}, "heads": heads}
    weights = weights_array(sensitivity, spec, CANDIDATES, 3)
    assert weights.shape == (3, 2, 3, len(CANDIDATES))
    without = weights_array({k: v for k, v in sensitivity.items() if k != "heads"}, spec, CANDIDATES, 3)
    for step in range(3):
        for index, layer in enumerate(spec.layers):
            expected = np.asarray(heads[layer.name][step])[:, None] * without[step, index][None, :]
            assert np.array_equal(weights[step, index, : layer.heads], expected)
    assert np.array_equal(weights[:, 1, 2], without[:, 1])  # l1 has no third head: weight 1


@pytest.mark.parametrize(
    "heads,match",
    [
        ({"l0": [[1.0] * 3] * 3}, "no weight for 1 of the model's layers"),
        ({"l0": [[1.0] * 3] * 2, "l1": [[1.0] * 2] * 2}, "head weights of 'l0' for 2 steps but the search runs 3"),
        ({"l0": [[1.0] * 3] * 3, "l1": [[1.0] * 3] * 3}, "'l1' must be 3 rows of 2 finite numbers >= 0"),
        ({"l0": [[1.0] * 3] * 3, "l1": [[1.0, -1.0]] * 3}, "'l1' must be 3 rows of 2 finite numbers >= 0"),
    ],
)
def test_weights_array_refuses_head_weights_of_another_model(heads, match):
    with pytest.raises(ValueError, match=match):
        weights_array({"layers": {"l0": 1.0, "l1": 1.0}, "heads": heads}, two_layer_spec(), CANDIDATES, 3)


def test_a_head_that_reaches_nothing_is_compressed_and_its_neighbours_are_not():
    pipe = make_pipeline("sd3")
    attn = pipe.transformer.transformer_blocks[0].attn
    with torch.no_grad():
        for linear in (attn.to_out[0], attn.to_add_out):
            linear.weight[:, head_columns(attn, 1)] = 0.0
    prompts = [{**embeds(1, seed=i), **negative_embeds(1, seed=20 + i)} for i in range(2)]
    config = SearchConfig(num_inference_steps=STEPS, guidance_scale=4.0, candidates=CANDIDATES, delta=1e-9,
                          budget="generation", head_coefficient=None, sensitivity="measure", **SIZE)
    plan = ditfastattn.calibrate(pipe, prompts, config, progress=False)
    assert "heads" in plan.provenance["search"]["sensitivity"]
    for step in range(1, STEPS):
        row = plan.methods[step][0]
        assert row[1] != "full", (step, row)
        assert all(method == "full" for head, method in enumerate(row) if head != 1), (step, row)


def test_calibrate_measures_head_sensitivity_under_inference_mode_as_without():
    # The measurement's backward pass failed under a caller's torch.inference_mode ("does not require
    # grad"); prompt embeddings made there are inference tensors.
    pipe = make_pipeline("sd3")
    config = SearchConfig(num_inference_steps=4, height=64, width=64, guidance_scale=4.0, delta=0.5,
                          sensitivity="measure")
    plain = ditfastattn.calibrate(pipe, [{**embeds(1), **negative_embeds(1)}], config, progress=False)
    with torch.inference_mode():
        prompts = {**embeds(1), **negative_embeds(1)}
        assert all(tensor.is_inference() for tensor in prompts.values())
        inferred = ditfastattn.calibrate(pipe, [prompts], config, progress=False)
    assert inferred.methods == plain.methods and inferred.scores == plain.scores
