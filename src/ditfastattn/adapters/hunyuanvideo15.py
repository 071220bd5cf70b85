"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``): the video, then the conditions (masked).

Layers ``transformer_blocks.{i}.attn`` attend over [video, conditions]: the SigLIP image tokens
(all padding in text-to-video), the ByT5 glyph text and the MLLM text, their real tokens first,
then their padding. Its processor builds the token-pair mask m_q & m_k from the condition mask,
which ditfastattn reads as padding (padded queries attend to nothing, as in stock diffusers). The
token refiner's text-only attention stays stock.
"""

from __future__ import annotations

from diffusers import HunyuanVideo15Transformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

from .base import DispatchFamily, video_first

# Its guider runs the negative prompt as a separate transformer call.
ADAPTER = DispatchFamily("hunyuanvideo15", HunyuanVideo15Transformer3DModel, (HunyuanVideo15AttnProcessor2_0,),
                         (("transformer_blocks", "attn", True),), video_first, PAIR_MASKS=True)
