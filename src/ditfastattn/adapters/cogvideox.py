"""CogVideoX 1.0 / 1.5 (``CogVideoXTransformer3DModel``): the text (226 tokens), then the video.

Layers ``transformer_blocks.{i}.attn1`` attend over [text, video]. Its processor calls
``F.scaled_dot_product_attention`` itself (q, k, v as (B, H, S, D)), not diffusers' dispatch
function, so ditfastattn intercepts that name in the processor's module instead (see
:mod:`.dispatch`); the fused-projection processor is refused. CogVideoX 1.5 also patches time.
"""

from __future__ import annotations

from diffusers import CogVideoXTransformer3DModel
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

from .base import DispatchFamily, video_segment


def image_segment(transformer, arguments):
    frames, _, height, width = arguments["hidden_states"].shape[1:]  # latents (B, F, C, H, W)
    return video_segment(arguments["encoder_hidden_states"].shape[1], (frames, height, width), transformer.config)


ADAPTER = DispatchFamily(
    "cogvideox", CogVideoXTransformer3DModel, (CogVideoXAttnProcessor2_0,), (("transformer_blocks", "attn1", True),),
    image_segment, CFG="one batch [unconditional; conditional]", CFG_IN_BATCH=True, CALLS="sdpa",
)
