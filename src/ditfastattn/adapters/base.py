"""The adapter contract, and the helpers that keep a dispatch family's adapter a page of metadata.

An adapter is a module that satisfies :class:`DispatchAdapter` (its processors call diffusers'
``dispatch_attention_fn``, which ditfastattn intercepts: FLUX.1, FLUX.2, Chroma, Qwen-Image,
Z-Image, HunyuanImage 2.1, HunyuanVideo and 1.5, Wan; or torch's SDPA, intercepted the same way:
CogVideoX) or :class:`ProcessorAdapter` (its processors call SDPA themselves and it brings its own
processor: SD3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from ..model import LayerSpec, ModelSpec

# An image segment: (start, length), or (start, length, (frames, rows, cols)) with its grid.
Segment = tuple[int, int] | tuple[int, int, tuple[int, int, int]]


class Adapter(Protocol):
    """What every family states."""

    FAMILY: str  # the short name plans store
    MODEL_CLASS: str  # the transformer class, for messages
    # Whether its pipelines run classifier-free guidance as one batch [unconditional; conditional],
    # the order cfg_share needs; CFG says how they run it, for messages.
    CFG_IN_BATCH: bool
    CFG: str

    def matches(self, transformer) -> bool:
        """Whether ``transformer`` belongs to this family."""

    def describe(self, transformer) -> ModelSpec:
        """The attention layers a plan covers, in execution order."""

    def stock_processor_types(self) -> tuple[type, ...]:
        """The diffusers processors ditfastattn works with (others are refused at apply)."""


class DispatchAdapter(Adapter, Protocol):
    """A family whose stock processors call ``dispatch_attention_fn`` (or SDPA): metadata only."""

    # What the processors call attention by: "dispatch" (diffusers' ``dispatch_attention_fn``, q, k,
    # v as (B, S, H, D)) or "sdpa" (``F.scaled_dot_product_attention``, (B, H, S, D)).
    CALLS: str
    # Whether attention masks are m_q & m_k or m_q * m_k of a token mask m, (B, 1, S, S), as
    # Chroma's blocks build them; otherwise masks are key masks, (B, 1, 1, S) or (B, S).
    PAIR_MASKS: bool

    def timestep(self, arguments: dict[str, Any]):
        """The step's timestep from one transformer call's arguments (by name); it must fall from
        step to step within a generation (ditfastattn counts steps by it)."""

    def image_segment(self, transformer, arguments: dict[str, Any]) -> Segment | str:
        """``(start, length)`` of the image tokens in the joint sequence of one call of ``transformer``
        (every other token is global: text, reference images, padding), optionally with their
        ``grid`` as a third item (frames, rows, cols of latent patches in raster order), or a sentence
        saying why this call has none ditfastattn can use (its joint layers then run only the stock
        attention). Image-only layers use the grid when the segment is their whole sequence."""


class ProcessorAdapter(Adapter, Protocol):
    """A family that calls SDPA itself: ditfastattn replaces its processors."""

    def make_processor(self, layer, original):
        """A processor computing what ``original`` does, with the attention itself done by
        ``layer.attend(q, k, v, text_start=, text_len=, dense=)`` (q, k, v as (B, S, H, D))."""


def timestep(arguments: dict[str, Any]):
    """The ``timestep`` argument: the default :meth:`DispatchAdapter.timestep`."""
    return arguments.get("timestep")


def text_then_image(transformer, arguments: dict[str, Any]) -> tuple[int, int]:
    """FLUX's layout: text first, then the image up to the first position id of another image
    (reference images follow the target in FLUX.1 Kontext and FLUX.2)."""
    ids = arguments.get("img_ids")
    image = arguments["hidden_states"].shape[1] if ids is None else target_tokens(ids)
    return arguments["encoder_hidden_states"].shape[1], image


# The attention layers of the double-stream, then single-stream, models (FLUX and its kin).
DOUBLE_THEN_SINGLE = (("transformer_blocks", "attn", True), ("single_transformer_blocks", "attn", True))


@dataclass(frozen=True)
class DispatchFamily:
    """A :class:`DispatchAdapter` as data: the transformer class, its stock processors, its
    attention layers (see :func:`model_spec`), where a call's image tokens are, and how its
    pipelines run guidance."""

    FAMILY: str
    transformer: type
    processors: tuple[type, ...]
    layers: tuple[tuple[str, str, bool], ...]
    image_segment: Callable[[Any, dict[str, Any]], Segment | str]
    CFG: str = "separate transformer calls"
    CFG_IN_BATCH: bool = False
    PAIR_MASKS: bool = False
    timestep: Callable[[dict[str, Any]], Any] = timestep
    CALLS: str = "dispatch"

    @property
    def MODEL_CLASS(self) -> str:  # noqa: N802 (the contract's name)
        return self.transformer.__name__

    def matches(self, transformer) -> bool:
        return isinstance(transformer, self.transformer)

    def describe(self, transformer) -> ModelSpec:
        return model_spec(self.FAMILY, transformer, self.layers)

    def stock_processor_types(self) -> tuple[type, ...]:
        return self.processors


def model_spec(family: str, transformer, groups: Sequence[tuple[str, str, bool]]) -> ModelSpec:
    """The layers of ``transformer``: for each ``(block list, attention attribute, joint)`` group,
    in order, every block's attention module; ``joint`` layers attend over global tokens too."""
    layers = []
    for blocks, attribute, joint in groups:
        for index, block in enumerate(getattr(transformer, blocks)):
            attn = getattr(block, attribute)
            layers.append(LayerSpec(f"{blocks}.{index}.{attribute}", attn.heads, attn.inner_dim // attn.heads, joint))
    return ModelSpec(family, type(transformer).__name__, tuple(layers))


def target_tokens(ids: torch.Tensor) -> int:
    """Tokens of the generated image in position ids ``(S, C)`` (or ``(B, S, C)``) whose first
    coordinate tells images apart: FLUX.1 Kontext and FLUX.2 put reference images after the target
    with another first coordinate. One host read."""
    if ids.dim() == 3:
        ids = ids[0]
    first = ids[:, 0]
    return int((first == first[0]).long().cumprod(0).sum()) if first.numel() else 0


def patch_tokens(sizes: Sequence[int], patch: Sequence[int]) -> int:
    """Tokens of a latent of ``sizes`` cut into patches of ``patch`` (per dimension)."""
    return math.prod(size // p for size, p in zip(sizes, patch))


def video_segment(start: int, sizes: Sequence[int], config) -> Segment:
    """The segment of a video latent of ``sizes`` (frames, height, width), its patches from
    ``start`` on in raster order; the patch from a transformer's ``config``: ``patch_size`` as a
    triple (Wan), or spatial with ``patch_size_t`` (None or absent: 1)."""
    p = config.patch_size
    patch = tuple(p) if isinstance(p, (tuple, list)) else (getattr(config, "patch_size_t", None) or 1, p, p)
    grid = tuple(size // q for size, q in zip(sizes, patch))
    return start, math.prod(grid), grid


def video_first(transformer, arguments: dict[str, Any]) -> Segment:
    """The segment of families whose sequence starts with the video, latents (B, C, F, H, W)."""
    return video_segment(0, arguments["hidden_states"].shape[2:], transformer.config)
