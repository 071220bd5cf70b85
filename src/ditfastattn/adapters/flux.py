"""FLUX.1 and FLUX.1 Kontext (``FluxTransformer2DModel``): text, image, then Kontext's reference image.

Double-stream layers ``transformer_blocks.{i}.attn`` and single-stream layers
``single_transformer_blocks.{i}.attn`` both attend over [text, image, reference]. The reference
image (position ids with first coordinate 1) is a global segment, not part of the banded image:
an edit copies from the reference at the same spatial position, a whole image away in the
sequence, which a band around the query would cut; as global keys every query keeps it.
"""

from __future__ import annotations

from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from .base import DOUBLE_THEN_SINGLE, DispatchFamily, text_then_image

# True CFG runs the negative prompt as a separate transformer call, never inside the batch.
ADAPTER = DispatchFamily("flux", FluxTransformer2DModel, (FluxAttnProcessor,), DOUBLE_THEN_SINGLE, text_then_image)
