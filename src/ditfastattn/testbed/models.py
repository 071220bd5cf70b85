"""The testbed transformers, built from diffusers' own classes, and the tensor layouts they use.

The two image models work in pixel space on 64x64 RGB images with 2x2 patches (1024 image tokens)
and 32 text tokens of 384 dimensions, with 6 heads of head dim 32 per attention layer. Eight heads
of 32 would make one SD3 joint layer 2.4M parameters, leaving room for only three layers under
16 MiB in bf16; six heads keep six layers, so heads can differ across depth as well as within a
layer.

- ``sd3``: ``SD3Transformer2DModel``, 6 joint layers, qk RMS norm (as in SD3.5), image tokens
  first. Timesteps are passed as ``sigma * 1000``, as ``StableDiffusion3Pipeline`` does.
- ``flux``: ``FluxTransformer2DModel``, 3 double-stream and 5 single-stream blocks, text tokens
  first, RoPE over (index, row, column) with axes (8, 12, 12) summing to the head dim, no guidance
  embedding. Images enter packed as ``FluxPipeline`` packs latents: every 2x2 patch becomes one
  token of 12 channels. Timesteps are passed as ``sigma``, as ``FluxPipeline`` passes ``t / 1000``.

The video testbed (``video``, not one of the image ``KINDS``): ``HunyuanVideoTransformer3DModel``
on 8 frames of 48x48 RGB pixels (:mod:`.video_data`) with 3x3 spatial patches, a token grid of
8 x 16 x 16 (2048 video tokens: 16 blocks of 128, or 4 x 2 x 2 tiles of 2 x 8 x 8), then the 32
text tokens under their key mask; 3 dual-stream and 5 single-stream blocks of 4 heads of 32, RoPE
axes (8, 12, 12) over (frame, row, column), one token-refiner layer, no guidance embedding (true
CFG, as ``HunyuanVideoPipeline`` runs it with a negative prompt). 3.6M parameters, 7 MB in bf16:
four heads keep eight layers within that. Timesteps are passed as ``sigma * 1000``, as
``HunyuanVideoPipeline`` passes ``t``.

The large video testbed (``video-large``): the same transformer and clips at twice the resolution,
8 frames of 96x96 pixels, a token grid of 8 x 32 x 32 (8192 video tokens: 64 blocks of 128, or
4 x 4 x 4 tiles of 2 x 8 x 8). There a band block is a strip of 4 patch rows across the frame, an
eighth of it, as at real video sizes, where the small testbed's blocks are already compact half
frames. Its weights were fine-tuned from the small testbed's (``train --init``).
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel, HunyuanVideoTransformer3DModel, SD3Transformer2DModel

KINDS = ("sd3", "flux")
VIDEO_KIND = "video"
LARGE_VIDEO_KIND = "video-large"
# Frame size in pixels of each video testbed (8 frames, 3x3 patches).
VIDEO_FRAME_SIZES = {VIDEO_KIND: 48, LARGE_VIDEO_KIND: 96}
SD3_CONFIG = {
    "sample_size": 64,
    "patch_size": 2,
    "in_channels": 3,
    "out_channels": 3,
    "num_layers": 6,
    "attention_head_dim": 32,
    "num_attention_heads": 6,
    "joint_attention_dim": 384,
    "caption_projection_dim": 192,
    "pooled_projection_dim": 384,
    "pos_embed_max_size": 32,
    "qk_norm": "rms_norm",
}
FLUX_CONFIG = {
    "patch_size": 1,
    "in_channels": 12,
    "num_layers": 3,
    "num_single_layers": 5,
    "attention_head_dim": 32,
    "num_attention_heads": 6,
    "joint_attention_dim": 384,
    "pooled_projection_dim": 384,
    "guidance_embeds": False,
    "axes_dims_rope": (8, 12, 12),
}
VIDEO_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "num_layers": 3,
    "num_single_layers": 5,
    "num_refiner_layers": 1,
    "patch_size": 3,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "guidance_embeds": False,
    "text_embed_dim": 384,
    "pooled_projection_dim": 384,
    "rope_axes_dim": (8, 12, 12),
}
DEFAULT_CONFIGS = {"sd3": SD3_CONFIG, "flux": FLUX_CONFIG, VIDEO_KIND: VIDEO_CONFIG, LARGE_VIDEO_KIND: VIDEO_CONFIG}


def is_video(kind: str) -> bool:
    return kind in VIDEO_FRAME_SIZES


def build_transformer(
    kind: str, config: dict | None = None
) -> SD3Transformer2DModel | FluxTransformer2DModel | HunyuanVideoTransformer3DModel:
    """A freshly initialised transformer of ``kind`` (an image kind or a video kind); ``config``
    overrides the defaults above."""
    if kind not in DEFAULT_CONFIGS:
        raise ValueError(f"kind must be one of {tuple(DEFAULT_CONFIGS)}, got {kind!r}")
    cfg = {**DEFAULT_CONFIGS[kind], **(config or {})}
    if kind == "sd3":
        return SD3Transformer2DModel(**cfg)
    if is_video(kind):
        cfg["rope_axes_dim"] = tuple(cfg["rope_axes_dim"])
        return HunyuanVideoTransformer3DModel(**cfg)
    cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
    return FluxTransformer2DModel(**cfg)


def pack_flux(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch one token, channel-major as in FluxPipeline."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_flux(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_flux`."""
    b, _, d = x.shape
    c = d // 4
    x = x.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def flux_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(H/2 * W/2, 3) position ids (0, row, column) of the packed image tokens, as in FluxPipeline."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)


def flux_text_ids(num_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """All-zero ids of the text tokens, as FluxPipeline gives them."""
    return torch.zeros(num_tokens, 3, device=device, dtype=dtype)


def velocity(
    kind: str,
    transformer: torch.nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor,
    states: torch.Tensor,
    pooled: torch.Tensor,
) -> torch.Tensor:
    """The transformer's flow-matching velocity (noise - image) for images ``x`` (B, 3, H, W), or
    videos (B, 3, F, H, W) for a video kind, at noise levels ``sigma`` (B,), called exactly as the
    testbed pipelines call it."""
    if is_video(kind):
        return transformer(
            hidden_states=x,
            timestep=sigma * 1000,
            encoder_hidden_states=states,
            encoder_attention_mask=text_mask(states),
            pooled_projections=pooled,
            return_dict=False,
        )[0]
    if kind == "sd3":
        return transformer(
            hidden_states=x,
            timestep=sigma * 1000,
            encoder_hidden_states=states,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
    height, width = x.shape[-2:]
    out = transformer(
        hidden_states=pack_flux(x),
        timestep=sigma,
        encoder_hidden_states=states,
        pooled_projections=pooled,
        txt_ids=flux_text_ids(states.shape[1], x.device, x.dtype),
        img_ids=flux_image_ids(height, width, x.device, x.dtype),
        return_dict=False,
    )[0]
    return unpack_flux(out, height, width)


def text_mask(states: torch.Tensor) -> torch.Tensor:
    """(B, T) key mask of text states (B, T, D) in their dtype: 1 on real tokens, 0 on padding, which
    the testbed's text encoder sets to exactly zero (:mod:`.text`); HunyuanVideo takes the mask as
    its pipeline gives it."""
    return (states != 0).any(dim=-1).to(states.dtype)
