"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): self-attention over the video alone.

Self-attention layers ``blocks.{i}.attn1`` see only video tokens (no global tokens: windows are
purely local). Cross-attention ``blocks.{i}.attn2`` to the text, and in image-to-video to the
image-encoder tokens before it, stays stock. Wan 2.2 A14B pipelines hand the low-noise steps to a
second expert, ``transformer_2``: a plan applied to the pipeline runs on both, each at its own steps
(``ditfastattn.runtime.install.experts_of``), and calibration scores both. Wan 2.2 TI2V
passes a timestep per token (0 on a conditioning first frame), so steps are counted by the last
token's. VACE and Animate are other transformer classes and are refused.
"""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from .base import DispatchFamily, video_first


def timestep(arguments):
    t = arguments.get("timestep")
    return t[:, -1] if torch.is_tensor(t) and t.dim() == 2 else t


# The negative prompt is a separate transformer call.
ADAPTER = DispatchFamily("wan", WanTransformer3DModel, (WanAttnProcessor,), (("blocks", "attn1", False),),
                         video_first, timestep=timestep)
