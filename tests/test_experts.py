"""Wan 2.2 A14B's two experts: ``WanPipeline`` hands the high-noise steps to ``transformer`` and
the low-noise ones to ``transformer_2``. One plan applied to the pipeline runs on both, each at
its own steps, and no head of one expert reads the other's outputs. Tiny random configs on the
real diffusers pipeline (CPU, seconds)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

import ditfastattn
from ditfastattn import Plan, SearchConfig

STEPS = 6
SIZE = dict(height=128, width=192, num_frames=13)  # 4 x 8 x 12 latent patches: 384 tokens, 6 blocks


def tiny_expert(seed: int, layers: int = 2, heads: int = 2) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=8, in_channels=16,
                                 out_channels=16, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers,
                                 rope_max_seq_len=32)


def pipeline(second: WanTransformer3DModel | None = None, boundary_ratio: float | None = 0.875,
             heads: int = 2) -> WanPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=tiny_expert(1, heads=heads), transformer_2=second or tiny_expert(2, heads=heads),
                       boundary_ratio=boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompts(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(1, 8, 16, generator=g), negative_prompt_embeds=torch.randn(1, 8, 16, generator=g))


def generate(pipe) -> torch.Tensor:
    return pipe(**prompts(), **SIZE, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                output_type="latent").frames


def first_expert_steps(pipe) -> int:
    """How many steps the pipeline gives the first expert (two calls a step: CFG)."""
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    generate(pipe)
    handle.remove()
    return len(calls) // 2


def plan_with(pipe, rows: dict[int, str]) -> Plan:
    """Every head full, but at the steps of ``rows`` every head of every layer runs its method."""
    full = Plan.uniform(pipe.transformer, STEPS, "full")
    return Plan(full.model, [[[rows.get(step, "full")] * layer.heads for layer in full.model.layers]
                             for step in range(STEPS)])


@pytest.fixture(scope="module")
def pipe():
    return pipeline()


@pytest.fixture(scope="module")
def boundary(pipe):
    steps = first_expert_steps(pipe)
    assert 0 < steps < STEPS - 1
    return steps


def test_one_plan_runs_on_both_experts_each_at_its_own_steps(pipe, boundary):
    stock = generate(pipe)
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "full"))
    assert torch.equal(generate(pipe), stock)
    ditfastattn.remove(pipe)
    for rows in ({step: "arrow:0.125" for step in range(boundary, STEPS)}, {1: "arrow:0.125"}):
        ditfastattn.apply(pipe, plan_with(pipe, rows))
        out = generate(pipe)
        ditfastattn.remove(pipe)
        assert bool(torch.isfinite(out).all()) and not torch.equal(out, stock)
    assert torch.equal(generate(pipe), stock)
    for expert in (pipe.transformer, pipe.transformer_2):
        assert not hasattr(expert, "_ditfastattn_session")
        assert not expert._forward_pre_hooks and not expert._forward_hooks


def test_no_head_reads_the_other_experts_outputs(pipe, boundary):
    stock = generate(pipe)
    outputs = {}
    for step in (boundary - 1, boundary, boundary + 1):
        ditfastattn.apply(pipe, plan_with(pipe, {step: "cache"}))
        outputs[step] = generate(pipe)
        ditfastattn.remove(pipe)
    # At the second expert's first step there is nothing of its own to reuse: its heads compute.
    assert torch.equal(outputs[boundary], stock)
    assert not torch.equal(outputs[boundary - 1], stock) and not torch.equal(outputs[boundary + 1], stock)


def test_calibration_decides_both_experts_steps_and_replays_bit_for_bit(pipe, boundary):
    recorded = []

    def keep(module, args, output):
        recorded.append((module is pipe.transformer_2, output[0].clone()))

    handles = [expert.register_forward_hook(keep) for expert in (pipe.transformer, pipe.transformer_2)]
    try:
        plan = ditfastattn.calibrate(pipe, [prompts()], SearchConfig(
            delta=1.0, num_inference_steps=STEPS, candidates=("full", "arrow:0.125", "cache"),
            pipeline_kwargs=dict(SIZE)), progress=False)
        calibrated = list(recorded)
        recorded.clear()
        ditfastattn.apply(pipe, plan)
        generate(pipe)
        ditfastattn.remove(pipe)
    finally:
        for handle in handles:
            handle.remove()
    assert plan.provenance["expert_switch_steps"] == [boundary]
    methods = plan.methods
    assert any(m != "full" for step in methods[boundary:] for heads in step for m in heads)
    assert all(m != "cache" for heads in methods[boundary] for m in heads)  # nothing of its own yet
    assert [second for second, _ in calibrated] == [False] * 2 * boundary + [True] * 2 * (STEPS - boundary)
    assert [second for second, _ in recorded] == [second for second, _ in calibrated]
    assert all(torch.equal(a, c) for (_, a), (_, c) in zip(recorded, calibrated))


def test_refused_where_one_plan_cannot_cover_both(pipe):
    processors = [m.processor for m in pipe.transformer_2.modules() if hasattr(m, "processor")]
    other = pipeline(second=tiny_expert(2, layers=1))
    with pytest.raises(ValueError, match=r"not the same model as pipe.transformer \(1 attention layers against 2\)"):
        ditfastattn.apply(other, Plan.uniform(other.transformer, STEPS, "full"))
    for model in (pipe, other):
        for expert in (model.transformer, model.transformer_2):
            assert not hasattr(expert, "_ditfastattn_session") and not expert._forward_pre_hooks
    assert [m.processor for m in pipe.transformer_2.modules() if hasattr(m, "processor")] == processors
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "full"))
    with pytest.raises(RuntimeError, match="already applied"):
        ditfastattn.apply(pipe.transformer_2, Plan.uniform(pipe.transformer, STEPS, "full"))
    ditfastattn.remove(pipe)


def test_sensitivity_probes_and_head_weights_cover_the_second_expert(pipe, boundary):
    plan = ditfastattn.calibrate(pipe, [prompts()], SearchConfig(
        target_sparsity=0.5, num_inference_steps=STEPS, budget="generation", sensitivity="measure",
        head_coefficient=None, cache="auto", pipeline_kwargs=dict(SIZE)), progress=False)
    sensitivity = plan.provenance["search"]["sensitivity"]
    # The Fisher pass took gradients through transformer_2 too: its steps' head weights are measured, not the
    # 1 of a layer that measured nothing.
    for rows in sensitivity["heads"].values():
        assert all(any(w != 1.0 for w in rows[step]) for step in range(1, STEPS))
    assert all(w > 0 for kind in sensitivity["steps"].values() for w in kind[1:])
    assert abs(plan.summary()["sparsity"] - 0.5) <= 0.02


def test_a_boundary_other_than_the_calibration_runs_is_logged_once(pipe, boundary, caplog):
    plan = plan_with(pipe, {})
    plan = Plan(plan.model, plan.methods, {"expert_switch_steps": [boundary]})
    ratio = pipe.config.boundary_ratio
    ditfastattn.apply(pipe, plan)
    try:
        with caplog.at_level(logging.WARNING, logger="ditfastattn"):
            generate(pipe)
            assert not caplog.records
            pipe.register_to_config(boundary_ratio=0.5)  # the second expert takes over later
            generate(pipe)
            generate(pipe)
    finally:
        pipe.register_to_config(boundary_ratio=ratio)
        ditfastattn.remove(pipe)
    warnings = [r.getMessage() for r in caplog.records if "transformer_2" in r.getMessage()]
    assert len(warnings) == 1 and f"but at step {boundary} in the plan's calibration run" in warnings[0]


def test_the_plan_picture_marks_where_the_second_expert_takes_over(pipe, boundary, tmp_path, monkeypatch):
    from ditfastattn import visualize

    drawn = {}
    save = visualize._save
    monkeypatch.setattr(visualize, "_save", lambda fig, path, dpi: drawn.setdefault("fig", fig) and save(fig, path, dpi))
    plan = plan_with(pipe, {step: "arrow:0.125" for step in range(boundary, STEPS)})
    plan = Plan(plan.model, plan.methods, {"expert_switch_steps": [boundary]})
    assert visualize.plot_plan(plan, tmp_path / "plan.png").stat().st_size > 0
    heat = drawn["fig"].axes[0]
    assert [line.get_ydata()[0] for line in heat.lines] == [boundary - 0.5]
    assert any("transformer_2" in text.get_text() for text in heat.texts)


def test_inspect_says_where_the_second_expert_takes_over(pipe, boundary, tmp_path, capsys):
    from ditfastattn.cli import main

    plan = plan_with(pipe, {})
    path = tmp_path / "plan.json"
    Plan(plan.model, plan.methods, {"expert_switch_steps": [boundary]}).save(path)
    assert main(["inspect", str(path), "--num-image-tokens", "384", "--text-len", "0"]) == 0
    assert f"second expert (transformer_2) from step {boundary}\n" in capsys.readouterr().out


@torch.no_grad()
def test_static_mode_runs_both_experts_compiled(pipe, boundary):
    # The step counter is every expert's buffer; each expert's layers keep their own tables and
    # buffers, and the second expert's first step computes its cache heads, as the dynamic runtime
    # does. Eager, then with both experts compiled in place (one graph each for every step).
    methods = ["cache", "arrow_residual:0.25", "arrow:0.125", "full"]
    full = Plan.uniform(pipe.transformer, STEPS, "full", num_image_tokens=384)
    plan = Plan(full.model, [[[methods[(head + layer + step) % 4] if step else "full" for head in range(layer_spec.heads)]
                              for layer, layer_spec in enumerate(full.model.layers)] for step in range(STEPS)])
    assert any("cache" in heads for heads in plan.methods[boundary])  # at the second expert's first step
    stock = generate(pipe)
    ditfastattn.apply(pipe, plan)
    dynamic = generate(pipe)
    ditfastattn.remove(pipe)
    ditfastattn.apply(pipe, plan, static=True, num_image_tokens=384)
    try:
        for _ in range(2):
            torch.testing.assert_close(generate(pipe), dynamic, atol=1e-5, rtol=1e-5)
        torch._dynamo.reset()
        for expert in (pipe.transformer, pipe.transformer_2):
            expert.compile(fullgraph=True, backend="aot_eager", dynamic=False)
        torch.testing.assert_close(generate(pipe), dynamic, atol=1e-5, rtol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            torch.testing.assert_close(generate(pipe), dynamic, atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()
        for expert in (pipe.transformer, pipe.transformer_2):
            expert._compiled_call_impl = None
        ditfastattn.remove(pipe)
    assert not [n for e in (pipe.transformer, pipe.transformer_2) for n, _ in e.named_buffers() if "ditfastattn" in n]
    assert torch.equal(generate(pipe), stock)
    assert not torch.allclose(dynamic, stock, atol=1e-3)


@torch.no_grad()
def test_static_mode_follows_both_experts_cast_after_apply(boundary):
    # .to() gives each expert its own copy of the shared step counter: the second expert counted
    # from step 0 when it took over (silently), until the session shares them again.
    full = Plan.uniform(pipeline().transformer, STEPS, "full", num_image_tokens=384)
    plan = Plan(full.model, [[["cache" if (head + step) % 2 else "arrow:0.125" for head in range(spec.heads)] if step
                              else ["full"] * spec.heads for spec in full.model.layers] for step in range(STEPS)])
    cast_first = pipeline().to(torch.float64)
    ditfastattn.apply(cast_first, plan, static=True, num_image_tokens=384)
    cast_after = pipeline()
    ditfastattn.apply(cast_after, plan, static=True, num_image_tokens=384)
    cast_after.to(torch.float64)
    assert torch.equal(generate(cast_after), generate(cast_first))


def test_a_second_expert_the_pipeline_never_calls_is_left_alone():
    unused = pipeline(second=tiny_expert(2, layers=1), boundary_ratio=None)
    stock = generate(unused)
    ditfastattn.apply(unused, Plan.uniform(unused.transformer, STEPS, "full"), static=True, num_image_tokens=384)
    assert not hasattr(unused.transformer_2, "_ditfastattn_session")
    ditfastattn.remove(unused)
    ditfastattn.apply(unused, Plan.uniform(unused.transformer, STEPS, "full"))
    assert torch.equal(generate(unused), stock)
    ditfastattn.remove(unused)


def test_experts_changed_after_apply_are_refused_and_remove_still_restores(pipe):
    stock = generate(pipe)
    second = pipe.transformer_2
    for change in (lambda: setattr(pipe, "transformer_2", tiny_expert(3)), lambda: pipe.register_to_config(boundary_ratio=None)):
        ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "arrow:0.125"))
        change()
        try:
            with pytest.raises(RuntimeError, match="changed after ditfastattn.apply"):
                generate(pipe)
        finally:
            ditfastattn.remove(pipe)
            pipe.transformer_2 = second
            pipe.register_to_config(boundary_ratio=0.875)
    assert torch.equal(generate(pipe), stock)
    assert not pipe.transformer._forward_pre_hooks and not second._forward_pre_hooks


def test_remove_on_the_pipeline_finds_a_plan_applied_to_transformer_2_alone(pipe):
    stock = generate(pipe)
    ditfastattn.apply(pipe.transformer_2, Plan.uniform(pipe.transformer, STEPS, "arrow:0.125"))
    ditfastattn.remove(pipe)
    assert not hasattr(pipe.transformer_2, "_ditfastattn_session") and torch.equal(generate(pipe), stock)


def test_a_plan_of_both_experts_is_refused_on_one_expert_alone(pipe):
    # transformer_2 alone counts steps from its own first call (the switch step): row 0 would run there.
    plan = Plan.uniform(pipe.transformer, STEPS, "arrow:0.125")
    plan = Plan(plan.model, plan.methods, {"expert_switch_steps": [2]})
    for expert in (pipe.transformer, pipe.transformer_2):
        with pytest.raises(ValueError, match=r"searched over a pipeline's two experts \(the second from step 2\).*"
                                             r"apply it to the pipeline"):
            ditfastattn.apply(expert, plan)
        assert not hasattr(expert, "_ditfastattn_session")
    ditfastattn.apply(pipe, plan)
    ditfastattn.remove(pipe)


def test_the_step_cache_schedule_leaves_the_switch_step_to_windows():
    early = pipeline(boundary_ratio=0.95)  # the second expert from step 1, which the schedule would cache
    assert first_expert_steps(early) == 1
    plan = ditfastattn.calibrate(early, [prompts()], SearchConfig(
        target_sparsity=0.5, num_inference_steps=STEPS, budget="generation", head_coefficient=None, cache="step",
        pipeline_kwargs=dict(SIZE)), progress=False)
    assert plan.provenance["expert_switch_steps"] == [1]
    assert 1 not in plan.provenance["search"]["cached_steps"]
    assert all(m != "cache" for heads in plan.methods[1] for m in heads)
    assert abs(plan.summary()["sparsity"] - 0.5) <= 0.02


@pytest.mark.parametrize("ratio, ran", [(1.5, "at step 0"), (0.0, "at no step")])
def test_a_generation_whose_second_expert_runs_every_step_or_none_is_logged(pipe, boundary, caplog, ratio, ran):
    plan = plan_with(pipe, {})
    ditfastattn.apply(pipe, Plan(plan.model, plan.methods, {"expert_switch_steps": [boundary]}))
    pipe.register_to_config(boundary_ratio=ratio)
    try:
        with caplog.at_level(logging.WARNING, logger="ditfastattn"):
            generate(pipe)
    finally:
        pipe.register_to_config(boundary_ratio=0.875)
        ditfastattn.remove(pipe)
    assert any(f"took over {ran}, but at step {boundary} in the plan's calibration run" in r.getMessage()
               for r in caplog.records)


def test_a_layer_skipping_cache_on_the_second_expert_is_named():
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = pipeline()
    pipe.transformer_2.enable_cache(FirstBlockCacheConfig(threshold=0.9))
    with pytest.raises(ValueError, match=r"pipe.transformer_2 has diffusers' FirstBlockCache enabled.*"
                                         r"call pipe.transformer_2.disable_cache\(\)"):
        ditfastattn.calibrate(pipe, [prompts()], SearchConfig(num_inference_steps=STEPS, pipeline_kwargs=dict(SIZE)),
                              progress=False)
    with pytest.raises(ValueError, match="pipe.transformer_2 has diffusers' FirstBlockCache enabled"):
        ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "cache"), static=True, num_image_tokens=384)
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "cache"))  # the dynamic runtime composes
    assert torch.isfinite(generate(pipe)).all()
    ditfastattn.remove(pipe)


def test_a_plan_of_one_expert_on_a_pipeline_of_two_is_logged(pipe, boundary, caplog):
    # Calibrated on one expert (Wan 2.1's pipeline), its rows ran on transformer_2 from the switch step
    # without a word (0.025 off stock): the plan now records that no second expert took over.
    one = WanPipeline(tokenizer=None, text_encoder=None, vae=pipe.vae, transformer=pipe.transformer,
                      scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    one.set_progress_bar_config(disable=True)
    plan = ditfastattn.calibrate(one, [prompts()], SearchConfig(num_inference_steps=STEPS, pipeline_kwargs=dict(SIZE)),
                                 progress=False)
    assert plan.provenance["expert_switch_steps"] == []
    ditfastattn.apply(pipe, plan)
    try:
        with caplog.at_level(logging.WARNING, logger="ditfastattn"):
            generate(pipe)
    finally:
        ditfastattn.remove(pipe)
    warnings = [r.getMessage() for r in caplog.records if "transformer_2" in r.getMessage()]
    assert len(warnings) == 1 and f"took over at step {boundary}, but at no step in the plan's" in warnings[0]


def test_a_lagged_first_pass_reads_nothing_the_other_expert_kept(monkeypatch):
    # A target's first pass over 8 steps decides on each layer's scores of the step before; at the
    # switch step those let the first expert's outputs be reused, which the runtime would compute
    # instead, so the pass's rows (whose exact heads the target's controller reads) must not.
    from ditfastattn import calibration

    sessions = []
    real = calibration.run_pass
    monkeypatch.setattr(calibration, "run_pass",
                        lambda *args, **kwargs: sessions.append(real(*args, **kwargs)) or sessions[-1])
    search = SearchConfig(target_sparsity=0.4, num_inference_steps=8, candidates=("full", "arrow:0.125", "cache"),
                          cache="head", pipeline_kwargs=dict(SIZE))
    ditfastattn.calibrate(pipeline(), [prompts()], search, progress=False)
    first = sessions[0][0]
    switch = first.switch_steps[0]
    assert first.lagged and 1 < switch < 7
    cache = [m.name for m in first.candidates].index("cache")
    assert np.isfinite(first.rse[switch - 1, ..., cache]).any()  # scored at the step before: allowed there
    assert all(m != "cache" for row in first.plan.methods[switch] for m in row)
