"""Static mode: device-side step counter and mode tables, one compiled graph for every step."""

from __future__ import annotations

import pytest
import torch
from conftest import flux_pipeline, negative_embeds, run_pipeline, sd3_pipeline, tiny_flux, tiny_sd3
from test_hardening import SLG, call
from test_runtime import with_methods
from test_tiles import hide_grid
from test_video_families import GRID as VIDEO_GRID
from test_video_families import TEXT as VIDEO_TEXT
from test_video_families import tiny_wan

import ditfastattn
from ditfastattn import Plan

STEPS = 4
TIMESTEPS = [900.0, 700.0, 400.0, 100.0]


def sd3_inputs(batch=2):
    generator = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(batch, 4, 48, 56, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 7, 16, generator=generator),
        "pooled_projections": torch.randn(batch, 16, generator=generator),
    }


def flux_inputs(batch=1, image=20 * 24):
    generator = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(batch, image, 16, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 7, 16, generator=generator),
        "pooled_projections": torch.randn(batch, 16, generator=generator),
        "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(20.0), torch.arange(24.0),
                                              indexing="ij"), -1).view(-1, 3),
        "txt_ids": torch.zeros(7, 3),
    }


def mixed_plan(model) -> Plan:
    plan = Plan.uniform(model, STEPS, "full", num_image_tokens=24 * 28)
    methods = [[list(h) for h in rows] for rows in plan.methods]
    cycle = ["cache", "arrow:0.5", "arrow_residual:0.5"]
    for step in range(1, STEPS):
        for layer, heads in enumerate(methods[step]):
            for head in range(len(heads)):
                heads[head] = "full" if step == 2 and head == 0 else cycle[(head + layer + step) % 3]
    return Plan(plan.model, methods, plan.provenance)


def denoise(model, inputs, generations=1):
    outputs = []
    for _ in range(generations):
        for t in TIMESTEPS:
            outputs.append(model(**inputs, timestep=torch.full((inputs["hidden_states"].shape[0],), t)).sample)
    return outputs


@torch.no_grad()
def test_static_mode_matches_the_dynamic_runtime():
    model = tiny_sd3(dual=True)
    plan = mixed_plan(model)
    inputs = sd3_inputs()
    ditfastattn.apply(model, plan)
    dynamic = denoise(model, inputs)
    ditfastattn.remove(model)
    ditfastattn.apply(model, plan, static=True)
    static = denoise(model, inputs, generations=2)
    for step, (want, got) in enumerate(zip(dynamic + dynamic, static)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"step {step % STEPS}")
    ditfastattn.remove(model)
    assert not [name for name, _ in model.named_buffers() if "ditfastattn" in name]


def compiled_generation(model, inputs, want):
    """One generation of ``model`` (static plan applied, tables built) compiled as one graph: no
    recompiles from step to step, and every step's output as ``want``."""
    torch._dynamo.reset()
    batch = inputs["hidden_states"].shape[0]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    got = [compiled(**inputs, timestep=torch.full((batch,), TIMESTEPS[0])).sample]
    with torch._dynamo.config.patch(error_on_recompile=True):
        got += [compiled(**inputs, timestep=torch.full((batch,), t)).sample for t in TIMESTEPS[1:]]
    for step, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"step {step}")
    torch._dynamo.reset()


@torch.no_grad()
def test_fullgraph_compile_without_recompiles():
    model = tiny_sd3(dual=True)
    inputs = sd3_inputs()
    ditfastattn.apply(model, mixed_plan(model), static=True)
    compiled_generation(model, inputs, denoise(model, inputs))  # the eager run also allocates the buffers


@torch.no_grad()
def test_fullgraph_compile_through_the_dispatch_interception():
    # FLUX's attention is intercepted at dispatch_attention_fn: the hooks and the wrapper trace into
    # one graph for every step, matching the dynamic runtime.
    model = tiny_flux()
    plan = mixed_plan(model)
    inputs = flux_inputs()
    ditfastattn.apply(model, plan)
    dynamic = denoise(model, inputs)
    ditfastattn.remove(model)
    ditfastattn.apply(model, plan, static=True, num_image_tokens=20 * 24)
    denoise(model, inputs)  # builds the tables and buffers
    compiled_generation(model, inputs, dynamic)
    ditfastattn.remove(model)


def test_static_mode_errors():
    flux = tiny_flux()
    with pytest.raises(ValueError, match="needs num_image_tokens"):
        ditfastattn.apply(flux, Plan.uniform(flux, 2, "cache"), static=True)
    model = tiny_sd3()
    with pytest.raises(NotImplementedError, match="cfg_share"):
        ditfastattn.apply(model, Plan.uniform(model, 2, "cfg_share"), static=True, num_image_tokens=64)
    assert not hasattr(model, "_ditfastattn_session")
    ditfastattn.apply(model, Plan.uniform(model, 2, "cache"), static=True, num_image_tokens=64)
    with pytest.raises(ValueError, match="applied for 64 image tokens but the model sees 672"):
        model(**sd3_inputs(1), timestep=torch.tensor([900.0]))


@torch.no_grad()
def test_static_all_full_plan_is_stock_bit_for_bit():
    model = tiny_sd3(dual=True)
    inputs = sd3_inputs()
    want = denoise(model, inputs)
    ditfastattn.apply(model, Plan.uniform(model, STEPS, "full"), static=True, num_image_tokens=24 * 28)
    got = denoise(model, inputs)
    assert not [name for name, _ in model.named_buffers() if name.endswith("_ditfastattn_out")]
    ditfastattn.remove(model)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_dense_slots_minimise_the_modelled_cost():
    from ditfastattn.runtime import dense_slots

    assert dense_slots([24, 5, 6, 7, 5], fused_cost=1.0) == 0  # no gain from routing: none
    assert dense_slots([24, 5, 6, 7, 5], fused_cost=1.16) == 5  # every step fills 5 slots
    # An idle step: 5 slots cost 25 and save 0.16 x 17 heads, so none; at twice the cost,
    # 6 slots (30 + 2 x 19 = 68) beat 5 (25 + 2 x 22 = 69) and 7 (35 + 2 x 17 = 69).
    assert dense_slots([24, 0, 6, 7, 5], fused_cost=1.16) == 0
    assert dense_slots([24, 0, 6, 7, 5], fused_cost=2.0) == 6
    assert dense_slots([], fused_cost=2.0) == 0


@torch.no_grad()
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_static_and_dynamic_modes_route_full_heads_to_dense_alike(monkeypatch, impl):
    from ditfastattn import runtime

    monkeypatch.setattr(runtime, "full_head_cost", lambda *args: 3.0)  # as if the fused op were 3x slower
    model = tiny_sd3(dual=True)
    plan = mixed_plan(model)
    methods = [[list(h) for h in rows] for rows in plan.methods]
    methods[3][0] = ["full", "full", "cache"]  # two full heads here, one at step 2, none at step 1
    plan = Plan(plan.model, methods, plan.provenance)
    inputs = sd3_inputs()
    ditfastattn.apply(model, plan, impl=impl)
    dynamic = denoise(model, inputs)
    ditfastattn.remove(model)
    ditfastattn.apply(model, plan, static=True, impl=impl)
    static = denoise(model, inputs)
    routed = {layer.name: layer.routed for layer in model._ditfastattn_session.layers}
    ditfastattn.remove(model)
    assert routed["transformer_blocks.0.attn"] == (impl == "auto")
    for step, (want, got) in enumerate(zip(dynamic, static)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"step {step}")


def test_the_custom_op_runs_tile_windows_with_a_legal_schema():
    from ditfastattn import ops
    from ditfastattn._geometry import tile_mode

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3 * 5 * 7 + 7, 3, 16, generator=generator) for _ in range(3))
    modes = ops.mode_tensor([tile_mode(0, 1, 0), -1, 0], "cpu")
    want = ops.headwise_attention(q, k, v, modes, text_start=105, text_len=7, grid=(3, 5, 7), tile=(1, 8, 16))
    got = torch.zeros_like(q)
    arguments = (q, k, v, modes, 105, 7, got, 16**-0.5, "reference", [3, 5, 7], [1, 8, 16])
    torch.ops.ditfastattn.headwise_attention_(*arguments)
    assert torch.equal(got, want)
    op = torch.ops.ditfastattn.headwise_attention_.default
    torch.library.opcheck(op, arguments)
    torch.library.opcheck(op, arguments[:-2])
    with pytest.raises(ValueError, match="tile= needs the image grid"):
        op(*arguments[:-2], None, [1, 8, 16])


def test_the_custom_op_takes_global_segments_and_padding():
    from ditfastattn import ops

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5 + 300 + 40, 3, 16, generator=generator) for _ in range(3))
    modes = ops.mode_tensor([0, -1, 1], "cpu")
    mask = torch.rand(2, 345, generator=generator) < 0.2
    segments = [(0, 5), (305, 40)]
    op = torch.ops.ditfastattn.headwise_attention_.default
    for bias in (ops.KEY_PADDING, ops.PAIR_PADDING, ((1.0, 0.0), (0.0, 0.0))):
        want = ops.headwise_attention(q, k, v, modes, segments=segments, key_padding=ops.Padding(mask, bias))
        flat_bias = None if bias == ops.KEY_PADDING else [float(x) for row in bias for x in row]
        arguments = (q, k, v, modes, 0, 0, torch.zeros_like(q), 16**-0.5, "reference", None, None, [0, 5, 305, 40],
                     mask, flat_bias)
        op(*arguments)
        assert torch.equal(arguments[6], want)
        torch.library.opcheck(op, arguments)
    with pytest.raises(ValueError, match="give the token layout once"):
        op(q, k, v, modes, 0, 5, torch.zeros_like(q), 0.25, "reference", None, None, [0, 5, 305, 40])
    with pytest.raises(ValueError, match="padding_bias needs key_padding"):
        op(q, k, v, modes, 0, 5, torch.zeros_like(q), 0.25, "reference", None, None, None, None, [0.0, 0.0, 0.0, 0.0])


# Tile windows beside every other kind of head; each head of each layer meets several over the steps.
TILED = ["tile:0,0,0", "cache", "tile:0,0.5,1", "arrow:0.5", "full", "arrow_residual:0.5", "tile:1,1,1"]


def tiled_plan(model, num_image_tokens: int) -> Plan:
    return with_methods(Plan.uniform(model, STEPS, "full", num_image_tokens=num_image_tokens),
                        lambda step, layer, head: TILED[(2 * head + layer + step) % len(TILED)])


def wan_inputs(batch=1):
    generator = torch.Generator().manual_seed(0)
    frames, rows, cols = VIDEO_GRID
    return {"hidden_states": torch.randn(batch, 4, frames, 2 * rows, 2 * cols, generator=generator),
            "encoder_hidden_states": torch.randn(batch, 7, 16, generator=generator)}


def static_matches_dynamic(model, plan, inputs, num_image_tokens, compiled=False):
    """``plan`` in static mode (two generations, and one compiled) gives the dynamic runtime's
    outputs; remove() restores the model bit for bit."""
    stock = denoise(model, inputs)
    ditfastattn.apply(model, plan)
    dynamic = denoise(model, inputs)
    ditfastattn.remove(model)
    ditfastattn.apply(model, plan, static=True, num_image_tokens=num_image_tokens)
    static = denoise(model, inputs, generations=2)
    tiled = {layer.name for layer in model._ditfastattn_session.layers if layer.tiles is not None}
    for step, (want, got) in enumerate(zip(dynamic + dynamic, static)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"step {step % STEPS}")
    if compiled:
        compiled_generation(model, inputs, dynamic)
    ditfastattn.remove(model)
    assert tiled == set(plan.layer_names)  # every layer ran tile windows
    assert not [name for name, _ in model.named_buffers() if "ditfastattn" in name]
    for want, got in zip(stock, denoise(model, inputs)):
        assert torch.equal(got, want)
    assert not torch.allclose(dynamic[-1], stock[-1], atol=1e-3)


@torch.no_grad()
def test_static_tile_windows_match_the_dynamic_runtime_compiled():
    # FLUX reports its image grid from raster img_ids: 1 x 20 x 24 patches, tiles of 1 x 8 x 16.
    model = tiny_flux()
    static_matches_dynamic(model, tiled_plan(model, 20 * 24), flux_inputs(), 20 * 24, compiled=True)


@torch.no_grad()
def test_static_tile_windows_on_video_match_the_dynamic_runtime():
    # Wan's self-attention sees the video alone: 3 x 8 x 12 patches in tiles of 2 x 8 x 8.
    model = tiny_wan().eval()
    tokens = VIDEO_GRID[0] * VIDEO_GRID[1] * VIDEO_GRID[2]
    static_matches_dynamic(model, tiled_plan(model, tokens), wan_inputs(), tokens)


@torch.no_grad()
def test_static_tile_plans_need_a_call_that_reports_its_grid(monkeypatch):
    model = tiny_flux()
    plan = tiled_plan(model, 20 * 24)
    hide_grid(monkeypatch)
    ditfastattn.apply(model, plan, static=True)
    with pytest.raises(ValueError, match=r"tile windows \(tile:0,0,0, tile:0,0.5,1, tile:1,1,1\), which need the "
                                         r"image grid.*FluxTransformer2DModel call reports none; apply a plan without"):
        model(**flux_inputs(), timestep=torch.tensor([TIMESTEPS[0]]))
    # Raised before any layer ran: none built its tables.
    assert not [name for name, _ in model.named_buffers() if name.endswith("_ditfastattn_modes")]
    ditfastattn.remove(model)


@torch.no_grad()
def test_static_tile_windows_need_the_grid_they_were_sized_for():
    model = tiny_flux()
    ditfastattn.apply(model, tiled_plan(model, 20 * 24), static=True)
    model(**flux_inputs(), timestep=torch.tensor([TIMESTEPS[0]]))
    transposed = flux_inputs()  # the same 480 tokens as 24 rows of 20
    transposed["img_ids"] = torch.cartesian_prod(torch.zeros(1), torch.arange(24.0), torch.arange(20.0))
    with pytest.raises(ValueError, match=r"image grid \(1, 20, 24\) in tiles of \(1, 8, 16\) but this call has "
                                         r"the image grid \(1, 24, 20\)"):
        model(**transposed, timestep=torch.tensor([TIMESTEPS[1]]))
    ditfastattn.remove(model)


# Families whose calls carry a padding mask or several global segments: Qwen-Image (a text key mask),
# Chroma (its float 0/1 token mask, and boolean m_q & m_k), FLUX.1 Kontext (reference-image tokens
# after the image).
MASKED = ["qwenimage", "chroma", "chroma-boolean", "flux-kontext"]
MIXED = ["cache", "arrow:0.5", "arrow_residual:0.5", "full", "arrow:0.25"]


def family_of(name):
    from test_families import FAMILIES, chroma_boolean

    return chroma_boolean() if name == "chroma-boolean" else FAMILIES[name]


def family_denoise(family, transformer, negative: bool):
    """One generation, one call per step; ``negative`` picks the family's other mask (a shorter prompt)."""
    from test_families import TEXT

    latents = family.latents(torch.Generator().manual_seed(0), 1)
    text = torch.randn(1, TEXT, family.channels, generator=torch.Generator().manual_seed(1))
    return [family.predict(transformer, latents, torch.tensor(t), text, negative) for t in TIMESTEPS]


@torch.no_grad()
@pytest.mark.parametrize("name", MASKED)
def test_static_mode_takes_padding_masks_and_global_segments(name):
    # The layout is fixed at the first call, the mask is each call's data: two generations with
    # different masks match the dynamic runtime, eager and compiled as one graph without recompiles.
    from test_families import H, W

    family = family_of(name)
    model = family.make()
    plan = with_methods(Plan.uniform(model, STEPS, "full"), lambda step, layer, head: MIXED[(head + layer + step) % 5])
    stock = family_denoise(family, model, False)
    ditfastattn.apply(model, plan)
    dynamic = {negative: family_denoise(family, model, negative) for negative in (False, True)}
    ditfastattn.remove(model)
    ditfastattn.apply(model, plan, static=True, num_image_tokens=H * W)
    for negative in (False, True, False):
        for step, (want, got) in enumerate(zip(dynamic[negative], family_denoise(family, model, negative))):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"step {step}, negative {negative}")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    if name == "chroma":  # its float 0/1 mask is checked on the host: refused inside a compiled graph
        with pytest.raises(Exception, match="float token mask inside torch.compile.*pass the mask as booleans"):
            family_denoise(family, compiled, True)
    else:
        got = family_denoise(family, compiled, True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            got += family_denoise(family, compiled, False)
        for step, (want, got) in enumerate(zip(dynamic[True] + dynamic[False], got)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"compiled, call {step}")
    torch._dynamo.reset()
    ditfastattn.remove(model)
    assert not [n for n, _ in model.named_buffers() if "ditfastattn" in n]
    for want, got in zip(stock, family_denoise(family, model, False)):
        assert torch.equal(got, want)
    assert not torch.allclose(dynamic[False][-1], stock[-1], atol=1e-3)


@torch.no_grad()
def test_static_mode_refuses_a_call_without_the_first_calls_mask():
    from test_families import FAMILIES, H, W

    family = FAMILIES["qwenimage"]
    model = family.make()
    plan = Plan.uniform(model, STEPS, "arrow:0.5")
    ditfastattn.apply(model, plan, static=True, num_image_tokens=H * W)
    family_denoise(family, model, False)
    layer = model._ditfastattn_session.layers[0]
    q = torch.zeros(1, 7 + H * W, 2, 8)
    with pytest.raises(ValueError, match="built for calls with a padding mask, and this call differs"):
        with pytest.MonkeyPatch.context() as patch:  # as in a compiled call, which keeps the first call's geometry
            patch.setattr(torch.compiler, "is_compiling", lambda: True)
            layer.attend(q, q, q, dense=lambda: q, layout=layer.geometry.layout, key_padding=None)
    ditfastattn.remove(model)


@pytest.mark.parametrize("first_under_inference_mode", [True, False])
def test_static_buffers_serve_generations_in_and_out_of_inference_mode(first_under_inference_mode):
    """Static mode's buffers persist across generations and are written in place: made by a first
    generation under torch.inference_mode, they still serve a later one outside it, and the reverse."""
    model = tiny_sd3(dual=True)
    plan = mixed_plan(model)
    inputs = sd3_inputs()
    with torch.no_grad():
        ditfastattn.apply(model, plan)
        want = denoise(model, inputs)
        ditfastattn.remove(model)
    ditfastattn.apply(model, plan, static=True)
    for inference in (first_under_inference_mode, not first_under_inference_mode):
        with torch.inference_mode() if inference else torch.no_grad():
            got = denoise(model, inputs)
        for step, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"step {step}")
    ditfastattn.remove(model)


# several transformer calls per step -----------------------------------------------------------
def pipeline_static_matches_dynamic(pipe, plan, **kwargs):
    """``plan`` on ``pipe`` in static mode (two generations) makes the dynamic runtime's images, which
    differ from stock ones; remove() restores the pipeline bit for bit. Returns the static session."""
    stock = run_pipeline(pipe, **kwargs)
    ditfastattn.apply(pipe, plan)
    dynamic = run_pipeline(pipe, **kwargs)
    ditfastattn.remove(pipe)
    ditfastattn.apply(pipe, plan, static=True)
    session = pipe.transformer._ditfastattn_session
    for generation in range(2):
        torch.testing.assert_close(run_pipeline(pipe, **kwargs), dynamic, atol=1e-5, rtol=1e-5,
                                   msg=f"generation {generation}")
    ditfastattn.remove(pipe)
    assert not torch.allclose(dynamic, stock, atol=1e-3)
    assert torch.equal(run_pipeline(pipe, **kwargs), stock)
    return session


CALL_METHODS = ["cache", "arrow_residual:0.5", "arrow:0.25", "full"]


@torch.no_grad()
def test_static_mode_runs_true_cfg_as_a_second_call():
    # FLUX's true CFG calls the transformer twice per step: each call keeps its own buffers, so a
    # cache head of the negative call reuses the negative call's previous output.
    pipe = flux_pipeline()
    plan = with_methods(Plan.uniform(pipe.transformer, STEPS, "full", num_image_tokens=1024),
                        lambda step, layer, head: CALL_METHODS[(head + layer + step) % 4])
    session = pipeline_static_matches_dynamic(pipe, plan, steps=STEPS, true_cfg_scale=3.0, **negative_embeds())
    assert session.calls_per_step == 2


@torch.no_grad()
def test_static_mode_computes_what_a_call_that_appears_mid_generation_did_not_keep():
    # SD3's skip-layer guidance adds a call at steps 1 and 2 of 6 only: at step 1 its cache heads, and
    # always its arrow_residual heads (it missed the full step 0), compute, as the dynamic runtime does.
    pipe = sd3_pipeline()
    plan = with_methods(Plan.uniform(pipe.transformer, 6, "full", num_image_tokens=1024),
                        lambda step, layer, head: CALL_METHODS[(head + step) % 3])
    session = pipeline_static_matches_dynamic(pipe, plan, steps=6, **SLG)
    assert session.calls_per_step == 2


@torch.no_grad()
def test_fullgraph_compile_with_a_second_call_per_step():
    # A step's two calls (the negative prompt shorter) compile once each for every step: the call
    # slot is data on the device, as the step is, and each call length keeps its own token layout.
    model = tiny_flux()
    plan = mixed_plan(model)
    inputs = flux_inputs()
    negative = {**inputs, "encoder_hidden_states": torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(5)),
                "txt_ids": torch.zeros(5, 3)}

    def generation(model, timesteps=TIMESTEPS):
        return [model(**prompt, timestep=torch.full((1,), t)).sample for t in timesteps for prompt in (inputs, negative)]

    ditfastattn.apply(model, plan)
    dynamic = generation(model)
    ditfastattn.remove(model)
    ditfastattn.apply(model, plan, static=True, num_image_tokens=20 * 24)
    generation(model)  # eager: builds the tables, and a second slot at the first second call
    compiled_calls_match(model, generation, dynamic)
    assert not torch.allclose(dynamic[3], dynamic[2], atol=1e-3)  # the two calls differ
    ditfastattn.remove(model)


def compiled_calls_match(model, generation, want):
    """``generation(model, timesteps)`` (every call of those steps) with ``model`` compiled as one
    graph per call shape: no recompile after the first step, every call as ``want``."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    try:
        got = generation(compiled, TIMESTEPS[:1])
        with torch._dynamo.config.patch(error_on_recompile=True):
            got += generation(compiled, TIMESTEPS[1:])
    finally:
        torch._dynamo.reset()
    calls = len(got) // len(TIMESTEPS)
    for index, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"compiled, step {index // calls}, call {index % calls}")


@torch.no_grad()
def test_static_mode_reports_a_call_under_compile_that_the_eager_calls_did_not_make():
    torch._dynamo.reset()
    model = tiny_sd3()
    ditfastattn.apply(model, Plan.uniform(model, 2, "cache"), static=True, num_image_tokens=256)
    call(model, 900.0)  # the uncompiled call that builds the tables: one call per step
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    for t in (900.0, 900.0, 500.0):  # a repeated timestep: no host read inside the graph
        call(compiled, t)
    with pytest.raises(RuntimeError, match="more often in one step than the 1 call.*run one whole step eagerly"):
        call(model, 900.0)
    call(model, 900.0)  # reported once
    torch._dynamo.reset()


@torch.no_grad()
def test_static_mode_runs_qwen_image_true_cfg_with_a_shorter_negative_prompt_compiled():
    # QwenImagePipeline: true CFG as a second call whose prompt has its own length and text mask.
    # Each call length keeps its token layout; the masks are data. Eager and compiled, every call
    # as the dynamic runtime's.
    from test_families import FAMILIES, TEXT, H, W, call as family_call

    family = FAMILIES["qwenimage"]
    model = family.make()
    latents = family.latents(torch.Generator().manual_seed(0), 1)
    text = torch.randn(1, TEXT, family.channels, generator=torch.Generator().manual_seed(1))
    prompts = [(text, 5), (text[:, :4], 2)]  # (text, real tokens): the negative prompt is shorter

    def generation(transformer, timesteps=TIMESTEPS):
        return [family_call(transformer, hidden_states=latents, encoder_hidden_states=words,
                            encoder_hidden_states_mask=(torch.arange(words.shape[1]) < real)[None],
                            timestep=torch.tensor([t / 1000]), img_shapes=[[(1, H, W)]])
                for t in timesteps for words, real in prompts]

    plan = with_methods(Plan.uniform(model, STEPS, "full"), lambda step, layer, head: MIXED[(head + layer + step) % 5])
    stock = generation(model)
    ditfastattn.apply(model, plan)
    dynamic = generation(model)
    ditfastattn.remove(model)
    ditfastattn.apply(model, plan, static=True, num_image_tokens=H * W)
    try:
        for index, (got, want) in enumerate(zip(generation(model), dynamic)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"eager, call {index}")
        compiled_calls_match(model, generation, dynamic)
    finally:
        ditfastattn.remove(model)
    assert not torch.allclose(dynamic[-1], stock[-1], atol=1e-3)


# faults of compiled calls ---------------------------------------------------------------------
def _compiled_pipeline(pipe, plan, tokens, **eager):
    """``pipe`` with ``plan`` in static mode, one eager 4-step generation, its transformer compiled in place."""
    torch._dynamo.reset()
    ditfastattn.apply(pipe, plan, static=True, num_image_tokens=tokens)
    run_pipeline(pipe, steps=4, **eager)
    pipe.transformer.compile(fullgraph=True, backend="aot_eager", dynamic=False)
    return pipe


@torch.no_grad()
def test_a_compiled_generation_of_another_step_count_is_refused_after_its_first_step():
    # Every call compiled, nothing checked the step count on the host: a 3-step generation of a 4-step
    # plan returned its image, a 6-step one ran the last row twice more, reported a generation later.
    pipe = _compiled_pipeline(sd3_pipeline(), Plan.uniform(tiny_sd3(), 4, "cache"), 256, height=32, width=32)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    for steps in (3, 6):
        calls.clear()
        with pytest.raises(ditfastattn.PlanMismatchError, match=f"4 denoising steps but the pipeline runs {steps}"):
            run_pipeline(pipe, steps=steps, height=32, width=32)
        assert len(calls) == 1
    run_pipeline(pipe, steps=4, height=32, width=32)
    ditfastattn.remove(pipe)
    torch._dynamo.reset()


@torch.no_grad()
def test_compiled_calls_after_a_fault_compute_every_head_exactly():
    # On the transformer alone nothing reports a compiled call's fault (no eager call, no scheduler):
    # a second call per step the eager generation never made (true CFG) shared a call slot's buffers.
    # From the faulting call on, every head computes exactly: the output is stock attention's.
    cfg = {"true_cfg_scale": 2.0, **negative_embeds()}
    stock = run_pipeline(flux_pipeline(), steps=4, seed=3, **cfg)
    pipe = flux_pipeline()
    plan = with_methods(Plan.uniform(pipe.transformer, 4, "full"),
                        lambda step, layer, head: ["cache", "arrow:0.25", "full"][(step + layer + head) % 3])
    torch._dynamo.reset()
    ditfastattn.apply(pipe.transformer, plan, static=True, num_image_tokens=1024)
    run_pipeline(pipe, steps=4, seed=3)  # eager: one call per step
    pipe.transformer.compile(fullgraph=True, backend="aot_eager", dynamic=False)
    assert torch.equal(run_pipeline(pipe, steps=4, seed=3, **cfg), stock)
    ditfastattn.remove(pipe.transformer)
    torch._dynamo.reset()


@torch.no_grad()
def test_a_compiled_call_on_another_grid_of_the_same_token_count_computes_exactly_and_is_reported():
    # FLUX's grid is data (img_ids): a compiled call at 64 x 32 after eager calls at 32 x 64 (512
    # tokens both) pooled its keys over the eager grid's patches. It now records a fault: every head
    # computes exactly, and the next generation's start reports it.
    size, swapped = {"height": 32, "width": 64}, {"height": 64, "width": 32}
    stock = run_pipeline(flux_pipeline(), steps=4, **swapped)
    pipe = _compiled_pipeline(flux_pipeline(), Plan.uniform(tiny_flux(), 4, "pool:2"), 512, **size)
    planned = run_pipeline(pipe, steps=4, **size)
    assert torch.equal(run_pipeline(pipe, steps=4, **swapped), stock)
    with pytest.raises(RuntimeError, match="another image grid of the same token count.*apply the plan again"):
        run_pipeline(pipe, steps=4, **size)
    assert torch.equal(run_pipeline(pipe, steps=4, **size), planned)  # the next generation as planned again
    ditfastattn.remove(pipe)
    torch._dynamo.reset()


@torch.no_grad()
@pytest.mark.parametrize("fullgraph", [True, False])
def test_a_compiled_call_on_latents_of_another_grid_computes_exactly(fullgraph):
    # Wan's grid shows in its latents' shape, known at trace time: 4 x 12 x 8 patches after eager calls
    # on 4 x 8 x 12 (384 tokens both). A raise there only broke the graph without fullgraph: the call
    # reran eagerly, took the new grid as an eager one, and the compiled layers pooled the old one's
    # patches (0.02 off). Now a fault: every head of that generation computes exactly.
    text = torch.randn(1, VIDEO_TEXT, 16, generator=torch.Generator().manual_seed(1))

    def generation(model, shape):
        latents = torch.randn(1, 4, *shape, generator=torch.Generator().manual_seed(0))
        return [model(hidden_states=latents, timestep=torch.tensor([t]), encoder_hidden_states=text,
                      return_dict=False)[0] for t in (1000.0, 750.0, 500.0)]

    first, other = (4, 16, 24), (4, 24, 16)
    torch.manual_seed(0)
    model = tiny_wan().eval()
    stock = generation(model, other)
    ditfastattn.apply(model, Plan.uniform(model, 3, "pool:2"), static=True, num_image_tokens=384)
    generation(model, first)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", dynamic=False, fullgraph=fullgraph)
    generation(compiled, first)
    got = generation(compiled, other)
    assert all(torch.allclose(g, s, atol=1e-5, rtol=0) for g, s in zip(got, stock))
    assert int(model._buffers["_ditfastattn_faults"]) & 16
    ditfastattn.remove(model)
    torch._dynamo.reset()
