"""The dispatch families on tiny random configs (CPU, seconds): FLUX.1 Kontext, FLUX.2, Chroma,
Qwen-Image, Z-Image and HunyuanImage 2.1.

Each family's transformer is driven the way its diffusers pipeline calls it (inputs, masks,
reference images, CFG in a batch, as separate calls or distilled), by a minimal pipeline that
``ditfastattn.calibrate`` can run. Every family: an all-full plan is bitwise stock, remove() restores
bit for bit, a compressed plan is finite and differs, calibration runs, every layer call sees the
token layout its family has, and full heads in the op under that layout and padding equal the
stock attention of every call (masks included: no compressed layer runs dense because of one).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
from conftest import tiny_flux
from diffusers import (
    ChromaTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    Flux2Transformer2DModel,
    HunyuanImageTransformer2DModel,
    QwenImageTransformer2DModel,
    ZImageTransformer2DModel,
)

import ditfastattn
from ditfastattn import Plan, SearchConfig, ops
from ditfastattn.model import TokenLayout
from ditfastattn.adapters.dispatch import FLOAT_PAIR_PADDING
from ditfastattn.runtime import LayerRuntime

STEPS = 3
TEXT = 7
H, W = 12, 10  # latent tokens of the generated image
REF_H, REF_W = 5, 8  # of a reference image


def grid(first: float, height: int, width: int, *extra) -> torch.Tensor:
    """Position ids (height x width, 3 or 4 coordinates) with ``first`` as the first coordinate."""
    axes = [torch.full((1,), float(first)), torch.arange(float(height)), torch.arange(float(width))]
    return torch.cartesian_prod(*axes, *(torch.zeros(1) for _ in extra))


@dataclass
class Family:
    make: Callable[[], torch.nn.Module]
    latents: Callable[[torch.Generator, int], object]  # the generated image's latents, batch b
    # (transformer, latents, scheduler timestep, text embeddings, negative) -> noise prediction
    predict: Callable
    cfg: str  # "separate", "batch" or "none": how its pipeline runs guidance
    layout: Callable[[int], TokenLayout]  # the joint layers' layout at sequence length S
    channels: int = 16  # text embedding width


def call(transformer, **kwargs):
    return transformer(**kwargs, return_dict=False)[0]


def flux_kontext(transformer, latents, t, text, negative):
    # FluxKontextPipeline: the reference image's latents after the target's, ids with first coordinate 1.
    reference = torch.ones(latents.shape[0], REF_H * REF_W, latents.shape[2])
    out = call(transformer, hidden_states=torch.cat([latents, reference], 1), encoder_hidden_states=text,
               pooled_projections=torch.zeros(latents.shape[0], 16), timestep=t.expand(latents.shape[0]) / 1000,
               img_ids=torch.cat([grid(0, H, W), grid(1, REF_H, REF_W)]), txt_ids=torch.zeros(TEXT, 3))
    return out[:, : H * W]


def flux2(transformer, latents, t, text, negative):
    # Flux2Pipeline with one reference image: time coordinate 10 in its ids; guidance-distilled.
    batch = latents.shape[0]
    reference = torch.ones(batch, REF_H * REF_W, latents.shape[2])
    ids = torch.cat([grid(0, H, W, "l"), grid(10, REF_H, REF_W, "l")])
    out = call(transformer, hidden_states=torch.cat([latents, reference], 1), encoder_hidden_states=text,
               timestep=t.expand(batch) / 1000, guidance=torch.full((batch,), 4.0),
               img_ids=ids[None].expand(batch, -1, -1), txt_ids=torch.zeros(batch, TEXT, 4))
    return out[:, : H * W]


def chroma_mask(batch: int, valid: int, dtype):
    """ChromaPipeline's mask: real tokens and one padding token, then the image (0.42 passes floats)."""
    text = (torch.arange(TEXT) <= valid).to(dtype)
    return torch.cat([text, torch.ones(H * W, dtype=torch.bool).to(dtype)])[None].expand(batch, -1)


def chroma(dtype):
    def predict(transformer, latents, t, text, negative):
        return call(transformer, hidden_states=latents, encoder_hidden_states=text, timestep=t.expand(latents.shape[0]) / 1000,
                    img_ids=grid(0, H, W), txt_ids=torch.zeros(TEXT, 3),
                    attention_mask=chroma_mask(latents.shape[0], 1 if negative else 3, dtype))

    return predict


def qwen(transformer, latents, t, text, negative):
    # QwenImagePipeline: a text mask (the negative prompt is shorter), true CFG as a second call.
    mask = (torch.arange(TEXT) < (2 if negative else 5))[None].expand(latents.shape[0], -1)
    return call(transformer, hidden_states=latents, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                timestep=t.expand(latents.shape[0]) / 1000, img_shapes=[[(1, H, W)]] * latents.shape[0])


def zimage(transformer, latents, t, text, negative):
    # ZImagePipeline: one batch [conditional; unconditional] of lists, captions of their own lengths
    # (7 and 40 tokens: 32 and 64 after padding, so the batch is padded with a key mask), t rising.
    batch = latents.shape[0]
    captions = [text[b, :9] for b in range(batch)] + [torch.cat([text[b]] * 6)[:40] for b in range(batch)]
    out = call(transformer, x=list(latents.repeat(2, 1, 1, 1, 1).unbind(0)), t=((1000 - t) / 1000).expand(2 * batch),
               cap_feats=captions)
    return torch.stack(out[:batch]) * 2 - torch.stack(out[batch:])


def hunyuan(transformer, latents, t, text, negative):
    mask = (torch.arange(TEXT) < (3 if negative else 6))[None].expand(latents.shape[0], -1).long()
    return call(transformer, hidden_states=latents, timestep=t.expand(latents.shape[0]).float(), encoder_hidden_states=text,
                encoder_attention_mask=mask)


def seeded(make):
    def build():
        torch.manual_seed(0)
        return make().eval()

    return build


FAMILIES = {
    "flux-kontext": Family(seeded(tiny_flux), lambda g, b: torch.randn(b, H * W, 16, generator=g), flux_kontext, "separate",
                           lambda s: TokenLayout(s, TEXT, H * W, (1, H, W))),  # the grid from the target's ids
    "flux2": Family(seeded(lambda: Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2))),
        lambda g, b: torch.randn(b, H * W, 8, generator=g), flux2, "none", lambda s: TokenLayout(s, TEXT, H * W)),
    "chroma": Family(seeded(lambda: ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4), approximator_num_channels=16, approximator_hidden_dim=16,
        approximator_layers=1)), lambda g, b: torch.randn(b, H * W, 16, generator=g), chroma(torch.float32),
        "separate", lambda s: TokenLayout(s, TEXT, H * W, (1, H, W))),
    "qwenimage": Family(seeded(lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4))), lambda g, b: torch.randn(b, H * W, 16, generator=g), qwen,
        "separate", lambda s: TokenLayout(s, TEXT, H * W)),
    "zimage": Family(seeded(lambda: ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[128, 32, 32])),
        lambda g, b: torch.randn(b, 4, 1, 2 * H, 2 * W, generator=g), zimage, "batch",
        lambda s: TokenLayout(s, 0, H * W + 8)),  # 120 image tokens padded to 128
    "hunyuanimage": Family(seeded(lambda: HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16, rope_axes_dim=(4, 4))),
        lambda g, b: torch.randn(b, 4, H, W, generator=g), hunyuan, "separate", lambda s: TokenLayout(s, 0, H * W)),
}


class MiniPipeline:
    """The smallest pipeline ``ditfastattn.calibrate`` can drive: a flow-matching scheduler, the
    transformer, and the family's calls with guidance as its pipeline runs it."""

    def __init__(self, family: Family):
        self.family = family
        self.transformer = family.make()
        self.scheduler = FlowMatchEulerDiscreteScheduler()

    def __call__(self, num_inference_steps, generator, prompt_embeds, output_type="latent", **_):
        family, batch = self.family, prompt_embeds.shape[0]
        latents = family.latents(generator, batch)
        negative = torch.randn(prompt_embeds.shape, generator=torch.Generator().manual_seed(99))
        self.scheduler.set_timesteps(num_inference_steps)
        with torch.no_grad():
            for t in self.scheduler.timesteps:
                noise = family.predict(self.transformer, latents, t, prompt_embeds, False)
                if family.cfg == "separate":
                    noise = 2 * noise - family.predict(self.transformer, latents, t, negative, True)
                latents = self.scheduler.step(noise, t, latents).prev_sample
        return SimpleNamespace(images=latents)


def prompt(batch: int = 1, seed: int = 1) -> dict:
    return {"prompt_embeds": torch.randn(batch, TEXT, 16, generator=torch.Generator().manual_seed(seed))}


def generate(pipe, batch: int = 1):
    return pipe(STEPS, torch.Generator().manual_seed(0), **prompt(batch)).images


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


def test_identity_is_stock_remove_restores_and_compression_differs(family, recorder):
    plan = identity_remove_and_compression(FAMILIES[family], recorder, arrow_residual_and_a_cache_head)
    joint = {layer.name for layer in plan.model.layers if layer.text}
    assert joint
    for record in recorder:
        seq = record["q"].shape[1]
        want = FAMILIES[family].layout(seq) if record["layer"] in joint else TokenLayout(seq, 0, seq)
        assert record["layout"] == want, record["layer"]


def arrow_residual_and_a_cache_head(transformer) -> Plan:
    plan = Plan.uniform(transformer, STEPS, "arrow_residual:0.3")
    methods = [[list(heads) for heads in rows] for rows in plan.methods]
    methods[2][-1][0] = "cache"
    return Plan(plan.model, methods)


def identity_remove_and_compression(family: Family, recorder, compressed: Callable) -> Plan:
    """An all-full plan is bitwise stock, remove() restores bit for bit, and the plan
    ``compressed(transformer)`` runs every layer, finite and different; ``recorder`` is left
    holding its run. Returns that plan."""
    pipe = MiniPipeline(family)
    stock = generate(pipe)
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "full"))
    assert torch.equal(generate(pipe), stock)
    ditfastattn.remove(pipe)
    assert torch.equal(generate(pipe), stock)
    plan = compressed(pipe.transformer)
    ditfastattn.apply(pipe, plan)
    recorder.clear()
    out = generate(pipe)
    ditfastattn.remove(pipe)
    assert bool(torch.isfinite(out).all()) and not torch.equal(out, stock)
    assert torch.equal(generate(pipe), stock)
    assert {r["layer"] for r in recorder} == {layer.name for layer in plan.model.layers}
    return plan


def test_full_heads_in_the_op_equal_the_stock_attention_of_every_call(family, monkeypatch):
    """The layout and padding each call hands the op reproduce the stock attention, masks included."""
    checked = full_heads_match_stock(FAMILIES[family], monkeypatch)
    assert checked and any(checked) == (family in ("chroma", "qwenimage", "zimage", "hunyuanimage"))


def full_heads_match_stock(family: Family, monkeypatch) -> list[bool]:
    """Checks full heads in the op against the stock attention of every call of an arrow plan;
    returns, per call, whether it had padding."""
    pipe = MiniPipeline(family)
    attend, checked = LayerRuntime.attend, []

    def checking(self, q, k, v, **kwargs):
        out = attend(self, q, k, v, **kwargs)
        modes = torch.full((q.shape[2],), ops.MODE_FULL, dtype=torch.int32)
        full = ops.headwise_attention(q, k, v, modes, **self.geometry.op, impl="reference")
        torch.testing.assert_close(full, kwargs["dense"](), atol=2e-5, rtol=1e-4, msg=self.name)
        checked.append(self.geometry.padding is not None)
        return out

    monkeypatch.setattr(LayerRuntime, "attend", checking)
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "arrow:0.3"))
    generate(pipe, batch=2)
    ditfastattn.remove(pipe)
    return checked


def test_calibration_scores_with_the_exact_layout_and_replays_bit_for_bit(family, recorder):
    """Candidates are scored under each call's own layout and padding: the applied plan reproduces
    the calibration run's every layer output exactly."""
    plan = calibrate_and_replay(FAMILIES[family], recorder, SearchConfig(num_inference_steps=STEPS, delta=2.0))
    assert any(m != "full" for rows in plan.methods[1:] for heads in rows for m in heads)


@pytest.mark.parametrize("name", ["zimage", "hunyuanimage"])
def test_measured_head_sensitivity_runs_on_every_family(name):
    # The head-weight pass differentiates the transformer's output: Z-Image's is a list of tensors
    # (it raised an AttributeError after the whole reference pass), and HunyuanImage 2.1's blocks take
    # keyword arguments diffusers' own checkpoint function refuses (a TypeError, the same place).
    pipe = MiniPipeline(FAMILIES[name])
    plan = ditfastattn.calibrate(pipe, [prompt(seed=1), prompt(seed=2)],
                                 SearchConfig(num_inference_steps=STEPS, delta=0.2, sensitivity="measure"), progress=False)
    assert not [m for m in pipe.transformer.modules() if getattr(m, "gradient_checkpointing", False)]
    heads = plan.provenance["search"]["sensitivity"]["heads"]
    assert any(weight != 1.0 for rows in heads.values() for row in rows[1:] for weight in row)


def calibrate_and_replay(family: Family, recorder, search: SearchConfig) -> Plan:
    """Calibrates on two prompts, applies the plan to both at once and checks that every layer
    output of the calibration run comes again bit for bit; returns the plan."""
    pipe = MiniPipeline(family)
    prompts = [prompt(seed=1), prompt(seed=2)]
    plan = ditfastattn.calibrate(pipe, prompts, search, progress=False)
    assert plan.model == ditfastattn.model.describe(pipe.transformer)
    calibrated = [(r["layer"], r["step"], r["call"], r["out"]) for r in recorder]
    recorder.clear()
    ditfastattn.apply(pipe, plan)
    embeds = torch.cat([p["prompt_embeds"] for p in prompts])
    assert bool(torch.isfinite(pipe(STEPS, torch.Generator().manual_seed(0), prompt_embeds=embeds).images).all())
    ditfastattn.remove(pipe)
    applied = [(r["layer"], r["step"], r["call"], r["out"]) for r in recorder]
    assert [a[:3] for a in applied] == [c[:3] for c in calibrated]
    assert all(torch.equal(a[3], c[3]) for a, c in zip(applied, calibrated))
    return plan


def test_chroma_boolean_masks_too():
    # The token mask as booleans (diffusers' fix of Chroma's float mask): m_q & m_k, padded queries see nothing.
    pipe = MiniPipeline(chroma_boolean())
    stock = generate(pipe)
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "full"))
    assert torch.equal(generate(pipe), stock)
    ditfastattn.remove(pipe)
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "arrow:0.3"))
    compressed = generate(pipe)
    ditfastattn.remove(pipe)
    assert bool(torch.isfinite(compressed).all()) and not torch.equal(compressed, stock)


def chroma_boolean() -> Family:
    family = FAMILIES["chroma"]
    return Family(family.make, family.latents, chroma(torch.bool), "separate", family.layout)


def test_unsupported_transformer_names_the_supported_ones():
    with pytest.raises(TypeError, match="SD3Transformer2DModel, FluxTransformer2DModel, Flux2Transformer2DModel, "
                                        "ChromaTransformer2DModel, QwenImageTransformer2DModel, ZImageTransformer2DModel, "
                                        "HunyuanImageTransformer2DModel"):
        Plan.uniform(torch.nn.Linear(2, 2), STEPS, "full")


def test_a_family_this_diffusers_lacks_is_left_out_and_named(monkeypatch):
    import importlib

    from ditfastattn import adapters

    real = importlib.import_module

    def without_zimage(name, package=None):
        if name == ".zimage":
            raise ImportError("cannot import name 'ZImageTransformer2DModel' from 'diffusers'")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", without_zimage)
    monkeypatch.setattr(adapters, "_missing", {})
    monkeypatch.setattr(adapters, "_ADAPTERS", adapters._load())
    assert "zimage" not in {adapter.FAMILY for adapter in adapters._ADAPTERS}
    with pytest.raises(TypeError, match=r"HunyuanImageTransformer2DModel, .*WanTransformer3DModel .*; this diffusers lacks zimage \(upgrade diffusers\)"):
        adapters.adapter_for(FAMILIES["zimage"].make())


def test_candidates_are_scored_under_the_calls_layout_and_padding(family, monkeypatch):
    """An arrow whose band covers the whole image is full attention under the call's own layout and
    padding, so its score is zero; scored with one text segment and no padding it would not be. So
    too where the exact output is computed on the scored part of the batch alone (rows compressed)."""
    from ditfastattn.runtime import routing

    parts = []

    def exact_attention(q, k, v, op, impl):
        parts.append(q.shape[0])
        return routing_exact(q, k, v, op, impl)

    routing_exact = routing.exact_attention
    monkeypatch.setattr(routing, "exact_attention", exact_attention)
    pipe = MiniPipeline(FAMILIES[family])
    for batch, candidates, delta in ((2, ("full", "arrow:1"), 0.0), (4, ("full", "arrow:1", "arrow:0.25"), 1e6)):
        search = SearchConfig(num_inference_steps=STEPS, delta=delta, candidates=candidates)
        plan = ditfastattn.calibrate(pipe, [prompt(seed=1, batch=batch)], search, progress=False)
        scores = np.array([[head for head in layer] for step in plan.scores["rse"][1:] for layer in step], dtype=float)
        assert scores[..., 1].max() < 1e-9
    assert parts and set(parts) == {2}  # the compressed rows' exact output: half of a batch of 4


def route_full_heads(monkeypatch) -> list[bool]:
    """Routes full heads of mixed layers to dense SDPA (as on a GPU where it beats the fused op) and
    records, per routed call, whether it had padding."""
    from ditfastattn.runtime import routing, session

    monkeypatch.setattr(ditfastattn.runtime, "full_head_cost", lambda *args: 2.0)
    calls = []

    def attend_dense(q, k, v, heads, out, padding=None):
        calls.append(padding is not None)
        routing.attend_dense(q, k, v, heads, out, padding)

    monkeypatch.setattr(session, "attend_dense", attend_dense)
    return calls


def one_full_head(transformer) -> Plan:
    """Every layer mixed after step 0: head 0 full, the others an arrow (no cache: routing is all that differs)."""
    plan = Plan.uniform(transformer, STEPS, "arrow:0.3")
    methods = [[["full"] + list(heads[1:]) for heads in rows] for rows in plan.methods]
    return Plan(plan.model, methods)


@pytest.mark.parametrize("family", ["qwenimage", "chroma", "chroma-boolean"])
def test_routed_full_heads_of_padded_calls_attend_under_the_mask(family, monkeypatch):
    """Full heads routed to dense SDPA take the call's padding (Qwen-Image's key mask, Chroma's
    token-pair masks, whose padded queries see nothing): the same output as in the fused op, which
    a maskless SDPA would not give."""
    pipe = MiniPipeline(chroma_boolean() if family == "chroma-boolean" else FAMILIES[family])
    stock = generate(pipe)
    plan = one_full_head(pipe.transformer)
    ditfastattn.apply(pipe, plan)
    fused = generate(pipe)
    ditfastattn.remove(pipe)
    calls = route_full_heads(monkeypatch)
    ditfastattn.apply(pipe, plan)
    got = generate(pipe)
    ditfastattn.remove(pipe)
    assert calls and all(calls)
    torch.testing.assert_close(got, fused, atol=1e-5, rtol=1e-5)
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "full"))
    assert torch.equal(generate(pipe), stock)
    ditfastattn.remove(pipe)


def test_candidates_scored_on_part_of_a_padded_batch_take_its_rows_of_the_mask(monkeypatch):
    """Z-Image pads the conditional captions (7 tokens to 32) and not the unconditional ones (40 to
    64): a candidate scored on a sampled conditional prompt and its unconditional half takes those
    two elements' mask rows, 32 padded keys and none."""
    padded = []
    real = ops.headwise_attention

    def spy(q, k, v, head_modes, **kwargs):
        if kwargs.get("global_rows") is False and kwargs.get("key_padding") is not None:
            mask = kwargs["key_padding"].mask
            padded.append((q.shape[0], mask.shape[0], mask.sum(dim=1).tolist()))
        return real(q, k, v, head_modes, **kwargs)

    monkeypatch.setattr(ops, "headwise_attention", spy)
    pipe = MiniPipeline(FAMILIES["zimage"])
    ditfastattn.calibrate(pipe, [prompt(seed=1), prompt(seed=2)], SearchConfig(num_inference_steps=STEPS, delta=2.0),
                          progress=False)
    assert padded and set(map(str, padded)) == {str((2, 2, [32, 0]))}


def test_calibration_with_routed_padded_full_heads_replays_bit_for_bit(recorder, monkeypatch):
    """Calibration runs the routed full heads under the mask as the applied plan does."""
    calls = route_full_heads(monkeypatch)
    # No step weights: at 3 unshifted steps the schedule's would keep step 1 all full and cache all of
    # step 2, leaving no layer that mixes full heads with others.
    search = SearchConfig(num_inference_steps=STEPS, delta=0.2, candidates=("full", "cache"), sensitivity=None)
    calibrate_and_replay(FAMILIES["qwenimage"], recorder, search)
    assert calls and all(calls)


def test_a_calls_mask_is_read_once_for_all_its_layers(monkeypatch):
    # HunyuanImage hands every layer of a call the same mask tensor (Qwen-Image's and Chroma's
    # processors build theirs per layer, so theirs are read per layer).
    from ditfastattn.adapters import dispatch

    reads, calls = [], []
    original = dispatch.padding_of
    monkeypatch.setattr(dispatch, "padding_of", lambda *args: reads.append(1) or original(*args))
    pipe = MiniPipeline(FAMILIES["hunyuanimage"])
    plan = Plan.uniform(pipe.transformer, STEPS, "arrow:0.3")
    assert len([layer for layer in plan.model.layers if layer.text]) > 1
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    ditfastattn.apply(pipe, plan)
    generate(pipe)
    ditfastattn.remove(pipe)
    assert len(reads) == len(calls) > 0


@pytest.mark.parametrize("bias,pairs", [(ops.KEY_PADDING, False), (ops.PAIR_PADDING, True),
                                        (FLOAT_PAIR_PADDING, True)])
def test_full_heads_under_token_pair_masks_stay_in_the_fused_op(bias, pairs):
    """Routing full heads to dense SDPA under a mask that treats padded queries apart would build an
    S x S mask (24 GiB at HunyuanVideo 1.5's 720p): their cost reads 0 (fused op) on any device.
    A key mask is left to the measured cost (1.0, no routing, off a GPU)."""
    from ditfastattn.runtime import routing
    from ditfastattn.runtime import CallGeometry

    q = torch.randn(1, 40, 2, 8)
    mask = torch.zeros(1, 40, dtype=torch.bool)
    mask[0, 30:] = True
    geometry = CallGeometry.of(40, None, None, TokenLayout.from_text(40, 0, 10), ops.Padding(mask, bias))
    cost = routing.full_head_cost(q, q, q, 0, 10, geometry)
    assert cost == (0.0 if pairs else 1.0)


@pytest.mark.parametrize("family", ["qwenimage", "chroma", "hunyuanimage", "zimage"])
def test_a_plan_runs_under_inference_mode_as_without(family):
    """Masks made under torch.inference_mode keep no version counter, which the per-call padding
    cache reads: such a mask is read at every layer instead, with the same images."""
    pipe = MiniPipeline(FAMILIES[family])
    plan = Plan.uniform(pipe.transformer, STEPS, "arrow:0.3")
    methods = [[["cache" if step and h == 0 else m for h, m in enumerate(heads)] for heads in rows]
               for step, rows in enumerate(plan.methods)]
    ditfastattn.apply(pipe, Plan(plan.model, methods))
    want = generate(pipe)
    with torch.inference_mode():
        got = generate(pipe)
    assert torch.equal(got, want)


def score_skipped_first_block(transformer, blocks: str) -> None:
    """What diffusers' perturbed-attention guider puts on a layer for its perturbed call: the
    attention's scores skipped (the output is the values), by a torch function mode on F.sdpa; on
    the first of ``blocks``."""
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip

    apply_layer_skip(transformer, LayerSkipConfig(indices=[0], fqn=blocks, skip_attention=False,
                                                  skip_attention_scores=True, skip_ff=False))


# The families diffusers' layer skip supports, and their blocks of joint attention.
SCORE_SKIP_BLOCKS = {"qwenimage": "transformer_blocks", "zimage": "layers", "hunyuanimage": "transformer_blocks"}


@pytest.mark.parametrize("name", list(SCORE_SKIP_BLOCKS))
def test_a_layer_under_diffusers_attention_score_skip_runs_stock_whatever_the_plan(name):
    pipe = MiniPipeline(FAMILIES[name])
    compressed = Plan.uniform(pipe.transformer, STEPS, "arrow:0.5")
    ditfastattn.apply(pipe.transformer, compressed)
    without_skip = generate(pipe)
    ditfastattn.remove(pipe.transformer)
    score_skipped_first_block(pipe.transformer, SCORE_SKIP_BLOCKS[name])
    stock = generate(pipe)
    skipped = {index for index, layer in enumerate(compressed.model.layers)
               if layer.name.startswith(f"{SCORE_SKIP_BLOCKS[name]}.0.")}
    assert len(skipped) == 1
    first_full = Plan(compressed.model, [[["full"] * len(heads) if index in skipped else list(heads)
                                          for index, heads in enumerate(step)] for step in compressed.methods])
    outputs = []
    for plan in (Plan.uniform(pipe.transformer, STEPS, "full"), compressed, first_full):
        ditfastattn.apply(pipe.transformer, plan)
        outputs.append(generate(pipe))
        ditfastattn.remove(pipe.transformer)
    assert torch.equal(outputs[0], stock)
    # The skipped layer's output is its values whatever its heads' methods; the others still compress.
    assert torch.equal(outputs[1], outputs[2]) and not torch.equal(outputs[1], stock)
    assert not torch.equal(outputs[1], without_skip)


def test_static_mode_refuses_diffusers_attention_score_skip():
    pipe = MiniPipeline(FAMILIES["qwenimage"])
    score_skipped_first_block(pipe.transformer, SCORE_SKIP_BLOCKS["qwenimage"])
    ditfastattn.apply(pipe.transformer, Plan.uniform(pipe.transformer, STEPS, "arrow:0.5"), static=True,
                      num_image_tokens=H * W)
    with pytest.raises(NotImplementedError, match=r"transformer_blocks.0.attn: static mode does not run under diffusers' "
                                                  "attention-score skip"):
        generate(pipe)
    ditfastattn.remove(pipe.transformer)


def _zimage_controlnet(transformer):
    """Z-Image's controlnet as ``from_transformer`` makes it: it runs the transformer's own noise
    refiner modules in its forward (shared, not copied), before every transformer call."""
    from diffusers import ZImageControlNetModel

    torch.manual_seed(1)
    controlnet = ZImageControlNetModel(control_layers_places=[0], control_in_dim=4, all_patch_size=(2,),
                                       all_f_patch_size=(1,), dim=32, n_refiner_layers=1, n_heads=2, n_kv_heads=2).eval()
    controlnet = ZImageControlNetModel.from_transformer(controlnet, transformer)
    for name, parameter in controlnet.named_parameters():
        if "proj" in name:  # zero-initialised projections, weighted as a trained controlnet's are
            torch.nn.init.normal_(parameter, std=0.2)
    assert controlnet.noise_refiner is transformer.noise_refiner
    return controlnet


@pytest.mark.parametrize("static", [False, True])
def test_a_zimage_controlnet_running_the_transformers_refiner_stays_stock(static):
    import copy

    transformer = FAMILIES["zimage"].make()
    controlnet = _zimage_controlnet(transformer)
    g = torch.Generator().manual_seed(2)
    latents, caption = torch.randn(4, 1, 2 * H, 2 * W, generator=g), torch.randn(9, 16, generator=g)
    control = torch.randn(1, 4, 1, 2 * H, 2 * W, generator=g)

    def generation(controlnet):  # ZImageControlNetPipeline's loop: the controlnet, then the transformer, at each step
        hints, outputs = [], []
        with torch.no_grad():
            for step in range(STEPS):
                t = torch.tensor([step / STEPS])  # Z-Image's t rises
                hints.append(controlnet([latents], t, [caption], control))
                outputs.append(transformer([latents], t, [caption], controlnet_block_samples=hints[-1],
                                           return_dict=False)[0][0])
        return hints, outputs

    stock_hints, _ = generation(controlnet)
    spec = ditfastattn.model.describe(transformer)
    methods = [[["arrow:0.2"] * layer.heads for layer in spec.layers] for _ in range(STEPS)]
    methods[2][0] = ["cache"] * spec.layers[0].heads  # the shared refiner reuses its own step-1 output
    plan = Plan(spec, methods)
    own = copy.deepcopy(controlnet)
    own.noise_refiner = copy.deepcopy(transformer.noise_refiner)  # a controlnet that shares nothing
    options = {"static": True, "num_image_tokens": H * W + 8} if static else {}
    ditfastattn.apply(transformer, plan, **options)
    _, expected = generation(own)
    for _ in range(2):  # a second generation starts where the first ended
        hints, outputs = generation(controlnet)
        for step in range(STEPS):
            assert all(torch.equal(hints[step][k], stock_hints[step][k]) for k in stock_hints[step])
            assert torch.equal(outputs[step], expected[step])
    ditfastattn.remove(transformer)


def test_zimage_omni_mode_is_refused_on_the_noise_refiner_too():
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[128, 32, 32], siglip_feat_dim=16).eval()
    g = torch.Generator().manual_seed(0)
    condition, target = torch.randn(4, 1, 2 * H, 2 * W, generator=g), torch.randn(4, 1, 2 * H, 2 * W, generator=g)
    caption = torch.randn(9, 16, generator=g)
    spec = ditfastattn.model.describe(transformer)
    # Only the refiner compresses: its sequence holds both images of the prompt, which a band would mix.
    methods = [[["arrow:0.3" if step and layer.name.startswith("noise_refiner") else "full"] * layer.heads
                for layer in spec.layers] for step in range(2)]
    ditfastattn.apply(transformer, Plan(spec, methods))
    with torch.no_grad(), pytest.raises(NotImplementedError, match=r"noise_refiner.0.attention: Z-Image's omni mode"):
        for t in (0.0, 0.5):
            transformer(x=[[condition, target]], t=torch.tensor([t]), cap_feats=[[caption, caption]],
                        siglip_feats=[[None, None]], image_noise_mask=[[0, 1]], return_dict=False)
    ditfastattn.remove(transformer)
