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
``pool:<p>``                   pooled keys (images and video with a known grid): global rows
                               and columns kept, image queries see the image keys and values
                               averaged over each whole p x p patch of a frame (weighted p x p),
                               and the tokens of partial patches at the grid's edges; p >= 2
=============================  ==============================================================

Each kind is one entry of :data:`KINDS`: its name forms, what it reads besides the call's q, k and
v, the op mode it computes and its colour in plan pictures. The runtime, calibration and the
pictures ask a :class:`Method` these questions rather than compare kind names, so a new method is
one entry (plus its op mode, if it computes a new geometry).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from ._geometry import MAX_POOL_FACTOR, MODE_FULL, MODE_SKIP, TileGrid, density, pool_mode, tile_mode, window_blocks

# What a method reads besides the call's q, k and v.
PREVIOUS_OUTPUT = "the head's output at its last computed step"
RESIDUAL = "the residual (full - arrow) kept at the head's last full step"
CFG_BATCH = "the conditional half of the CFG batch, for the unconditional half"

# Placeholders of the name forms: a window fraction in (0, 1], a tile window's three in [0, 1], a
# pool factor (an int >= 2).
FRACTION = "<f>"
WINDOW = "<ft>,<fh>,<fw>"
FACTOR = "<p>"
_NUMBER = r"[0-9.eE+-]+"


def _full(method: Method, num_image_tokens: int, tiles: TileGrid | None) -> int:
    return MODE_FULL


def _skip(method: Method, num_image_tokens: int, tiles: TileGrid | None) -> int:
    return MODE_SKIP


def _band(method: Method, num_image_tokens: int, tiles: TileGrid | None) -> int:
    """An arrow band of the method's fraction; no fraction (plain ``cfg_share``) is full attention."""
    return MODE_FULL if method.fraction is None else window_blocks(method.fraction, num_image_tokens)


def _tile(method: Method, num_image_tokens: int, tiles: TileGrid | None) -> int:
    if tiles is None:
        raise ValueError(f"{method.name} needs the image grid (frames x rows x cols), which this call does not "
                         "give: its model family passes none, so use arrow:<f> windows there")
    return tile_mode(*tiles.windows(method.window))


def _pool(method: Method, num_image_tokens: int, tiles: TileGrid | None) -> int:
    if tiles is None:
        raise ValueError(f"{method.name} needs the image grid (frames x rows x cols), which this call does not "
                         "give: its model family passes none, so use arrow:<f> windows there")
    return pool_mode(method.factor)


@dataclass(frozen=True)
class MethodKind:
    """One kind of method: everything the rest of the package needs to know about it."""

    name: str
    forms: tuple[str, ...]  # its names, with FRACTION / WINDOW placeholders for the parameters
    geometry: Callable[[Method, int, TileGrid | None], int]  # the op mode of what it computes
    colour: tuple[float, float, float]  # RGB in [0, 1] of its share in plan pictures, labelled by name
    reads: str | None = None  # PREVIOUS_OUTPUT, RESIDUAL, CFG_BATCH or None: q, k and v only
    computes: bool = True  # False: the head's output is not computed at this step
    exact: bool = False  # the head's exact output for the whole batch (what a residual is taken against)
    needs_grid: bool = False  # its geometry needs the image's grid

    def match(self, name: str) -> Method | None:
        """The method ``name`` is one of this kind's forms of, else None (a fraction out of range raises)."""
        for form in self.forms:
            pattern = re.escape(form).replace(re.escape(FRACTION), f"(?P<f>{_NUMBER})")
            pattern = pattern.replace(re.escape(WINDOW), f"(?P<w>{_NUMBER},{_NUMBER},{_NUMBER})")
            pattern = pattern.replace(re.escape(FACTOR), f"(?P<p>{_NUMBER})")
            found = re.fullmatch(pattern, name)
            if found is None:
                continue
            groups = found.groupdict()
            fraction = _fraction(groups["f"], name) if groups.get("f") is not None else None
            window = None
            if groups.get("w") is not None:
                window = tuple(_fraction(part, name, low_open=False) for part in groups["w"].split(","))
            factor = _factor(groups["p"], name) if groups.get("p") is not None else None
            return Method(self.name, fraction, window, factor)
        return None

    def format(self, method: Method) -> str:
        """The name of ``method``: the form whose placeholders its parameters fill."""
        for form in self.forms:
            if ((FRACTION in form) != (method.fraction is not None) or (WINDOW in form) != (method.window is not None)
                    or (FACTOR in form) != (method.factor is not None)):
                continue
            if method.fraction is not None:
                form = form.replace(FRACTION, f"{method.fraction:g}")
            if method.window is not None:
                form = form.replace(WINDOW, ",".join(f"{f:g}" for f in method.window))
            if method.factor is not None:
                form = form.replace(FACTOR, str(method.factor))
            return form
        raise ValueError(f"{self.name} has no name form for fraction {method.fraction}, window {method.window} and "
                         f"factor {method.factor}")


KINDS: dict[str, MethodKind] = {
    kind.name: kind
    for kind in (
        MethodKind("full", ("full",), _full, (0.85, 0.85, 0.85), exact=True),
        MethodKind("arrow", (f"arrow:{FRACTION}",), _band, (0.20, 0.45, 0.85)),
        MethodKind("arrow_residual", (f"arrow_residual:{FRACTION}",), _band, (0.55, 0.30, 0.80), reads=RESIDUAL),
        MethodKind("cache", ("cache",), _skip, (0.95, 0.55, 0.10), reads=PREVIOUS_OUTPUT, computes=False),
        MethodKind("cfg_share", ("cfg_share", f"cfg_share+arrow:{FRACTION}"), _band, (0.20, 0.70, 0.35),
                   reads=CFG_BATCH),
        MethodKind("tile", (f"tile:{WINDOW}",), _tile, (0.85, 0.25, 0.45), needs_grid=True),
        MethodKind("pool", (f"pool:{FACTOR}",), _pool, (0.10, 0.65, 0.65), needs_grid=True),
    )
}


@dataclass(frozen=True)
class Method:
    kind: str  # a key of KINDS
    fraction: float | None = None  # an arrow window's fraction
    window: tuple[float, float, float] | None = None  # a tile window's fractions (frames, rows, cols)
    factor: int | None = None  # a pool head's patch side

    @property
    def spec(self) -> MethodKind:
        return KINDS[self.kind]

    @property
    def name(self) -> str:
        return self.spec.format(self)

    @property
    def computes(self) -> bool:
        """Whether the head's output is computed at this step (everything but ``cache``)."""
        return self.spec.computes

    @property
    def exact(self) -> bool:
        """Whether the head gets its exact output for the whole batch (``full``)."""
        return self.spec.exact

    @property
    def reads_beyond_qkv(self) -> bool:
        """Whether it reads anything besides the call's q, k and v (:data:`KINDS`' ``reads``)."""
        return self.spec.reads is not None

    @property
    def reads_previous_output(self) -> bool:
        return self.spec.reads == PREVIOUS_OUTPUT

    @property
    def reads_residual(self) -> bool:
        return self.spec.reads == RESIDUAL

    @property
    def shares_cfg(self) -> bool:
        return self.spec.reads == CFG_BATCH

    @property
    def needs_grid(self) -> bool:
        return self.spec.needs_grid

    def mode(self, num_image_tokens: int, tiles: TileGrid | None = None) -> int:
        """Integer head mode of the op for the computed part of this method; a tile window and
        pooled keys need the image's ``tiles`` (its grid and tile shape)."""
        return _mode(self, num_image_tokens, tiles)

    def cost(self, num_image_tokens: int, text_len: int, tiles: TileGrid | None = None) -> float:
        """Share of a full head's attention FLOPs this method computes (CFG sharing halves it)."""
        return _cost(self, num_image_tokens, text_len, tiles)


# Calibration asks for the same few methods' modes and costs at every layer and step, from the host
# path a GPU waits on; their block geometry is worth computing once.
@lru_cache(maxsize=4096)
def _mode(method: Method, num_image_tokens: int, tiles: TileGrid | None) -> int:
    return method.spec.geometry(method, num_image_tokens, tiles)


@lru_cache(maxsize=4096)
def _cost(method: Method, num_image_tokens: int, text_len: int, tiles: TileGrid | None) -> float:
    share = density(method.mode(num_image_tokens, tiles), num_image_tokens, text_len, tiles)
    return share / 2.0 if method.shares_cfg else share


def distinct_candidates(candidates, num_image_tokens: int, tiles: TileGrid | None = None) -> list[bool]:
    """Per candidate, False for a window that rounds to the same blocks (tiles of the image grid
    ``tiles``) as an earlier one: at this resolution they are one candidate."""
    seen, distinct = set(), []
    for method in candidates:
        signature = (method.kind, method.mode(num_image_tokens, tiles))
        distinct.append(signature not in seen)
        seen.add(signature)
    return distinct


def _fraction(text: str, name: str, low_open: bool = True) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        raise ValueError(f"unknown method {name!r}: a window fraction must be a number in {'(' if low_open else '['}0, 1]")
    return value


def _factor(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 2 <= value <= MAX_POOL_FACTOR:
        raise ValueError(f"unknown method {name!r}: a pool factor must be an int in [2, {MAX_POOL_FACTOR}]")
    return value


@lru_cache(maxsize=None)
def parse_method(name: str) -> Method:
    """Parse a method name (see the module docstring); raises ValueError naming the valid forms."""
    if isinstance(name, str):
        for kind in KINDS.values():
            method = kind.match(name.strip())
            if method is not None:
                return method
    forms = ", ".join(repr(form) for kind in KINDS.values() for form in kind.forms)
    raise ValueError(f"unknown method {name!r}; valid: {forms} with {FRACTION} in (0, 1], each of {WINDOW} in [0, 1] "
                     f"and {FACTOR} an int in [2, {MAX_POOL_FACTOR}]")


@lru_cache(maxsize=4096)
def canonical(name: str) -> str:
    return parse_method(name).name
