"""End-to-end step time of FLUX.1-dev- and SD3-medium-sized transformers under ditfastattn plans.

    python benchmarks/e2e.py            # CUDA GPU: benchmarks/results/e2e.json and benchmarks/e2e_speedup.png
    python benchmarks/e2e.py --smoke    # tiny models on the CPU (reference op): checks the script itself
    python benchmarks/e2e.py --runs flux2:1024 flux2:2048 qwenimage:1024 ... --out results/e2e_families.json
    python benchmarks/e2e.py --runs hunyuanvideo:720x1280x129 wan:720x1280x81 --out results/e2e_video.json

The other families at real size (``--runs KIND:SIZE``): ``flux-kontext`` (FLUX.1-dev with a
reference image as large as the target), ``flux2`` (FLUX.2 [dev], 32B: an H200), ``chroma``,
``qwenimage``, ``zimage``, ``hunyuanimage``; Chroma, Qwen-Image and HunyuanImage get a text mask
(40% of the text real), as their pipelines pass one, which their compressed layers take in the fused
kernel. Where a mask rules out the flash SDPA backend, its columns stay empty.

Video families (``--runs KIND:HxWxF``, pixels and frames): ``hunyuanvideo`` (13B; 720x1280x129 is
33 x 45 x 80 = 118,800 latent patches, 256 text tokens, 40% real), ``wan`` (Wan 2.1 14B; 720x1280x81
is 21 x 45 x 80 = 75,600 patches; plans cover its self-attention, which has no text; the attention
share counts its stock cross-attention too, under 1% of its attention FLOPs), ``hunyuanvideo15`` and
``cogvideox`` (5B, CFG batch 2). HunyuanVideo's text mask rules out the flash baseline. One step
is timed (a generation of 2: step 0 is full), with plans at sparsity 0.5, 0.68 and 0.8 (with
``--tiles`` also the same targets with 3-D tile windows instead of bands: ``tiles_*``). The
released depth fits one H200 (26-28 GB of bf16 weights), but a step of it takes tens of seconds,
so the transformer runs a reduced number of blocks (``VIDEO_DEPTH``; ``--released-depth`` for all):
each row states both depths and ``ms_released_depth`` = ms x released / run blocks (the embeddings
and output layer are scaled along with the blocks: a slight overestimate). ``--budget-s`` also
skips the plans of a run that started before it ran out.

Random bf16 weights, eager mode. One transformer call is one denoising step; the runtime tracks
steps from the `timestep` argument, so each measurement calls the transformer with decreasing
timesteps (a generation of N steps), times every call with CUDA events and takes the median of
steps 1..N-1 (step 0 of a plan is always full). For each model and resolution, in one process:

- stock diffusers (cuDNN SDPA, the default), stock with the flash SDPA backend (the paper's
  baseline), stock with attention removed (gives the attention share), stock again (noise);
- ditfastattn with an all-full plan (overhead) and synthetic plans at attention sparsity
  0.04 (one cached head per layer: the kernel's cost for full heads), 0.43, 0.68 and 0.80.

Amdahl ceiling of a plan = 1 / (1 - share x sparsity), share = 1 - t(no attention) / t(baseline).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    ChromaTransformer2DModel,
    CogVideoXTransformer3DModel,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    HunyuanImageTransformer2DModel,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoTransformer3DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
    ZImageTransformer2DModel,
)
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from torch.nn.attention import SDPBackend, sdpa_kernel

import ditfastattn
from ditfastattn.methods import parse_method

HERE = Path(__file__).resolve().parent

FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
# Smoke configs: the same code paths at toy size (2 image blocks at 256x256).
FLUX_TINY = dict(FLUX_DEV, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
SD3_TINY = dict(SD3_MEDIUM, sample_size=32, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
                pos_embed_max_size=64)

# The other families at their released sizes (the classes' defaults) and at toy size.
FLUX2_DEV = dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                 num_attention_heads=48, joint_attention_dim=15360, axes_dims_rope=(32, 32, 32, 32))
FLUX2_TINY = dict(FLUX2_DEV, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4))
CHROMA = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56))
CHROMA_TINY = dict(CHROMA, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
                   approximator_hidden_dim=32, approximator_layers=1)
QWEN = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
QWEN_TINY = dict(QWEN, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
ZIMAGE = dict(in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560,
              axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512])
ZIMAGE_TINY = dict(ZIMAGE, in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                   cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[512, 64, 64])
HUNYUAN = dict(in_channels=64, out_channels=64, num_attention_heads=28, attention_head_dim=128, num_layers=20,
               num_single_layers=40, num_refiner_layers=2, patch_size=(1, 1), text_embed_dim=3584, rope_axes_dim=(64, 64))
HUNYUAN_TINY = dict(HUNYUAN, in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                    num_single_layers=1, num_refiner_layers=1, text_embed_dim=32, rope_axes_dim=(8, 8))

# The video families at their released sizes and at toy size.
HUNYUANVIDEO = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                    num_single_layers=40, num_refiner_layers=2, patch_size=2, patch_size_t=1, text_embed_dim=4096,
                    pooled_projection_dim=768, rope_axes_dim=(16, 56, 56))
HUNYUANVIDEO_TINY = dict(HUNYUANVIDEO, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
                         num_refiner_layers=1, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6))
HUNYUANVIDEO15 = dict(in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
                      num_refiner_layers=2, patch_size=1, patch_size_t=1, text_embed_dim=3584, text_embed_2_dim=1472,
                      image_embed_dim=1152, rope_axes_dim=(16, 56, 56))
HUNYUANVIDEO15_TINY = dict(HUNYUANVIDEO15, in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                           num_layers=2, num_refiner_layers=1, text_embed_dim=32, text_embed_2_dim=32,
                           image_embed_dim=32, rope_axes_dim=(4, 6, 6))
COGVIDEOX_5B = dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
                    text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49,
                    patch_size=2, use_rotary_positional_embeddings=True)
COGVIDEOX_TINY = dict(COGVIDEOX_5B, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                      time_embed_dim=16, text_embed_dim=32, num_layers=2)
WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_TINY = dict(WAN_14B, in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, text_dim=32,
                freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=64)

# kind: (class, full config, smoke config, text tokens, batch). SD3 and CogVideoX pipelines batch
# CFG (2); the others are guidance-distilled or run CFG as a second call (1 per call).
MODELS = {
    "flux": (FluxTransformer2DModel, FLUX_DEV, FLUX_TINY, 512, 1),
    "sd3": (SD3Transformer2DModel, SD3_MEDIUM, SD3_TINY, 333, 2),
    "flux-kontext": (FluxTransformer2DModel, FLUX_DEV, FLUX_TINY, 512, 1),
    "flux2": (Flux2Transformer2DModel, FLUX2_DEV, FLUX2_TINY, 512, 1),
    "chroma": (ChromaTransformer2DModel, CHROMA, CHROMA_TINY, 512, 1),
    "qwenimage": (QwenImageTransformer2DModel, QWEN, QWEN_TINY, 1024, 1),
    "zimage": (ZImageTransformer2DModel, ZIMAGE, ZIMAGE_TINY, 512, 1),
    "hunyuanimage": (HunyuanImageTransformer2DModel, HUNYUAN, HUNYUAN_TINY, 1000, 1),
    "hunyuanvideo": (HunyuanVideoTransformer3DModel, HUNYUANVIDEO, HUNYUANVIDEO_TINY, 256, 1),
    "hunyuanvideo15": (HunyuanVideo15Transformer3DModel, HUNYUANVIDEO15, HUNYUANVIDEO15_TINY, 1000, 1),
    "cogvideox": (CogVideoXTransformer3DModel, COGVIDEOX_5B, COGVIDEOX_TINY, 226, 2),
    "wan": (WanTransformer3DModel, WAN_14B, WAN_TINY, 512, 1),
}
MASKED = ("chroma", "qwenimage", "hunyuanimage", "hunyuanvideo", "hunyuanvideo15")  # their pipelines pass a text mask
# Video kinds: (VAE spatial, VAE temporal compression); latent channels are the configs' out_channels.
VIDEO = {"hunyuanvideo": (8, 4), "hunyuanvideo15": (16, 4), "cogvideox": (8, 4), "wan": (8, 4)}
# HunyuanVideo 1.5's conditions after the MLLM text: ByT5 glyph tokens (no glyphs: all padding) and
# SigLIP image tokens (text to video: all padding).
HV15_GLYPH, HV15_IMAGE = 256, 729
# Blocks a video run builds, a tenth to a twentieth of the released depth (HunyuanVideo's 1:2 of
# dual- and single-stream kept), so that a step stays a few seconds at 75-120k tokens.
VIDEO_DEPTH = {"hunyuanvideo": dict(num_layers=1, num_single_layers=2), "hunyuanvideo15": dict(num_layers=3),
               "cogvideox": dict(num_layers=4), "wan": dict(num_layers=3)}
SMOKE_VIDEO = (128, 128, 9)  # 3 x 8 x 8 latent patches in every video family
VIDEO_TARGETS = (0.5, 0.68, 0.80)
REAL_TEXT = 0.4  # share of the text tokens a mask keeps
# Most important first: the time budget may cut the tail.
RUNS = [("flux", 2048), ("flux", 1024), ("sd3", 1024), ("sd3", 2048)]
TARGETS = (0.43, 0.68, 0.80)
# Compressed heads of the synthetic plans, in the proportions of a searched plan (cache and
# the three default windows); the rest run full, as many as the target sparsity allows.
MIX = {"cache": 0.4, "arrow:0.125": 0.2, "arrow:0.0625": 0.2, "arrow:0.03125": 0.2}
# The same with tile windows (rows x cols tiles of an image, every frame of a video) for the bands.
TILE_MIX = {"cache": 0.4, "tile:0,0.25,0.25": 0.2, "tile:0,0.125,0.125": 0.2, "tile:0,0.0625,0.0625": 0.2}
# --pool: a fifth of the compressed heads pooled keys instead of bands (searched plans on the
# testbeds pooled 13-14% of their heads).
POOL_MIX = {"cache": 0.4, "arrow:0.125": 0.15, "arrow:0.0625": 0.15, "arrow:0.03125": 0.1, "pool:2": 0.1, "pool:4": 0.1}
# Video (--tiles): 3-D windows spanning about 1/2, 0.4 and 0.32 of each axis (an eighth, a sixteenth
# and a thirty-second of the video's tiles, as the bands' widths).
VIDEO_TILE_MIX = {"cache": 0.4, "tile:0.25,0.25,0.25": 0.2, "tile:0.2,0.2,0.2": 0.2, "tile:0.16,0.16,0.16": 0.2}


def build_transformer(kind: str, config: dict, device, dtype):
    """Random weights created on the device in ``dtype``: no CPU init, no float32 copy (FLUX is 12B)."""
    cls = MODELS[kind][0]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def flux_image_ids(rows: int, cols: int, device, dtype) -> torch.Tensor:
    """(rows * cols, 3) position ids of packed FLUX latents: (0, row, col), as FluxPipeline builds them."""
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1)
    return torch.cat([torch.zeros(rows * cols, 1), grid.reshape(-1, 2).float()], dim=1).to(device, dtype)


def parse_size(text: str) -> int | tuple[int, int, int]:
    """``1024`` (a square image) or ``720x1280x129`` (a video: height x width x frames)."""
    parts = tuple(int(part) for part in text.split("x"))
    if len(parts) not in (1, 3):
        raise SystemExit(f"a size is SIZE or HEIGHTxWIDTHxFRAMES; got {text!r}")
    return parts[0] if len(parts) == 1 else parts


def size_label(size) -> str:
    return "x".join(map(str, size)) if isinstance(size, tuple) else str(size)


def video_latent(kind: str, size: tuple[int, int, int]) -> tuple[int, int, int]:
    """(frames, height, width) of the latents of a video of ``size`` = (height, width, frames) pixels."""
    spatial, temporal = VIDEO[kind]
    height, width, frames = size
    return (frames - 1) // temporal + 1, height // spatial, width // spatial


def video_grid(kind: str, config: dict, size: tuple[int, int, int]) -> tuple[int, int, int]:
    """(frames, rows, cols) of latent patches of a video of ``size``."""
    p = config["patch_size"]
    patch = tuple(p) if isinstance(p, (tuple, list)) else (config.get("patch_size_t") or 1, p, p)
    return tuple(n // q for n, q in zip(video_latent(kind, size), patch))


def image_tokens(kind: str, size, config: dict | None = None) -> int:
    """Tokens of the generated image at ``size`` x ``size`` pixels (HunyuanImage 2.1's VAE is /32),
    or of the video at ``size`` (needs the ``config`` for the patch sizes)."""
    if kind in VIDEO:
        return math.prod(video_grid(kind, config, size))
    return (size // 32) ** 2 if kind == "hunyuanimage" else (size // 16) ** 2


def global_tokens(kind: str, size, text_len: int) -> int:
    """Text and reference-image tokens of the compressed layers (FLUX.1 Kontext: one reference as
    large as the target; Wan's self-attention: none)."""
    if kind == "wan":
        return 0
    if kind == "hunyuanvideo15":
        return text_len + HV15_GLYPH + HV15_IMAGE
    return text_len + (image_tokens(kind, size) if kind == "flux-kontext" else 0)


def released_blocks(config: dict) -> int:
    return config["num_layers"] + config.get("num_single_layers", 0)


def video_inputs(kind: str, config: dict, size, text_len: int, batch: int, randn, device, dtype) -> dict:
    """A transformer call of a video family, as its pipeline makes it."""
    frames, height, width = video_latent(kind, size)
    channels = config["out_channels"]
    real = (torch.arange(text_len, device=device) < int(REAL_TEXT * text_len))[None].expand(batch, -1)
    if kind == "hunyuanvideo":  # the mask in the latents' dtype, a distilled guidance embedding x 1000
        return dict(hidden_states=randn(batch, channels, frames, height, width),
                    encoder_hidden_states=randn(batch, text_len, config["text_embed_dim"]),
                    encoder_attention_mask=real.to(dtype),
                    pooled_projections=randn(batch, config["pooled_projection_dim"]),
                    guidance=torch.full((batch,), 6000.0, device=device, dtype=dtype), return_dict=False)
    if kind == "hunyuanvideo15":  # text to video: [latents, zero condition, zero mask] on the channels
        zeros = torch.zeros(batch, channels + 1, frames, height, width, device=device, dtype=dtype)
        return dict(hidden_states=torch.cat([randn(batch, channels, frames, height, width), zeros], 1),
                    encoder_hidden_states=randn(batch, text_len, config["text_embed_dim"]),
                    encoder_attention_mask=real.long(),
                    encoder_hidden_states_2=randn(batch, HV15_GLYPH, config["text_embed_2_dim"]),
                    encoder_attention_mask_2=torch.zeros(batch, HV15_GLYPH, device=device, dtype=torch.long),
                    image_embeds=torch.zeros(batch, HV15_IMAGE, config["image_embed_dim"], device=device, dtype=dtype),
                    return_dict=False)
    if kind == "cogvideox":  # latents (B, F, C, H, W); RoPE over the patch grid, as CogVideoXPipeline makes it
        _, rows, cols = video_grid(kind, config, size)
        p = config["patch_size"]
        crops = get_resize_crop_region_for_grid((rows, cols), config["sample_width"] // p, config["sample_height"] // p)
        rope = get_3d_rotary_pos_embed(config["attention_head_dim"], crops, (rows, cols), frames, device=device)
        return dict(hidden_states=randn(batch, frames, channels, height, width),
                    encoder_hidden_states=randn(batch, text_len, config["text_embed_dim"]), image_rotary_emb=rope,
                    return_dict=False)
    return dict(hidden_states=randn(batch, channels, frames, height, width),  # wan: text (zero-padded) unmasked
                encoder_hidden_states=randn(batch, text_len, config["text_dim"]), return_dict=False)


def family_inputs(kind: str, config: dict, size: int, text_len: int, batch: int, randn, device, dtype) -> dict:
    """A transformer call of the families other than FLUX.1 and SD3, as their pipelines make it."""
    side = size // 16
    real = torch.arange(text_len, device=device) < int(REAL_TEXT * text_len)
    mask = real[None].expand(batch, -1)
    if kind == "flux2":
        ids = torch.cartesian_prod(*(torch.arange(n, device=device) for n in (1, side, side, 1))).to(dtype)
        return dict(hidden_states=randn(batch, side * side, config["in_channels"]),
                    encoder_hidden_states=randn(batch, text_len, config["joint_attention_dim"]), img_ids=ids[None],
                    txt_ids=torch.zeros(1, text_len, 4, device=device, dtype=dtype),
                    guidance=torch.full((batch,), 4.0, device=device), return_dict=False)
    if kind == "chroma":  # ChromaPipeline: a float 0/1 mask over text and image
        full = torch.cat([mask, torch.ones(batch, side * side, dtype=torch.bool, device=device)], 1)
        return dict(hidden_states=randn(batch, side * side, config["in_channels"]),
                    encoder_hidden_states=randn(batch, text_len, config["joint_attention_dim"]),
                    img_ids=flux_image_ids(side, side, device, dtype),
                    txt_ids=torch.zeros(text_len, 3, device=device, dtype=dtype), attention_mask=full.to(dtype),
                    return_dict=False)
    if kind == "qwenimage":
        return dict(hidden_states=randn(batch, side * side, config["in_channels"]),
                    encoder_hidden_states=randn(batch, text_len, config["joint_attention_dim"]),
                    encoder_hidden_states_mask=mask, img_shapes=[[(1, side, side)]] * batch, return_dict=False)
    if kind == "zimage":
        return dict(x=[randn(config["in_channels"], 1, 2 * side, 2 * side) for _ in range(batch)],
                    cap_feats=[randn(text_len, config["cap_feat_dim"]) for _ in range(batch)], return_dict=False)
    side = size // 32  # hunyuanimage
    return dict(hidden_states=randn(batch, config["in_channels"], side, side),
                encoder_hidden_states=randn(batch, text_len, config["text_embed_dim"]), encoder_attention_mask=mask,
                return_dict=False)


def model_inputs(kind: str, config: dict, size: int, text_len: int, batch: int, device, dtype) -> dict:
    """Keyword arguments of one transformer call at ``size`` x ``size`` pixels, without the timestep."""
    g = torch.Generator(device).manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=g, device=device, dtype=dtype)

    if kind in VIDEO:
        return video_inputs(kind, config, size, text_len, batch, randn, device, dtype)
    if kind not in ("flux", "flux-kontext", "sd3"):
        return family_inputs(kind, config, size, text_len, batch, randn, device, dtype)
    text = randn(batch, text_len, config["joint_attention_dim"])
    pooled = randn(batch, config["pooled_projection_dim"])
    if kind == "flux-kontext":  # the reference image's latents after the target's, ids with first coordinate 1
        side = size // 16
        reference = flux_image_ids(side, side, device, dtype)
        reference[:, 0] = 1
        return dict(
            hidden_states=randn(batch, 2 * side * side, config["in_channels"]), encoder_hidden_states=text,
            pooled_projections=pooled, img_ids=torch.cat([flux_image_ids(side, side, device, dtype), reference]),
            txt_ids=torch.zeros(text_len, 3, device=device, dtype=dtype),
            guidance=torch.full((batch,), 2.5, device=device), return_dict=False,
        )
    if kind == "flux":
        side = size // 16  # VAE /8, then 2x2 patches packed into tokens
        return dict(
            hidden_states=randn(batch, side * side, config["in_channels"]), encoder_hidden_states=text,
            pooled_projections=pooled, img_ids=flux_image_ids(side, side, device, dtype),
            txt_ids=torch.zeros(text_len, 3, device=device, dtype=dtype),
            guidance=torch.full((batch,), 3.5, device=device), return_dict=False,
        )
    side = size // 8
    return dict(hidden_states=randn(batch, config["in_channels"], side, side), encoder_hidden_states=text,
                pooled_projections=pooled, return_dict=False)


def timesteps(kind: str, steps: int, batch: int, device, dtype) -> list[dict]:
    """The timestep argument of each call of one generation, on the device as the pipelines pass it."""
    values = [1.0 - k / steps for k in range(steps)]
    if kind == "zimage":  # ZImagePipeline: (1000 - t) / 1000, rising
        return [{"t": torch.full((batch,), 1.0 - v, device=device, dtype=dtype)} for v in values]
    if kind == "sd3":
        return [{"timestep": torch.full((batch,), 1000.0 * v, device=device)} for v in values]
    if kind in VIDEO or kind == "hunyuanimage":  # their pipelines: the scheduler's t in [0, 1000], in the latents' dtype
        return [{"timestep": torch.full((batch,), 1000.0 * v, device=device, dtype=dtype)} for v in values]
    # FluxPipeline and its kin: t / 1000 in the latents' dtype
    return [{"timestep": torch.full((batch,), v, device=device, dtype=dtype)} for v in values]


def device_of(inputs: dict) -> torch.device:
    return next(v for v in inputs.values() if torch.is_tensor(v)).device if "x" not in inputs else inputs["x"][0].device


def step_times(model, inputs: dict, steps: list[dict]) -> list[float]:
    """Milliseconds of each call of one generation; back-to-back events, so host gaps count."""
    if device_of(inputs).type != "cuda":
        times = []
        for t in steps:
            start = time.perf_counter()
            model(**t, **inputs)
            times.append(1e3 * (time.perf_counter() - start))
        return times
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(len(steps) + 1)]
    marks[0].record()
    for t, mark in zip(steps, marks[1:]):
        model(**t, **inputs)
        mark.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]


def host_syncs(model, inputs: dict, steps: list[dict]) -> int | None:
    """Synchronizing CUDA calls that step 1 of a generation makes (torch's sync debug mode)."""
    if device_of(inputs).type != "cuda":
        return None
    model(**steps[0], **inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(**steps[1], **inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@contextlib.contextmanager
def attention_removed():
    """Every SDPA call (diffusers' FLUX and SD3 paths both end there) returns its query, plus one
    element of key and value per head: with the query alone, torch.compile drops the key and value
    projections as dead code and the attention share comes out too high."""
    original = F.scaled_dot_product_attention

    def no_attention(query, key, value, *args, **kwargs):
        return query + (key[..., :1, :1] + value[..., :1, :1])

    F.scaled_dot_product_attention = no_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def measure(model, inputs, steps, context=contextlib.nullcontext, syncs: bool = False) -> dict:
    device = device_of(inputs)
    with torch.no_grad(), context():
        step_times(model, inputs, steps[:2])  # warm-up: cuDNN plans, Triton compile and autotuning
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = step_times(model, inputs, steps)
        result = {"ms": statistics.median(times[1:]), "ms_steps": [round(t, 3) for t in times]}
        if device.type == "cuda":
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if syncs:
            result["host_syncs_step1"] = host_syncs(model, inputs, steps)
    return result


def synthetic_plan(full_plan, target: float, num_image_tokens: int, text_len: int, seed: int = 0, mix=MIX):
    """A plan whose steps 1.. reach ``target`` attention sparsity with heads drawn i.i.d.: ``full``
    with probability p, else a method from ``mix``; p is bisected to the target. Tile windows are
    sized by the grid ``full_plan`` records (``Plan.uniform(..., grid=)``)."""
    spec = full_plan.model
    steps, layers, heads = full_plan.num_steps, len(spec.layers), max(layer.heads for layer in spec.layers)
    rng = np.random.default_rng(seed)
    draw = rng.random((steps, layers, heads))
    names = list(mix)
    pick = rng.choice(len(names), size=draw.shape, p=list(mix.values()))
    grid = full_plan.provenance.get("grid")
    tiles = None if grid is None else ditfastattn.ops.TileGrid(tuple(grid), tuple(full_plan.provenance["tile"]))
    density = np.array([parse_method(n).cost(num_image_tokens, text_len, tiles) for n in names])[pick]
    # Every layer attends over text and image here, so layers weigh by heads x head_dim.
    weight = np.array([layer.head_dim for layer in spec.layers], dtype=float)[None, :, None]

    def sparsity(p_full: float) -> float:
        kept = np.where(draw[1:] < p_full, 1.0, density[1:])
        return 1.0 - float((kept * weight).sum() / (weight.sum() * heads * (steps - 1)))

    lo, hi = 0.0, 1.0  # sparsity falls as p_full rises
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sparsity(mid) > target else (lo, mid)
    p_full = min((lo, hi), key=lambda p: abs(sparsity(p) - target))
    methods = [
        [[("full" if step == 0 or draw[step, l, h] < p_full else names[pick[step, l, h]]) for h in range(layer.heads)]
         for l, layer in enumerate(spec.layers)]
        for step in range(steps)
    ]
    provenance = {"source": f"synthetic, target sparsity {target}", "num_image_tokens": num_image_tokens,
                  "text_len": text_len}
    if tiles is not None:
        provenance.update(grid=list(tiles.grid), tile=list(tiles.tile))
    return ditfastattn.Plan(spec, methods, provenance)


def with_residuals(plan, num_image_tokens: int, text_len: int):
    """``plan`` with the arrows of each head's first window after a full step (up to its next
    full step) read as ``arrow_residual``: the same windows, plus the captures its full steps now
    make for them, which its summary counts."""
    methods = [[list(heads) for heads in rows] for rows in plan.methods]
    for layer, spec in enumerate(plan.model.layers):
        for head in range(spec.heads):
            window = None
            for rows in methods:
                method = parse_method(rows[layer][head])
                if method.exact:
                    window = None
                elif method.kind == "arrow" and window in (None, method.fraction):
                    window = method.fraction
                    rows[layer][head] = f"arrow_residual:{method.fraction:g}"
    provenance = {**plan.provenance, "source": f"{plan.provenance['source']}, arrows read as arrow_residual",
                  "num_image_tokens": num_image_tokens, "text_len": text_len}
    return ditfastattn.Plan(plan.model, methods, provenance)


def one_cached_head_plan(full_plan, num_image_tokens: int, text_len: int):
    """Steps 1.. cache head 0 of every layer: every layer goes through the kernel with the rest full."""
    methods = [[["cache" if step and h == 0 else "full" for h in range(layer.heads)] for layer in full_plan.model.layers]
               for step in range(full_plan.num_steps)]
    provenance = {"source": "one cached head per layer", "num_image_tokens": num_image_tokens, "text_len": text_len}
    return ditfastattn.Plan(full_plan.model, methods, provenance)


def setup(kind: str, size: int, args, device, dtype):
    """Inputs of one model at one size: (inputs, timesteps of a generation, row header, impl)."""
    _, full_config, tiny_config, text_len, batch = MODELS[kind]
    config = tiny_config if args.smoke else full_config
    text_len = 16 if args.smoke else text_len
    inputs = model_inputs(kind, config, size, text_len, batch, device, dtype)
    # A video step takes seconds: one timed step, after step 0 (always full in a plan).
    n_steps = args.steps or (2 if kind in VIDEO else 6 if size >= 2048 else 8)
    steps = timesteps(kind, n_steps, batch, device, dtype)
    # text_len: every global token (text, a reference image), as plan summaries count them.
    row = {"model": kind, "size": size, "batch": batch, "image_tokens": image_tokens(kind, size, config),
           "text_len": global_tokens(kind, size, text_len), "masked_text": kind in MASKED,
           "steps_per_generation": n_steps}
    if kind in VIDEO:
        row["grid"] = video_grid(kind, config, size)
    return inputs, steps, row, "reference" if args.smoke else "auto"


def run_config(model, kind: str, size: int, args, device, dtype) -> dict:
    inputs, steps, row, impl = setup(kind, size, args, device, dtype)
    image_tokens, text_len, n_steps = row["image_tokens"], row["text_len"], row["steps_per_generation"]
    row["variants"] = {}
    out = row["variants"]
    video = kind in VIDEO
    syncs = not video  # counting them costs two more calls of seconds each

    out["stock"] = measure(model, inputs, steps, syncs=syncs)
    flash = kind not in MASKED  # the flash backend takes no attention mask
    if flash:
        out["stock_flash"] = measure(model, inputs, steps, lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION))
    out["no_attention"] = measure(model, inputs, steps, attention_removed)
    row["attention_share"] = 1.0 - out["no_attention"]["ms"] / out["stock"]["ms"]
    row["attention_share_flash"] = 1.0 - out["no_attention"]["ms"] / out["stock_flash"]["ms"] if flash else None

    full = ditfastattn.Plan.uniform(model, n_steps, "full", num_image_tokens=image_tokens, text_len=text_len)
    plans = {"full_plan": full}
    if not video:
        plans["plan_one_cached_head"] = one_cached_head_plan(full, image_tokens, text_len)
    plans.update({f"plan_{t:.2f}": synthetic_plan(full, t, image_tokens, text_len)
                  for t in (VIDEO_TARGETS if video else TARGETS)})
    if args.residuals:
        plans.update({f"residual_{t:.2f}": with_residuals(plans[f"plan_{t:.2f}"], image_tokens, text_len)
                      for t in (VIDEO_TARGETS if video else TARGETS)})
    side = math.isqrt(image_tokens)
    if args.pool and not video and side * side == image_tokens:  # the square images' grid of patches
        pooled = ditfastattn.Plan.uniform(model, n_steps, "full", num_image_tokens=image_tokens, text_len=text_len,
                                          grid=(1, side, side))
        plans.update({f"pool_{t:.2f}": synthetic_plan(pooled, t, image_tokens, text_len, mix=POOL_MIX)
                      for t in TARGETS})
    if video and args.tiles:
        tiled = ditfastattn.Plan.uniform(model, n_steps, "full", num_image_tokens=image_tokens, text_len=text_len,
                                         grid=row["grid"])
        plans.update({f"tiles_{t:.2f}": synthetic_plan(tiled, t, image_tokens, text_len, mix=VIDEO_TILE_MIX)
                      for t in VIDEO_TARGETS})
    row["skipped_variants"] = []
    for name, plan in plans.items():
        if time.perf_counter() > args.deadline:
            row["skipped_variants"].append(name)
            continue
        summary = plan.summary(image_tokens, text_len)
        ditfastattn.apply(model, plan, impl=impl)
        try:
            result = measure(model, inputs, steps, syncs=syncs)
        finally:
            ditfastattn.remove(model)
        sparsity = statistics.fmean(summary["sparsity_per_step"][1:])
        result.update(
            sparsity=sparsity, plan_sparsity=summary["sparsity"], method_share=summary["method_share"],
            speedup=out["stock"]["ms"] / result["ms"],
            ceiling=1.0 / (1.0 - row["attention_share"] * sparsity),
        )
        result["of_ceiling"] = result["speedup"] / result["ceiling"]
        if flash:
            result.update(speedup_vs_flash=out["stock_flash"]["ms"] / result["ms"],
                          ceiling_vs_flash=1.0 / (1.0 - row["attention_share_flash"] * sparsity))
            result["of_ceiling_vs_flash"] = result["speedup_vs_flash"] / result["ceiling_vs_flash"]
        if "peak_gib" in result:
            result["extra_gib"] = result["peak_gib"] - out["stock"]["peak_gib"]
        out[name] = result
    # The same stock run again, last: the spread between the two is the noise floor.
    row["stock_spread"] = None
    if time.perf_counter() <= args.deadline:
        out["stock_again"] = measure(model, inputs, steps)
        row["stock_spread"] = abs(out["stock_again"]["ms"] / out["stock"]["ms"] - 1.0)
    return row


def environment(device) -> dict:
    import diffusers
    import triton

    # The device's copy of the tree has no .git: the caller may name the commit in BENCH_COMMIT.
    commit = os.environ.get("BENCH_COMMIT")
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=HERE, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "triton": triton.__version__, "diffusers": diffusers.__version__, "ditfastattn": ditfastattn.__version__,
        "commit": commit, "python": sys.version.split()[0],
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(rows))
    lines = -(-len(rows) // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(5.0 * cols, 4.0 * lines), squeeze=False)
    grid = np.linspace(0.0, 0.9, 50)
    for ax, row in zip(axes.flat, rows):
        plans = [v for name, v in row["variants"].items() if name.startswith(("plan_", "full_plan"))]
        x = [v["sparsity"] for v in plans]
        for key, label, color in (("", "cuDNN", "C0"), ("_flash", "flash (paper's baseline)", "C1")):
            share = row[f"attention_share{key}"]
            if share is None:  # a masked family: no flash baseline
                continue
            ax.plot(grid, 1.0 / (1.0 - share * grid), "--", color=color, label=f"ceiling vs {label}")
            speedup = "speedup_vs_flash" if key else "speedup"
            ax.plot(x, [v[speedup] for v in plans], "o", color=color, label=f"ditfastattn vs {label}")
        ax.axhline(1.0, color="gray", lw=0.5)
        size = size_label(row["size"]) + ("" if isinstance(row["size"], (list, tuple)) else "²")
        ax.set_title(f"{row['model'].upper()} {size} (attention {row['attention_share']:.0%} of a step)", fontsize=9)
        ax.set_xlabel("attention sparsity")
        ax.set_ylabel("end-to-end step speed-up")
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict]) -> str:
    lines = ["model size  variant               ms    sparsity speedup ceiling  of_ceil | vs_flash ceil_fl of_ceil | peak_GiB syncs"]
    for row in rows:
        if "blocks" in row:
            lines.append(f"{row['model']} {size_label(row['size'])}: {row['blocks']} of {row['released_blocks']} blocks "
                         f"run; a step of the released depth ~ ms x {row['released_blocks'] / row['blocks']:.1f}")
        for name, v in row["variants"].items():
            cells = f"{row['model']:5} {size_label(row['size']):4}  {name:20} {v['ms']:8.2f}"
            if "speedup" in v:
                flash = [v.get(k, float("nan")) for k in ("speedup_vs_flash", "ceiling_vs_flash", "of_ceiling_vs_flash")]
                cells += (f"  {v['sparsity']:6.3f}  {v['speedup']:6.3f}  {v['ceiling']:6.3f}  {v['of_ceiling']:6.3f} |"
                          f"  {flash[0]:6.3f}  {flash[1]:6.3f}  {flash[2]:6.3f} |")
            else:
                cells += " " * 51 + "|"
            cells += f" {v.get('peak_gib', float('nan')):7.2f}  {v.get('host_syncs_step1')}"
            lines.append(cells)
        flash, spread = row["attention_share_flash"], row["stock_spread"]
        lines.append(f"      attention share {row['attention_share']:.3f} (cuDNN), "
                     f"{'-' if flash is None else f'{flash:.3f}'} (flash); stock spread "
                     f"{'-' if spread is None else f'{spread:.3%}'}")
        if row.get("skipped_variants"):
            lines.append(f"      skipped (time budget): {', '.join(row['skipped_variants'])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU with the reference op")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="start no new model/resolution, and no new plan within one, after this")
    parser.add_argument("--runs", nargs="+", default=[f"{kind}:{size}" for kind, size in RUNS],
                        help="model:size pairs, e.g. flux:2048 sd3:1024 wan:720x1280x81 (video: HxWxF)")
    parser.add_argument("--released-depth", action="store_true",
                        help="video models with all their blocks (default: VIDEO_DEPTH, a tenth to a twentieth)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per generation (default 6 at 2K, 8 at 1K, 2 for video)")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default results/e2e.json; smoke: out/)")
    parser.add_argument("--png", type=Path, default=None, help="plot (default e2e_speedup.png; smoke: out/)")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot and table from the JSON")
    parser.add_argument("--tiles", action="store_true",
                        help="video runs also time plans whose compressed heads run 3-D tile windows (VIDEO_TILE_MIX)")
    parser.add_argument("--pool", action="store_true",
                        help="image runs also time synthetic plans where a fifth of the compressed heads pool keys (POOL_MIX)")
    parser.add_argument("--residuals", action="store_true",
                        help="also time each synthetic plan with its arrows read as arrow_residual (with_residuals)")
    args = parser.parse_args()
    # A smoke run never overwrites the committed results.
    folder = HERE.parent / "out" if args.smoke else HERE
    args.out = args.out or folder / ("e2e_smoke.json" if args.smoke else "results/e2e.json")
    args.png = args.png or folder / ("e2e_smoke.png" if args.smoke else "e2e_speedup.png")
    if args.replot:
        result = json.loads(args.out.read_text())
    else:
        result = run_all(args)
    print(table(result["runs"]))
    for line in result["skipped"]:
        print("skipped:", line)
    plot(result["runs"], args.png)


def run_all(args) -> dict:
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    runs = [(kind, parse_size(size)) for kind, size in (r.split(":") for r in args.runs)]
    if args.smoke:
        runs = [(kind, SMOKE_VIDEO if kind in VIDEO else 256) for kind in dict(runs)]
    start = time.perf_counter()
    args.deadline = start + args.budget_s
    result = {"environment": environment(device), "smoke": args.smoke, "mode": "eager",
              "timing": "median of steps 1..N-1 of one generation, CUDA events, after a 2-step warm-up generation",
              "runs": [], "skipped": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    models = {}
    for kind, size in runs:
        if time.perf_counter() - start > args.budget_s:
            result["skipped"].append(f"{kind} {size}: time budget ({args.budget_s:.0f} s) spent")
            continue
        released = MODELS[kind][2 if args.smoke else 1]
        reduce = kind in VIDEO and not (args.smoke or args.released_depth)
        config = {**released, **VIDEO_DEPTH[kind]} if reduce else released
        if kind not in models:
            models.clear()  # one full-size model on the GPU at a time
            if device.type == "cuda":
                torch.cuda.empty_cache()
            models[kind] = build_transformer(kind, config, device, dtype)
        row = run_config(models[kind], kind, size, args, device, dtype)
        if kind in VIDEO:
            row.update(blocks=released_blocks(config), released_blocks=released_blocks(released))
            for variant in row["variants"].values():
                variant["ms_released_depth"] = variant["ms"] * row["released_blocks"] / row["blocks"]
        result["runs"].append(row)
        # Written after every run, so a run cut short by a time limit still leaves its results.
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"[{time.perf_counter() - start:6.1f} s] {kind} {size} done", flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
