"""FLUX.2 (``Flux2Transformer2DModel``): text, image, then the reference images of an edit.

Double-stream layers ``transformer_blocks.{i}.attn`` (``Flux2AttnProcessor``) and parallel
single-stream layers ``single_transformer_blocks.{i}.attn`` (``Flux2ParallelSelfAttnProcessor``)
attend over [text, image, references]. Reference images (position ids with a time coordinate of 10
and up) are global tokens, as in FLUX.1 Kontext (see :mod:`.flux`). The KV-cache processors of the
Klein pipelines are not stock here and are refused.
"""

from __future__ import annotations

from diffusers import Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor

from .base import DOUBLE_THEN_SINGLE, DispatchFamily, text_then_image

ADAPTER = DispatchFamily("flux2", Flux2Transformer2DModel, (Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor),
                         DOUBLE_THEN_SINGLE, text_then_image, CFG="a distilled guidance embedding (no CFG batch)")
