"""Tiny random diffusers models and pipelines (SD3, SD3.5 with dual attention, FLUX) for CPU tests."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from ditfastattn.runtime import LayerRuntime

# As the session started, before any test module was imported (the kernel tests set it for their own tests only).
TRITON_INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET")

TEXT_LEN = 7
POOLED = 16
LATENT = 4


def tiny_sd3(dual: bool = False, seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=LATENT,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=3,
        joint_attention_dim=16,
        caption_projection_dim=24,
        pooled_projection_dim=POOLED,
        out_channels=LATENT,
        pos_embed_max_size=32,
        dual_attention_layers=(0,) if dual else (),
        qk_norm="rms_norm" if dual else None,
    ).eval()


def tiny_flux(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT * 4,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=3,
        joint_attention_dim=16,
        pooled_projection_dim=POOLED,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        latent_channels=LATENT,
        norm_num_groups=4,
        layers_per_block=1,
        shift_factor=0.0,
        scaling_factor=1.0,
    ).eval()


def embeds(batch: int = 1, seed: int = 1) -> dict[str, torch.Tensor]:
    """Precomputed prompt embeddings: the tiny pipelines have no text encoders."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(batch, TEXT_LEN, 16, generator=generator),
        "pooled_prompt_embeds": torch.randn(batch, POOLED, generator=generator),
    }


def negative_embeds(batch: int = 1, seed: int = 2) -> dict[str, torch.Tensor]:
    return {f"negative_{key}": value for key, value in embeds(batch, seed).items()}


def sd3_pipeline(dual: bool = False) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3(dual),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def flux_pipeline() -> FluxPipeline:
    return FluxPipeline(
        transformer=tiny_flux(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )


# 64 x 64 pixels -> 64 x 64 latents (the 1-level tiny VAE keeps the size) -> 32 x 32 = 1024 image tokens.
HEIGHT = WIDTH = 64


@pytest.fixture(params=["sd3", "sd35", "flux"])
def pipeline_kind(request):
    return request.param


def make_pipeline(kind: str):
    return {"sd3": lambda: sd3_pipeline(False), "sd35": lambda: sd3_pipeline(True), "flux": flux_pipeline}[kind]()


def run_pipeline(pipe, steps: int = 3, batch: int = 1, seed: int = 0, **kwargs) -> torch.Tensor:
    extra = dict(embeds(batch))
    if isinstance(pipe, StableDiffusion3Pipeline):
        extra.update(negative_embeds(batch))
        extra.setdefault("guidance_scale", 4.0)
    extra = {"height": HEIGHT, "width": WIDTH, **extra, **kwargs}
    return pipe(
        num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt", **extra
    ).images


@pytest.fixture
def recorder(monkeypatch):
    """Records every layer call: step, call slot, inputs and the output the runtime returned."""
    records = []
    attend = LayerRuntime.attend

    def recording_attend(self, q, k, v, **kwargs):
        out = attend(self, q, k, v, **kwargs)
        records.append(
            {
                "layer": self.name,
                "step": self.session.step,
                "call": self.session.call,
                "q": q.clone(), "k": k.clone(), "v": v.clone(),
                "text_start": self.geometry.text_start, "text_len": self.geometry.text_len,
                "layout": self.geometry.layout, "padding": self.geometry.padding,
                "given_layout": kwargs.get("layout"),  # as the adapter gave it (with the video grid)
                "out": out.clone(),
            }
        )
        return out

    monkeypatch.setattr(LayerRuntime, "attend", recording_attend)
    return records


def pytest_collection_modifyitems(session, config, items):
    """The Triton interpreter tests run last: the interpreter patches Triton's language modules in
    ways that outlive it (Gluon's sm_90 build then fails), whatever order the files were given in."""
    items.sort(key=lambda item: item.path.name in ("test_triton_kernel.py", "test_tiles_triton.py"))
