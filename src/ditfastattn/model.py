"""What ditfastattn knows of a model, as plain data: its attention layers and its token layout.

Nothing here imports torch, diffusers or the adapters: plans store a :class:`ModelSpec`, the op and
the runtime take a :class:`TokenLayout`. The adapters register the one function that describes a
live transformer (:func:`describe`), so that code holding only plain data never imports them.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from ._geometry import TileGrid, positive_triple


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class LayerSpec:
    """One attention layer: its module path, heads, head dim, and whether it attends over text
    (more generally: over global tokens; image-only layers such as SD3.5's ``attn2`` do not)."""

    name: str
    heads: int
    head_dim: int
    text: bool

    def __post_init__(self):
        if not (isinstance(self.name, str) and self.name):
            raise ValueError(f"a layer's name must be a non-empty string; got {self.name!r}")
        for field in ("heads", "head_dim"):
            if not (_is_int(getattr(self, field)) and getattr(self, field) > 0):
                raise ValueError(f"layer {self.name}: {field} must be a positive int; got {getattr(self, field)!r}")
        if not isinstance(self.text, bool):
            raise ValueError(f"layer {self.name}: text must be true or false; got {self.text!r}")


@dataclass(frozen=True)
class ModelSpec:
    """What a plan must match: the model class and its attention layers in execution order."""

    family: str
    model_class: str
    layers: tuple[LayerSpec, ...]

    def __post_init__(self):
        if not (isinstance(self.family, str) and isinstance(self.model_class, str)):
            raise ValueError(f"family and class must be strings; got {self.family!r}, {self.model_class!r}")
        if not self.layers or not all(isinstance(layer, LayerSpec) for layer in self.layers):
            raise ValueError("a model needs at least one attention layer (LayerSpec)")
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError(f"layer names must be unique; {sorted({n for n in names if names.count(n) > 1})} repeat")

    def describe(self) -> str:
        heads = sorted({layer.heads for layer in self.layers})
        dims = sorted({layer.head_dim for layer in self.layers})
        return (
            f"{self.model_class} with {len(self.layers)} attention layers "
            f"({'/'.join(map(str, heads))} heads of dim {'/'.join(map(str, dims))})"
        )

    def to_json(self) -> dict:
        return {"family": self.family, "class": self.model_class, "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_json(cls, data: dict) -> "ModelSpec":
        return cls(data["family"], data["class"], tuple(LayerSpec(**layer) for layer in data["layers"]))


@dataclass(frozen=True)
class TokenLayout:
    """Where the image tokens of one joint attention sequence of ``seq_len`` tokens lie.

    One contiguous image segment ``[image_start, image_start + image_len)``; every other token is
    global (text, reference-image tokens): global queries attend to every key and every query
    attends to the global keys. Arrow attention bands the image segment only, in blocks counted
    from ``image_start``. The global tokens may sit before the image, after it, or both (FLUX.1
    Kontext: text, image, reference image).

    ``grid`` (optional) is the image segment as frames x rows x cols latent patches in raster order;
    it lets heads run tile windows (:func:`ditfastattn.ops.tile_mode`) over tiles of ``tile`` patches
    (when None, of 2 x 8 x 8 (video only), 1 x 8 x 16 and 1 x 16 x 8 the first that leaves the
    fewest pad slots at the grid's edges). Band, full and skip heads ignore both.
    """

    seq_len: int
    image_start: int
    image_len: int
    grid: tuple[int, int, int] | None = None
    tile: tuple[int, int, int] | None = None

    def __post_init__(self):
        for field in ("seq_len", "image_start", "image_len"):
            if not (_is_int(getattr(self, field)) and getattr(self, field) >= 0):
                raise ValueError(f"{field} must be an int >= 0; got {getattr(self, field)!r}")
        if self.image_start + self.image_len > self.seq_len:
            raise ValueError(
                f"the image segment [{self.image_start}, {self.image_start + self.image_len}) runs past the "
                f"{self.seq_len} tokens of the sequence"
            )
        if self.grid is not None:
            object.__setattr__(self, "grid", positive_triple(self.grid, "a grid"))
            if math.prod(self.grid) != self.image_len:
                raise ValueError(f"the grid {self.grid} holds {math.prod(self.grid)} patches; the image segment has "
                                 f"{self.image_len} tokens")
        if self.tile is not None:
            if self.grid is None:
                raise ValueError("a tile shape needs the image grid (grid=(frames, rows, cols))")
            object.__setattr__(self, "tile", TileGrid(self.grid, self.tile).tile)

    @classmethod
    def from_text(cls, seq_len: int, text_start: int, text_len: int) -> "TokenLayout":
        """Text ``[text_start, text_start + text_len)`` at the start or the end, image the rest."""
        if not (_is_int(text_start) and _is_int(text_len)):
            raise TypeError(f"text_start and text_len must be ints; got {text_start!r}, {text_len!r}")
        if not 0 <= text_len <= seq_len:
            raise ValueError(f"text_len must be in [0, {seq_len}]; got {text_len}")
        if text_start not in (0, seq_len - text_len):
            raise ValueError(
                f"text tokens must sit at the start or the end so image tokens are contiguous: "
                f"text_start must be 0 or {seq_len - text_len}, got {text_start}; give several global "
                "segments as segments=[(start, length), ...]"
            )
        return cls(seq_len, text_len if text_start == 0 else 0, seq_len - text_len)

    @classmethod
    def from_segments(cls, seq_len: int, segments: Sequence[tuple[int, int]]) -> "TokenLayout":
        """Global ``segments`` as ``(start, length)`` pairs; the tokens they leave must be one run."""
        if not _is_int(seq_len) or seq_len < 0:
            raise ValueError(f"seq_len must be an int >= 0; got {seq_len!r}")
        try:
            pairs = sorted((start, length) for start, length in segments)
        except (TypeError, ValueError):
            raise TypeError(f"segments must be (start, length) pairs of ints; got {segments!r}") from None
        gaps, position = [], 0
        for start, length in pairs:
            if not (_is_int(start) and _is_int(length) and start >= 0 and length >= 0 and start + length <= seq_len):
                raise ValueError(f"segment ({start!r}, {length!r}) does not fit in {seq_len} tokens")
            if start < position:
                raise ValueError(f"global segments overlap: {pairs}")
            gaps.append((position, start - position))
            position = start + length
        gaps = [gap for gap in gaps + [(position, seq_len - position)] if gap[1]]
        if len(gaps) > 1:
            raise ValueError(
                f"the tokens outside the global segments {pairs} must be one contiguous image segment; "
                "list every global segment (text and reference images)"
            )
        start, length = gaps[0] if gaps else (seq_len, 0)
        return cls(seq_len, start, length)

    @property
    def image_end(self) -> int:
        return self.image_start + self.image_len

    @property
    def num_global(self) -> int:
        return self.seq_len - self.image_len

    @property
    def segments(self) -> tuple[tuple[int, int], ...]:
        """The non-empty global segments as ``(start, length)``: before the image, after it."""
        pairs = ((0, self.image_start), (self.image_end, self.seq_len - self.image_end))
        return tuple(pair for pair in pairs if pair[1])

    def tile_grid(self) -> TileGrid | None:
        """The grid cut into this layout's tiles (the default shape when it names none), or None
        without a grid."""
        if self.grid is None:
            return None
        return _tile_grid(self.grid, self.tile)

    def text_range(self) -> tuple[int, int] | None:
        """``(text_start, text_len)`` when the global tokens are one segment at the start or the end
        (the op's original form), else None."""
        if self.image_end == self.seq_len:
            return 0, self.image_start
        if self.image_start == 0:
            return self.image_len, self.seq_len - self.image_len
        return None


_describer: Callable[[Any], ModelSpec] | None = None


def register_describer(describer: Callable[[Any], ModelSpec]) -> None:
    """Set the function that describes a live transformer (the adapters register theirs)."""
    global _describer
    _describer = describer


def describe(model) -> ModelSpec:
    """``model`` if it is a :class:`ModelSpec`, else the description of the transformer (or
    pipeline) it is; unsupported transformers raise TypeError naming the supported ones."""
    if isinstance(model, ModelSpec):
        return model
    if _describer is None:
        raise RuntimeError("no model adapters are registered; import ditfastattn (not only ditfastattn.model)")
    return _describer(model)


@functools.lru_cache(maxsize=256)
def _tile_grid(grid: tuple[int, int, int], tile: tuple[int, int, int] | None) -> TileGrid:
    # Asked for at every attention call of a family with a grid: built (and checked) once per shape.
    return TileGrid(grid, tile)


def token_layout(seq_len: int, image_start: int, image_len: int,
                 grid: Sequence[int] | TileGrid | None = None) -> TokenLayout:
    """``TokenLayout(seq_len, image_start, image_len, grid)``, built and checked once per shape: the
    adapters ask for their call's layout at every attention call. ``grid`` as a :class:`TileGrid`
    brings its tile shape (a plan's); as (frames, rows, cols), the default one."""
    if isinstance(grid, TileGrid):
        return _token_layout(seq_len, image_start, image_len, grid.grid, grid.tile)
    return _token_layout(seq_len, image_start, image_len, None if grid is None else tuple(grid), None)


@functools.lru_cache(maxsize=256)
def _token_layout(seq_len: int, image_start: int, image_len: int, grid: tuple[int, int, int] | None,
                  tile: tuple[int, int, int] | None) -> TokenLayout:
    return TokenLayout(seq_len, image_start, image_len, grid, tile)
