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

from .base import model_spec, target_tokens, timestep  # noqa: F401  (timestep: the adapter's)

FAMILY = "flux"
MODEL_CLASS = "FluxTransformer2DModel"
# True CFG runs the negative prompt as a separate transformer call, never inside the batch.
CFG_IN_BATCH = False
PAIR_MASKS = False


def matches(transformer) -> bool:
    return isinstance(transformer, FluxTransformer2DModel)


def describe(transformer):
    return model_spec(FAMILY, transformer, [("transformer_blocks", "attn", True),
                                            ("single_transformer_blocks", "attn", True)])


def stock_processor_types() -> tuple[type, ...]:
    return (FluxAttnProcessor,)


def image_segment(arguments):
    """Text first; the target image then runs up to the first position id of another image."""
    text = arguments["encoder_hidden_states"].shape[1]
    ids = arguments.get("img_ids")
    return text, arguments["hidden_states"].shape[1] if ids is None else target_tokens(ids)
