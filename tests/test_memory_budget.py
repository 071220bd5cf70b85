"""The cache-buffer memory budget: what gives way, what is held, and that outputs follow the plan."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from conftest import tiny_sd3

import ditfastattn
from ditfastattn import Plan
from ditfastattn.runtime import cache_heads, fit_cache_budget

STEPS = 5
TIMESTEPS = [900.0, 700.0, 500.0, 300.0, 100.0]


def sd3_inputs(batch=2):
    generator = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(batch, 4, 32, 32, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 7, 16, generator=generator),
        "pooled_projections": torch.randn(batch, 16, generator=generator),
    }


def caching_plan(model, seed=0) -> Plan:
    full = Plan.uniform(model, STEPS, "full")
    rng = random.Random(seed)
    methods = [
        [["full" if step == 0 else rng.choice(["full", "cache", "cache", "arrow:0.5"]) for _ in heads] for heads in rows]
        for step, rows in enumerate(full.methods)
    ]
    return Plan(full.model, methods, {"num_image_tokens": 256})


def without_cache(plan: Plan, dropped) -> Plan:
    methods = [
        [["full" if m == "cache" and step in dropped[layer] else m for m in heads] for layer, heads in enumerate(rows)]
        for step, rows in enumerate(plan.methods)
    ]
    return Plan(plan.model, methods, plan.provenance)


def held_during(steps_kept, t, layer_bytes):
    return sum(layer_bytes[l] for l in steps_kept[t] | steps_kept[t + 1])


@pytest.mark.parametrize("seed", range(20))
def test_budget_is_met_at_every_step_and_only_cache_steps_give_way(seed):
    rng = random.Random(seed)
    steps, layers = rng.randint(2, 8), rng.randint(1, 6)
    cached = [[0] * layers] + [[rng.choice([0, 0, 1, 3, 8]) for _ in range(layers)] for _ in range(steps - 1)]
    layer_bytes = [rng.choice([100, 200, 300]) for _ in range(layers)]
    budget = rng.randint(0, sum(layer_bytes))
    dropped = fit_cache_budget(cached, layer_bytes, budget)
    kept = [{l for l in range(layers) if cached[t][l] and t not in dropped[l]} for t in range(steps)] + [set()]
    for t in range(steps):
        assert held_during(kept, t, layer_bytes) <= budget, (t, kept)
    for layer, gone in enumerate(dropped):
        assert all(cached[t][layer] for t in gone), "only steps with cache heads are given up"


def test_budget_gives_up_the_buffer_that_saves_fewest_cached_heads_per_byte():
    cached = [[0, 0, 0], [1, 6, 6], [0, 0, 0]]
    # Room for two of the three equal buffers: layer 0 (one cached head) gives way.
    assert fit_cache_budget(cached, [10, 10, 10], 20) == [frozenset({1}), frozenset(), frozenset()]
    # Per byte: layer 1's buffer is three times larger for six heads, so it gives way instead.
    assert fit_cache_budget(cached, [10, 30, 10], 20) == [frozenset(), frozenset({1}), frozenset()]
    assert fit_cache_budget(cached, [10, 10, 10], 30) == [frozenset()] * 3
    assert fit_cache_budget(cached, [10, 10, 10], 0) == [frozenset({1})] * 3
    # Static sessions hold a buffer all generation: whole layers give way.
    static = fit_cache_budget([[0, 0], [1, 0], [0, 2]], [10, 10], 10, static=True)
    assert static == [frozenset(range(3)), frozenset()]


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_a_step_cached_whole_gives_way_whole(seed, static):
    rng = random.Random(seed)
    steps, layers, heads = rng.randint(3, 8), rng.randint(2, 5), 4
    cached = [[0] * layers] + [[rng.choice([0, 1, 4]) for _ in range(layers)] for _ in range(steps - 1)]
    whole = frozenset(rng.sample(range(1, steps), 2))
    for t in whole:
        cached[t] = [heads] * layers
    layer_bytes = [rng.choice([100, 200, 300]) for _ in range(layers)]
    budget = rng.randint(0, sum(layer_bytes))
    dropped = fit_cache_budget(cached, layer_bytes, budget, static=static, whole=whole)
    for t in whole:  # every layer caches there, or none does
        assert len({t in gone for gone in dropped}) == 1, (t, dropped)
    kept = [{l for l in range(layers) if cached[t][l] and t not in dropped[l]} for t in range(steps)] + [set()]
    if static:
        assert sum(layer_bytes[l] for l in set().union(*kept)) <= budget
    else:
        assert all(held_during(kept, t, layer_bytes) <= budget for t in range(steps))
    # Without the whole steps named, the same budget may split them: naming them changes only those.
    plain = fit_cache_budget(cached, layer_bytes, budget, static=static)
    assert all(gone - plain[l] <= whole for l, gone in enumerate(dropped))


def test_a_budget_for_half_the_layers_computes_a_whole_cached_step_instead_of_mixing_it():
    cached = [[0, 0, 0], [4, 4, 4], [0, 0, 0]]
    assert fit_cache_budget(cached, [10, 10, 10], 20) == [frozenset({1}), frozenset(), frozenset()]
    assert fit_cache_budget(cached, [10, 10, 10], 20, whole=frozenset({1})) == [frozenset({1})] * 3
    assert fit_cache_budget(cached, [10, 10, 10], 30, whole=frozenset({1})) == [frozenset()] * 3


@torch.no_grad()
def test_runtime_computes_a_whole_cached_step_that_does_not_fit():
    # One byte short of every layer's buffer (attn2's of the image alone): the step gives way whole
    model = tiny_sd3(dual=True)
    full = Plan.uniform(model, STEPS, "full")
    whole = [[["cache" if step == 2 else "full"] * len(heads) for heads in rows] for step, rows in enumerate(full.methods)]
    plan = Plan(full.model, whole, {"num_image_tokens": 256})
    inputs = sd3_inputs()
    sizes = layer_bytes(model, plan, inputs)
    ditfastattn.apply(model, full)
    want = denoise(model, inputs)
    ditfastattn.remove(model)
    ditfastattn.apply(model, plan, cache_budget_gib=(sum(sizes) - 1) / 2**30)  # one byte short of every layer's buffer
    got = denoise(model, inputs)
    ditfastattn.remove(model)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def denoise(model, inputs):
    return [model(**inputs, timestep=torch.full((2,), t)).sample for t in TIMESTEPS]


def layer_bytes(model, plan, inputs):
    """Each layer's buffer: SD3.5's attn2 holds the image tokens alone, the joint layers the text too."""
    batch, image, text = inputs["hidden_states"].shape[0], 16 * 16, inputs["encoder_hidden_states"].shape[1]
    return [batch * (image + (text if spec.text else 0)) * spec.heads * spec.head_dim * 4 for spec in plan.model.layers]


@torch.no_grad()
@pytest.mark.parametrize("fraction", [0.0, 0.4, 0.7])
def test_runtime_under_a_budget_holds_no_more_and_computes_what_gives_way(fraction, caplog):
    model = tiny_sd3(dual=True)
    plan = caching_plan(model)
    inputs = sd3_inputs()
    sizes = layer_bytes(model, plan, inputs)
    budget = int(fraction * sum(sizes))
    dropped = fit_cache_budget(cache_heads(plan), sizes, budget)
    assert any(dropped), "the budget must bite for this test to mean anything"

    ditfastattn.apply(model, without_cache(plan, dropped))
    want = denoise(model, inputs)
    ditfastattn.remove(model)

    held = []
    model.register_forward_hook(
        lambda *_: held.append(sum(s.out.nbytes for layer in session.layers for s in layer.slots.values() if s.out is not None))
    )
    with caplog.at_level(logging.WARNING, logger="ditfastattn"):
        ditfastattn.apply(model, plan, cache_budget_gib=budget / 2**30)
        session = model._ditfastattn_session
        got = denoise(model, inputs)
    for step, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=f"step {step}")
    assert max(held) <= budget
    lost = sum(cache_heads(plan)[t][l] for l, steps in enumerate(dropped) for t in steps)
    assert [r.message for r in caplog.records].count(next(r.message for r in caplog.records)) == 1
    assert f"{lost} of {sum(map(sum, cache_heads(plan)))} cached head-steps compute instead" in caplog.text
    ditfastattn.remove(model)


@torch.no_grad()
def test_a_budget_that_fits_changes_nothing():
    model = tiny_sd3()
    plan = caching_plan(model, seed=1)
    inputs = sd3_inputs()
    ditfastattn.apply(model, plan)
    want = denoise(model, inputs)
    ditfastattn.remove(model)
    ditfastattn.apply(model, plan, cache_budget_gib=sum(layer_bytes(model, plan, inputs)) / 2**30)
    got = denoise(model, inputs)
    ditfastattn.remove(model)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@torch.no_grad()
def test_static_mode_frees_what_a_second_call_slot_refits_away():
    # The first call builds each layer's buffer for one call slot; true CFG's second call refits the
    # budget for two, and the layers that then keep nothing held their old buffers (1.5x the budget).
    from test_experts import STEPS, generate, pipeline

    pipe = pipeline(heads=2)
    full = Plan.uniform(pipe.transformer, STEPS, "full")
    rows = [["cache", "full"], ["cache", "cache"]]  # the second layer caches more heads a byte: it keeps its buffers
    plan = Plan(full.model, [[rows[layer] if step else ["full"] * 2 for layer in range(2)] for step in range(STEPS)])
    spec = plan.model.layers[0]
    one = 384 * spec.heads * spec.head_dim * 4  # one layer's buffer for one call slot: 384 tokens, float32
    # Each of the two experts keeps its own buffers: room for both layers' at one call slot, one layer's at two.
    ditfastattn.apply(pipe, plan, static=True, num_image_tokens=384, cache_budget_gib=5 * one / 2**30)
    generate(pipe)
    held = sum(b.nbytes for expert in (pipe.transformer, pipe.transformer_2)
               for name, b in expert.named_buffers() if name.endswith("_ditfastattn_out"))
    ditfastattn.remove(pipe)
    assert held == 4 * one  # the second layer's, two call slots in each expert (5x before: the first layer's stayed)


@torch.no_grad()
def test_static_mode_budget_drops_whole_layers_and_holds_buffers_only_for_caching_layers():
    model = tiny_sd3(dual=True)
    plan = caching_plan(model, seed=2)
    methods = [[list(h) for h in rows] for rows in plan.methods]
    for step in range(STEPS):  # layer 1 is full throughout: the stock attention, no buffer
        methods[step][1] = ["full"] * len(methods[step][1])
    plan = Plan(plan.model, methods, plan.provenance)
    inputs = sd3_inputs()
    sizes = layer_bytes(model, plan, inputs)
    budget = sizes[0]  # room for one of the caching layers 0 and 2
    dropped = fit_cache_budget(cache_heads(plan), sizes, budget, static=True)
    assert sum(bool(d) for d in dropped) == 1 and not dropped[1]

    ditfastattn.apply(model, without_cache(plan, dropped))
    want = denoise(model, inputs)
    ditfastattn.remove(model)
    ditfastattn.apply(model, plan, static=True, cache_budget_gib=budget / 2**30)
    got = denoise(model, inputs)
    holders = sorted(name for name, _ in model.named_buffers() if name.endswith("_ditfastattn_out"))
    ditfastattn.remove(model)
    for step, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"step {step}")
    cached = cache_heads(plan)
    kept = [name for i, name in enumerate(plan.layer_names) if not dropped[i] and any(row[i] for row in cached)]
    assert holders == [f"{name}._ditfastattn_out" for name in kept]


def test_budget_must_not_be_negative():
    model = tiny_sd3()
    for bad in (-1, 1e300, 10**400):  # the two large ones raised a bare OverflowError
        with pytest.raises(ValueError, match="cache_budget_gib must be >= 0"):
            ditfastattn.apply(model, Plan.uniform(model, 2, "full"), cache_budget_gib=bad)
    assert not hasattr(model, "_ditfastattn_session")


@torch.no_grad()
def test_layers_of_other_lengths_are_fitted_together():
    # SD3.5's attn2 attends the image alone, its joint layers image and text: fitted apart per call
    # length, each fit priced every layer at the caller's length, and together held 1.25x the budget
    # (the log counting head-steps that never computed).
    from ditfastattn.runtime import LayerRuntime

    model, steps, text = tiny_sd3(dual=True), 5, 256
    generator = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(2, 4, 32, 32, generator=generator),
              "encoder_hidden_states": torch.randn(2, text, 16, generator=generator),
              "pooled_projections": torch.randn(2, 16, generator=generator)}
    full = Plan.uniform(model, steps, "full")
    rows = {0: ["cache"] * 3, 1: ["cache", "full", "full"], 2: ["cache"] * 3}  # layer 1 is attn2
    plan = Plan(full.model, [[["full"] * 3 if step == 0 else rows[layer] for layer in range(3)] for step in range(steps)],
                {"num_image_tokens": 256})
    budget = 2 * 2 * (256 + text) * 3 * 8 * 4  # the two joint layers' buffers
    held, attend = [], LayerRuntime.attend

    def holding(layer, *args, **kwargs):
        out = attend(layer, *args, **kwargs)
        held.append(sum(slot.out.nbytes for each in layer.session.layers for slot in each.slots.values()
                        if slot.out is not None))
        return out

    LayerRuntime.attend = holding
    try:
        ditfastattn.apply(model, plan, cache_budget_gib=budget / 2**30)
        for timestep in (900.0, 700.0, 500.0, 300.0, 100.0):
            model(**inputs, timestep=torch.full((2,), timestep))
        ditfastattn.remove(model)
    finally:
        LayerRuntime.attend = attend
    assert max(held) == budget  # the joint layers keep theirs, attn2 gives way


def test_a_generation_that_gives_way_leaves_the_next_at_another_size_as_it_was():
    # A whole cached step given way at a large size stayed given way at every later size: the same
    # small generation computed it after a large one (4.99e-2 off the one before it), unsaid.
    from test_experts import SIZE, STEPS, pipeline, prompts

    pipe = pipeline()
    full = Plan.uniform(pipe.transformer, STEPS, "full")
    plan = Plan(full.model, [[["cache" if step in (2, 4) else "full"] * layer.heads for layer in full.model.layers]
                             for step in range(STEPS)], {})
    small = 2 * 2 * 384 * 2 * 8 * 4  # two layers, two call slots (CFG's second call), 384 tokens, 2 heads of 8

    def generate(size):
        return pipe(**prompts(), **size, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                    output_type="latent").frames

    ditfastattn.apply(pipe, plan, cache_budget_gib=small / 2**30)
    before = generate(SIZE)
    generate({**SIZE, "height": 2 * SIZE["height"], "width": 2 * SIZE["width"]})
    after = generate(SIZE)
    ditfastattn.remove(pipe)
    assert torch.equal(before, after)


def test_the_budget_is_logged_once_when_cfg_is_a_second_call(caplog):
    # The step's second call refits the same shape for its own buffers: one line, not one per call slot.
    from test_experts import STEPS, generate, pipeline, plan_with

    pipe = pipeline()
    ditfastattn.apply(pipe, plan_with(pipe, {step: "cache" for step in range(1, STEPS)}), cache_budget_gib=0)
    with caplog.at_level(logging.WARNING, logger="ditfastattn"):
        generate(pipe)
        generate(pipe)
    ditfastattn.remove(pipe)
    assert len([r for r in caplog.records if "cached head-steps compute instead" in r.getMessage()]) == 1
