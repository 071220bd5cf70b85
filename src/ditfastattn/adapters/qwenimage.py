"""Qwen-Image (``QwenImageTransformer2DModel``): text (masked, up to 1024 tokens), then the image.

Layers ``transformer_blocks.{i}.attn`` attend over [text, image, edit references]; the text mask
reaches attention as a key mask. Qwen-Image-Edit appends reference images to the image stream
(``img_shapes`` lists them after the target): global tokens, as in FLUX.1 Kontext. Qwen-Image 2.1
(``QwenImage21Transformer2DModel``) attends block-causally, another pattern: not supported.
"""

from __future__ import annotations

import math

from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

from .base import DispatchFamily


def image_segment(transformer, arguments):
    shapes = arguments.get("img_shapes")
    image = arguments["hidden_states"].shape[1]
    if shapes:  # per batch element, the target's (frames, height, width) first
        first = shapes[0][0] if isinstance(shapes[0], list) else shapes[0]
        image = math.prod(first)
    return arguments["encoder_hidden_states"].shape[1], image


# True CFG: the negative prompt is a separate transformer call.
ADAPTER = DispatchFamily("qwenimage", QwenImageTransformer2DModel, (QwenDoubleStreamAttnProcessor2_0,),
                         (("transformer_blocks", "attn", True),), image_segment)
