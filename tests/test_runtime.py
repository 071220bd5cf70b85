"""apply/remove on real (tiny) diffusers pipelines: exactness, every method's definition, errors."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from conftest import embeds, flux_pipeline, make_pipeline, negative_embeds, run_pipeline, sd3_pipeline, tiny_sd3
from test_reference_op import masked_reference

import ditfastattn
from ditfastattn import Plan, PlanMismatchError
from ditfastattn._geometry import MODE_FULL, window_blocks

STEPS = 4
# 48 x 56 pixels (the tiny VAE keeps the size) -> 24 x 28 = 672 image tokens: 5 full blocks and a partial one.
ODD = {"height": 48, "width": 56}
ODD_IMAGE_TOKENS = 672


def find(records, layer, step, call=0):
    (record,) = [r for r in records if r["layer"] == layer and r["step"] == step and r["call"] == call]
    return record


def with_methods(plan: Plan, assign) -> Plan:
    methods = [[list(h) for h in rows] for rows in plan.methods]
    for step in range(1, plan.num_steps):
        for layer, heads in enumerate(methods[step]):
            for head in range(len(heads)):
                heads[head] = assign(step, layer, head)
    return Plan(plan.model, methods, plan.provenance)


def test_all_full_plan_is_bitwise_stock(pipeline_kind):
    pipe = make_pipeline(pipeline_kind)
    stock = run_pipeline(pipe, steps=STEPS, batch=2)
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "full"))
    assert torch.equal(run_pipeline(pipe, steps=STEPS, batch=2), stock)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_all_full_plan_is_bitwise_stock_in_half_precision(dtype):
    pipe = sd3_pipeline(dual=True).to(dtype=dtype)
    inputs = {key: value.to(dtype) for key, value in {**embeds(), **negative_embeds()}.items()}
    stock = run_pipeline(pipe, steps=2, **inputs)
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, 2, "full"))
    assert torch.equal(run_pipeline(pipe, steps=2, **inputs), stock)


@pytest.mark.parametrize("method", ["cache", "arrow:0.5", "arrow_residual:0.25"])
def test_remove_restores_bitwise(pipeline_kind, method):
    pipe = make_pipeline(pipeline_kind)
    processors = dict(pipe.transformer.attn_processors)
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    stock = run_pipeline(pipe, steps=STEPS)
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, method))
    compressed = run_pipeline(pipe, steps=STEPS)
    assert not torch.equal(compressed, stock)
    ditfastattn.remove(pipe)
    assert torch.equal(run_pipeline(pipe, steps=STEPS), stock)
    assert all(pipe.transformer.attn_processors[k] is v for k, v in processors.items())
    assert all(torch.equal(v, state[k]) for k, v in pipe.transformer.state_dict().items())
    assert "set_timesteps" not in vars(pipe.scheduler)


def test_apply_twice_and_remove_twice_raise():
    pipe = flux_pipeline()
    plan = Plan.uniform(pipe.transformer, STEPS, "cache")
    ditfastattn.apply(pipe, plan)
    with pytest.raises(RuntimeError, match="already applied"):
        ditfastattn.apply(pipe.transformer, plan)
    assert ditfastattn.remove(pipe) is plan
    with pytest.raises(RuntimeError, match="nothing to remove"):
        ditfastattn.remove(pipe)


def test_plan_for_another_model_is_refused_and_nothing_changes():
    pipe = sd3_pipeline()
    processors = dict(pipe.transformer.attn_processors)
    with pytest.raises(PlanMismatchError, match="made for FluxTransformer2DModel"):
        ditfastattn.apply(pipe, Plan.uniform(flux_pipeline().transformer, STEPS, "cache"))
    assert all(pipe.transformer.attn_processors[k] is v for k, v in processors.items())
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "cache"))  # still clean


def test_wrong_step_count_fails_before_denoising(pipeline_kind, recorder):
    pipe = make_pipeline(pipeline_kind)
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "cache"))
    with pytest.raises(PlanMismatchError, match=f"{STEPS} denoising steps but the pipeline runs {STEPS + 2}"):
        run_pipeline(pipe, steps=STEPS + 2)
    assert recorder == []
    run_pipeline(pipe, steps=STEPS)  # the session recovers for a correct call


def test_transformer_only_tracks_steps_and_refuses_extra_steps(recorder):
    model = tiny_sd3()
    ditfastattn.apply(model, Plan.uniform(model, 2, "cache"))
    inputs = {
        "hidden_states": torch.randn(1, 4, 32, 32),
        "encoder_hidden_states": torch.randn(1, 7, 16),
        "pooled_projections": torch.randn(1, 16),
    }
    for generation in range(2):
        model(**inputs, timestep=torch.tensor([900.0]))
        model(**inputs, timestep=torch.tensor([500.0]))
    assert [r["step"] for r in recorder if r["layer"].endswith("0.attn")] == [0, 1, 0, 1]
    with pytest.raises(PlanMismatchError, match="more than the plan's 2 denoising steps"):
        model(**inputs, timestep=torch.tensor([100.0]))


def mixed_plan(transformer, steps, cfg: bool) -> Plan:
    """Every method on some head; layers rotate the assignment so each layer sees each method."""
    methods = ["cache", "arrow:0.5", "arrow_residual:0.5"]
    if cfg:
        methods = ["cfg_share", "cfg_share+arrow:0.5", "arrow_residual:0.5"]

    def assign(step, layer, head):
        if step == 2 and head == 0:
            return "full"  # a fresh full step: residuals and caches must follow it
        return methods[(head + layer) % len(methods)]

    return with_methods(Plan.uniform(transformer, steps, "full"), assign)


def head_attention(record, head, mode, rows=slice(None)):
    """Float64 masked attention of one head of a recorded call, from the definition."""
    q, k, v = (record[name][rows, :, head : head + 1] for name in ("q", "k", "v"))
    (expected,), _ = masked_reference(q, k, v, [mode], record["text_start"], record["text_len"])
    return expected


def check_definitions(plan, records, atol: float):
    checked = set()
    for record in records:
        step, layer, call, out = record["step"], record["layer"], record["call"], record["out"]
        index = plan.layer_names.index(layer)
        image_tokens = out.shape[1] - record["text_len"]
        half = out.shape[0] // 2
        for head in range(out.shape[2]):
            method = plan.method(step, index, head)
            checked.add(method.name)
            if method.kind == "cache":
                earlier = find(records, layer, step - 1, call)["out"][:, :, head]
                assert torch.equal(out[:, :, head], earlier), "cache must reuse the previous output exactly"
                continue
            mode = method.mode(image_tokens)
            rows = slice(half, None) if method.shares_cfg else slice(None)
            expected = head_attention(record, head, mode, rows)
            if method.kind == "arrow_residual":
                last_full = max(s for s in range(step) if plan.method(s, index, head).kind == "full")
                then = find(records, layer, last_full, call)
                expected = expected + head_attention(then, head, MODE_FULL) - head_attention(then, head, mode)
            torch.testing.assert_close(out[rows, :, head].double(), expected, atol=atol, rtol=1e-4)
            if method.shares_cfg:
                assert torch.equal(out[:half, :, head], out[half:, :, head]), "CFG sharing copies the cond half"
    return checked


def test_every_method_follows_its_definition(pipeline_kind, recorder):
    pipe = make_pipeline(pipeline_kind)
    plan = mixed_plan(pipe.transformer, STEPS, cfg=False)
    ditfastattn.apply(pipe, plan)
    run_pipeline(pipe, steps=STEPS, **ODD)
    assert window_blocks(0.5, ODD_IMAGE_TOKENS) == 1  # a band narrower than the 6 image blocks
    checked = check_definitions(plan, recorder, atol=3e-5)
    assert checked == {"full", "cache", "arrow:0.5", "arrow_residual:0.5"}


def test_residual_heads_apart_add_and_capture_only_their_own_rows(pipeline_kind, recorder):
    # Heads 0 and 2 keep residuals with head 1 between them: adding or capturing over the span
    # of both would change head 1, which caches (an exact copy) or runs a plain window.
    pipe = make_pipeline(pipeline_kind)
    rows = [["full"] * 3, ["arrow_residual:0.5", "cache", "arrow_residual:0.5"],
            ["full", "arrow:0.5", "full"], ["arrow_residual:0.5", "cache", "arrow_residual:0.5"]]
    plan = with_methods(Plan.uniform(pipe.transformer, STEPS, "full"), lambda step, layer, head: rows[step][head])
    ditfastattn.apply(pipe, plan)
    run_pipeline(pipe, steps=STEPS, **ODD)
    assert check_definitions(plan, recorder, atol=3e-5) == {"full", "cache", "arrow:0.5", "arrow_residual:0.5"}


@pytest.mark.parametrize("static", [False, True])
def test_a_generation_that_failed_inside_the_transformer_leaves_the_next_one_exact(static):
    # An error mid-call (out of memory in a block, say) leaves the session mid-step, its buffers
    # and counters part-written: the next generation must run as on a fresh model.
    plan_rows = [["full"] * 3, ["cache", "arrow_residual:0.5", "arrow:0.5"], ["full"] * 3,
                 ["cache", "arrow_residual:0.5", "arrow:0.5"]]
    pipes = [sd3_pipeline(), sd3_pipeline()]
    for pipe in pipes:
        plan = with_methods(Plan.uniform(pipe.transformer, 4, "full"), lambda step, layer, head: plan_rows[step][head])
        ditfastattn.apply(pipe, plan, static=static, num_image_tokens=1024 if static else None)
    failing, fresh = pipes
    calls = []

    def fail_at_the_third_call(*_):
        calls.append(None)
        if len(calls) == 3:
            raise MemoryError("out of memory")

    hook = failing.transformer.transformer_blocks[-1].register_forward_hook(fail_at_the_third_call)
    with pytest.raises(MemoryError):
        run_pipeline(failing, steps=4, seed=9)
    hook.remove()
    assert torch.equal(run_pipeline(failing, steps=4, seed=3), run_pipeline(fresh, steps=4, seed=3))


def test_cfg_sharing_follows_its_definition(recorder):
    pipe = sd3_pipeline(dual=True)
    plan = mixed_plan(pipe.transformer, STEPS, cfg=True)
    ditfastattn.apply(pipe, plan)
    run_pipeline(pipe, steps=STEPS, **ODD)
    assert recorder[0]["q"].shape[0] == 2  # CFG batch [uncond; cond]
    checked = check_definitions(plan, recorder, atol=3e-5)
    assert checked == {"full", "cfg_share", "cfg_share+arrow:0.5", "arrow_residual:0.5"}


def test_cfg_share_needs_a_cfg_batch():
    flux = flux_pipeline()
    with pytest.raises(ValueError, match="separate transformer calls"):
        ditfastattn.apply(flux, Plan.uniform(flux.transformer, 2, "cfg_share"))
    pipe = sd3_pipeline()
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, 2, "cfg_share"))
    with pytest.raises(ValueError, match="cfg_share needs a CFG batch"):
        run_pipeline(pipe, steps=2, guidance_scale=1.0)
    # Two prompts without guidance make an even batch, which would share across the prompts.
    with pytest.raises(ValueError, match=r"cfg_share needs a CFG batch.*without classifier-free guidance"):
        run_pipeline(pipe, steps=2, batch=2, guidance_scale=1.0)


def test_true_cfg_keeps_separate_caches_per_call(recorder):
    pipe = flux_pipeline()
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, 3, "cache"))
    run_pipeline(pipe, steps=3, true_cfg_scale=3.0, **negative_embeds())
    layer = "single_transformer_blocks.1.attn"
    assert {r["call"] for r in recorder} == {0, 1}
    positive, negative = find(recorder, layer, 0, 0)["out"], find(recorder, layer, 0, 1)["out"]
    assert not torch.equal(positive, negative)
    for step in (1, 2):
        assert torch.equal(find(recorder, layer, step, 0)["out"], positive)
        assert torch.equal(find(recorder, layer, step, 1)["out"], negative)


def test_buffers_are_freed_when_a_generation_ends():
    pipe = sd3_pipeline()
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "arrow_residual:0.5"))
    session = pipe.transformer._ditfastattn_session
    run_pipeline(pipe, steps=STEPS)
    assert all(not layer.slots for layer in session.layers)


def test_repeated_generations_are_identical():
    pipe = make_pipeline("sd35")
    ditfastattn.apply(pipe, mixed_plan(pipe.transformer, STEPS, cfg=True))
    first = run_pipeline(pipe, steps=STEPS)
    assert torch.equal(run_pipeline(pipe, steps=STEPS), first)


def test_fused_projections_are_refused():
    pipe = sd3_pipeline()
    pipe.transformer.fuse_qkv_projections()
    with pytest.raises(TypeError, match="FusedJointAttnProcessor2_0.*fuse_qkv_projections"):
        ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "cache"))


def test_non_pipeline_input_is_refused():
    with pytest.raises(TypeError, match="pipeline with a `.transformer`"):
        ditfastattn.apply(object(), None)


def test_a_layer_holds_its_buffer_only_while_the_next_step_caches():
    pipe = sd3_pipeline()
    base = Plan.uniform(pipe.transformer, 5, "full")
    schedule = {1: "arrow:0.5", 2: "cache", 3: "arrow_residual:0.5", 4: "cache"}
    plan = with_methods(base, lambda step, layer, head: schedule[step])
    ditfastattn.apply(pipe, plan)
    session = pipe.transformer._ditfastattn_session
    held = []
    pipe.transformer.register_forward_hook(
        lambda *_: held.append([layer.slots[0].out is not None for layer in session.layers if 0 in layer.slots])
    )
    run_pipeline(pipe, steps=5)
    # after steps 0..3: the next step caches only after steps 1 and 3; the last step frees all
    assert [any(flags) for flags in held] == [False, True, False, True, False]


@torch.no_grad()
def test_explicit_gluon_impl_is_accepted_and_never_falls_back():
    model = tiny_sd3()
    with pytest.raises(ValueError, match="impl must be one of"):
        ditfastattn.apply(model, Plan.uniform(model, 2, "full"), impl="cuda")
    ditfastattn.apply(model, Plan.uniform(model, 2, "arrow:0.5"), impl="gluon")
    inputs = {
        "hidden_states": torch.randn(1, 4, 32, 32),
        "encoder_hidden_states": torch.randn(1, 7, 16),
        "pooled_projections": torch.randn(1, 16),
    }
    # Refused at the first call, though step 0 would run the stock attention and step 1 the op.
    with pytest.raises(RuntimeError, match="impl='gluon' cannot run"):
        model(**inputs, timestep=torch.tensor([900.0]))
    ditfastattn.remove(model)


def test_a_processor_replaced_after_apply_is_refused_not_silently_left_stock():
    # SD3 runs ditfastattn's own processors: fuse_qkv_projections after apply replaces them, and
    # the plan would silently stop. FLUX keeps diffusers' stock processor, whose attention call is
    # intercepted: a new stock instance still runs the plan, another processor class does not.
    pipe = sd3_pipeline()
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "arrow:0.3"))
    pipe.transformer.fuse_qkv_projections()
    with pytest.raises(RuntimeError, match=r"transformer_blocks.0.attn's attention processor was replaced.*"
                                           r"FusedJointAttnProcessor2_0.*ditfastattn.remove\(\)"):
        run_pipeline(pipe, STEPS)
    ditfastattn.remove(pipe)
    pipe.transformer.unfuse_qkv_projections()

    pipe = flux_pipeline()
    plan = Plan.uniform(pipe.transformer, STEPS, "arrow:0.3")
    ditfastattn.apply(pipe, plan)
    want = run_pipeline(pipe, STEPS)
    pipe.transformer.set_attn_processor(FluxAttnProcessor())
    assert torch.equal(run_pipeline(pipe, STEPS), want)
    pipe.transformer.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(RuntimeError, match="attention processor was replaced after ditfastattn.apply"):
        run_pipeline(pipe, STEPS)
    ditfastattn.remove(pipe)


def test_image_to_image_runs_the_plan_rows_of_the_steps_it_runs(recorder):
    # strength 0.5 of 6 steps: the pipeline starts its scheduler at step 3 (begin_index), so the
    # plan's rows 3, 4, 5 run, each head as its row says (a cache row at the first step computes:
    # there is no previous output to reuse).
    from diffusers import FluxImg2ImgPipeline

    pipe = FluxImg2ImgPipeline.from_pipe(flux_pipeline())
    steps = 6
    rows = {1: "cache", 2: "cache", 3: "cache", 4: "arrow:0.3", 5: "cache"}
    plan = Plan.uniform(pipe.transformer, steps, "full")
    plan = Plan(plan.model, [[[rows.get(step, "full")] * len(heads) for heads in layers]
                             for step, layers in enumerate(plan.methods)])
    ditfastattn.apply(pipe, plan)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pipe(image=image, strength=0.5, num_inference_steps=steps, height=64, width=64, output_type="latent",
         generator=torch.Generator().manual_seed(0), **embeds(1))
    assert sorted({record["step"] for record in recorder}) == [3, 4, 5]
    for record in recorder:
        if record["step"] == 5:  # cache: step 4's output
            previous = find(recorder, record["layer"], 4, record["call"])
            assert torch.equal(record["out"], previous["out"])
        if record["step"] == 4:  # the arrow row, not a cache row
            previous = find(recorder, record["layer"], 3, record["call"])
            assert not torch.equal(record["out"], previous["out"])
    ditfastattn.remove(pipe)


@pytest.mark.parametrize("static", [False, True])
def test_a_plan_applied_mid_generation_runs_its_rows_from_the_step_the_scheduler_is_at(static):
    # Applied from a step callback after step 1, the plan's first call is step 2: it ran row 0 there
    # (and every later row one step late), silently. Static mode, which counts from step 0, refuses.
    steps = 5
    rows = ["full", "arrow:0.25", "arrow:0.5", "cache", "arrow:0.25"]
    plan = Plan.uniform(flux_pipeline().transformer, steps, "full")
    plan = Plan(plan.model, [[[rows[step]] * len(heads) for heads in layers] for step, layers in enumerate(plan.methods)])
    from_step_2 = Plan(plan.model, [plan.methods[0]] * 2 + plan.methods[2:])
    reference = flux_pipeline()
    ditfastattn.apply(reference, from_step_2)
    want = run_pipeline(reference, steps)

    def apply_after_step_1(pipe, step, timestep, tensors):
        if step == 1:
            ditfastattn.apply(pipe, plan, static=static, num_image_tokens=1024 if static else None)
        return tensors

    pipe = flux_pipeline()
    if static:
        with pytest.raises(NotImplementedError, match="starts at step 2 .*a plan applied mid-generation"):
            run_pipeline(pipe, steps, callback_on_step_end=apply_after_step_1)
    else:
        assert torch.equal(run_pipeline(pipe, steps, callback_on_step_end=apply_after_step_1), want)
    ditfastattn.remove(pipe)


def test_static_mode_refuses_a_schedule_that_starts_past_step_0():
    from diffusers import FluxImg2ImgPipeline

    pipe = FluxImg2ImgPipeline.from_pipe(flux_pipeline())
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, 6, "cache"), static=True, num_image_tokens=1024)
    with pytest.raises(NotImplementedError, match="starts at step 3 .*strength below 1.*without static=True"):
        pipe(image=torch.rand(1, 3, 64, 64), strength=0.5, num_inference_steps=6, height=64, width=64,
             output_type="latent", **embeds(1))
    ditfastattn.remove(pipe)


def bf16_flux_with_rounded_timesteps(steps: int):
    """The tiny FLUX pipeline in bfloat16 with FLUX.1-dev's schedule at 2048² (its dynamic shift
    there is about 25): the pipeline casts each timestep to bfloat16, where neighbouring ones near
    1000 round to one value."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = flux_pipeline().to(torch.bfloat16)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=25.0)
    pipe.scheduler.set_timesteps(steps)
    passed = (pipe.scheduler.timesteps.to(torch.bfloat16) / 1000).tolist()
    assert sum(a == b for a, b in zip(passed, passed[1:])) >= 5  # the schedule this test is about
    return pipe


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("true_cfg", [False, True])
def test_steps_whose_bf16_timesteps_round_alike_each_run_their_own_row(static, true_cfg):
    # Counted by timestep changes alone, a step whose timestep rounded to the last one's ran as that
    # step's second call: its cache heads read outputs two steps old, and the last rows never ran.
    steps = 28
    pipe = bf16_flux_with_rounded_timesteps(steps)
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, steps, "cache"), static=static,
                      num_image_tokens=1024 if static else None)
    session = pipe.transformer._ditfastattn_session
    seen = []

    def count(module, args, output):
        if static:
            seen.append((int(session.step_tensor()), int(session.call_tensor())))
        else:
            seen.append((session.step, session.call))

    handle = pipe.transformer.register_forward_hook(count)
    inputs = {key: value.to(torch.bfloat16) for key, value in embeds().items()}
    if true_cfg:
        inputs.update({key: value.to(torch.bfloat16) for key, value in negative_embeds().items()}, true_cfg_scale=2.0)
    run_pipeline(pipe, steps, **inputs)
    handle.remove()
    calls = 2 if true_cfg else 1
    assert seen == [(step, call) for step in range(steps) for call in range(calls)]
    ditfastattn.remove(pipe)
    assert "step" not in vars(pipe.scheduler)


def test_a_compiled_static_generation_counts_rounded_steps_as_the_scheduler_takes_them():
    # Compiled, the step counter moves on the device: the scheduler's step adds to a counter there.
    steps = 28
    pipe = bf16_flux_with_rounded_timesteps(steps)
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, steps, "cache"), static=True, num_image_tokens=1024)
    session = pipe.transformer._ditfastattn_session
    inputs = {key: value.to(torch.bfloat16) for key, value in embeds().items()}
    eager = run_pipeline(pipe, steps, **inputs)
    torch._dynamo.reset()
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend="aot_eager", dynamic=False)
    seen = []
    pipe.transformer.register_forward_hook(lambda module, args, output: seen.append(int(session.step_tensor())))
    try:
        compiled = run_pipeline(pipe, steps, **inputs)
    finally:
        torch._dynamo.reset()
    assert seen == list(range(steps)) and torch.equal(compiled, eager)


def test_the_transformer_alone_says_once_that_it_cannot_tell_rounded_steps_apart(caplog):
    steps = 28
    pipe = bf16_flux_with_rounded_timesteps(steps)
    ditfastattn.apply(pipe.transformer, Plan.uniform(pipe.transformer, steps, "full"))
    inputs = {key: value.to(torch.bfloat16) for key, value in embeds().items()}
    with caplog.at_level("WARNING", logger="ditfastattn"):
        run_pipeline(pipe, steps, **inputs)
    said = [r for r in caplog.records if "same torch.bfloat16 timestep twice in a row" in r.getMessage()]
    assert len(said) == 1 and "apply the plan to the pipeline" in said[0].getMessage()
    ditfastattn.remove(pipe.transformer)


@pytest.mark.parametrize("static", [False, True])
def test_a_bf16_tie_at_the_first_step_stays_the_steps_next_call(static):
    # 1000 and 999 round alike in bfloat16: the tied call's latents differ (the scheduler stepped), which
    # must not read as a new generation there (the latents tell only full-precision ties apart).
    pipe = flux_pipeline().to(torch.bfloat16)
    options = {"static": True, "num_image_tokens": 1024} if static else {}
    ditfastattn.apply(pipe.transformer, Plan.uniform(pipe.transformer, 4, "cache"), **options)
    session = pipe.transformer._ditfastattn_session
    restarts = []
    start = session._start_generation if not static else None
    if not static:
        session._start_generation = lambda: (restarts.append(1), start())
    inputs = {key: value.to(torch.bfloat16) for key, value in embeds().items()}
    for seed in (0, 1):
        pipe(sigmas=[1.0, 0.999, 0.75, 0.5], num_inference_steps=4, height=64, width=64, output_type="latent",
             generator=torch.Generator().manual_seed(seed), **inputs)
    if static:
        assert int(pipe.transformer._buffers["_ditfastattn_step"]) == 2 and session.calls_per_step == 2
    else:
        assert restarts == [1, 1] and session.calls_per_step == 2
    ditfastattn.remove(pipe.transformer)


def test_a_pipeline_with_a_scheduler_of_its_own_is_said_once(caplog):
    # A sibling made by from_pipe with a new scheduler shares the transformer, not the scheduler the
    # plan follows: its strength and rounded timesteps would run the wrong rows, silently.
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline

    pipe = flux_pipeline()
    sibling = FluxImg2ImgPipeline.from_pipe(pipe, scheduler=FlowMatchEulerDiscreteScheduler())
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "cache"))
    with caplog.at_level("WARNING", logger="ditfastattn"):
        run_pipeline(pipe, STEPS)
        assert not [r for r in caplog.records if r.name.startswith("ditfastattn")]
        for _ in range(2):
            sibling(image=torch.rand(1, 3, 64, 64), strength=1.0, num_inference_steps=STEPS, height=64, width=64,
                    output_type="latent", **embeds(1))
    said = [r.getMessage() for r in caplog.records if r.name.startswith("ditfastattn")]
    assert len(said) == 1 and "FlowMatchEulerDiscreteScheduler, the scheduler ditfastattn follows, took no step" in said[0]
    ditfastattn.remove(pipe)


@pytest.mark.parametrize("static", [False, True])
def test_pipelines_sharing_a_scheduler_each_run_their_own_plan_or_none(static):
    # from_pipe shares the scheduler by default: a plan on one pipeline held the other's generations
    # to its step count (a stock pipeline could not run 4 steps under a 3-step plan elsewhere).
    from conftest import tiny_flux
    from diffusers import FluxPipeline

    first = flux_pipeline()
    second = FluxPipeline.from_pipe(first, transformer=tiny_flux(seed=5))
    assert second.scheduler is first.scheduler
    stock = {steps: run_pipeline(second, steps) for steps in (3, 4)}
    options = {"static": True, "num_image_tokens": 1024} if static else {}
    plans = [Plan.uniform(first.transformer, 3, "arrow:0.5"), Plan.uniform(second.transformer, 4, "arrow:0.5")]
    ditfastattn.apply(first, plans[0], **options)
    compressed = run_pipeline(first, 3)
    assert all(torch.equal(run_pipeline(second, steps), stock[steps]) for steps in (4, 3))
    ditfastattn.apply(second, plans[1], **options)
    second_compressed = run_pipeline(second, 4)
    assert torch.equal(run_pipeline(first, 3), compressed) and not torch.equal(second_compressed, stock[4])
    with pytest.raises(PlanMismatchError, match="this plan has 3 denoising steps but the pipeline runs 4"):
        run_pipeline(first, 4)  # still refused before the first transformer call computes
    assert torch.equal(run_pipeline(second, 4), second_compressed)
    # Removed in the order applied, the second's hook wraps the first's: both come off the scheduler.
    assert ditfastattn.remove(first) is plans[0] and ditfastattn.remove(second) is plans[1]
    assert not {"set_timesteps", "step"} & set(vars(first.scheduler))
    with pytest.raises(RuntimeError, match="no ditfastattn plan is applied"):
        ditfastattn.remove(first)
    assert torch.equal(run_pipeline(second, 4), stock[4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host waits exist on a GPU only")
def test_a_rows_first_compile_does_not_wait_for_the_gpu():
    # A plan's row is compiled at its layer's first call, mid-step: its masks and head indices (residual
    # heads, captures, CFG-shared heads, full heads routed to SDPA, scattered so that they need index
    # tensors) must be queued, not copied from pageable memory, which waits for the GPU's queued work.
    from ditfastattn._geometry import MODE_SKIP
    from ditfastattn.methods import parse_method
    from ditfastattn.runtime.rows import compile_row

    shared = ["full", "arrow_residual:0.125", "arrow:0.25", "arrow_residual:0.125", "cfg_share+arrow:0.125", "full"]
    routed = ["full", "arrow:0.25", "full", "cache"]
    capture = [MODE_SKIP] * len(shared)
    capture[0] = capture[5] = window_blocks(0.125, 4096)
    busy = torch.randn(4096, 4096, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        busy @ busy  # queued work the copies must not wait for
        rows = [compile_row([parse_method(n) for n in names], keep=True, capture=capture if names is shared else
                            [MODE_SKIP] * len(names), num_image_tokens=4096, device=torch.device("cuda"),
                            route_full=True, residual_from=[None] * len(names)) for names in (shared, routed)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rows[0].residual_add.view(-1).tolist() == [False, True, False, True, False, False]
    assert rows[0].residual_index.tolist() == [1, 3] and rows[0].capture_index.tolist() == [0, 5]
    assert rows[0].share_mask.view(-1).tolist() == [False] * 4 + [True, False]
    assert rows[1].full_heads.tolist() == [0, 2]
