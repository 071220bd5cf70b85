"""Plan-aware head placement: balanced orders, valid permutations, and permuted weights that compute
what the original model computes under the original plan."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ditfastattn
from ditfastattn.model import LayerSpec, ModelSpec
from ditfastattn.placement import head_costs, imbalance, invert, permute_heads, permute_plan, place_heads
from ditfastattn.plan import Plan

from conftest import embeds, tiny_flux

GEOMETRY = {"num_image_tokens": 1024, "text_len": 0}


def _plan(rows_per_step, heads=4, layers=1) -> Plan:
    spec = ModelSpec("test", "Test", tuple(LayerSpec(f"l{i}", heads, 8, False) for i in range(layers)))
    return Plan(spec, [[list(row)] * layers for row in rows_per_step], GEOMETRY)


def test_full_heads_on_one_rank_are_spread():
    plan = _plan([["full"] * 4] + [["full", "full", "cache", "cache"]] * 3)
    (placement,) = place_heads(plan, 2)
    # identity: rank 0 runs 2 heads at every step, rank 1 at step 0 only -> (4 * 2) / (2 + 3 * 1)
    assert placement.imbalance_before == pytest.approx(8 / 5)
    assert placement.imbalance_after == pytest.approx(1.0)
    first_rank = set(placement.permutation[:2])
    assert len(first_rank & {0, 1}) == 1 and len(first_rank & {2, 3}) == 1


def test_balances_every_step_not_only_the_sums():
    # Every head's summed cost is equal, so only the per-step loads tell the orders apart.
    plan = _plan([["full"] * 4, ["full", "full", "cache", "cache"], ["cache", "cache", "full", "full"]])
    costs = head_costs(plan, 0)
    assert imbalance(costs, [0, 1, 2, 3], 2) == pytest.approx(6 / 4)
    (placement,) = place_heads(plan, 2)
    assert placement.imbalance_after == pytest.approx(1.0)
    assert sorted(placement.permutation) == [0, 1, 2, 3]


def test_balanced_plan_keeps_the_identity():
    plan = _plan([["full"] * 4, ["full", "cache"] * 2])
    assert place_heads(plan, 2)[0].permutation == (0, 1, 2, 3)


def test_permutations_are_valid_and_never_worse():
    methods = ["full", "cache", "arrow:0.25", "arrow:0.5", "cfg_share"]
    rows = [["full"] * 12] + [[methods[(7 * step + 3 * head * head) % 5] for head in range(12)] for step in range(1, 6)]
    plan = _plan(rows, heads=12, layers=2)
    for world in (1, 2, 3, 4, 6, 12):
        for placement in place_heads(plan, world):
            assert sorted(placement.permutation) == list(range(12))
            assert placement.imbalance_after <= placement.imbalance_before + 1e-12
            assert placement.imbalance_after == pytest.approx(imbalance(head_costs(plan, 0), placement.permutation, world))


def test_pooled_keys_and_tile_windows_are_weighed_on_the_plans_grid():
    # The costs are the summary's: pool and tile heads on the grid the plan records (refused before,
    # as if the plan had none), a full step's residual capture counted.
    spec = ModelSpec("test", "Test", (LayerSpec("l0", 4, 8, True),))
    rows = [["full"] * 4, ["pool:2", "pool:2", "tile:0.5,0.5,0.5", "full"],
            ["full", "full", "full", "arrow_residual:0.25"], ["cache", "cache", "full", "arrow_residual:0.25"]]
    plan = Plan(spec, [[row] for row in rows], {"num_image_tokens": 16 * 24, "text_len": 8, "grid": [1, 16, 24]})
    costs = head_costs(plan, 0)
    summary = plan.summary()
    assert costs.sum() / costs.size == pytest.approx(1 - summary["sparsity"])
    assert costs[1, 0] < 0.5 and costs[1, 3] > 1.0  # pooled; full plus the capture of the next step's window
    (placement,) = place_heads(plan, 2)
    assert placement.imbalance_after < placement.imbalance_before


def test_offloaded_weights_are_refused():
    # On the meta device (accelerate's cpu_offload) a reorder changes nothing while the plan's heads
    # move: 0.013 off under Ulysses, silently.
    model = tiny_flux().to("meta")
    plan = Plan.uniform(model, 3, "full", num_image_tokens=64, text_len=8)
    placements = [dataclasses.replace(p, permutation=tuple(reversed(p.permutation))) for p in place_heads(plan, 1)]
    with pytest.raises(ValueError, match="is offloaded .*meta device.*apply without balance_heads"):
        permute_heads(model, plan, placements)


def test_world_size_must_divide_the_heads():
    plan = _plan([["full"] * 4])
    with pytest.raises(ValueError, match=r"4 heads, which 3 ranks cannot split evenly.*ulysses_degree in \[1, 2, 4\]"):
        place_heads(plan, 3)
    with pytest.raises(ValueError, match="world_size must be an int"):
        place_heads(plan, 0)


def test_permute_plan_reorders_methods_and_records_the_order():
    plan = _plan([["full"] * 4, ["full", "cache", "arrow:0.5", "cache"]])
    (placement,) = place_heads(plan, 2)
    permuted = permute_plan(plan, [placement])
    order = placement.permutation
    assert permuted.methods[1][0] == [plan.methods[1][0][h] for h in order]
    assert permuted.provenance["head_order"] == {"l0": list(order)}
    bad = type(placement)("l0", (0, 0, 1, 2), 1.0, 1.0)
    with pytest.raises(ValueError, match="not a permutation"):
        permute_plan(plan, [bad])


def _flux_output(model, steps: int) -> list[torch.Tensor]:
    torch.manual_seed(3)
    latents = torch.randn(1, 16, 16)  # 4 x 4 image tokens
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(-1, 3)
    prompt = embeds()
    outs = []
    for step in range(steps):
        t = torch.tensor([1.0 - step / steps])
        with torch.no_grad():
            outs.append(model(hidden_states=latents, timestep=t, img_ids=ids, txt_ids=torch.zeros(7, 3),
                              encoder_hidden_states=prompt["prompt_embeds"],
                              pooled_projections=prompt["pooled_prompt_embeds"]).sample)
    return outs


def test_permuted_flux_computes_the_same():
    reference = tiny_flux()
    methods = ["full", "cache", "arrow:0.5"]
    rows = [[["full"] * 3] * 3] + [[[methods[(step + layer + head) % 3] for head in range(3)] for layer in range(3)]
                                  for step in range(1, 3)]
    plan = Plan(ditfastattn.model.describe(reference), rows, {"num_image_tokens": 16, "text_len": 7})
    stock = _flux_output(reference, 3)
    ditfastattn.apply(reference, plan, impl="reference")
    expected = _flux_output(reference, 3)
    ditfastattn.remove(reference)

    model = tiny_flux()
    placements = [type(p)(p.layer, (2, 0, 1), 1.0, 1.0) for p in place_heads(plan, 1)]
    permuted = permute_heads(model, plan, placements)
    assert not torch.equal(model.transformer_blocks[0].attn.to_q.weight, reference.transformer_blocks[0].attn.to_q.weight)
    for got, want in zip(_flux_output(model, 3), stock):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    ditfastattn.apply(model, permuted, impl="reference")
    for got, want in zip(_flux_output(model, 3), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    ditfastattn.remove(model)


def test_unknown_layouts_are_refused_before_any_change():
    model = tiny_flux()
    plan = Plan.uniform(model, 2, "full", num_image_tokens=16, text_len=7)
    model.single_transformer_blocks[0].proj_mlp = torch.nn.Linear(24, 5)  # no longer [attention, MLP]
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="not a FLUX-style single block"):
        permute_heads(model, plan, [type(p)(p.layer, (1, 0, 2), 1.0, 1.0) for p in place_heads(plan, 1)])
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


class _PackedWeight(torch.nn.Parameter):
    """Stands for a quantized weight (bitsandbytes' Int8Params keeps its row scales beside the tensor)."""


def test_quantized_weights_are_refused_before_any_change():
    model = tiny_flux()
    plan = Plan.uniform(model, 2, "full", num_image_tokens=16, text_len=7)
    placements = [type(p)(p.layer, (1, 0, 2), 1.0, 1.0) for p in place_heads(plan, 1)]
    projection = model.single_transformer_blocks[-1].proj_out
    projection.weight = _PackedWeight(projection.weight.detach().clone(), requires_grad=False)
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"single_transformer_blocks\.1\.proj_out\.weight is a quantized weight "
                                         r"\(_PackedWeight.*apply without balance_heads"):
        permute_heads(model, plan, placements)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_invert_puts_heads_and_weights_back_exactly():
    model = tiny_flux()
    plan = Plan.uniform(model, 2, "full", num_image_tokens=16, text_len=7)
    placements = [type(p)(p.layer, (2, 0, 1), 1.5, 1.0) for p in place_heads(plan, 1)]
    before = {name: p.clone() for name, p in model.named_parameters()}
    permuted = permute_heads(model, plan, placements)
    inverse = invert(placements)
    assert inverse[0].permutation == (1, 2, 0) and (inverse[0].imbalance_before, inverse[0].imbalance_after) == (1.0, 1.5)
    assert permute_plan(permuted, inverse).methods == plan.methods
    permute_heads(model, permuted, inverse)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
