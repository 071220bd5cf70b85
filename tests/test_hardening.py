"""Issue 17: no silent wrong output, no lost work, every bad input a clear error at the boundary.

One test per class of problem; each failed on the code before the fix.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import embeds, flux_pipeline, negative_embeds, run_pipeline, sd3_pipeline, tiny_sd3, tiny_vae
from diffusers import FlowMatchEulerDiscreteScheduler
from test_runtime import find, head_attention, with_methods

import ditfastattn
from ditfastattn import Plan, PlanMismatchError
from ditfastattn._geometry import MODE_FULL, window_blocks


def call(model, timestep: float):
    """One call of a tiny SD3 transformer on 32x32 latents (256 image tokens) at ``timestep``; the
    latents are the timestep's, as a step's calls share theirs in a pipeline."""
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(int(timestep)))
    return model(hidden_states=latents, encoder_hidden_states=torch.randn(1, 7, 16),
                 pooled_projections=torch.randn(1, 16), timestep=torch.tensor([timestep]))


# extra transformer calls that appear mid-generation --------------------------------------------
SLG = {"skip_guidance_layers": [1], "skip_layer_guidance_start": 0.01, "skip_layer_guidance_stop": 0.5}


def test_skip_layer_guidance_call_computes_what_it_has_no_buffer_for(recorder):
    # SD3's skip-layer guidance adds a second transformer call at steps 1 and 2 of 6 only. That
    # call slot holds no previous output at step 1 and no residual ever: its cache and
    # arrow_residual heads must compute (exactly), never read an uninitialised buffer.
    pipe = sd3_pipeline()
    plan = with_methods(Plan.uniform(pipe.transformer, 6, "full"),
                        lambda step, layer, head: ["cache", "arrow_residual:0.5", "arrow:0.5"][head])
    ditfastattn.apply(pipe, plan)
    first = run_pipeline(pipe, steps=6, **SLG)
    layer = "transformer_blocks.0.attn"
    assert {(r["step"], r["call"]) for r in recorder if r["layer"] == layer} >= {(1, 1), (2, 1)}
    image_tokens = recorder[0]["q"].shape[1] - recorder[0]["text_len"]
    arrow = window_blocks(0.5, image_tokens)
    for step in (1, 2):
        record = find(recorder, layer, step, call=1)
        out = record["out"]
        if step == 1:  # no previous output in this slot: computed
            torch.testing.assert_close(out[:, :, 0].double(), head_attention(record, 0, MODE_FULL), atol=3e-5, rtol=1e-4)
        else:  # the slot ran at step 1: reused exactly
            assert torch.equal(out[:, :, 0], find(recorder, layer, 1, call=1)["out"][:, :, 0])
        # No residual was ever captured for this slot (it was absent at the full step 0): computed.
        torch.testing.assert_close(out[:, :, 1].double(), head_attention(record, 1, MODE_FULL), atol=3e-5, rtol=1e-4)
        torch.testing.assert_close(out[:, :, 2].double(), head_attention(record, 2, arrow), atol=3e-5, rtol=1e-4)
    assert torch.isfinite(first).all()
    assert torch.equal(run_pipeline(pipe, steps=6, **SLG), first)


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty filled with NaN, so that reading memory nothing wrote shows in every run."""
    empty = torch.empty

    def filled(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", filled)


def test_skip_layer_guidance_call_computes_cfg_shared_heads_unshared(recorder):
    # The extra call holds conditional rows only: sharing would copy one prompt onto another.
    pipe = sd3_pipeline()
    plan = with_methods(Plan.uniform(pipe.transformer, 4, "full"),
                        lambda step, layer, head: ["cfg_share", "cfg_share+arrow:0.5", "full"][head])
    ditfastattn.apply(pipe, plan)
    run_pipeline(pipe, steps=4, batch=2, **SLG)
    record = find(recorder, "transformer_blocks.0.attn", 1, call=1)
    assert record["q"].shape[0] == 2  # two prompts, conditional only
    arrow = window_blocks(0.5, record["q"].shape[1] - record["text_len"])
    for head, mode in ((0, MODE_FULL), (1, arrow)):
        torch.testing.assert_close(record["out"][:, :, head].double(), head_attention(record, head, mode),
                                   atol=3e-5, rtol=1e-4)
    recorder.clear()
    with pytest.raises(ValueError, match="cfg_share needs a CFG batch.*raise guidance_scale above 1"):
        run_pipeline(pipe, steps=4, guidance_scale=1.0)
    assert recorder == []  # refused before step 0 computed


def test_calibration_with_skip_layer_guidance_is_reproducible(recorder, nan_empty):
    pipe = sd3_pipeline()
    prompts = [{**embeds(), **negative_embeds()}]
    config = ditfastattn.SearchConfig(delta=0.5, num_inference_steps=4, height=64, width=64, guidance_scale=4.0,
                                      pipeline_kwargs=SLG)
    plans = [ditfastattn.calibrate(pipe, prompts, config, progress=False) for _ in range(2)]
    assert any(r["call"] == 1 for r in recorder)
    assert all(torch.isfinite(r["out"]).all() for r in recorder)
    assert plans[0].methods == plans[1].methods


def test_calibration_with_skip_layer_guidance_and_residual_candidates_replays_bit_for_bit(recorder):
    # The guidance call first appears at step 1, so it never kept the residual of the full step 0:
    # its arrow_residual heads compute exactly, in calibration as in the runtime (a KeyError before).
    pipe = sd3_pipeline()
    prompts = {**embeds(2), **negative_embeds(2)}
    # Costs that keep arrow_residual cheaper than cfg_share with its capture paid (as at 4096 tokens).
    config = ditfastattn.SearchConfig(delta=0.05, num_inference_steps=6, height=64, width=64, guidance_scale=4.0,
                                      candidates=("full", "arrow_residual:0.25", "cfg_share"), pipeline_kwargs=SLG,
                                      costs={"arrow_residual:0.25": 0.2, "cfg_share": 0.5})
    plan = ditfastattn.calibrate(pipe, [prompts], config, progress=False)
    calibrated = [(r["layer"], r["step"], r["call"], r["out"]) for r in recorder]
    assert "arrow_residual:0.25" in plan.methods[1][0] and any(c[1:3] == (1, 1) for c in calibrated)
    recorder.clear()
    ditfastattn.apply(pipe, plan)
    run_pipeline(pipe, steps=6, batch=2, **prompts, **SLG)
    applied = [(r["layer"], r["step"], r["call"], r["out"]) for r in recorder]
    assert [a[:3] for a in applied] == [c[:3] for c in calibrated]
    assert all(torch.equal(a[3], c[3]) for a, c in zip(applied, calibrated))


def end_cfg_after_step_1(pipe, step, timestep, tensors):
    """diffusers' documented way to end CFG early: drop the unconditional halves in a step callback."""
    if step == 1:
        pipe._guidance_scale = 0.0
        tensors = {name: tensor.chunk(2)[-1] for name, tensor in tensors.items()}
    return tensors


END_CFG = {"callback_on_step_end": end_cfg_after_step_1,
           "callback_on_step_end_tensor_inputs": ["prompt_embeds", "pooled_prompt_embeds"]}


def rows_of(pipe, per_step) -> Plan:
    """A plan whose every layer runs the heads' methods ``per_step[step]``."""
    spec = Plan.uniform(pipe.transformer, len(per_step), "full").model
    return Plan(spec, [[list(heads) for _ in spec.layers] for heads in per_step])


def test_a_callback_ending_cfg_early_computes_what_the_halved_batch_cannot_read(caplog):
    # From step 2 the batch holds the two prompts' conditional rows only. Cache heads would read
    # step 1's outputs of the CFG batch and arrow_residual heads a residual of it (both failed on a
    # shape mismatch), and cfg_share heads would share between the two prompts (silently). They
    # run as the plan with those heads computing: full, and cfg_share's conditional method.
    pipe = sd3_pipeline()
    mixed = ["cache", "arrow_residual:0.5", "cfg_share+arrow:0.5"]
    ditfastattn.apply(pipe, rows_of(pipe, [["full"] * 3, mixed, ["full", "full", "arrow:0.5"],
                                           ["cache", "full", "arrow:0.5"]]))
    want = run_pipeline(pipe, steps=4, batch=2, **END_CFG)
    ditfastattn.remove(pipe)
    ditfastattn.apply(pipe, rows_of(pipe, [["full"] * 3, mixed, mixed, mixed]))
    with caplog.at_level(logging.WARNING, logger="ditfastattn"):
        got = run_pipeline(pipe, steps=4, batch=2, **END_CFG)
    assert torch.equal(got, want)
    assert re.search(r"changed shape within a generation.*: 2 layer-steps computed their cache and arrow_residual "
                     r"heads.*; 4 layer-steps ran their cfg_share heads' conditional method", caplog.text)


def test_z_image_cfg_truncation_runs_a_caching_plan_exactly_and_static_mode_and_calibrate_refuse_it():
    # ZImagePipeline's own cfg_truncation drops the unconditional rows (and their longer caption's
    # padding) from the step where t passes it: every plan with cache heads failed there.
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                                           n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                           axes_dims=[4, 6, 6], axes_lens=[128, 32, 32])
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=None, tokenizer=None,
                          transformer=transformer.eval())
    generator = torch.Generator().manual_seed(1)
    captions = {"prompt_embeds": [torch.randn(9, 16, generator=generator)],
                "negative_prompt_embeds": [torch.randn(40, 16, generator=generator)]}

    def run():
        return pipe(**captions, guidance_scale=4.0, cfg_truncation=0.3, height=64, width=64, num_inference_steps=4,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

    batches = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    stock = run()
    handle.remove()
    ended = batches.index(1)
    assert batches[:ended] == [2] * ended and 0 < ended < 3
    cached = Plan.uniform(pipe.transformer, 4, "cache")
    ditfastattn.apply(pipe, Plan(cached.model, [[["full"] * len(heads) if step == ended else heads for heads in row]
                                                for step, row in enumerate(cached.methods)]))
    want = run()
    ditfastattn.remove(pipe)
    ditfastattn.apply(pipe, cached)
    assert torch.equal(run(), want) and not torch.equal(want, stock)
    ditfastattn.remove(pipe)
    # Its latents are a list (one per batch element): static mode and calibrate see the batch shrink.
    ditfastattn.apply(pipe, cached, static=True, num_image_tokens=1024)
    with pytest.raises(RuntimeError, match="changed shape within a generation.*Z-Image's cfg_truncation"):
        run()
    ditfastattn.remove(pipe)
    config = ditfastattn.SearchConfig(num_inference_steps=4, height=64, width=64, guidance_scale=4.0,
                                      pipeline_kwargs={"cfg_truncation": 0.3})
    with pytest.raises(ValueError, match=rf"at step {ended} the input changed from \(2, 4, 1, 64, 64\) to \(1, 4, 1, 64, 64\)"):
        ditfastattn.calibrate(pipe, [captions], config, progress=False)


def test_static_mode_refuses_a_call_that_changed_shape_within_a_generation():
    # Its buffers hold each call slot's rows at one shape: a halved batch would read the first
    # half (the unconditional rows). Eager calls raise at once; compiled ones report it next.
    def call_with(model, batch, timestep):
        generator = torch.Generator().manual_seed(batch)
        return model(hidden_states=torch.randn(batch, 4, 32, 32, generator=generator),
                     encoder_hidden_states=torch.randn(batch, 7, 16, generator=generator),
                     pooled_projections=torch.randn(batch, 16, generator=generator),
                     timestep=torch.full((batch,), timestep))

    torch._dynamo.reset()
    model = tiny_sd3()
    ditfastattn.apply(model, Plan.uniform(model, 3, "cache"), static=True, num_image_tokens=256)
    with torch.no_grad():
        call_with(model, 2, 900.0)
        with pytest.raises(RuntimeError, match="changed shape within a generation.*apply the plan without static=True"):
            call_with(model, 1, 500.0)
        call_with(model, 2, 900.0)  # a new generation
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
        call_with(compiled, 2, 500.0)
        stock_model = tiny_sd3()
        want = call_with(stock_model, 1, 100.0).sample
        assert torch.equal(call_with(compiled, 1, 100.0).sample, want)  # every head exact, not the old rows
        with pytest.raises(RuntimeError, match="within a generation of a compiled or graph-replayed run, which from "
                                               "then on computed every head exactly"):
            call_with(model, 2, 900.0)
        arrows = tiny_sd3()  # no head reads a kept output: any shape runs
        ditfastattn.apply(arrows, Plan.uniform(arrows, 3, "arrow:0.5"), static=True, num_image_tokens=256)
        for batch, timestep in ((2, 900.0), (1, 500.0), (2, 100.0)):
            call_with(arrows, batch, timestep)
    torch._dynamo.reset()


def test_calibrate_refuses_a_generation_whose_batch_changes_naming_the_callback():
    pipe = sd3_pipeline()
    config = ditfastattn.SearchConfig(num_inference_steps=4, height=64, width=64, guidance_scale=4.0,
                                      pipeline_kwargs=END_CFG)
    with pytest.raises(ValueError, match=r"at step 2 the input changed from \(2, 4, 64, 64\) to \(1, 4, 64, 64\) "
                                         r"\(classifier-free guidance ended early, by a step callback or Z-Image's cfg_truncation\?\); "
                                         r"calibrate without that"):
        ditfastattn.calibrate(pipe, [{**embeds(1), **negative_embeds(1)}], config, progress=False)


# a pipeline changed after apply ---------------------------------------------------------------
@pytest.mark.parametrize("static", [False, True])
def test_a_transformer_swapped_into_the_pipeline_after_apply_is_refused_and_remove_still_restores(static):
    # The plan's hooks stay on the transformer it was applied to: the new one ran stock, silently,
    # and remove(pipe) found no plan on it.
    class Holding(torch.nn.Module):  # a wrapper that runs the applied transformer (PEFT's, say): no swap
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

    pipe = sd3_pipeline()
    stock = run_pipeline(pipe, steps=3)
    applied = pipe.transformer
    ditfastattn.apply(pipe, Plan.uniform(applied, 3, "cache"), static=static, num_image_tokens=1024 if static else None)
    planned = run_pipeline(pipe, steps=3)
    pipe.transformer = Holding(applied)
    assert torch.equal(run_pipeline(pipe, steps=3), planned)
    pipe.transformer = tiny_sd3(seed=1)
    with pytest.raises(RuntimeError, match="pipe.transformer was replaced after ditfastattn.apply.*remove\\(pipe\\)"):
        run_pipeline(pipe, steps=3)
    ditfastattn.remove(pipe)
    pipe.transformer = applied
    assert torch.equal(run_pipeline(pipe, steps=3), stock)
    assert not [name for name, _ in applied.named_buffers() if "ditfastattn" in name]


@torch.no_grad()
def test_static_mode_follows_a_model_cast_after_apply():
    # .to() gave the model new counter tensors, the timestep's in bfloat16, where 998 rounds to 1000:
    # two steps counted as one (and the session kept counting on the old tensors).
    def generation(model):
        generator = torch.Generator().manual_seed(0)
        inputs = {"hidden_states": torch.randn(1, 4, 32, 32, generator=generator),
                  "encoder_hidden_states": torch.randn(1, 7, 16, generator=generator),
                  "pooled_projections": torch.randn(1, 16, generator=generator)}
        inputs = {name: tensor.to(torch.bfloat16) for name, tensor in inputs.items()}
        return [model(**inputs, timestep=torch.tensor([t])).sample for t in (1000.0, 998.0, 996.0)]

    plan = Plan.uniform(tiny_sd3(), 3, "arrow_residual:0.5")
    cast_first = tiny_sd3().to(torch.bfloat16)
    ditfastattn.apply(cast_first, plan, static=True, num_image_tokens=256)
    model = tiny_sd3()
    ditfastattn.apply(model, plan, static=True, num_image_tokens=256)
    model.to(torch.bfloat16)
    for got, want in zip(generation(model), generation(cast_first), strict=True):
        assert torch.equal(got, want)


# step count -----------------------------------------------------------------------------------
def test_a_short_generation_on_the_transformer_alone_runs_the_first_rows_and_is_reported(caplog):
    # On the transformer alone the step count is known only once a generation ends (a warm-up, as the
    # benchmarks run, or an interrupted run): a short one runs exactly the plan's first rows.
    pipe = sd3_pipeline()
    plan = with_methods(Plan.uniform(pipe.transformer, 4, "full"),
                        lambda step, layer, head: ["cache", "arrow:0.5", "full"][(step + head) % 3])
    ditfastattn.apply(pipe, Plan(plan.model, plan.methods[:2]))
    first_rows = run_pipeline(pipe, steps=2)
    ditfastattn.remove(pipe)
    ditfastattn.apply(pipe.transformer, plan)
    with caplog.at_level(logging.WARNING, logger="ditfastattn"):
        assert torch.equal(run_pipeline(pipe, steps=2), first_rows)
        run_pipeline(pipe, steps=4)  # the restart shows that the last generation stopped at step 2
        run_pipeline(pipe, steps=4)
    assert [r.getMessage()[:62] for r in caplog.records] == [
        "the last generation stopped after 2 of the plan's 4 denoising "
    ]
    with pytest.raises(PlanMismatchError, match="more than the plan's 4"):
        run_pipeline(pipe, steps=5)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("kind", ["sd3", "flux true cfg"])
def test_a_generation_stopped_after_its_first_step_lends_the_next_one_nothing(kind, static):
    # On the transformer alone the next generation's first timestep equals the stopped one's last, as a
    # step's second call's does (true CFG): the latents tell them apart. The stopped generation's step-0
    # outputs were read by the next one's cache heads at step 1 (0.0025 off on SD3), with no warning.
    make = sd3_pipeline if kind == "sd3" else flux_pipeline
    extra = {"height": 32, "width": 32} if kind == "sd3" else {"true_cfg_scale": 2.0, **negative_embeds()}
    options = {"static": True, "num_image_tokens": 256 if kind == "sd3" else 1024} if static else {}

    def stop_after_the_first_step(pipe, step, timestep, kwargs):
        pipe._interrupt = True
        return kwargs

    outputs = {}
    for target in ("pipeline", "transformer"):
        pipe = make()
        plan = Plan.uniform(pipe.transformer, 4, "cache")
        ditfastattn.apply(pipe if target == "pipeline" else pipe.transformer, plan, **options)
        outputs[target] = run_pipeline(pipe, steps=4, seed=3, **extra)
    assert torch.equal(outputs["transformer"], outputs["pipeline"])  # true CFG's second call is still one
    for stop in ({"steps": 1}, {"steps": 4, "callback_on_step_end": stop_after_the_first_step}):
        pipe = make()
        ditfastattn.apply(pipe.transformer, Plan.uniform(pipe.transformer, 4, "cache"), **options)
        run_pipeline(pipe, seed=9, **stop, **extra)
        assert torch.equal(run_pipeline(pipe, steps=4, seed=3, **extra), outputs["pipeline"])


@pytest.mark.parametrize("static", [False, True])
def test_a_float16_first_step_tie_on_other_latents_starts_a_new_generation(static):
    # float16 keeps neighbouring timesteps near 1000 apart (spacing 0.5): its ties are as telling as
    # float32's. (bfloat16's are not: a test_runtime test.)
    def generation(model, seed, timesteps):
        latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(seed))
        text = torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(0))
        return [model(hidden_states=latents, encoder_hidden_states=text, pooled_projections=torch.zeros(1, 16),
                      timestep=torch.tensor([t], dtype=torch.float16)).sample for t in timesteps]

    options = {"static": True, "num_image_tokens": 256} if static else {}
    with torch.no_grad():
        fresh = tiny_sd3()
        ditfastattn.apply(fresh, Plan.uniform(fresh, 3, "cache"), **options)
        want = generation(fresh, 2, (1000.0, 750.0, 500.0))
        model = tiny_sd3()
        ditfastattn.apply(model, Plan.uniform(model, 3, "cache"), **options)
        generation(model, 1, (1000.0,))  # stopped after its first step
        got = generation(model, 2, (1000.0, 750.0, 500.0))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("make", [sd3_pipeline, flux_pipeline], ids=["sd3 processors", "flux dispatch"])
def test_an_apply_interrupted_after_its_hooks_leaves_nothing_behind(make, static, monkeypatch):
    # An interrupt at apply's last step (following the scheduler) left the hooks on a model that remove()
    # could not find: the next "stock" generation ran the plan.
    from diffusers.models import attention_dispatch

    from ditfastattn.runtime.session import Session

    pipe = make()
    size = {"height": 32, "width": 32}
    stock = run_pipeline(pipe, steps=4, **size)
    modules = dict(pipe.transformer.named_modules())
    processors = {name: m.processor for name, m in modules.items() if hasattr(m, "processor")}
    dispatch_fn = attention_dispatch.dispatch_attention_fn

    def interrupted(self, check=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(Session, "follow_scheduler", interrupted)
    options = {"static": True, "num_image_tokens": 256} if static else {}
    with pytest.raises(KeyboardInterrupt):
        ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, 4, "arrow:0.5"), **options)
    monkeypatch.undo()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules.values())
    assert {name: m.processor for name, m in modules.items() if hasattr(m, "processor")} == processors
    assert all(not name.startswith("_ditfastattn") for m in modules.values() for name in m._buffers)
    assert attention_dispatch.dispatch_attention_fn is dispatch_fn
    assert "set_timesteps" not in vars(pipe.scheduler) and "step" not in vars(pipe.scheduler)
    with pytest.raises(RuntimeError, match="no ditfastattn plan is applied"):
        ditfastattn.remove(pipe)
    assert torch.equal(run_pipeline(pipe, steps=4, **size), stock)
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, 4, "arrow:0.5"), **options)
    assert not torch.equal(run_pipeline(pipe, steps=4, **size), stock)
    ditfastattn.remove(pipe)


def test_a_scheduler_swapped_after_apply_is_checked_and_restored(recorder):
    pipe = sd3_pipeline()
    old = pipe.scheduler
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, 4, "cache"))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(old.config)
    with pytest.raises(PlanMismatchError, match="4 denoising steps but the pipeline runs 3"):
        run_pipeline(pipe, steps=3)
    assert recorder == []  # refused before any layer ran
    with pytest.raises(PlanMismatchError, match="4 denoising steps but the pipeline runs 6"):
        run_pipeline(pipe, steps=6)  # now through the new scheduler's hooked set_timesteps
    run_pipeline(pipe, steps=4)
    ditfastattn.remove(pipe)
    assert "set_timesteps" not in vars(pipe.scheduler) and "set_timesteps" not in vars(old)


def test_static_mode_checks_the_step_count_on_the_transformer_alone(caplog):
    model = tiny_sd3()
    ditfastattn.apply(model, Plan.uniform(model, 3, "cache"), static=True, num_image_tokens=256)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="ditfastattn"):
        for t in (900.0, 600.0, 900.0):  # a 2-step generation, then a restart
            call(model, t)
        assert "stopped after 2 of the plan's 3" in caplog.text
        for t in (600.0, 300.0):
            call(model, t)
        with pytest.raises(PlanMismatchError, match="more than the plan's 3"):
            call(model, 100.0)


def test_remove_keeps_a_users_own_set_timesteps_patch():
    pipe = sd3_pipeline()
    calls = []
    original = pipe.scheduler.set_timesteps

    def patched(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    pipe.scheduler.set_timesteps = patched
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, 2, "cache"))
    with pytest.raises(PlanMismatchError):
        run_pipeline(pipe, steps=3)
    ditfastattn.remove(pipe)
    assert vars(pipe.scheduler)["set_timesteps"] is patched
    run_pipeline(pipe, steps=3)
    assert len(calls) == 2


# apply's arguments ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"cache_budget_gib": math.inf}, "cache_budget_gib must be >= 0: a finite number"),
        ({"cache_budget_gib": math.nan}, "cache_budget_gib must be >= 0: a finite number"),
        ({"cache_budget_gib": "4"}, "cache_budget_gib must be >= 0: a finite number"),
        ({"cache_budget_gib": True}, "cache_budget_gib must be >= 0: a finite number"),
        ({"num_image_tokens": -5, "static": True}, "num_image_tokens must be a positive int"),
        ({"num_image_tokens": 4.5}, "num_image_tokens must be a positive int"),
        ({"impl": "cuda", "static": True}, "impl must be one of"),
    ],
)
def test_apply_refuses_bad_arguments_and_changes_nothing(kwargs, match):
    model = tiny_sd3()
    with pytest.raises(ValueError, match=match):
        ditfastattn.apply(model, Plan.uniform(model, 2, "cache"), **kwargs)
    assert not hasattr(model, "_ditfastattn_session")


def test_a_small_budget_is_logged_in_mib(caplog):
    model = tiny_sd3()
    ditfastattn.apply(model, Plan.uniform(model, 2, "cache"), cache_budget_gib=1 / 102400)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="ditfastattn"):
        for t in (900.0, 500.0):
            call(model, t)
    assert "exceed the 0.01 MiB budget" in caplog.text


# prompts and candidates -----------------------------------------------------------------------
def test_prompt_dicts_of_different_text_lengths_are_refused_before_any_pass(monkeypatch):
    pipe = sd3_pipeline()
    calls = []
    monkeypatch.setattr(pipe.transformer, "forward", lambda *a, **k: calls.append(1))
    short = embeds(1)
    long = {key: torch.cat([value] * 2, dim=1) if value.dim() == 3 else value for key, value in embeds(1, seed=3).items()}
    with pytest.raises(ValueError, match=r"'prompt_embeds' must be tensors of one shape .*pad them to one length"):
        ditfastattn.calibrate(pipe, [short, long], ditfastattn.SearchConfig(delta=0.1, num_inference_steps=3))
    assert not calls


@pytest.mark.parametrize("static", [False, True])
def test_a_model_with_a_plan_applied_refuses_to_be_copied_or_pickled(static):
    import copy
    import pickle

    pipe = sd3_pipeline()
    options = {"static": True, "num_image_tokens": 16} if static else {}
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, 3, "arrow:0.5"), **options)
    for copying in (copy.deepcopy, pickle.dumps):
        for what in (pipe.transformer, pipe):
            with pytest.raises(TypeError, match=r"cannot be copied or pickled .*ditfastattn.remove\(\) first"):
                copying(what)
    ditfastattn.remove(pipe)
    copied = copy.deepcopy(pipe.transformer)
    assert all(torch.equal(a, b) for a, b in zip(copied.state_dict().values(), pipe.transformer.state_dict().values()))
    pickle.dumps(pipe.transformer)


def test_a_bare_prompt_or_candidate_is_one_not_one_per_character():
    from ditfastattn._prompts import prompt_kwargs

    assert prompt_kwargs("a red circle")[0] == {"prompt": ["a red circle"]}
    assert prompt_kwargs(embeds())[0].keys() == embeds().keys()
    with pytest.raises(TypeError, match=r"all strings or all dicts.*\['int'\]"):
        prompt_kwargs([1, 2])
    with pytest.raises(TypeError, match="prompts must be a list"):
        prompt_kwargs(None)
    assert ditfastattn.SearchConfig(candidates="full").candidates == ("full",)
    with pytest.raises(TypeError, match="candidates must be a tuple or list of method names"):
        ditfastattn.SearchConfig(candidates=["full", 0.5])


def test_prompt_dicts_batch_their_texts_and_share_only_equal_settings():
    from ditfastattn._prompts import prompt_kwargs

    # Two dicts with one text each are two prompts (they were merged into a batch of one when equal).
    merged, digest = prompt_kwargs([{"prompt": "a cat", "guidance_scale": 4.0}, {"prompt": "a cat", "guidance_scale": 4.0}])
    assert merged == {"prompt": ["a cat", "a cat"], "guidance_scale": 4.0}
    assert prompt_kwargs([{"prompt": "a cat", "negative_prompt": "blur"}, {"prompt": "a dog", "negative_prompt": "fog"}])[0] \
        == {"prompt": ["a cat", "a dog"], "negative_prompt": ["blur", "fog"]}
    assert digest != prompt_kwargs([{"prompt": "a cat", "guidance_scale": 4.0}])[1]
    # Values that == compares elementwise (a list of tensors, as ip_adapter_image_embeds; an array)
    # are compared whole: equal ones are shared, different ones refused naming the fix.
    image = [torch.randn(2, 1, 8)]
    shared, _ = prompt_kwargs([{"prompt": "a", "ip_adapter_image_embeds": image},
                               {"prompt": "b", "ip_adapter_image_embeds": [image[0].clone()]}])
    assert shared["ip_adapter_image_embeds"] is image
    assert prompt_kwargs([{"x": np.zeros(3)}, {"x": np.zeros(3)}])[0]["x"].shape == (3,)
    assert prompt_kwargs([{"guidance_scale": np.float32(3.5)}] * 2)[0] == {"guidance_scale": 3.5}
    for values in ([[torch.zeros(1, 4)], [torch.ones(1, 4)]], [np.zeros(3), np.ones(3)], [4.0, 5.0]):
        with pytest.raises(ValueError, match=r"differ in 'x', .*tensor with a batch dimension.*pipeline_kwargs"):
            prompt_kwargs([{"x": value} for value in values])
    # The hash reads a tensor's content, not its repr (which elides the middle of large tensors).
    big = torch.zeros(1, 4000)
    changed = big.clone()
    changed[0, 2000] = 1.0
    assert prompt_kwargs([{"x": [big]}])[1] != prompt_kwargs([{"x": [changed]}])[1]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"pipeline_kwargs": {"return_dict": False}}, "pipeline_kwargs cannot set 'return_dict'.*reads the latents itself"),
        ({"pipeline_kwargs": {"sigmas": [1.0, 0.5]}},
         r"sigmas give 2 steps but the search runs num_inference_steps=4.*or set num_inference_steps=2"),
        ({"target_sparsity": 0.5, "candidates": ("full",)}, "target_sparsity 0.5 needs candidates that remove attention"),
        ({"sensitivity": {"layer": {"transformer_blocks.0": 1.0}}}, r"a measurement's keys are \('layers', 'steps', 'heads'\)"),
        ({"sensitivity": {"layers": {}, "step": {}}}, r"sensitivity has keys \['step'\] that a measurement does not"),
    ],
)
def test_calibrate_refuses_inputs_it_would_fail_on_after_a_pass(kwargs, match):
    pipe = sd3_pipeline()
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=match):
        config = ditfastattn.SearchConfig(**{"num_inference_steps": 4, "height": 32, "width": 32, **kwargs})
        ditfastattn.calibrate(pipe, [{**embeds(), **negative_embeds()}], config, progress=False)
    assert calls == []


def test_a_step_count_the_scheduler_changes_is_refused_by_name_under_the_schedule_weights(monkeypatch):
    # A scheduler that sets another step count than asked (here, always 2) meets the plan's step
    # count first at the transformer's first call; the schedule's step weights, read when the
    # timesteps are set, are not combined with the wrong count before that (a numpy broadcast error).
    pipe = sd3_pipeline()
    set_timesteps = pipe.scheduler.set_timesteps
    monkeypatch.setattr(pipe.scheduler, "set_timesteps", lambda num_inference_steps=None, **kw: set_timesteps(2, **kw))
    config = ditfastattn.SearchConfig(delta=0.1, num_inference_steps=4, height=32, width=32)
    with pytest.raises(ditfastattn.PlanMismatchError, match="4 denoising steps but the pipeline runs 2"):
        ditfastattn.calibrate(pipe, [{**embeds(), **negative_embeds()}], config, progress=False)


def test_the_provenance_records_settings_given_through_pipeline_kwargs():
    config = ditfastattn.SearchConfig(delta=0.1, num_inference_steps=2, width=32,
                                      pipeline_kwargs={"guidance_scale": 4.5, "height": 32})
    plan = ditfastattn.calibrate(sd3_pipeline(), [{**embeds(), **negative_embeds()}], config, progress=False)
    assert (plan.provenance["height"], plan.provenance["width"], plan.provenance["guidance_scale"]) == (32, 32, 4.5)


def test_a_calibration_pass_a_callback_interrupts_is_named_as_such():
    def interrupt(pipe, step, timestep, kwargs):
        pipe._interrupt = step == 1
        return kwargs

    config = ditfastattn.SearchConfig(delta=0.1, num_inference_steps=4, height=32, width=32,
                                      pipeline_kwargs={"callback_on_step_end": interrupt})
    with pytest.raises(RuntimeError, match=r"pass ended after 2 of its 4 steps \(a step callback in pipeline_kwargs"):
        ditfastattn.calibrate(sd3_pipeline(), [{**embeds(), **negative_embeds()}], config, progress=False)


def test_a_sensitivity_naming_layers_the_model_lacks_is_refused():
    pipe = sd3_pipeline()
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    names = [layer.name for layer in Plan.uniform(pipe.transformer, 4, "full").model.layers]
    weights = {**{name: 1.0 for name in names}, "transformer_blocks.99": 2.0}  # another model's measurement
    config = ditfastattn.SearchConfig(delta=0.1, num_inference_steps=4, height=32, width=32, sensitivity=weights)
    with pytest.raises(ValueError, match=r"names 1 layers the model does not have \(first: 'transformer_blocks.99'\)"):
        ditfastattn.calibrate(pipe, [{**embeds(), **negative_embeds()}], config, progress=False)
    assert calls == []


# plans ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pipeline_kwargs,prompt,match",
    [
        ({}, {"output_type": "pil"}, "prompt dicts cannot set 'output_type'"),
        ({"prompt_embeds": embeds()["prompt_embeds"]}, {}, r"pipeline_kwargs and the prompts both set \['prompt_embeds'\]"),
        ({"height": 48}, {}, "height is SearchConfig.height=32 but 48 in the pipeline arguments"),
        ({"skip_guidance_layer": [1]}, {}, "StableDiffusion3Pipeline takes no argument 'skip_guidance_layer'"),
    ],
)
def test_calibrate_refuses_pipeline_arguments_it_cannot_pass(pipeline_kwargs, prompt, match):
    pipe = sd3_pipeline()
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    config = ditfastattn.SearchConfig(num_inference_steps=2, height=32, width=32, pipeline_kwargs=pipeline_kwargs,
                                      sensitivity="measure")
    with pytest.raises(ValueError, match=match):
        ditfastattn.calibrate(pipe, [{**embeds(), **negative_embeds(), **prompt}], config, progress=False)
    assert calls == []  # before the sensitivity probes' first pass


def test_calibrate_takes_a_search_config():
    with pytest.raises(TypeError, match=r"config must be a SearchConfig \(e.g. SearchConfig\(delta=0.2\)\); got dict"):
        ditfastattn.calibrate(sd3_pipeline(), ["a red circle"], {"delta": 0.2})


def test_a_plan_with_non_finite_numbers_saves_and_loads(tmp_path):
    import numpy as np

    model = tiny_sd3()
    base = Plan.uniform(model, 2, "full")
    provenance = {"search": {"delta": math.inf, "costs": {"cache": np.float32(0.5)}}, "shape": (1, 2)}
    scores = {"rse": [[[[0.0, math.nan]] * 3] * 2] * 2, "best": np.array([1.5, np.inf])}
    plan = Plan(base.model, base.methods, provenance, scores)
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.provenance == plan.provenance and loaded.scores == plan.scores
    assert plan.provenance["search"] == {"delta": None, "costs": {"cache": 0.5}} and plan.provenance["shape"] == [1, 2]
    assert plan.scores["rse"][0][0][0] == [0.0, None] and plan.scores["best"] == [1.5, None]
    with pytest.raises(TypeError, match=r"provenance\['prompts'\] holds a set"):
        Plan(base.model, base.methods, {"prompts": {"a"}})
    with pytest.raises(TypeError, match="string keys"):
        Plan(base.model, base.methods, {"sensitivity": {0: 1.0}})


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d.update(extra=1), r"fields a version-1 plan does not: \['extra'\]"),
        (lambda d: d["model"]["layers"][0].update(heads="3"), "heads must be a positive int"),
        (lambda d: d["model"]["layers"][0].update(text="yes"), "text must be true or false"),
        (lambda d: d["model"]["layers"].append(dict(d["model"]["layers"][0])), "layer names must be unique"),
        (lambda d: d.update(num_steps=2.0), "num_steps must be an int"),
        (lambda d: d["provenance"].update(num_image_tokens=-4), "num_image_tokens must be an int >= 1"),
        (lambda d: d["provenance"].update(search="delta=0.2"), "search must be a dict"),
        (lambda d: d.update(provenance=[1]), "provenance must be a dict"),
    ],
)
def test_a_plan_file_is_checked_when_loaded(tmp_path, edit, match):
    import json

    model = tiny_sd3()
    Plan.uniform(model, 2, "cache").save(tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())
    edit(data)
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        Plan.load(tmp_path / "plan.json")


def test_plan_methods_and_geometry_are_checked(tmp_path):
    model = tiny_sd3()
    plan = Plan.uniform(model, 2, "cache")
    with pytest.raises(ValueError, match=r"methods\[1\]\[0\] \(one method name per head\) must be a list, not str"):
        Plan(plan.model, [plan.methods[0], ["cache cache cache", ["cache"] * 3]])
    with pytest.raises(ValueError, match="num_image_tokens must be a positive int"):
        plan.summary(-64, 7)
    with pytest.raises(ValueError, match="num_image_tokens must be a positive int"):
        plan.summary(0, 0)
    with pytest.raises(ValueError, match="text_len must be an int >= 0"):
        plan.summary(256, -7)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        Plan.load(tmp_path)
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1; got 2.5"):
        Plan.uniform(model, 2.5, "full")


# the evaluation harness -----------------------------------------------------------------------
def test_evaluation_checks_before_its_first_image():
    from ditfastattn.evaluation import delta_sweep, evaluate, generate

    pipe = sd3_pipeline()
    prompt = {**embeds(), **negative_embeds(), "height": 32, "width": 32}
    images, _ = generate(pipe, prompt, num_inference_steps=1)  # a bare prompt is one prompt
    assert images.shape[0] == 1
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(PlanMismatchError, match="3 denoising steps but the pipeline runs 2"):
        evaluate(pipe, [prompt], {"p": Plan.uniform(pipe.transformer, 3, "cache")}, num_inference_steps=2)
    with pytest.raises(ValueError, match="distinct deltas"):
        delta_sweep(pipe, [prompt], [prompt], [0.2, 0.2000001], ditfastattn.SearchConfig(num_inference_steps=2))
    assert calls == []


# confusing output and lost work ----------------------------------------------------------------
def test_one_progress_bar_at_a_time_with_log_lines_above_it(capsys):
    # Calibration's bar replaces the pipeline's per-pass bar (restored after); under the CLI a log
    # line prints on its own line above a bar, not inside it.
    from tqdm.auto import tqdm

    from ditfastattn.cli import _library_log

    pipe = sd3_pipeline()
    pipe.set_progress_bar_config(leave=True)
    config = ditfastattn.SearchConfig(delta=0.2, num_inference_steps=3, height=32, width=32)
    ditfastattn.calibrate(pipe, [{**embeds(), **negative_embeds()}], config)
    err = capsys.readouterr().err
    assert "ditfastattn calibrate" in err and "/4 [" in err and "/3 [" not in err  # 2 steps x 2 layers; no 3-step bar
    assert pipe._progress_bar_config == {"leave": True}
    with _library_log(verbose=False), tqdm(total=2, desc="bar") as bar:
        bar.update(1)
        logging.getLogger("ditfastattn.runtime").warning("a warning")
    assert "ditfastattn: a warning" in re.split(r"[\r\n]", capsys.readouterr().err)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a folder no one can write in, even root: /proc")
def test_evaluate_refuses_an_unwritable_folder_before_calibrating(tmp_path, capsys):
    from ditfastattn.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    argv = ["evaluate", "--model", "testbed:sd3", "--device", "cpu", "--prompts", str(prompts),
            "--calibration-prompts", str(prompts), "--out", "/proc/ditfastattn-evaluation"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--out /proc/ditfastattn-evaluation: cannot write in /proc" in err and err.count("\n") == 1


# property: random plans on random tiny models -------------------------------------------------
def random_model(rng):
    """A tiny SD3 or FLUX transformer with random heads and head dim, and one call's inputs maker
    for a random text length and an image token count that is not a multiple of 128."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    heads, dim = rng.choice([1, 2, 3]), rng.choice([8, 16])
    text = rng.choice([1, 5, 77])
    rows, cols = rng.choice([(3, 5), (10, 13), (12, 19)])  # 15, 130, 228 image tokens
    torch.manual_seed(rng.randrange(1000))
    if rng.random() < 0.5:
        model = SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=dim, num_attention_heads=heads,
            joint_attention_dim=16, caption_projection_dim=heads * dim, pooled_projection_dim=16, out_channels=4,
            pos_embed_max_size=40, dual_attention_layers=(0,) if rng.random() < 0.5 else (),
        ).eval()

        def inputs(batch, g):
            return {"hidden_states": torch.randn(batch, 4, 2 * rows, 2 * cols, generator=g),
                    "encoder_hidden_states": torch.randn(batch, text, 16, generator=g),
                    "pooled_projections": torch.randn(batch, 16, generator=g)}
    else:
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=dim,
            num_attention_heads=heads, joint_attention_dim=16, pooled_projection_dim=16,
            axes_dims_rope=(2, 2, 4) if dim == 8 else (4, 6, 6),
        ).eval()
        grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
        img_ids = torch.cat([torch.zeros(rows * cols, 1), grid.float()], 1)

        def inputs(batch, g):
            return {"hidden_states": torch.randn(batch, rows * cols, 16, generator=g),
                    "encoder_hidden_states": torch.randn(batch, text, 16, generator=g),
                    "pooled_projections": torch.randn(batch, 16, generator=g),
                    "img_ids": img_ids, "txt_ids": torch.zeros(text, 3)}
    return model, inputs


def random_plan(model, steps, rng) -> Plan:
    """Every method where the plan rules allow it: a cache after a computed step, an
    arrow_residual (one window per head) after a full step."""
    base = Plan.uniform(model, steps, "full")
    methods = [[list(heads) for heads in rows] for rows in base.methods]
    for layer, spec in enumerate(base.model.layers):
        for head in range(spec.heads):
            window = rng.choice([0.1, 0.5, 1.0])
            for step in range(1, steps):
                choices = ["full", "cache", f"arrow:{rng.choice([0.05, 0.3, 1.0])}"]
                if any(methods[s][layer][head] == "full" for s in range(step)):
                    choices.append(f"arrow_residual:{window}")
                methods[step][layer][head] = rng.choice(choices)
    return Plan(base.model, methods)


@torch.no_grad()
@pytest.mark.parametrize("seed", range(6))
def test_random_plans_stay_finite_and_all_full_plans_stay_stock(seed, nan_empty):
    import random

    rng = random.Random(seed)
    model, inputs = random_model(rng)
    steps = rng.randint(2, 4)
    timesteps = sorted(rng.sample(range(1, 1000), steps), reverse=True)
    extra = [rng.random() < 0.5 for _ in range(steps)]  # a second call at some steps only (skip-layer guidance)

    def generation():
        g = torch.Generator().manual_seed(seed)
        outs = []
        for t, twice in zip(timesteps, extra):
            for batch in (2, 1)[: 1 + twice]:
                args = inputs(batch, g)
                outs.append(model(**args, timestep=torch.full((batch,), t / (1000.0 if "img_ids" in args else 1.0))).sample)
        return outs

    stock = generation()
    ditfastattn.apply(model, Plan.uniform(model, steps, "full"))
    assert all(torch.equal(a, b) for a, b in zip(generation(), stock))
    ditfastattn.remove(model)
    budget = rng.choice([None, 0.0, 1e-5])
    ditfastattn.apply(model, random_plan(model, steps, rng), cache_budget_gib=budget)
    for first, second in zip(generation(), generation()):
        assert torch.isfinite(first).all() and torch.equal(first, second)
