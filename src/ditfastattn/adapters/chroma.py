"""Chroma (``ChromaTransformer2DModel``): FLUX.1's layout and processors, with a masked text.

Its blocks turn the pipeline's token mask m into m_q & m_k (booleans) or m_q * m_k (the floats 0/1
that diffusers 0.42's pipeline passes, which SDPA adds to the scores: +1 between two real tokens);
ditfastattn reads either as padding with the same effect on every head, compressed or not.
"""

from __future__ import annotations

from diffusers import ChromaTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from .base import DOUBLE_THEN_SINGLE, DispatchFamily
from .flux import image_segment

# FLUX's layout and image grid (from raster img_ids), so tile windows run on Chroma too.
ADAPTER = DispatchFamily("chroma", ChromaTransformer2DModel, (FluxAttnProcessor,), DOUBLE_THEN_SINGLE, image_segment,
                         PAIR_MASKS=True)
