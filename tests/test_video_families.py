"""The video families on tiny random configs (CPU, seconds): HunyuanVideo, HunyuanVideo 1.5,
CogVideoX 1.0 and 1.5 (temporal patches and RoPE) and Wan 2.1 / 2.2 (TI2V's per-token timesteps).

Each transformer is driven the way its diffusers pipeline calls it (latent layout, text masks,
guidance embedding, CFG in a batch or as separate calls) by the minimal pipeline of
``test_families``, over a video of 3 x 8 x 12 latent patches (288 tokens, so an arrow drops
blocks). Every family: an all-full plan is bitwise stock, remove() restores bit for bit, an arrow
plan is finite and differs, every layer call gets its family's layout with the video grid, full
heads in the op equal the stock attention of every call (masks included), the calibrated plan
replays the calibration run bit for bit, and (on a one-block video) an arrow over the whole video
scores zero.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoTransformer3DModel,
    WanTransformer3DModel,
)
from diffusers.models import attention_processor
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from test_families import (
    STEPS,
    TEXT,
    Family,
    MiniPipeline,
    calibrate_and_replay,
    call,
    full_heads_match_stock,
    generate,
    identity_remove_and_compression,
    prompt,
    seeded,
)

import ditfastattn
from ditfastattn import Plan, SearchConfig
from ditfastattn.model import TokenLayout

GRID = (4, 8, 12)  # frames, rows, cols of latent patches: 384 tokens, 3 blocks; ragged in tiles of 2 x 8 x 8
SMALL = (2, 4, 8)  # 64 tokens, one block
C = 4  # latent channels


def text_mask(batch: int, length: int, valid: int) -> torch.Tensor:
    """A tokenizer's mask: ``valid`` real tokens first, then padding."""
    return (torch.arange(length) < valid)[None].expand(batch, -1)


def hunyuanvideo(transformer, latents, t, text, negative):
    # HunyuanVideoPipeline: the mask in the transformer's dtype, a distilled guidance embedding
    # (x 1000), true CFG with a shorter negative prompt as a second call.
    batch = latents.shape[0]
    return call(transformer, hidden_states=latents, timestep=t.expand(batch), encoder_hidden_states=text,
                encoder_attention_mask=text_mask(batch, TEXT, 3 if negative else 6).float(),
                pooled_projections=text[:, 0], guidance=torch.full((batch,), 6000.0))


def hunyuanvideo15(transformer, latents, t, text, negative):
    # HunyuanVideo15Pipeline, text to video: [latents, zero condition latents, zero mask] on the
    # channels, zero SigLIP embeddings (all padding), a ByT5 text with no glyphs in the negative.
    batch, _, frames, height, width = latents.shape
    hidden = torch.cat([latents, torch.zeros_like(latents), torch.zeros(batch, 1, frames, height, width)], 1)
    mask = text_mask(batch, TEXT, 3 if negative else 6).long()
    glyph_mask = text_mask(batch, 4, 0 if negative else 2).long()
    return call(transformer, hidden_states=hidden, timestep=t.expand(batch), image_embeds=torch.zeros(batch, 5, 16),
                encoder_hidden_states=text, encoder_attention_mask=mask, encoder_hidden_states_2=text[:, :4],
                encoder_attention_mask_2=glyph_mask)


def cogvideox(transformer, latents, t, text, negative):
    # CogVideoXPipeline: one batch [unconditional; conditional]; 1.5: RoPE over the patch grid
    # (1.0 here: sinusoidal positions in the patch embedding).
    batch, frames, _, height, width = latents.shape
    grid = (height // 2, width // 2)
    rope = None
    if transformer.config.patch_size_t:
        rope = get_3d_rotary_pos_embed(16, None, grid, frames // 2, grid_type="slice", max_size=grid)
    out = call(transformer, hidden_states=torch.cat([latents] * 2), timestep=t.expand(2 * batch),
               encoder_hidden_states=torch.cat([text.flip(1), text]), image_rotary_emb=rope)
    uncond, cond = out.chunk(2)
    return uncond + 6 * (cond - uncond)


def wan(transformer, latents, t, text, negative):
    # WanPipeline (2.1, 2.2 A14B): the negative prompt as a second call.
    return call(transformer, hidden_states=latents, timestep=t.expand(latents.shape[0]), encoder_hidden_states=text)


def wan_ti2v(transformer, latents, t, text, negative):
    # WanImageToVideoPipeline with expand_timesteps (Wan 2.2 TI2V): a timestep per token, 0 on the
    # conditioning first frame.
    frames, height, width = latents.shape[2:]
    per_token = torch.full((frames, height // 2, width // 2), float(t))
    per_token[0] = 0
    return call(transformer, hidden_states=latents, timestep=per_token.flatten()[None].expand(latents.shape[0], -1),
                encoder_hidden_states=text)


def video(*shape):
    return lambda g, b: torch.randn(b, *shape, generator=g)


def families(grid: tuple[int, int, int]) -> dict[str, Family]:
    frames, rows, cols = grid

    def joint(start: int):
        return lambda s: TokenLayout(s, start, frames * rows * cols, grid)

    return {
        "hunyuanvideo": Family(seeded(tiny_hunyuanvideo), video(C, *grid), hunyuanvideo, "separate", joint(0)),
        "hunyuanvideo15": Family(seeded(tiny_hunyuanvideo15), video(C, *grid), hunyuanvideo15, "separate", joint(0)),
        "cogvideox": Family(seeded(tiny_cogvideox("1.5")), video(2 * frames, C, 2 * rows, 2 * cols), cogvideox,
                            "batch", joint(TEXT)),
        "cogvideox-1.0": Family(seeded(tiny_cogvideox("1.0")), video(frames, C, 2 * rows, 2 * cols), cogvideox,
                                "batch", joint(TEXT)),
        "wan": Family(seeded(tiny_wan), video(C, frames, 2 * rows, 2 * cols), wan, "separate", joint(0)),
        "wan-ti2v": Family(seeded(tiny_wan), video(C, frames, 2 * rows, 2 * cols), wan_ti2v, "separate", joint(0)),
    }


def tiny_hunyuanvideo():
    return HunyuanVideoTransformer3DModel(
        in_channels=C, out_channels=C, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=16,
        rope_axes_dim=(2, 2, 4))


def tiny_hunyuanvideo15():
    return HunyuanVideo15Transformer3DModel(
        in_channels=2 * C + 1, out_channels=C, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=16, image_embed_dim=16,
        rope_axes_dim=(2, 2, 4))


def tiny_wan():
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=C,
                                 out_channels=C, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                 rope_max_seq_len=32)


def tiny_cogvideox(version: str):
    temporal = dict(patch_size_t=2, use_rotary_positional_embeddings=True) if version == "1.5" else {}
    return lambda: CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=C, out_channels=C, time_embed_dim=16,
        text_embed_dim=16, num_layers=2, sample_width=24, sample_height=16, sample_frames=9, patch_size=2,
        max_text_seq_length=TEXT, **temporal)


FAMILIES = families(GRID)
MASKED = {"hunyuanvideo", "hunyuanvideo15"}


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


# Calibration records the plan's resolution from the first layer with text, and Wan's layers have
# none: its calibrate() fails in Plan.summary until _CalibrationSession.row also records
# (image tokens, 0) when no layer of the model has text.


def test_identity_is_stock_remove_restores_and_arrows_differ(family, recorder):
    identity_remove_and_compression(FAMILIES[family], recorder, lambda t: Plan.uniform(t, STEPS, "arrow:0.3"))
    assert attention_processor.F is torch.nn.functional
    for r in recorder:
        assert r["given_layout"] == FAMILIES[family].layout(r["q"].shape[1]), r["layer"]
        # a band plan has no tile launch to mark its text mask for (test_tiles.py: tile plans)
        assert r["padding"] is None or not r["padding"].global_only, r["layer"]
    assert any(r["padding"] is not None for r in recorder) == (family in MASKED)


def test_full_heads_in_the_op_equal_the_stock_attention_of_every_call(family, monkeypatch):
    """The layout and padding each call hands the op reproduce the stock attention, masks included."""
    checked = full_heads_match_stock(FAMILIES[family], monkeypatch)
    assert checked and any(checked) == (family in MASKED)


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_replays_bit_for_bit(family, recorder):
    """Candidates are scored under each call's own layout and padding: the applied plan reproduces
    the calibration run's every layer output exactly."""
    search = SearchConfig(num_inference_steps=STEPS, delta=2.0, candidates=("full", "arrow:0.3", "arrow_residual:0.3"))
    plan = calibrate_and_replay(FAMILIES[family], recorder, search)
    assert any(m.startswith("arrow") for rows in plan.methods[1:] for heads in rows for m in heads)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_arrow_over_the_whole_video_scores_zero(family):
    """On a one-block video an arrow is full attention under the call's layout and padding, so its
    score is zero; scored with another layout or without the padding it would not be."""
    pipe = MiniPipeline(families(SMALL)[family])
    search = SearchConfig(num_inference_steps=STEPS, delta=0.0, candidates=("full", "arrow:1"))
    plan = ditfastattn.calibrate(pipe, [prompt(seed=1, batch=2)], search, progress=False)
    scores = np.array([[head for head in layer] for step in plan.scores["rse"][1:] for layer in step], dtype=float)
    assert scores[..., 1].max() < 1e-9


def test_wan_leaves_cross_attention_stock_and_counts_ti2v_steps_by_the_noisy_tokens():
    pipe = MiniPipeline(FAMILIES["wan-ti2v"])
    spec = ditfastattn.model.describe(pipe.transformer)
    assert [layer.name for layer in spec.layers] == ["blocks.0.attn1", "blocks.1.attn1"]
    assert not any(layer.text for layer in spec.layers)
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "arrow:0.3"))
    generate(pipe)
    session = pipe.transformer._ditfastattn_session
    assert (session.step, session.calls_per_step) == (STEPS - 1, 2)
    ditfastattn.remove(pipe)


def test_cogvideox_sdpa_interception_touches_only_its_layers():
    """CogVideoX's processor calls SDPA through attention_processor.F: other processors of that
    module (HunyuanVideo's token refiner) keep the stock SDPA while a plan is applied elsewhere."""
    cog = MiniPipeline(FAMILIES["cogvideox"])
    hunyuan = MiniPipeline(FAMILIES["hunyuanvideo"])
    stock = generate(hunyuan)
    ditfastattn.apply(cog, Plan.uniform(cog.transformer, STEPS, "arrow:0.3"))
    assert attention_processor.F is not torch.nn.functional
    assert attention_processor.F.softmax is torch.nn.functional.softmax
    assert torch.equal(generate(hunyuan), stock)
    ditfastattn.remove(cog)
    assert attention_processor.F is torch.nn.functional


def test_cfg_share_only_where_the_pipeline_batches_cfg():
    """CogVideoX batches [unconditional; conditional]: cfg_share runs. The others call the
    transformer once per condition: cfg_share is refused with the reason."""
    pipe = MiniPipeline(FAMILIES["cogvideox"])
    stock = generate(pipe)
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "cfg_share"))
    shared = generate(pipe)
    ditfastattn.remove(pipe)
    assert bool(torch.isfinite(shared).all()) and not torch.equal(shared, stock)
    for family in ("hunyuanvideo", "hunyuanvideo15", "wan"):
        pipe = MiniPipeline(FAMILIES[family])
        with pytest.raises(ValueError, match="separate transformer calls, so cfg_share cannot apply"):
            ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "cfg_share"))


def test_cogvideox_fused_projections_are_refused():
    pipe = MiniPipeline(FAMILIES["cogvideox"])
    plan = Plan.uniform(pipe.transformer, STEPS, "full")
    pipe.transformer.fuse_qkv_projections()
    with pytest.raises(TypeError, match="FusedCogVideoXAttnProcessor2_0; ditfastattn works with diffusers' stock "
                                        "CogVideoXAttnProcessor2_0 only"):
        ditfastattn.apply(pipe, plan)


def test_the_masks_hunyuanvideo15_builds_per_layer_are_not_kept_alive(monkeypatch):
    """Its processor builds an S x S token-pair mask in every layer (13 GB at 720p x 121 frames). The
    runtime reads each once and must not hold on to it: a layer's mask is freed when its layer
    returns, as in stock diffusers, not kept for the rest of the call or after it."""
    import gc
    import weakref

    from ditfastattn.adapters import dispatch

    seen = []
    read = dispatch.padding_of

    def recording(mask, *args):
        seen.append(weakref.ref(mask))
        return read(mask, *args)

    monkeypatch.setattr(dispatch, "padding_of", recording)
    pipe = MiniPipeline(FAMILIES["hunyuanvideo15"])
    ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "arrow:0.3"))
    generate(pipe)
    gc.collect()
    assert len(seen) >= 2 * STEPS and all(ref() is None for ref in seen)
