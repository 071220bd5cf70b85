"""ditfastattn next to what users already have: LoRA, offloading, fp8 weight storage, diffusers' attention
backends, caches, guiders, modular and ControlNet pipelines, compile wrappers and schedulers."""

from __future__ import annotations

import functools
import logging
import warnings

import pytest
import torch
from conftest import HEIGHT, WIDTH, embeds, flux_pipeline, negative_embeds, run_pipeline, sd3_pipeline

import ditfastattn
from ditfastattn import Plan, SearchConfig, calibrate

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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sequential CPU offload runs each module on a CUDA device")
@pytest.mark.parametrize("make", [sd3_pipeline, flux_pipeline], ids=["sd3", "flux"])
def test_sequential_cpu_offload(make):
    pytest.importorskip("accelerate")
    inputs = {**embeds(1), **(negative_embeds(1) if make is sd3_pipeline else {})}
    inputs = {name: value.cuda() for name, value in inputs.items()}
    reference = make().to("cuda")
    stock = run_pipeline(reference, steps=STEPS, **inputs)
    ditfastattn.apply(reference, compressed(reference.transformer))
    expected = run_pipeline(reference, steps=STEPS, **inputs)
    assert not torch.equal(expected, stock)
    pipe = make()
    pipe.enable_sequential_cpu_offload(device="cuda")
    ditfastattn.apply(pipe, compressed(pipe.transformer))
    assert torch.equal(run_pipeline(pipe, steps=STEPS, **inputs), expected)
    ditfastattn.remove(pipe)
    assert torch.equal(run_pipeline(pipe, steps=STEPS, **inputs), stock)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading(offload_type):
    reference = flux_pipeline()
    ditfastattn.apply(reference, compressed(reference.transformer))
    expected = run_pipeline(reference, steps=STEPS)
    pipe = flux_pipeline()
    cpu = torch.device("cpu")  # the hooks move the groups the same way between any two devices
    pipe.transformer.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type=offload_type,
                                          num_blocks_per_group=1)
    ditfastattn.apply(pipe, compressed(pipe.transformer))
    assert torch.equal(run_pipeline(pipe, steps=STEPS), expected)
    ditfastattn.remove(pipe)


def test_layerwise_casting_runs_and_calibrates_as_its_rounded_weights_do():
    """fp8 storage (`enable_layerwise_casting`) upcasts each layer's weights for its forward: a plan and
    a search under it compute exactly what they compute on the same rounded weights stored in float32."""
    pipe = flux_pipeline()
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    stored = {name: value.clone() for name, value in pipe.transformer.state_dict().items()}
    assert any(value.dtype == torch.float8_e4m3fn for value in stored.values())
    rounded = flux_pipeline()
    rounded.transformer.load_state_dict({name: value.float() for name, value in stored.items()})
    stock = run_pipeline(pipe, steps=STEPS)
    assert torch.equal(run_pipeline(rounded, steps=STEPS), stock)

    config = SearchConfig(target_sparsity=0.4, num_inference_steps=STEPS, height=HEIGHT, width=WIDTH)
    plans = [calibrate(each, [embeds(1)], config) for each in (pipe, rounded)]
    assert plans[0].methods == plans[1].methods and plans[0].summary()["sparsity"] > 0.2
    for each in (pipe, rounded):
        ditfastattn.apply(each, plans[0])
    assert torch.equal(run_pipeline(pipe, steps=STEPS), run_pipeline(rounded, steps=STEPS))
    ditfastattn.remove(pipe)
    assert all(torch.equal(value, stored[name]) and value.dtype == stored[name].dtype
               for name, value in pipe.transformer.state_dict().items())
    assert torch.equal(run_pipeline(pipe, steps=STEPS), stock)


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


def pyramid_attention_broadcast():
    """Every attention layer runs at every other step only (steps 0, 2, 4, ...)."""
    from diffusers.hooks import PyramidAttentionBroadcastConfig

    return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                           spatial_attention_timestep_skip_range=(-1, 1001),
                                           current_timestep_callback=lambda: 500)


def diffusers_cache(name: str):
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig, TextKVCacheConfig

    return {
        "FirstBlockCache": lambda: FirstBlockCacheConfig(threshold=0.9),
        "PyramidAttentionBroadcast": pyramid_attention_broadcast,
        "TaylorSeerCache": lambda: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1),
        "TextKVCache": TextKVCacheConfig,
    }[name]()


@pytest.mark.parametrize("name", ["FirstBlockCache", "PyramidAttentionBroadcast", "TaylorSeerCache", "TextKVCache"])
def test_diffusers_caches_run_under_a_plan_and_remove_restores(name):
    steps = 6
    pipe = flux_pipeline()
    plain = run_pipeline(pipe, steps=steps)
    pipe.transformer.enable_cache(diffusers_cache(name))
    stock = run_pipeline(pipe, steps=steps)
    assert torch.equal(stock, plain) == (name == "TextKVCache")  # the others skip work, so change the output
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, steps, "full"))
    assert torch.equal(run_pipeline(pipe, steps=steps), stock)
    ditfastattn.remove(pipe)
    ditfastattn.apply(pipe, compressed_over(pipe.transformer, steps))
    compressed_out = run_pipeline(pipe, steps=steps)
    assert torch.isfinite(compressed_out).all() and not torch.equal(compressed_out, stock)
    ditfastattn.remove(pipe)
    assert torch.equal(run_pipeline(pipe, steps=steps), stock)


def test_an_output_returned_at_one_step_is_never_written_again():
    # The runtime returned the buffer it keeps for the next step's cache heads and wrote the next
    # computing step into it in place: whatever kept an attention module's output across steps (a
    # cache such as TaylorSeer, a user's hook) then held the new step's values.
    steps = 6
    pipe = flux_pipeline()
    ditfastattn.apply(pipe, compressed_over(pipe.transformer, steps))
    kept = []

    def keep(module, args, output):
        output = output[0] if isinstance(output, tuple) else output
        kept.append((output, output.clone()))

    hooks = [module.register_forward_hook(keep) for name, module in pipe.transformer.named_modules()
             if name.endswith(".attn")]
    run_pipeline(pipe, steps=steps)
    for hook in hooks:
        hook.remove()
    assert len(kept) == steps * 3
    assert all(torch.equal(output, copy) for output, copy in kept)
    ditfastattn.remove(pipe)


def test_taylorseer_under_a_plan_reads_each_steps_own_outputs(monkeypatch):
    steps = 8
    # Factors in the model's dtype: TaylorSeer then keeps the module's output itself, not a cast copy.
    config = {"cache_interval": 3, "disable_cache_before_step": 2, "taylor_factors_dtype": torch.float32}
    from diffusers.hooks import TaylorSeerCacheConfig

    from ditfastattn.runtime import LayerRuntime

    def generate():
        pipe = flux_pipeline()
        pipe.transformer.enable_cache(TaylorSeerCacheConfig(**config))
        ditfastattn.apply(pipe, compressed_over(pipe.transformer, steps))
        return run_pipeline(pipe, steps=steps)

    shipped = generate()
    attend = LayerRuntime.attend
    monkeypatch.setattr(LayerRuntime, "attend", lambda self, *args, **kwargs: attend(self, *args, **kwargs).clone())
    assert torch.equal(shipped, generate())  # copying every output changes nothing


def compressed_over(transformer, steps: int) -> Plan:
    """Heads that read the past (a cache, a residual) beside full ones, at every step after the first."""
    model = Plan.uniform(transformer, steps, "full").model
    kinds = ("full", "cache", "arrow_residual:0.5")
    return Plan(model, [[[kinds[head % 3] if step else "full" for head in range(layer.heads)] for layer in model.layers]
                        for step in range(steps)])


def test_cache_heads_compute_where_a_diffusers_cache_skipped_their_layer_the_step_before(caplog):
    steps = 6
    pipe = flux_pipeline()
    pipe.transformer.enable_cache(pyramid_attention_broadcast())
    stock = run_pipeline(pipe, steps=steps)
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, steps, "cache"))
    with caplog.at_level(logging.WARNING, logger="ditfastattn"):
        cached = run_pipeline(pipe, steps=steps)
        run_pipeline(pipe, steps=steps)
    # The 3 layers run at steps 0, 2 and 4 only; at 2 and 4 their cache heads find no output of the
    # step before and compute, exactly as stock.
    assert torch.equal(cached, stock)
    said = [record.getMessage() for record in caplog.records if "had not run at the step before" in record.getMessage()]
    assert len(said) == 1  # once, not per generation
    assert said[0].startswith("6 layer-steps") and "PyramidAttentionBroadcast on pipe.transformer" in said[0]
    ditfastattn.remove(pipe)


def test_static_mode_refuses_a_layer_skipping_cache():
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = flux_pipeline()
    pipe.transformer.enable_cache(pyramid_attention_broadcast())
    plan = Plan.uniform(pipe.transformer, STEPS, "cache")
    with pytest.raises(ValueError, match=r"PyramidAttentionBroadcast enabled.*without static=True.*disable_cache\(\)"):
        ditfastattn.apply(pipe, plan, static=True, num_image_tokens=1024)
    assert not hasattr(pipe.transformer, "_ditfastattn_session")  # refused before anything changed
    pipe.transformer.disable_cache()
    ditfastattn.apply(pipe, plan, static=True, num_image_tokens=1024)
    run_pipeline(pipe, steps=STEPS)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.9))  # after apply: refused at the next generation
    with pytest.raises(ValueError, match="FirstBlockCache enabled"):
        run_pipeline(pipe, steps=STEPS)
    ditfastattn.remove(pipe)


def test_calibrate_refuses_a_layer_skipping_cache_before_any_pass():
    pipe = flux_pipeline()
    pipe.transformer.enable_cache(pyramid_attention_broadcast())
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *args: calls.append(1))
    config = SearchConfig(num_inference_steps=STEPS, pipeline_kwargs={"height": HEIGHT, "width": WIDTH})
    with pytest.raises(ValueError, match=r"pipe.transformer has diffusers' PyramidAttentionBroadcast.*pipe.transformer.disable_cache\(\)"):
        calibrate(pipe, [embeds(1)], config, progress=False)
    assert not calls


def skip_last_single_block_at_odd_steps(transformer) -> None:
    """A block cache as cache-dit and ParaAttention make one: the transformer's forward patched to run
    fewer blocks at some steps (here the last single block at steps 1, 3, 5), marked _is_cached."""
    from unittest import mock

    original, calls = transformer.forward, iter(range(10**6))

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if next(calls) % 2 == 0:
            return original(*args, **kwargs)
        with mock.patch.object(transformer, "single_transformer_blocks", transformer.single_transformer_blocks[:-1]):
            return original(*args, **kwargs)

    transformer.forward = forward
    transformer._is_cached = True


def test_a_block_cache_of_another_library_composes_exactly_and_static_mode_and_calibrate_refuse_it(caplog):
    steps = 6
    pipe, want_pipe = flux_pipeline(), flux_pipeline()
    skip_last_single_block_at_odd_steps(pipe.transformer)
    skip_last_single_block_at_odd_steps(want_pipe.transformer)
    # The skipped layer runs at steps 0, 2, 4: at 2 and 4 its cache heads find no output of the
    # step before and compute, as a plan keeping it full there does.
    cached = Plan.uniform(pipe.transformer, steps, "cache")
    last = cached.model.layers.index(next(l for l in cached.model.layers if l.name.startswith("single_transformer_blocks.1")))
    computing = [[["full"] * len(heads) if layer == last and step in (2, 4) else heads for layer, heads in enumerate(row)]
                 for step, row in enumerate(cached.methods)]
    ditfastattn.apply(want_pipe, Plan(cached.model, computing))
    want = run_pipeline(want_pipe, steps=steps)
    ditfastattn.apply(pipe, cached)
    with caplog.at_level(logging.WARNING, logger="ditfastattn"):
        assert torch.equal(run_pipeline(pipe, steps=steps), want)
    assert "2 layer-steps" in caplog.text and "a block cache (cache-dit or ParaAttention" in caplog.text
    ditfastattn.remove(pipe)
    with pytest.raises(ValueError, match=r"block cache \(cache-dit.*without static=True.*cache_dit.disable_cache\(pipe\)"):
        ditfastattn.apply(pipe, cached, static=True, num_image_tokens=1024)
    with pytest.raises(ValueError, match=r"pipe.transformer has a block cache .*calibration measures every layer"):
        calibrate(pipe, [embeds(1)], SearchConfig(num_inference_steps=steps, height=HEIGHT, width=WIDTH), progress=False)


def test_a_pag_pipeline_is_refused_before_denoising_and_naming_the_way_without_pag():
    from diffusers import StableDiffusion3PAGPipeline, StableDiffusion3Pipeline

    stock_pipe = sd3_pipeline()
    pag = StableDiffusion3PAGPipeline.from_pipe(stock_pipe, pag_applied_layers=["blocks.1"])
    ditfastattn.apply(pag, Plan.uniform(pag.transformer, STEPS, "arrow:0.5"))
    steps = []
    pag.transformer.register_forward_hook(lambda *args: steps.append(1))
    with pytest.raises(RuntimeError, match=r"PAGCFGJointAttnProcessor2_0\): this is a perturbed-attention guidance.*from_pipe"):
        pag(num_inference_steps=STEPS, height=HEIGHT, width=WIDTH, guidance_scale=4.0, pag_scale=3.0, output_type="pt",
            **embeds(1), **negative_embeds(1))
    assert not steps  # refused at the first call's start
    ditfastattn.remove(pag)
    plain = StableDiffusion3Pipeline.from_pipe(pag)  # the way the error names
    expected = run_pipeline(plain, steps=STEPS)
    ditfastattn.apply(plain, Plan.uniform(plain.transformer, STEPS, "full"))
    assert torch.equal(run_pipeline(plain, steps=STEPS), expected)
    ditfastattn.remove(plain)


def test_a_torch_compile_wrapper_is_refused_naming_compile_in_place():
    pipe = flux_pipeline()
    plan = compressed(pipe.transformer)
    ditfastattn.apply(pipe, plan)
    expected = run_pipeline(pipe, steps=STEPS)
    ditfastattn.remove(pipe)
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    with pytest.raises(TypeError, match=r"torch.compile's wrapper \(OptimizedModule\) of a FluxTransformer2DModel.*"
                                        r"pipe.transformer._orig_mod.*pipe.transformer.compile"):
        ditfastattn.apply(pipe, plan)
    pipe.transformer = pipe.transformer._orig_mod  # the way the error names
    ditfastattn.apply(pipe, plan)
    pipe.transformer.compile(backend="eager")  # the dynamic runtime: the compiler breaks the graph at its hooks
    assert torch.equal(run_pipeline(pipe, steps=STEPS), expected)
    ditfastattn.remove(pipe)
    ditfastattn.apply(pipe, plan)
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")  # a wrapper made after apply reaches it
    assert torch.equal(run_pipeline(pipe, steps=STEPS), expected)
    ditfastattn.remove(pipe)


def modular_sd3(decode: bool = False):
    """diffusers' modular SD3 denoising with its CFG guider, which calls the transformer once per condition;
    with ``decode``, followed by its VAE decode step."""
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.modular_pipelines import SequentialPipelineBlocks
    from diffusers.modular_pipelines.stable_diffusion_3.decoders import StableDiffusion3DecodeStep
    from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import (
        StableDiffusion3T2ICoreDenoiseStep)

    base = sd3_pipeline()
    blocks = StableDiffusion3T2ICoreDenoiseStep()
    if decode:
        blocks = SequentialPipelineBlocks.from_blocks_dict({"denoise": blocks, "decode": StableDiffusion3DecodeStep()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # guiders are experimental
        pipe = blocks.init_pipeline()
        pipe.update_components(transformer=base.transformer, scheduler=base.scheduler,
                               guider=ClassifierFreeGuidance(guidance_scale=4.0),
                               **({"vae": base.vae} if decode else {}))
    return pipe


def run_modular(pipe, batch: int = 1, steps: int = STEPS) -> torch.Tensor:
    positive, negative = embeds(batch), negative_embeds(batch)
    return pipe(**positive, **negative, height=HEIGHT, width=WIDTH, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0), output="latents")


def test_a_modular_pipeline_with_a_guider_runs_a_plan_and_remove_restores():
    pipe = modular_sd3()
    stock = run_modular(pipe)
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "full"))
    assert torch.equal(run_modular(pipe), stock)
    ditfastattn.remove(pipe)
    ditfastattn.apply(pipe, compressed(pipe.transformer))
    out = run_modular(pipe)
    assert torch.isfinite(out).all() and not torch.equal(out, stock)
    ditfastattn.remove(pipe)
    assert torch.equal(run_modular(pipe), stock)


def test_cfg_share_is_refused_where_a_guider_calls_once_per_condition():
    pipe = modular_sd3()
    plan = Plan.uniform(pipe.transformer, STEPS, "cfg_share")
    with pytest.raises(ValueError, match=r"guider \(ClassifierFreeGuidance\) calls the transformer once per condition"):
        ditfastattn.apply(pipe, plan)
    # Given the transformer alone, the pipeline is unseen: a step's second call of the first's batch
    # (two prompts: an even batch, which the halves would split across prompts) is refused.
    ditfastattn.apply(pipe.transformer, plan)
    with pytest.raises(ValueError, match=r"called the transformer again at step 0 on a batch of 2, as its first call"):
        run_modular(pipe, batch=2)
    ditfastattn.remove(pipe.transformer)


def test_calibrate_a_modular_pipeline_and_run_its_plan():
    steps = 10
    pipe = modular_sd3()
    stock = run_modular(pipe, steps=steps)
    config = SearchConfig(num_inference_steps=steps, height=HEIGHT, width=WIDTH, delta=0.5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*output_type")  # which modular pipelines do not take, and say so
        plan = calibrate(pipe, [{**embeds(1), **negative_embeds(1)}], config, progress=False)
    assert plan.summary()["sparsity"] > 0.2
    ditfastattn.apply(pipe, plan)
    out = run_modular(pipe, steps=steps)
    assert torch.isfinite(out).all() and not torch.equal(out, stock)
    ditfastattn.remove(pipe)


def test_calibrate_a_modular_pipeline_with_a_decode_step_decodes_nothing():
    steps = 6
    pipe = modular_sd3(decode=True)
    decodes = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda *args, **kwargs: decodes.append(1) or decode(*args, **kwargs)
    assert torch.is_tensor(pipe(**embeds(1), **negative_embeds(1), height=HEIGHT, width=WIDTH, num_inference_steps=steps,
                                output_type="pt", output="images"))
    assert len(decodes) == 1
    config = SearchConfig(num_inference_steps=steps, height=HEIGHT, width=WIDTH, delta=0.5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*output_type")
        plan = calibrate(pipe, [{**embeds(1), **negative_embeds(1)}], config, progress=False)
    assert len(decodes) == 1
    assert plan.summary()["sparsity"] > 0.2


def test_a_second_order_scheduler_is_refused_before_denoising():
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    pipe = sd3_pipeline()
    euler = pipe.scheduler
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(euler.config)  # timesteps 1000, 667, 667, 334, 334, ...
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "cache"))
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="FlowMatchHeunDiscreteScheduler has a timestep twice in its schedule"):
        run_pipeline(pipe, steps=STEPS)
    assert not calls
    pipe.scheduler = euler  # a first-order scheduler given a repeated sigma: the fix named is not "another scheduler"
    with pytest.raises(ValueError, match=r"FlowMatchEulerDiscreteScheduler has a timestep twice .*sigmas or timesteps "
                                         r"given with a value repeated"):
        run_pipeline(pipe, steps=STEPS, sigmas=[1.0, 0.5, 0.5, 0.1][:STEPS])
    assert not calls
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(euler.config)
    expected = sd3_pipeline()
    ditfastattn.apply(expected, Plan.uniform(expected.transformer, STEPS, "cache"))
    assert torch.equal(run_pipeline(pipe, steps=STEPS), run_pipeline(expected, steps=STEPS))
    ditfastattn.remove(pipe)


def test_calibration_under_offloading_finds_the_plain_pipelines_plan():
    pytest.importorskip("accelerate")
    config = SearchConfig(num_inference_steps=4, height=HEIGHT, width=WIDTH, delta=0.5, guidance_scale=4.0)
    prompts = [{**embeds(1), **negative_embeds(1)}]
    plain = calibrate(sd3_pipeline(), prompts, config, progress=False)
    assert plain.summary()["sparsity"] > 0
    model_offload, group_offload = sd3_pipeline(), sd3_pipeline()
    model_offload.enable_model_cpu_offload(device="cpu")
    cpu = torch.device("cpu")
    group_offload.transformer.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="leaf_level")
    for pipe in (model_offload, group_offload):
        assert calibrate(pipe, prompts, config, progress=False).methods == plain.methods


def controlnet_pipeline(kind: str):
    """A tiny ControlNet pipeline around the tests' tiny transformer and VAE, its controlnet's
    zero-initialised output layers randomised so that it changes the image."""
    from diffusers import (FluxControlNetModel, FluxControlNetPipeline, SD3ControlNetModel,
                           StableDiffusion3ControlNetPipeline)

    torch.manual_seed(5)
    if kind == "flux":
        base = flux_pipeline()
        controlnet = FluxControlNetModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=3, joint_attention_dim=16,
                                         pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
        cls, encoders = FluxControlNetPipeline, ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    else:
        base = sd3_pipeline()
        controlnet = SD3ControlNetModel(sample_size=32, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=3, joint_attention_dim=16, caption_projection_dim=24,
                                        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=32)
        cls = StableDiffusion3ControlNetPipeline
        encoders = tuple(f"{part}{n}" for n in ("", "_2", "_3") for part in ("text_encoder", "tokenizer"))
    for parameter in controlnet.parameters():
        parameter.data.normal_(0, 0.05)
    return cls(transformer=base.transformer, controlnet=controlnet.eval(), scheduler=base.scheduler, vae=base.vae,
               **dict.fromkeys(encoders))


def run_controlnet(pipe):
    torch.manual_seed(11)  # the control image's VAE latents are sampled without the generator
    control = torch.rand(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(3))
    cfg = {} if "Flux" in type(pipe).__name__ else {**negative_embeds(1), "guidance_scale": 4.0}
    return run_pipeline(pipe, steps=STEPS, control_image=control, **cfg)


def flat(tensors) -> list[torch.Tensor]:
    """A controlnet's output (tensors, in tuples and lists, or None) as one list."""
    if torch.is_tensor(tensors):
        return [tensors]
    return [t for part in tensors or () for t in flat(part)]


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_a_controlnet_pipeline_runs_the_plan_on_its_transformer_and_leaves_the_controlnet_stock(kind):
    pipe = controlnet_pipeline(kind)
    outputs = []
    pipe.controlnet.register_forward_hook(lambda module, args, output: outputs.append(output))
    stock = run_controlnet(pipe)
    stock_first = outputs[0]
    processors = {name: type(p) for name, p in pipe.controlnet.attn_processors.items()}
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "full"))
    assert torch.equal(run_controlnet(pipe), stock)
    ditfastattn.remove(pipe)
    ditfastattn.apply(pipe, compressed(pipe.transformer))
    outputs.clear()
    assert not torch.equal(run_controlnet(pipe), stock)
    # Step 0 runs every head full, so the controlnet sees the stock inputs there: its attention is stock.
    assert flat(outputs[0]) and all(torch.equal(a, b) for a, b in zip(flat(outputs[0]), flat(stock_first)))
    assert {name: type(p) for name, p in pipe.controlnet.attn_processors.items()} == processors
    ditfastattn.remove(pipe)
    assert torch.equal(run_controlnet(pipe), stock)


def test_calibrate_a_controlnet_pipeline():
    pipe = controlnet_pipeline("flux")
    control = torch.rand(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(3))
    config = SearchConfig(num_inference_steps=STEPS, height=HEIGHT, width=WIDTH, delta=0.5)
    torch.manual_seed(11)
    plan = calibrate(pipe, [{**embeds(1), "control_image": control}], config, progress=False)
    assert plan.summary()["sparsity"] > 0.2
    ditfastattn.apply(pipe, plan)
    assert torch.isfinite(run_controlnet(pipe)).all()
    ditfastattn.remove(pipe)


def test_flux2_klein_runs_the_plan_with_its_negative_prompt_as_a_second_call():
    # Flux2KleinPipeline (not its KV-cache variant, whose processors are refused) runs stock FLUX.2
    # attention, CFG as a second call per step.
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                          timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=2, norm_num_groups=4,
                             layers_per_block=1, mid_block_add_attention=False)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                              transformer=transformer.eval())
    generator = torch.Generator().manual_seed(1)
    prompts = {"prompt_embeds": torch.randn(1, 7, 16, generator=generator),
               "negative_prompt_embeds": torch.randn(1, 7, 16, generator=generator)}

    def run():
        return pipe(**prompts, guidance_scale=4.0, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

    stock = run()
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "full"))
    assert torch.equal(run(), stock)
    ditfastattn.remove(pipe)
    ditfastattn.apply(pipe, compressed(pipe.transformer))
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *args: calls.append(1))
    out = run()
    handle.remove()
    assert len(calls) == 2 * STEPS and torch.isfinite(out).all() and not torch.equal(out, stock)
    ditfastattn.remove(pipe)
    assert torch.equal(run(), stock)
