"""Diffusers-style pipelines around the testbed transformers, and the loader of the bundled weights.

Both pipelines are ``DiffusionPipeline`` subclasses with two components, ``transformer`` and
``scheduler`` (a ``FlowMatchEulerDiscreteScheduler``), and sample the way their real counterparts
do, so code that hooks ``pipe.transformer``'s attention processors or wraps
``pipe.scheduler.set_timesteps`` sees the same calls it would see on SD3 or FLUX.1:

- :class:`SD3TestbedPipeline` (``StableDiffusion3Pipeline``): classifier-free guidance as one
  transformer call on a batch ``[uncond; cond]``; timestep ``t`` from the scheduler (sigma * 1000).
- :class:`FluxTestbedPipeline` (``FluxPipeline`` with true CFG): latents stay packed; with
  guidance, two transformer calls per step, positive then negative; timestep ``t / 1000``.
- :class:`VideoTestbedPipeline` (``HunyuanVideoPipeline`` with true CFG): videos (B, 3, F, H, W),
  the text's key mask, two transformer calls per step, positive then negative; timestep ``t``.
  Output ``frames`` as diffusers' video pipelines give them.

The text encoder (:mod:`.text`) is cached per device and is not a pipeline component. Images are
64x64 RGB in pixel space, videos 8 frames of 48x48 (``video``) or 96x96 (``video-large``,
:class:`LargeVideoTestbedPipeline`); there is no VAE.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.hunyuan_video.pipeline_output import HunyuanVideoPipelineOutput
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file

from .models import (LARGE_VIDEO_KIND, VIDEO_FRAME_SIZES, VIDEO_KIND, build_transformer, flux_image_ids, flux_text_ids,
                     pack_flux, text_mask, unpack_flux)
from .text import encode_prompts

logger = logging.getLogger("ditfastattn")

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# Shift 3 (SD3's) spends most sampling steps at high noise, where layout and colours are decided.
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}
DEFAULT_GUIDANCE_SCALE = 4.0


def _check_output_type(output_type: str) -> None:
    if output_type not in ("pil", "pt", "np", "latent"):
        raise ValueError(f"output_type must be 'pil', 'pt', 'np' or 'latent', got {output_type!r}")


class _TestbedPipeline(DiffusionPipeline):
    kind: str

    def __init__(self, transformer, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    def encode_prompt(self, prompt: str | list[str], device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(states (N, 32, 384), pooled (N, 384)) on the pipeline's device, in the transformer's dtype."""
        return encode_prompts(prompt, device or self._execution_device, dtype or self.transformer.dtype)

    def _embeddings(
        self,
        do_cfg,
        prompt,
        negative_prompt,
        prompt_embeds,
        pooled_prompt_embeds,
        negative_prompt_embeds,
        negative_pooled_prompt_embeds,
    ):
        """Positive and (with CFG) negative embeddings, encoding whatever was not given; the
        negative prompt defaults to "", the unconditional prompt the models were trained with."""
        device, dtype = self._execution_device, self.transformer.dtype
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("give either prompt or prompt_embeds")
            prompt_embeds, pooled_prompt_embeds = self.encode_prompt(prompt)
        elif pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds needs pooled_prompt_embeds too")
        batch = prompt_embeds.shape[0]
        if do_cfg and negative_prompt_embeds is None:
            negative_prompt = negative_prompt or ""
            if isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * batch
            negative_prompt_embeds, negative_pooled_prompt_embeds = self.encode_prompt(negative_prompt)
        elif do_cfg and negative_pooled_prompt_embeds is None:
            raise ValueError("negative_prompt_embeds needs negative_pooled_prompt_embeds too")
        embeds = [prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds]
        return [None if e is None else e.to(device, dtype) for e in embeds]

    def _true_cfg(self, latents, predict, cond, uncond, guidance_scale, do_cfg):
        """Sampling with true CFG as two calls per step, positive then negative (FLUX, HunyuanVideo):
        ``predict(latents, timestep, states, pooled)``, ``cond``/``uncond`` its (states, pooled)."""
        for t in self.progress_bar(self.scheduler.timesteps):
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            noise_pred = predict(latents, timestep, *cond)
            if do_cfg:
                neg_noise_pred = predict(latents, timestep, *uncond)
                noise_pred = neg_noise_pred + guidance_scale * (noise_pred - neg_noise_pred)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        return latents

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int = 64,
        width: int = 64,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        joint_attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ):
        """Generate one image per prompt. ``output_type``: "pil" (list of images), "pt" (tensor
        (N, 3, H, W) in [0, 1], float32), "np" (array (N, H, W, 3) in [0, 1]) or "latent" (the
        denoised sample, (N, 3, H, W) in the model's dtype and range)."""
        if height % 4 or width % 4 or max(height, width) > 64:
            raise ValueError(f"height and width must be multiples of 4, at most 64; got {height}x{width}")
        _check_output_type(output_type)
        do_cfg = guidance_scale > 1.0
        embeds = self._embeddings(
            do_cfg,
            prompt,
            negative_prompt,
            prompt_embeds,
            pooled_prompt_embeds,
            negative_prompt_embeds,
            negative_pooled_prompt_embeds,
        )
        device, dtype = self._execution_device, self.transformer.dtype
        shape = (embeds[0].shape[0], 3, height, width)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        images = self._denoise(latents, *embeds, guidance_scale, do_cfg, joint_attention_kwargs)
        self.maybe_free_model_hooks()
        if output_type == "latent":  # pixel space: the denoised sample before the [0, 1] mapping
            return ImagePipelineOutput(images=images) if return_dict else (images,)
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            out = images
        else:
            out = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                out = [PIL.Image.fromarray(a) for a in (out * 255).round().astype(np.uint8)]
        return ImagePipelineOutput(images=out) if return_dict else (out,)


class SD3TestbedPipeline(_TestbedPipeline):
    """SD3-style sampling: CFG as one batch of 2 per prompt, ``[uncond; cond]``."""

    kind = "sd3"

    def _denoise(self, latents, states, pooled, neg_states, neg_pooled, guidance_scale, do_cfg, attn_kwargs):
        if do_cfg:
            states = torch.cat([neg_states, states])
            pooled = torch.cat([neg_pooled, pooled])
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            timestep = t.expand(model_input.shape[0])
            noise_pred = self.transformer(
                hidden_states=model_input,
                timestep=timestep,
                encoder_hidden_states=states,
                pooled_projections=pooled,
                joint_attention_kwargs=attn_kwargs,
                return_dict=False,
            )[0]
            if do_cfg:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        return latents


class FluxTestbedPipeline(_TestbedPipeline):
    """FLUX-style sampling: packed latents; true CFG as two calls per step, positive then negative."""

    kind = "flux"

    def _denoise(self, latents, states, pooled, neg_states, neg_pooled, guidance_scale, do_cfg, attn_kwargs):
        height, width = latents.shape[-2:]
        latents = pack_flux(latents)
        img_ids = flux_image_ids(height, width, latents.device, latents.dtype)
        txt_ids = flux_text_ids(states.shape[1], latents.device, latents.dtype)

        def predict(latents, timestep, text_states, text_pooled):
            return self.transformer(
                hidden_states=latents,
                timestep=timestep / 1000,
                encoder_hidden_states=text_states,
                pooled_projections=text_pooled,
                txt_ids=txt_ids,
                img_ids=img_ids,
                joint_attention_kwargs=attn_kwargs,
                return_dict=False,
            )[0]

        latents = self._true_cfg(latents, predict, (states, pooled), (neg_states, neg_pooled), guidance_scale, do_cfg)
        return unpack_flux(latents, height, width)


class VideoTestbedPipeline(_TestbedPipeline):
    """HunyuanVideo-style sampling of the video testbed: true CFG as two calls per step, positive
    then negative, each with its text's key mask."""

    kind = VIDEO_KIND

    @property
    def frame_size(self) -> int:
        """Default frame height and width in pixels: the size this kind was trained on."""
        return VIDEO_FRAME_SIZES[self.kind]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_frames: int = 8,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ):
        """Generate one video per prompt. ``output_type``: "pil" (a list of frame lists), "pt" (tensor
        (N, F, 3, H, W) in [0, 1], float32), "np" (array (N, F, H, W, 3) in [0, 1]) or "latent" (the
        denoised sample, (N, 3, F, H, W) in the model's dtype and range). Text states' padding rows
        must be zero (as :mod:`.text` gives them): the key mask is read from them. ``height`` and
        ``width`` default to :attr:`frame_size`."""
        config = self.transformer.config
        height, width = height or self.frame_size, width or self.frame_size
        if num_frames % config.patch_size_t or height % config.patch_size or width % config.patch_size:
            raise ValueError(
                f"num_frames must be a multiple of {config.patch_size_t}, height and width of {config.patch_size}; "
                f"got {num_frames} frames of {height}x{width}"
            )
        _check_output_type(output_type)
        do_cfg = guidance_scale > 1.0
        states, pooled, neg_states, neg_pooled = self._embeddings(
            do_cfg,
            prompt,
            negative_prompt,
            prompt_embeds,
            pooled_prompt_embeds,
            negative_prompt_embeds,
            negative_pooled_prompt_embeds,
        )
        device, dtype = self._execution_device, self.transformer.dtype
        shape = (states.shape[0], config.in_channels, num_frames, height, width)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)

        def predict(latents, timestep, text_states, text_pooled):
            return self.transformer(
                hidden_states=latents,
                timestep=timestep,
                encoder_hidden_states=text_states,
                encoder_attention_mask=text_mask(text_states),
                pooled_projections=text_pooled,
                attention_kwargs=attention_kwargs,
                return_dict=False,
            )[0]

        latents = self._true_cfg(latents, predict, (states, pooled), (neg_states, neg_pooled), guidance_scale, do_cfg)
        self.maybe_free_model_hooks()
        if output_type == "latent":  # pixel space: the denoised sample before the [0, 1] mapping
            return HunyuanVideoPipelineOutput(frames=latents) if return_dict else (latents,)
        frames = (latents.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # (N, F, 3, H, W)
        if output_type == "pt":
            out = frames
        else:
            out = frames.permute(0, 1, 3, 4, 2).cpu().numpy()
            if output_type == "pil":
                out = [[PIL.Image.fromarray(a) for a in video] for video in (out * 255).round().astype(np.uint8)]
        return HunyuanVideoPipelineOutput(frames=out) if return_dict else (out,)


class LargeVideoTestbedPipeline(VideoTestbedPipeline):
    """The video testbed at 96x96 pixels a frame (``video-large``): sampled as the small one."""

    kind = LARGE_VIDEO_KIND


PIPELINES = {"sd3": SD3TestbedPipeline, "flux": FluxTestbedPipeline, VIDEO_KIND: VideoTestbedPipeline,
             LARGE_VIDEO_KIND: LargeVideoTestbedPipeline}


def load_pipeline(
    kind: str = "sd3",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    weights_dir: str | Path | None = None,
) -> SD3TestbedPipeline | FluxTestbedPipeline | VideoTestbedPipeline:
    """The trained testbed pipeline of ``kind`` ("sd3", "flux", "video" or "video-large") with the bundled weights
    (or those in ``weights_dir``: ``{kind}.safetensors`` and ``{kind}_train_config.json`` from train.py)."""
    if kind not in PIPELINES:
        raise ValueError(f"kind must be one of {tuple(PIPELINES)}, got {kind!r}")
    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    missing = [name for name in (f"{kind}_train_config.json", f"{kind}.safetensors") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"no trained {kind} testbed in {folder} (missing {', '.join(missing)}): train one with "
            f"`python -m ditfastattn.testbed.training.train --kind {kind} --out DIR` in a source checkout "
            "and pass weights_dir=DIR"
        )
    config = json.loads((folder / f"{kind}_train_config.json").read_text())
    transformer = build_transformer(kind, config["model_config"])
    transformer.load_state_dict(load_file(folder / f"{kind}.safetensors"))
    # Built in float32; cast only when asked (diffusers warns on every dtype cast).
    transformer.to(device).eval()
    if dtype != torch.float32:
        transformer.to(dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(**config["scheduler_config"])
    logger.info("loaded the %s testbed from %s", kind, folder)
    return PIPELINES[kind](transformer=transformer, scheduler=scheduler)
