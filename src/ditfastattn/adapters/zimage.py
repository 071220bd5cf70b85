"""Z-Image (``ZImageTransformer2DModel``): image first, then the caption, in one single stream.

Main layers ``layers.{i}.attention`` attend over [image, caption], each padded to a multiple of 32
tokens with learned pad tokens, then over the batch's longest sequence with a key mask. The noise
refiner's layers ``noise_refiner.{i}.attention`` attend over the image alone; the caption refiner's
are text-only and left stock. Its pipeline batches CFG as [conditional; unconditional], not the
order cfg_share reads, and passes a timestep that rises from 0 to 1 over the steps.
"""

from __future__ import annotations

from diffusers import ZImageTransformer2DModel
from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF, ZSingleStreamAttnProcessor

from .base import DispatchFamily, patch_tokens


def image_segment(transformer, arguments):
    images = arguments["x"]
    if any(isinstance(image, list) for image in images):
        return "Z-Image's omni mode (several images per prompt)"
    patch = (arguments.get("f_patch_size", 1), arguments.get("patch_size", 2), arguments.get("patch_size", 2))
    tokens = {-(-patch_tokens(image.shape[1:], patch) // SEQ_MULTI_OF) * SEQ_MULTI_OF for image in images}
    if len(tokens) > 1:
        return "images of different sizes in one batch"
    return 0, tokens.pop()


def timestep(arguments):
    return -arguments["t"]  # falling, as ditfastattn counts steps


ADAPTER = DispatchFamily(
    "zimage", ZImageTransformer2DModel, (ZSingleStreamAttnProcessor,),
    (("noise_refiner", "attention", False), ("layers", "attention", True)), image_segment,
    CFG="one batch [conditional; unconditional], the reverse of the order cfg_share reads", timestep=timestep,
)
