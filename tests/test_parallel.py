"""diffusers' parallelism: plans applied and calibrated under Ulysses context parallelism (two gloo
processes on the CPU), and what ditfastattn refuses, before changing anything."""

from __future__ import annotations

import contextlib
import dataclasses
import time

import pytest
import torch
import numpy as np
from conftest import embeds, flux_pipeline, tiny_flux, tiny_vae
from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       QwenImageTransformer2DModel, WanTransformer3DModel)
import test_experts as experts
from test_experts import tiny_expert

import ditfastattn
from ditfastattn.plan import Plan

WORLD = 2
TEXT, ROWS, COLS = 8, 16, 24  # 384 image tokens (Wan: one frame of them): 3 blocks of 128, so arrows drop blocks
REAL_TEXT = 5  # Qwen-Image's text mask keeps the first 5 of the 8 text tokens
STEPS = 3
# Per layer (FLUX's double block, then two single blocks; Qwen-Image's and Wan's two blocks), each head's
# method at steps 1..: every method, rows where one rank's heads are all full and the other's all
# cached (placement swaps them), and the ranks taking different paths in one call (stock on one,
# the op on the other).
PATTERNS = (
    ("full", "full", "cache", "arrow:0.25"),
    ("arrow:0.25", "arrow_residual:0.25", "full", "cache"),
    ("cache", "cache", "full", "full"),
)
# FLUX with pooled keys (the call's grid, 16 x 24: whole 2 x 2 and 4 x 4 patches, partial 5 x 5 ones).
POOL_PATTERNS = (
    ("pool:2", "full", "cache", "pool:5"),
    ("arrow:0.25", "pool:4", "full", "pool:2"),
    ("pool:2", "pool:2", "full", "full"),
)


def four_head_flux() -> FluxTransformer2DModel:
    """tiny_flux with 4 heads, which 2 Ulysses ranks split."""
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    ).eval()


def four_head_qwen() -> QwenImageTransformer2DModel:
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
    ).eval()


def four_head_wan() -> WanTransformer3DModel:
    return tiny_expert(0, heads=4).eval()


def mixed_plan(model, patterns=PATTERNS) -> Plan:
    spec = ditfastattn.model.describe(model)
    methods = [[list(patterns[layer]) if step else ["full"] * 4 for layer in range(len(spec.layers))]
               for step in range(STEPS)]
    return Plan(spec, methods, {"num_image_tokens": ROWS * COLS, "text_len": TEXT})


def generate(model, steps: int = STEPS) -> list[torch.Tensor]:
    """One generation's transformer outputs (its first ``steps``), called as FluxPipeline,
    QwenImagePipeline (with a text mask) or WanPipeline (one frame of 2 x 2 patches) calls it."""
    generator = torch.Generator().manual_seed(3)
    wan = isinstance(model, WanTransformer3DModel)
    latents = torch.randn((1, 16, 1, 2 * ROWS, 2 * COLS) if wan else (1, ROWS * COLS, 16), generator=generator)
    text = torch.randn(1, TEXT, 16, generator=generator)
    if wan:
        inputs = {}
    elif isinstance(model, QwenImageTransformer2DModel):
        inputs = dict(encoder_hidden_states_mask=(torch.arange(TEXT) < REAL_TEXT)[None], img_shapes=[[(1, ROWS, COLS)]])
    else:
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(ROWS)), torch.arange(float(COLS)),
                                         indexing="ij"), -1).reshape(-1, 3)
        inputs = dict(pooled_projections=torch.randn(1, 16, generator=generator), img_ids=ids,
                      txt_ids=torch.zeros(TEXT, 3))
    outs = []
    with torch.no_grad():
        for step in range(steps):
            out = model(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([1.0 - step / STEPS]),
                        return_dict=False, **inputs)[0]
            outs.append(torch.empty_like(out).copy_(out))  # a plain tensor (context parallelism gathers lazily)
    return outs


def _plans_under_ulysses(model) -> dict:
    """Stock Ulysses, an all-full plan and the mixed plan on ``model`` under Ulysses."""
    from diffusers.models._modeling_parallel import ContextParallelConfig

    plan = mixed_plan(model)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    result = {"stock": generate(model)}
    ditfastattn.apply(model, Plan.uniform(model, STEPS, "full"), impl="reference")
    result["all_full"] = generate(model)
    ditfastattn.remove(model)
    assert ditfastattn.apply(model, plan, impl="reference") is None
    result["mixed"] = generate(model)
    generate(model, steps=1)  # step 0 keeps the buffers that step 1's cache heads read
    session = model._ditfastattn_session
    result["buffers"] = {layer.name: tuple(slot.out.shape) for layer in session.layers
                         for slot in layer.slots.values() if slot.out is not None}
    assert ditfastattn.remove(model) is plan
    return result


@contextlib.contextmanager
def _process_group(rank: int, directory: str):
    """This rank in a gloo group of WORLD ranks, for the block's duration."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool (it hangs)
    # diffusers builds the rank's mesh on torch's accelerator: the CPU here, also on a GPU machine,
    # where a forked child cannot initialise CUDA once the parent has.
    torch._C._get_accelerator = lambda: torch.device("cpu")
    torch.accelerator.device_count = lambda: 1  # diffusers picks the rank's device by it; the CPU has none
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=WORLD)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _ulysses_rank(rank: int, directory: str) -> None:
    """One rank: stock Ulysses, then plans applied to the parallel models; outputs to a file."""
    with _process_group(rank, directory):
        result = {"qwen": _plans_under_ulysses(four_head_qwen()), "wan": _plans_under_ulysses(four_head_wan())}
        model = four_head_flux()
        weights = {name: p.clone() for name, p in model.named_parameters()}
        flux = result["flux"] = _plans_under_ulysses(model)
        plan = mixed_plan(model)
        ditfastattn.apply(model, plan, impl="reference", balance_heads=True)
        permuted = model.transformer_blocks[0].attn.to_q.weight.clone()
        flux["balanced"] = generate(model)
        ditfastattn.remove(model)
        flux["permuted"] = not torch.equal(permuted, weights["transformer_blocks.0.attn.to_q.weight"])
        flux["restored"] = all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
        flux["after_remove"] = generate(model)
        ditfastattn.apply(model, mixed_plan(model, POOL_PATTERNS), impl="reference")
        flux["pooled"] = generate(model)
        ditfastattn.remove(model)
        with pytest.raises(ValueError, match="static=True does not run under context parallelism"):
            ditfastattn.apply(model, plan, static=True, num_image_tokens=ROWS * COLS)
        with pytest.raises(ValueError, match=r"balance_heads=True weighs each head .*Plan.uniform\(\.\.\., num_image"):
            ditfastattn.apply(model, Plan.uniform(model, STEPS, "cache"), balance_heads=True)
        assert not hasattr(model, "_ditfastattn_session")
        torch.save(result, f"{directory}/rank{rank}.pt")


def _run_ranks(directory, rank_fn=_ulysses_rank, timeout_s: float = 120.0, start_method: str = "fork") -> list[dict]:
    """Start WORLD ranks running ``rank_fn``: forked (spawning re-imports torch and diffusers: tens of
    seconds on 2 cores), or spawned where a forked child would inherit a thread pool it cannot use."""
    context = torch.multiprocessing.start_processes(rank_fn, args=(str(directory),), nprocs=WORLD, join=False,
                                                    start_method=start_method)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):  # raises with the rank's traceback if one fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the Ulysses ranks did not finish within {timeout_s:.0f} s")
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(WORLD)]


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor], bound: float) -> None:
    for step, (a, b) in enumerate(zip(got, want)):
        assert (a - b).abs().max().item() <= bound, f"step {step}: {(a - b).abs().max().item():.3g} > {bound:.3g}"


def _single_process(make) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Stock and mixed-plan outputs of the model ``make`` builds, in one process."""
    model = make()
    stock = generate(model)
    ditfastattn.apply(model, mixed_plan(model), impl="reference")
    mixed = generate(model)
    ditfastattn.remove(model)
    return stock, mixed


def test_plans_under_ulysses_match_one_process(tmp_path):
    single = {"flux": _single_process(four_head_flux), "qwen": _single_process(four_head_qwen),
              "wan": _single_process(four_head_wan)}
    ranks = _run_ranks(tmp_path)
    for family, (single_stock, single_mixed) in single.items():
        result = ranks[0][family]
        for rank in ranks[1:]:  # every rank gathers the same output
            for key in ("stock", "mixed", "balanced"):
                assert all(torch.equal(a, b) for a, b in zip(rank[family].get(key, []), result.get(key, [])))
        assert all(torch.equal(a, b) for a, b in zip(result["all_full"], result["stock"]))
        # Ulysses reorders the keys of every attention (and placement the output projection's sum),
        # so float32 results move by rounding: the plan's as much as the stock model's. Bound: 4x the
        # stock difference, at least 16 ulps of the output's scale.
        scale = max(out.abs().max().item() for out in single_stock)
        stock_diff = max((a - b).abs().max().item() for a, b in zip(result["stock"], single_stock))
        bound = max(4 * stock_diff, 16 * torch.finfo(torch.float32).eps * scale)
        _assert_close(result["mixed"], single_mixed, bound)
        # the plan compresses: far from stock at the steps after the first
        assert (result["mixed"][-1] - single_stock[-1]).abs().max().item() > 100 * bound
        if family == "flux":
            _assert_close(result["balanced"], single_mixed, bound)
            model = four_head_flux()
            ditfastattn.apply(model, mixed_plan(model, POOL_PATTERNS), impl="reference")
            _assert_close(result["pooled"], generate(model), bound)  # each rank's pool heads see the whole grid
            assert (result["pooled"][-1] - single_mixed[-1]).abs().max().item() > 100 * bound
    flux = ranks[0]["flux"]
    assert all(torch.equal(a, b) for a, b in zip(flux["after_remove"], flux["stock"]))
    assert flux["permuted"] and flux["restored"]
    # Each rank keeps buffers for its own heads (2 of 4), in the layers where they cache at step 1.
    shape = (1, TEXT + ROWS * COLS, 2, 8)
    assert ranks[0]["flux"]["buffers"] == {"single_transformer_blocks.1.attn": shape}
    assert ranks[1]["flux"]["buffers"] == {"transformer_blocks.0.attn": shape, "single_transformer_blocks.0.attn": shape}
    assert ranks[0]["qwen"]["buffers"] == {} and ranks[1]["qwen"]["buffers"].keys() == {
        "transformer_blocks.0.attn", "transformer_blocks.1.attn"}
    video = (1, ROWS * COLS, 2, 8)  # Wan's self-attention: the video alone
    assert ranks[0]["wan"]["buffers"] == {} and ranks[1]["wan"]["buffers"] == {"blocks.0.attn1": video,
                                                                               "blocks.1.attn1": video}


def _fake_parallel(model, **config):
    """A parallel config as enable_parallelism records it, without a process group."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig, TensorParallelConfig

    if "tp_degree" in config:
        model._parallel_config = ParallelConfig(tensor_parallel_config=TensorParallelConfig(**config))
    else:
        model._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(**config))
    return model._parallel_config


def _unchanged(model, stock_dispatch) -> bool:
    from diffusers.models.transformers import transformer_flux

    return (not hasattr(model, "_ditfastattn_session") and not any(m._forward_pre_hooks for m in model.modules())
            and transformer_flux.dispatch_attention_fn is stock_dispatch)


@pytest.mark.parametrize("make, config, message", [
    (four_head_flux, {"tp_degree": 2}, r"tensor parallelism .* one full model per process .* Ulysses context parallelism"),
    (four_head_flux, {"ring_degree": 2}, r"ring attention \(ring_degree=2\) is not supported.*Use Ulysses: ContextParallelConfig\(ulysses_degree=N\)"),
    (four_head_flux, {"ulysses_degree": 2, "ulysses_anything": True}, "ulysses_anything .* is not supported"),
    (tiny_flux, {"ulysses_degree": 2}, r"has 3 heads, which 2 ranks cannot split evenly"),
    (four_head_flux, {"ulysses_degree": 2}, r"no device mesh yet; call transformer.enable_parallelism"),
])
def test_apply_refuses_unsupported_parallelism_before_any_change(make, config, message):
    from diffusers.models.transformers import transformer_flux

    model = make()
    plan = Plan.uniform(model, 2, "cache")  # describing a parallel model still works: plans are made for it
    _fake_parallel(model, **config)
    stock = transformer_flux.dispatch_attention_fn
    with pytest.raises(ValueError, match=message):
        ditfastattn.apply(model, plan)
    assert _unchanged(model, stock)


def test_processor_configured_by_hand_and_balance_without_parallelism_are_refused():
    from diffusers.models.transformers import transformer_flux

    stock = transformer_flux.dispatch_attention_fn
    model = four_head_flux()
    plan = Plan.uniform(model, 2, "cache")
    with pytest.raises(ValueError, match="balance_heads=True evens the heads of Ulysses ranks; .* without context"):
        ditfastattn.apply(model, plan, balance_heads=True)
    config = _fake_parallel(model, ulysses_degree=2)
    model._parallel_config = None
    model.transformer_blocks[0].attn.processor._parallel_config = config
    with pytest.raises(ValueError, match="processors carry a parallel config the model does not"):
        ditfastattn.apply(model, plan)
    assert _unchanged(model, stock)


def test_parallelism_enabled_after_apply_is_refused_at_the_next_call():
    model = four_head_flux()
    ditfastattn.apply(model, Plan.uniform(model, STEPS, "cache"), impl="reference")
    _fake_parallel(model, ulysses_degree=2)
    with pytest.raises(RuntimeError, match=r"enable_parallelism after apply\); call ditfastattn.remove\(\)"):
        generate(model)
    ditfastattn.remove(model)


def test_parallelism_enabled_on_the_second_expert_after_apply_is_refused_at_its_next_call():
    pipe = experts.pipeline()
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, experts.STEPS, "cache"), impl="reference")
    _fake_parallel(pipe.transformer_2, ulysses_degree=2)
    with pytest.raises(RuntimeError, match=r"enable_parallelism after apply\); call ditfastattn.remove\(\)"):
        experts.generate(pipe)
    ditfastattn.remove(pipe)


# Calibration: FluxPipeline over the 4-head FLUX, 8 text tokens and 16 x 24 image tokens (Ulysses
# splits both), two prompts; each search on both ranks and in one process.
SEARCHES = {
    "delta": {"delta": 0.3},
    "target": {"target_sparsity": 0.45, "fit_prompts": 1},  # the first pass on one prompt on every rank
    "sensitivity": {"delta": 0.3, "sensitivity": "measure"},
    "residual": {"delta": 0.05, "candidates": ("full", "arrow:0.125", "arrow_residual:0.125")},  # full heads at later steps
    "all_full": {"delta": 0.0},
    # both searches and the uncompressed pass that decides between them, on each rank's gathered latents
    "cache_auto": {"target_sparsity": 0.5, "budget": "generation", "head_coefficient": None, "cache": "auto"},
}


def four_head_flux_pipeline() -> FluxPipeline:
    return FluxPipeline(transformer=four_head_flux(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(),
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)


def calibration_prompts() -> list[dict]:
    generator = torch.Generator().manual_seed(5)
    return [{"prompt_embeds": torch.randn(1, TEXT, 16, generator=generator),
             "pooled_prompt_embeds": torch.randn(1, 16, generator=generator)} for _ in range(2)]


def search(name: str) -> ditfastattn.SearchConfig:
    # 1 pixel per latent (the tiny VAE), 2 x 2 latents per token
    return ditfastattn.SearchConfig(num_inference_steps=STEPS + 1, height=2 * ROWS, width=2 * COLS, impl="reference",
                                    **SEARCHES[name])


def _transformer_outputs(pipe, run) -> list[torch.Tensor]:
    """The transformer's outputs while ``run()`` runs ``pipe``."""
    outs = []

    def keep(module, args, output):
        outs.append(torch.empty_like(output[0]).copy_(output[0]))  # a plain tensor (CP gathers lazily)

    handle = pipe.transformer.register_forward_hook(keep)
    try:
        run()
    finally:
        handle.remove()
    return outs


def _calibrating_rank(rank: int, directory: str) -> None:
    """One rank: every search on the Ulysses pipeline (plans to files), and stock Ulysses's outputs."""
    from diffusers.models._modeling_parallel import ContextParallelConfig

    with _process_group(rank, directory):
        pipe = four_head_flux_pipeline()
        pipe.set_progress_bar_config(disable=True)
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        prompts = calibration_prompts()
        result = {}
        for name in SEARCHES:
            outs = _transformer_outputs(
                pipe, lambda: ditfastattn.calibrate(pipe, prompts, search(name), progress=False).save(
                    f"{directory}/rank{rank}-{name}.json"))
            if name == "all_full":
                result["calibrated_all_full"] = outs
        batch = {key: torch.cat([p[key] for p in prompts]) for key in prompts[0]}
        config = search("all_full")
        result["stock"] = _transformer_outputs(pipe, lambda: pipe(
            **batch, num_inference_steps=config.num_inference_steps, height=config.height, width=config.width,
            generator=torch.Generator().manual_seed(config.seed), output_type="latent"))
        torch.save(result, f"{directory}/rank{rank}.pt")


def _rse(plan: Plan) -> np.ndarray:
    return np.array([[np.nan if layer is None else layer for layer in step] for step in plan.scores["rse"][1:]],
                    dtype=np.float64)


def test_calibration_under_ulysses_matches_one_process(tmp_path):
    pipe = four_head_flux_pipeline()
    single = {name: ditfastattn.calibrate(pipe, calibration_prompts(), search(name), progress=False) for name in SEARCHES}
    # Under Ulysses the head weights are not measured (their gradients would cross the all-to-all): the same
    # search in one process, with the layer and step weights it measured, is the reference.
    measured = single["sensitivity"].provenance["search"]["sensitivity"]
    assert "heads" in measured
    without_heads = {key: value for key, value in measured.items() if key != "heads"}
    single["sensitivity"] = ditfastattn.calibrate(
        pipe, calibration_prompts(), dataclasses.replace(search("sensitivity"), sensitivity=without_heads), progress=False)
    # Spawned: scipy's HiGHS (the layer budget's integer programs) keeps a thread pool once it has solved
    # on a machine of many cores, and a forked child solving again waits on it for ever (a 16-core H100 host).
    ranks = _run_ranks(tmp_path, _calibrating_rank, timeout_s=300.0, start_method="spawn")
    for name, want in single.items():
        plans = [Plan.load(tmp_path / f"rank{rank}-{name}.json") for rank in range(WORLD)]
        for plan in plans[1:]:  # every rank solved the same programs on the same pooled scores
            assert plan == plans[0] and plan.scores == plans[0].scores
        got = plans[0]
        assert got == want, name  # the same method for every head of every layer at every step
        # Scores differ by float32 rounding (Ulysses's key order, the layer variance pooled over the ranks:
        # ~1e-6 relative, measured 5e-6), and plans store them to 7 decimals.
        np.testing.assert_allclose(_rse(got), _rse(want), rtol=1e-4, atol=1e-6)
        assert got.provenance["search"]["candidates"] == list(search(name).candidates)
        assert got.provenance["search"]["ulysses_degree"] == WORLD and "ulysses_degree" not in want.provenance["search"]
    assert single["delta"].summary()["sparsity"] > 0.2  # the searches compress: their choices are tested
    # residual heads, and heads that ran full at different later steps (each rank keeps its own residuals)
    residual = single["residual"].methods
    assert any(m.startswith("arrow_residual") for rows in residual for heads in rows for m in heads)
    assert any(len(set(heads)) > 1 and "full" in heads for rows in residual[2:] for heads in rows)
    targeted = [single["target"].provenance["search"], Plan.load(tmp_path / "rank0-target.json").provenance["search"]]
    assert targeted[1]["target_sparsity"] == 0.45 and targeted[1]["delta"] == pytest.approx(targeted[0]["delta"], rel=1e-3)
    assert targeted[1]["first_pass_prompts"] == targeted[0]["first_pass_prompts"]
    np.testing.assert_allclose(targeted[1]["delta_per_step_layer"], targeted[0]["delta_per_step_layer"], rtol=1e-3)
    weights = [single["sensitivity"].provenance["search"]["sensitivity"],
               Plan.load(tmp_path / "rank0-sensitivity.json").provenance["search"]["sensitivity"]]
    np.testing.assert_allclose(list(weights[1]["layers"].values()), list(weights[0]["layers"].values()), rtol=1e-3)
    assert "heads" not in weights[1]
    chosen = [single["cache_auto"].provenance["search"], Plan.load(tmp_path / "rank0-cache_auto.json").provenance["search"]]
    assert chosen[1]["cache"] == chosen[0]["cache"]
    np.testing.assert_allclose(list(chosen[1]["cache_final_rse"].values()), list(chosen[0]["cache_final_rse"].values()), rtol=1e-3)
    # delta 0: every head full, and the calibration pass is stock context parallelism bit for bit
    assert all(m == "full" for rows in single["all_full"].methods for heads in rows for m in heads)
    for rank in ranks:
        assert len(rank["stock"]) == STEPS + 1
        assert all(torch.equal(a, b) for a, b in zip(rank["calibrated_all_full"], rank["stock"], strict=True))
    # The plan calibrated under Ulysses applies to one whole model.
    ditfastattn.apply(pipe, Plan.load(tmp_path / "rank1-delta.json"), impl="reference")
    ditfastattn.remove(pipe)


# Wan 2.2 A14B's two experts: test_experts.py's WanPipeline (CFG as a second call, the second
# expert from the boundary step on), with 4 heads a layer, each expert under its own enable_parallelism.
EXPERT_SEARCH = dict(delta=0.4, candidates=("full", "arrow:0.25", "arrow_residual:0.25", "cache"))


def four_head_experts():
    return experts.pipeline(heads=4)


def expert_plan(pipe, boundary: int) -> Plan:
    """PATTERNS at the first expert's steps; every head full at the second expert's first step (its
    cache heads would compute there anyway; its arrow_residual heads keep a residual of its own),
    then PATTERNS reversed."""
    spec = ditfastattn.model.describe(pipe.transformer)

    def row(step: int, layer: int) -> list[str]:
        if step in (0, boundary):
            return ["full"] * 4
        return list(PATTERNS[layer] if step < boundary else PATTERNS[layer][::-1])

    return Plan(spec, [[row(step, layer) for layer in range(len(spec.layers))] for step in range(experts.STEPS)],
                {"num_image_tokens": 384, "text_len": 0})


def expert_search() -> ditfastattn.SearchConfig:
    return ditfastattn.SearchConfig(num_inference_steps=experts.STEPS, impl="reference",
                                    pipeline_kwargs=dict(experts.SIZE), **EXPERT_SEARCH)


def _experts_state(pipe) -> tuple:
    """What apply changes on a pipeline's experts: sessions, hooks, weights, Wan's attention function."""
    from diffusers.models.transformers import transformer_wan

    models = (pipe.transformer, pipe.transformer_2)
    return (transformer_wan.dispatch_attention_fn, [hasattr(m, "_ditfastattn_session") for m in models],
            [(len(m._forward_pre_hooks), len(m._forward_hooks)) for model in models for m in model.modules()],
            [p.clone() for model in models for p in model.parameters()])


def _unchanged_experts(pipe, before: tuple) -> bool:
    after = _experts_state(pipe)
    return after[:3] == before[:3] and all(torch.equal(a, b) for a, b in zip(after[3], before[3], strict=True))


def _own_mesh(rank: int):
    """A (ring, ulysses) mesh over every rank with process groups of its own: init_device_mesh gives any
    mesh spanning the world the default group, which would make both experts' groups one."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    alone = [dist.new_group([r]) for r in range(WORLD)]  # every rank takes part in making every group
    return DeviceMesh.from_group([alone[rank], dist.new_group(list(range(WORLD)))], "cpu",
                                 mesh=torch.arange(WORLD).view(1, WORLD), mesh_dim_names=("ring", "ulysses"))


def _experts_rank(rank: int, directory: str) -> None:
    """One rank: Wan's two experts under Ulysses, stock and under plans; calibration; the refusals."""
    import torch.distributed as dist
    from diffusers.models._modeling_parallel import ContextParallelConfig
    from torch.distributed.device_mesh import DeviceMesh

    with _process_group(rank, directory):
        pipe = four_head_experts()
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        pipe.transformer_2.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD, mesh=_own_mesh(rank)))
        models = (pipe.transformer, pipe.transformer_2)
        boundary = experts.first_expert_steps(pipe)
        result = {"stock": experts.generate(pipe)}
        ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, experts.STEPS, "full"), impl="reference")
        result["all_full"] = experts.generate(pipe)
        ditfastattn.remove(pipe)
        plan = expert_plan(pipe, boundary)
        # Which process group each expert's calls trade over (two groups of the same ranks).
        groups = {expert: expert._parallel_config.context_parallel_config._ulysses_mesh.get_group() for expert in models}
        assert groups[models[0]] is not groups[models[1]]
        traded, trade = [], dist.all_to_all_single

        def recording(*args, group=None, **kwargs):
            traded.append((session._expert, group))
            return trade(*args, group=group, **kwargs)

        ditfastattn.apply(pipe, plan, impl="reference")
        session = pipe.transformer._ditfastattn_session
        dist.all_to_all_single = recording
        try:
            result["mixed"] = experts.generate(pipe)
        finally:
            dist.all_to_all_single = trade
        ditfastattn.remove(pipe)
        result["own_groups"] = ({expert for expert, _ in traded} == set(groups)
                                and all(group is groups[expert] for expert, group in traded))
        weights = [{name: p.clone() for name, p in expert.named_parameters()} for expert in models]
        ditfastattn.apply(pipe, plan, impl="reference", balance_heads=True)
        result["permuted"] = [not torch.equal(expert.blocks[0].attn1.to_q.weight, own["blocks.0.attn1.to_q.weight"])
                              for expert, own in zip(models, weights)]
        result["balanced"] = experts.generate(pipe)
        ditfastattn.remove(pipe)
        result["restored"] = all(torch.equal(p, own[name]) for expert, own in zip(models, weights)
                                 for name, p in expert.named_parameters())
        result["after_remove"] = experts.generate(pipe)
        ditfastattn.calibrate(pipe, [experts.prompts()], expert_search(), progress=False).save(
            f"{directory}/rank{rank}-experts.json")
        # Refused before any change: parallelism on one expert only (either), or the experts' Ulysses groups
        # splitting the heads otherwise (here the second mesh's ranks in the other order).
        lone, other = four_head_experts(), four_head_experts()
        lone.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        other.transformer_2.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        refusals = [(lone, r"enabled on pipe.transformer but not on pipe.transformer_2; .* enable it on both"),
                    (other, r"enabled on pipe.transformer_2 but not on pipe.transformer; .* enable it on both")]
        for model, message in refusals:
            before = _experts_state(model)
            for run in (lambda: ditfastattn.apply(model, plan, balance_heads=True),
                        lambda: ditfastattn.calibrate(model, [experts.prompts()], expert_search(), progress=False)):
                with pytest.raises(ValueError, match=message):
                    run()
                assert _unchanged_experts(model, before)
        reversed_mesh = DeviceMesh("cpu", torch.tensor([list(range(WORLD))[::-1]]), mesh_dim_names=("ring", "ulysses"))
        other.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD, mesh=reversed_mesh))
        before = _experts_state(other)
        with pytest.raises(ValueError, match=r"pipe.transformer's Ulysses group is ranks \[1, 0\] \(ulysses_degree=2\)"
                                             r" but pipe.transformer_2's is \[0, 1\] .* same ulysses_degree and device mesh"):
            ditfastattn.apply(other, plan, balance_heads=True)
        assert _unchanged_experts(other, before)
        result["boundary"] = boundary
        torch.save(result, f"{directory}/rank{rank}.pt")


def test_two_wan_experts_under_ulysses_match_one_process(tmp_path):
    pipe = four_head_experts()
    boundary = experts.first_expert_steps(pipe)
    assert 0 < boundary < experts.STEPS - 1
    stock = experts.generate(pipe)
    plan = expert_plan(pipe, boundary)
    ditfastattn.apply(pipe, plan, impl="reference")
    mixed = experts.generate(pipe)
    ditfastattn.remove(pipe)
    calibrated = ditfastattn.calibrate(pipe, [experts.prompts()], expert_search(), progress=False)
    ranks = _run_ranks(tmp_path, _experts_rank)
    for rank in ranks[1:]:  # every rank gathers the same latents
        for key in ("stock", "mixed", "balanced"):
            assert torch.equal(rank[key], ranks[0][key])
    result = ranks[0]
    assert result["boundary"] == boundary
    assert torch.equal(result["all_full"], result["stock"]) and torch.equal(result["after_remove"], result["stock"])
    assert result["own_groups"]
    # The file's bound (test_plans_under_ulysses_match_one_process), on the final latents.
    stock_diff = (result["stock"] - stock).abs().max().item()
    bound = max(4 * stock_diff, 16 * torch.finfo(torch.float32).eps * stock.abs().max().item())
    _assert_close([result["mixed"], result["balanced"]], [mixed, mixed], bound)
    assert (result["mixed"] - stock).abs().max().item() > 100 * bound  # the plan compresses on both experts
    assert result["permuted"] == [True, True] and result["restored"]
    plans = [Plan.load(tmp_path / f"rank{rank}-experts.json") for rank in range(WORLD)]
    assert plans[0] == plans[1] == calibrated  # the same method for every head of every layer at every step
    assert plans[0].provenance["expert_switch_steps"] == calibrated.provenance["expert_switch_steps"] == [boundary]
    assert any(m != "full" for step in calibrated.methods[boundary + 1:] for heads in step for m in heads)


def _refusing_rank(rank: int, directory: str) -> None:
    """One rank: calls that only one rank would refuse, or that get other arguments on each rank;
    every rank must stop alike (one rank raising while the other trades leaves it waiting, or runs
    its next call against the first one's leftover collectives)."""
    import logging

    import peft
    from diffusers.models._modeling_parallel import ContextParallelConfig

    with _process_group(rank, directory):
        result = {}
        # Pooled keys on Qwen-Image's masked calls, held by rank 0's heads alone (refused there only
        # before: rank 1 went on, and the next stock generation of rank 0 came out 0.012 off).
        model = four_head_qwen()
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        stock = generate(model)
        spec = ditfastattn.model.describe(model)
        row = ["pool:2", "pool:2", "cache", "full"]
        pooled = Plan(spec, [[row if step else ["full"] * 4 for _ in spec.layers] for step in range(STEPS)],
                      {"num_image_tokens": ROWS * COLS, "text_len": TEXT, "grid": [1, ROWS, COLS]})
        ditfastattn.apply(model, pooled, impl="reference")
        with pytest.raises(ValueError, match="pool:2 needs the image grid"):
            generate(model)
        ditfastattn.remove(model)
        result["stock_again"] = all(torch.equal(a, b) for a, b in zip(generate(model), stock))
        # Another plan on each rank.
        model = four_head_flux()
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        plans = [mixed_plan(model), Plan.uniform(model, STEPS, "full")]
        with pytest.raises(ValueError, match="ditfastattn.apply got other plan on the Ulysses ranks"):
            ditfastattn.apply(model, plans[rank], impl="reference")
        # An argument one rank alone refuses: every rank stops (the other waited in the exchange).
        refused = [(RuntimeError, r"stopped on Ulysses rank 1 of 2 \(ValueError: impl must be one of"),
                   (ValueError, "impl must be one of")]
        with pytest.raises(refused[rank][0], match=refused[rank][1]):
            ditfastattn.apply(model, plans[0], impl=["reference", "bogus"][rank])
        assert not hasattr(model, "_ditfastattn_session")
        # A LoRA added while balance_heads has the heads reordered: refused at the next generation
        # (0.024 off before, and remove() failed, leaving the weights reordered), the weights restored.
        weights = {name: p.clone() for name, p in model.named_parameters()}
        ditfastattn.apply(model, mixed_plan(model), impl="reference", balance_heads=True)
        torch.manual_seed(7)
        model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                          target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        with pytest.raises(RuntimeError, match="changed after ditfastattn.apply.*balance_heads=True.*remove"):
            generate(model)
        ditfastattn.remove(model)
        base = {name.replace(".base_layer", ""): p for name, p in model.named_parameters() if "lora_" not in name}
        result["lora_restored"] = all(torch.equal(base[name], p) for name, p in weights.items())
        result["lora_removed"] = not hasattr(model, "_ditfastattn_session")
        # Projections fused while the heads are reordered: refused too, and remove() says what stays.
        model = four_head_flux()
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        ditfastattn.apply(model, mixed_plan(model), impl="reference", balance_heads=True)
        model.fuse_qkv_projections()
        with pytest.raises(RuntimeError, match="changed after ditfastattn.apply"):
            generate(model)
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("ditfastattn").addHandler(handler)
        ditfastattn.remove(model)
        logging.getLogger("ditfastattn").removeHandler(handler)
        result["fused_said"] = any("unfuse and fuse again" in r.getMessage() for r in records)
        # calibrate: another search on each rank, and an input only one rank refuses.
        pipe = four_head_flux_pipeline()
        pipe.set_progress_bar_config(disable=True)
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        prompts = calibration_prompts()
        deltas = [search("delta"), dataclasses.replace(search("delta"), delta=0.6)]
        with pytest.raises(ValueError, match=r"calibrate got other SearchConfig\.delta on the Ulysses ranks"):
            ditfastattn.calibrate(pipe, prompts, deltas[rank], progress=False)
        arguments = [{}, {"no_such_argument": 1}]
        refused = [(RuntimeError, r"stopped on Ulysses rank 1 of 2 \(ValueError: FluxPipeline takes no argument"),
                   (ValueError, "FluxPipeline takes no argument 'no_such_argument'")]
        with pytest.raises(refused[rank][0], match=refused[rank][1]):
            ditfastattn.calibrate(pipe, prompts, dataclasses.replace(search("delta"), pipeline_kwargs=arguments[rank]),
                                  progress=False)
        assert not hasattr(pipe.transformer, "_ditfastattn_session")
        torch.save(result, f"{directory}/rank{rank}.pt")


def test_what_one_rank_refuses_or_gets_otherwise_stops_every_rank(tmp_path):
    for result in _run_ranks(tmp_path, _refusing_rank, timeout_s=240.0):
        assert result == {"stock_again": True, "lora_restored": True, "lora_removed": True, "fused_said": True}


@pytest.mark.parametrize("config, message", [
    ({"ring_degree": 2}, r"ring attention \(ring_degree=2\) is not supported.*Use Ulysses"),
    ({"tp_degree": 2}, r"tensor parallelism .* apply\(\) and calibrate\(\) also Ulysses context parallelism"),
])
def test_calibration_refuses_unsupported_parallelism_before_any_pass(config, message):
    pipe = flux_pipeline()
    _fake_parallel(pipe.transformer, **config)
    with pytest.raises(ValueError, match=message):
        ditfastattn.calibrate(pipe, [embeds()], ditfastattn.SearchConfig(num_inference_steps=2, height=16, width=16))
    assert not hasattr(pipe.transformer, "_ditfastattn_session")


def test_evaluation_under_context_parallelism_names_what_runs():
    from ditfastattn.evaluation import evaluate

    pipe = flux_pipeline()
    _fake_parallel(pipe.transformer, ulysses_degree=2)
    with pytest.raises(ValueError, match=r"apply\(\) and calibrate\(\) run there \(Ulysses\)\. Evaluation runs one whole"):
        evaluate(pipe, [embeds()], {"plan": Plan.uniform(pipe.transformer, 2, "full")}, num_inference_steps=2)
