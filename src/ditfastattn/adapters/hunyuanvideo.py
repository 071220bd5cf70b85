"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): the video, then the text (masked, 256 tokens).

Dual-stream layers ``transformer_blocks.{i}.attn`` and single-stream layers
``single_transformer_blocks.{i}.attn`` both attend over [video, text]; the transformer turns the
text mask (real tokens first) into a key mask over the joint sequence. The image-to-video variants
(latent concat, first-frame token replace) keep that layout. The token refiner's text-only
attention stays stock; FramePack is another transformer class and is refused.
"""

from __future__ import annotations

from diffusers import HunyuanVideoTransformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

from .base import DOUBLE_THEN_SINGLE, DispatchFamily, video_first

ADAPTER = DispatchFamily(
    "hunyuanvideo", HunyuanVideoTransformer3DModel, (HunyuanVideoAttnProcessor2_0,), DOUBLE_THEN_SINGLE,
    video_first, CFG="a distilled guidance embedding; true CFG (a negative prompt) as separate transformer calls",
)
