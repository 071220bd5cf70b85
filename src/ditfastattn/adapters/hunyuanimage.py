"""HunyuanImage 2.1 (``HunyuanImageTransformer2DModel``): image first, then the text (masked).

Double-stream layers ``transformer_blocks.{i}.attn`` and single-stream layers
``single_transformer_blocks.{i}.attn`` attend over [image, text]: the MLLM text, with the glyph
(ByT5) text before it when given, real tokens first; the text mask reaches attention as a key mask.
The token refiner's text-only attention stays stock.
"""

from __future__ import annotations

from diffusers import HunyuanImageTransformer2DModel
from diffusers.models.transformers.transformer_hunyuanimage import HunyuanImageAttnProcessor

from .base import DOUBLE_THEN_SINGLE, DispatchFamily, patch_tokens


def image_segment(transformer, arguments):
    latents = arguments["hidden_states"]  # (B, C, H, W) or (B, C, F, H, W)
    return 0, patch_tokens(latents.shape[2:], transformer.config.patch_size)


# Its guider runs the negative prompt as a separate transformer call.
ADAPTER = DispatchFamily("hunyuanimage", HunyuanImageTransformer2DModel, (HunyuanImageAttnProcessor,),
                         DOUBLE_THEN_SINGLE, image_segment)
