"""Per-head compression methods, named by strings in plans.

=============================  ==============================================================
``full``                       exact attention
``cache``                      skip the head; reuse its output from the last step that computed it
``arrow:<f>``                  arrow attention, image band of total width f x image tokens
``arrow_residual:<f>``         arrow, plus the residual (full - arrow) kept from the head's last
                               ``full`` step
``cfg_share``                  compute the conditional half of a CFG batch only (full attention)
                               and reuse it for the unconditional half
``cfg_share+arrow:<f>``        the same, with arrow attention on the conditional half
``tile:<ft>,<fh>,<fw>``        tile window (images and video with a known grid): global rows and
                               columns kept, image queries see the tiles within a half-width of
                               f x (tiles - 1) along frames, rows and cols (0: own tiles only,
                               1: the whole axis); 0 <= f <= 1
=============================  ==============================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from ._geometry import MODE_FULL, MODE_SKIP, TileGrid, density, tile_mode, window_blocks

_NUMBER = r"[0-9.eE+-]+"
_NAME = re.compile(
    rf"^(?:(?P<cfg>cfg_share)(?:\+arrow:(?P<cfg_f>{_NUMBER}))?|full|cache|(?P<kind>arrow|arrow_residual):(?P<f>{_NUMBER})"
    rf"|tile:(?P<tile>{_NUMBER},{_NUMBER},{_NUMBER}))$"
)


@dataclass(frozen=True)
class Method:
    kind: str  # "full", "cache", "arrow", "arrow_residual" or "tile"
    fraction: float | None = None
    cfg_share: bool = False
    window: tuple[float, float, float] | None = None  # a tile window's fractions (frames, rows, cols)

    @property
    def name(self) -> str:
        if self.window is not None:
            return "tile:" + ",".join(f"{f:g}" for f in self.window)
        base = self.kind if self.fraction is None else f"{self.kind}:{self.fraction:g}"
        if not self.cfg_share:
            return base
        return "cfg_share" if self.kind == "full" else f"cfg_share+{base}"

    @property
    def computes(self) -> bool:
        """Whether the head's output is computed at this step (everything but ``cache``)."""
        return self.kind != "cache"

    def mode(self, num_image_tokens: int, tiles: TileGrid | None = None) -> int:
        """Integer head mode of the op for the computed part of this method; a tile window needs
        the image's ``tiles`` (its grid and tile shape)."""
        if self.kind == "cache":
            return MODE_SKIP
        if self.kind == "full":
            return MODE_FULL
        if self.kind == "tile":
            if tiles is None:
                raise ValueError(f"{self.name} needs the image grid (frames x rows x cols), which this call does not "
                                 "give: its model family passes none, so use arrow:<f> windows there")
            return tile_mode(*tiles.windows(self.window))
        return window_blocks(self.fraction, num_image_tokens)

    def cost(self, num_image_tokens: int, text_len: int, tiles: TileGrid | None = None) -> float:
        """Share of a full head's attention FLOPs this method computes (CFG sharing halves it)."""
        share = density(self.mode(num_image_tokens, tiles), num_image_tokens, text_len, tiles)
        return share / 2.0 if self.cfg_share else share


def _fraction(text: str, name: str, low_open: bool = True) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        raise ValueError(f"unknown method {name!r}: a window fraction must be a number in {'(' if low_open else '['}0, 1]")
    return value


@lru_cache(maxsize=None)
def parse_method(name: str) -> Method:
    """Parse a method name (see the module docstring); raises ValueError naming the valid forms."""
    match = _NAME.match(name.strip()) if isinstance(name, str) else None
    if match is None:
        raise ValueError(
            f"unknown method {name!r}; valid: 'full', 'cache', 'arrow:<f>', 'arrow_residual:<f>', "
            "'cfg_share', 'cfg_share+arrow:<f>' with 0 < f <= 1, 'tile:<ft>,<fh>,<fw>' with 0 <= f <= 1"
        )
    if match.group("tile"):
        return Method("tile", window=tuple(_fraction(part, name, low_open=False) for part in match.group("tile").split(",")))
    if match.group("cfg"):
        if match.group("cfg_f") is None:
            return Method("full", None, cfg_share=True)
        return Method("arrow", _fraction(match.group("cfg_f"), name), cfg_share=True)
    if match.group("kind"):
        return Method(match.group("kind"), _fraction(match.group("f"), name))
    return Method(name.strip())


def canonical(name: str) -> str:
    return parse_method(name).name
