"""FLUX.1 and FLUX.1 Kontext (``FluxTransformer2DModel``): text, image, then Kontext's reference image.

Double-stream layers ``transformer_blocks.{i}.attn`` and single-stream layers
``single_transformer_blocks.{i}.attn`` both attend over [text, image, reference]. The reference
image (position ids with first coordinate 1) is a global segment, not part of the banded image:
an edit copies from the reference at the same spatial position, a whole image away in the
sequence, which a band around the query would cut; as global keys every query keeps it.

The packed image is a grid of rows x cols latent patches (2 x 2 latent pixels each), read from its
position ids, so tile windows can run on it.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from .base import DOUBLE_THEN_SINGLE, DispatchFamily, Segment, text_then_image


def raster_grid(ids: torch.Tensor, tokens: int) -> tuple[int, int, int] | None:
    """``(1, rows, cols)`` when the first ``tokens`` position ids ``(S, 3)`` (on the host) are
    ``(*, row, col)`` in raster order from (0, 0), as FLUX pipelines make them; else None (no grid:
    tile windows are then refused, bands run as before)."""
    if tokens == 0:
        return None
    ids = ids[:tokens, 1:3]
    rows, cols = int(ids[-1, 0]) + 1, int(ids[-1, 1]) + 1
    if rows * cols != tokens:
        return None
    expected = torch.cartesian_prod(torch.arange(rows), torch.arange(cols)).to(ids.dtype)
    return (1, rows, cols) if torch.equal(ids, expected) else None


def image_segment(transformer, arguments) -> Segment:
    """FLUX's layout (:func:`text_then_image`) with the image's grid from ``img_ids``: one copy of
    the ids to the host, the one read the layout needs anyway."""
    ids = arguments.get("img_ids")
    if ids is None:
        return text_then_image(transformer, arguments)
    ids = ids.cpu()
    if ids.dim() == 3:
        ids = ids[0]
    text, image = text_then_image(transformer, {**arguments, "img_ids": ids})
    grid = raster_grid(ids, image)
    return (text, image) if grid is None else (text, image, grid)


# True CFG runs the negative prompt as a separate transformer call, never inside the batch.
ADAPTER = DispatchFamily("flux", FluxTransformer2DModel, (FluxAttnProcessor,), DOUBLE_THEN_SINGLE, image_segment)
