"""Block geometry of arrow attention: the one place where windows become blocks and FLOPs.

Image tokens are cut into blocks of ``IMAGE_BLOCK`` tokens counted from the first image token
(the last block may be partial). An arrow head with half-width ``w`` lets an image query in
block ``i`` see the image keys of blocks ``j`` with ``|i - j| <= w`` plus every text key; text
queries see everything. Plans store windows as fractions of the image tokens so that one plan
carries across resolutions; :func:`window_blocks` is the only conversion.

Tile windows: an image (video) segment known as a grid of frames x rows x cols latent patches
(raster order) is cut into tiles of ``t x h x w`` patches, ``t * h * w == IMAGE_BLOCK`` (tiles at
the grid's far edges may be partial). A tile head with half-widths ``(wt, wh, ww)`` lets an image
query in tile ``(a, b, c)`` see the image keys of the tiles ``(a', b', c')`` with ``|a - a'| <= wt``,
``|b - b'| <= wh`` and ``|c - c'| <= ww``, plus every global key. Its op mode packs the three
half-widths with :data:`TILE_FLAG` (:func:`tile_mode`); plans store them as fractions of the grid's
extent in tiles (:meth:`TileGrid.windows`).

Pooled keys: a pool head of factor ``p`` (:func:`pool_mode`) lets an image query see every global
key and the image keys and values averaged over each whole ``p x p`` patch of every frame, each
average standing for the ``p * p`` keys it replaces (a ``log(p * p)`` score bias); image tokens of
the partial patches at a grid's bottom and right edges stay keys of their own. Global queries see
every key. Equivalently: full attention over keys and values where each whole patch's tokens are
replaced by the patch's mean.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

IMAGE_BLOCK = 128

# Integer head modes understood by the attention op.
MODE_FULL = -1
MODE_SKIP = -2

# Tile modes: TILE_FLAG | wt << 20 | wh << 10 | ww, every half-width in [0, MAX_TILE_WINDOW].
TILE_FLAG = 1 << 30
TILE_BITS = 10
MAX_TILE_WINDOW = (1 << TILE_BITS) - 1


# Pool modes: POOL_FLAG | p, for a factor p in [2, MAX_POOL_FACTOR]; arrow half-widths stay below POOL_FLAG.
POOL_FLAG = 1 << 29
MAX_POOL_FACTOR = 64
# A fused kernel's pool heads: POOL_FLAG | slot << POOL_SLOT_SHIFT | p, where slot is the head's
# column in the patch-mean buffer the caller hands the kernel (factors stay below 1 << POOL_SLOT_SHIFT).
POOL_SLOT_SHIFT = 8


def pool_mode(factor: int) -> int:
    """The op's head mode of pooled keys over ``factor x factor`` patches."""
    if not (isinstance(factor, int) and not isinstance(factor, bool) and 2 <= factor <= MAX_POOL_FACTOR):
        raise ValueError(f"a pool factor must be an int in [2, {MAX_POOL_FACTOR}]; got {factor!r}")
    return POOL_FLAG | factor


def is_pool_mode(mode: int) -> bool:
    return POOL_FLAG <= mode < TILE_FLAG


def pool_factor(mode: int) -> int:
    """``p`` of a pool mode."""
    if not is_pool_mode(mode):
        raise ValueError(f"head mode {mode} is not a pool mode (see pool_mode)")
    return mode & ~POOL_FLAG


def pooled_keys(grid: tuple[int, int, int], factor: int) -> tuple[int, int]:
    """``(patches, loose)``: the whole ``factor x factor`` patches of the frames x rows x cols
    ``grid`` (one pooled key each) and the image tokens outside them (keys of their own)."""
    frames, rows, cols = grid
    whole = (rows // factor) * (cols // factor)
    return frames * whole, frames * (rows * cols - whole * factor * factor)


def tile_mode(wt: int, wh: int, ww: int) -> int:
    """The op's head mode of a tile window with half-widths ``(wt, wh, ww)`` in tiles."""
    for value in (wt, wh, ww):
        if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TILE_WINDOW):
            raise ValueError(f"tile half-widths must be ints in [0, {MAX_TILE_WINDOW}]; got {(wt, wh, ww)}")
    return TILE_FLAG | wt << 2 * TILE_BITS | wh << TILE_BITS | ww


def is_tile_mode(mode: int) -> bool:
    return mode >= TILE_FLAG


def tile_window(mode: int) -> tuple[int, int, int]:
    """``(wt, wh, ww)`` of a tile mode."""
    if not is_tile_mode(mode):
        raise ValueError(f"head mode {mode} is not a tile window (see tile_mode)")
    return mode >> 2 * TILE_BITS & MAX_TILE_WINDOW, mode >> TILE_BITS & MAX_TILE_WINDOW, mode & MAX_TILE_WINDOW


# Tile shapes a grid may get, in order of preference: the first of those whose partial tiles leave
# the fewest pad slots.
VIDEO_TILES = ((2, 8, 8), (1, 8, 16), (1, 16, 8))
FRAME_TILES = ((1, 8, 16), (1, 16, 8))


def default_tile(grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """The tile shape ditfastattn uses for ``grid``: of 2 x 8 x 8, 1 x 8 x 16 and 1 x 16 x 8 (one
    frame: the last two), the first that leaves the fewest pad slots.

    Pad slots (where a tile at the grid's edge is partial) are work that a kernel of whole 128-slot
    tiles computes and the density does not count. At 720p (45 rows of patches) 2 x 8 x 8 tiles
    leave 9.9% of HunyuanVideo's 33 x 45 x 80 patches and 11.7% of Wan's 21 x 45 x 80, 1 x 8 x 16
    6.7% of both: the Gluon kernel's tile windows at HunyuanVideo's shape went from 69-73% to 80-82%
    of the ideal speed-up (benchmarks/README.md). A plan runs in the tile shape it records for its
    grid, whatever this default.
    """
    shapes = VIDEO_TILES if grid[0] > 1 else FRAME_TILES
    return min(shapes, key=lambda tile: math.prod(-(-g // t) * t for g, t in zip(grid, tile)))


def positive_triple(value, what: str) -> tuple[int, int, int]:
    """``value`` as a tuple of 3 positive ints (a grid or a tile shape); ValueError naming ``what``."""
    try:
        triple = tuple(value)
    except TypeError:
        triple = ()
    if len(triple) != 3 or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) and x > 0
                                   for x in triple):
        raise ValueError(f"{what} must be 3 positive ints (frames, rows, cols); got {value!r}")
    return tuple(int(x) for x in triple)


@dataclass(frozen=True)
class TileGrid:
    """An image segment as a ``grid`` of frames x rows x cols patches cut into ``tile``-shaped tiles
    (``t * h * w == IMAGE_BLOCK``; :func:`default_tile` of the grid when None).

    ``TileGrid((33, 45, 80)).counts`` gives the tiles along each axis, ``windows(fractions)`` the
    half-widths of a plan's ``tile:<ft>,<fh>,<fw>``; :func:`density` takes it for tile modes.
    """

    grid: tuple[int, int, int]
    tile: tuple[int, int, int] | None = None

    def __post_init__(self):
        object.__setattr__(self, "grid", positive_triple(self.grid, "a grid"))
        tile = default_tile(self.grid) if self.tile is None else self.tile
        object.__setattr__(self, "tile", positive_triple(tile, "a tile"))
        if math.prod(self.tile) != IMAGE_BLOCK:
            raise ValueError(f"a tile must hold {IMAGE_BLOCK} patches (one image block); {self.tile} holds "
                             f"{math.prod(self.tile)}")

    @property
    def counts(self) -> tuple[int, int, int]:
        """Tiles along frames, rows and cols (the last along each may be partial)."""
        return tuple(-(-g // t) for g, t in zip(self.grid, self.tile))

    @property
    def num_tiles(self) -> int:
        return math.prod(self.counts)

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def slots(self) -> int:
        """Tokens of the image in tile order: every tile, partial ones too, padded to a whole block."""
        return self.num_tiles * IMAGE_BLOCK

    @property
    def ragged(self) -> bool:
        """Whether some tile is partial (the grid does not divide into whole tiles)."""
        return any(g % t for g, t in zip(self.grid, self.tile))

    def windows(self, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
        """Half-widths in tiles of a window whose half-width along each axis is ``fraction`` x the
        axis's extent in tiles minus one (nearest, ties up): 0 keeps the query's own tiles along
        that axis, 1 every tile of it, from any query."""
        return tuple(min(MAX_TILE_WINDOW, math.floor(f * (n - 1) + 0.5)) for f, n in zip(fractions, self.counts))

    def _extents(self, axis: int) -> list[int]:
        size, tile = self.grid[axis], self.tile[axis]
        return [min(tile, size - i * tile) for i in range(self.counts[axis])]

    def image_pairs(self, mode: int) -> int:
        """(image query, image key) pairs a tile head keeps: per axis, the sum over query tiles of
        their extent times that of the tiles in their window (the count factorises over axes)."""
        total = 1
        for axis, half in enumerate(tile_window(mode)):
            extents = self._extents(axis)
            prefix = [0]
            for extent in extents:
                prefix.append(prefix[-1] + extent)
            n = len(extents)
            total *= sum(e * (prefix[min(n, i + half + 1)] - prefix[max(0, i - half)]) for i, e in enumerate(extents))
        return total


def num_image_blocks(num_image_tokens: int) -> int:
    return -(-num_image_tokens // IMAGE_BLOCK)


def window_blocks(fraction: float, num_image_tokens: int) -> int:
    """Half-width ``w`` in image blocks of an arrow band of total width ``fraction`` x image tokens.

    The band spans ``2w + 1`` blocks, the diagonal block included, so ``w`` is the nearest
    integer (ties up) to ``(fraction * n_blocks - 1) / 2``, never below 0. Example: FLUX at
    2048x2048 has 16384 image tokens = 128 blocks; ``arrow:0.125`` gives 16 blocks of band, w = 8.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"an arrow window fraction must be in (0, 1], got {fraction}")
    blocks = num_image_blocks(num_image_tokens)
    return max(0, math.floor((fraction * blocks - 1.0) / 2.0 + 0.5))


def kept_pairs(mode: int, num_image_tokens: int, text_len: int, tiles: TileGrid | None = None) -> int:
    """Exact number of (query, key) pairs a head computes under ``mode``, over the joint sequence;
    tile and pool modes need the image's ``tiles`` (a pool head counts each pooled key once)."""
    seq = num_image_tokens + text_len
    if mode == MODE_SKIP:
        return 0
    if mode == MODE_FULL:
        return seq * seq
    if mode < 0:
        raise ValueError(f"unknown head mode {mode}")
    if is_tile_mode(mode):
        if tiles is None or tiles.tokens != num_image_tokens:
            raise ValueError(f"a tile window's cost needs the grid of the {num_image_tokens} image tokens; got {tiles}")
        return text_len * seq + num_image_tokens * text_len + tiles.image_pairs(mode)
    if is_pool_mode(mode):
        if tiles is None or tiles.tokens != num_image_tokens:
            raise ValueError(f"pooled keys' cost needs the grid of the {num_image_tokens} image tokens; got {tiles}")
        return text_len * seq + num_image_tokens * (text_len + sum(pooled_keys(tiles.grid, pool_factor(mode))))
    # In closed form (a sum over blocks held one number per block: gigabytes at a mistyped resolution).
    # Image block i (of n, each B tokens but the last, r) attends to blocks [i - w, i + w] within the
    # image: block pairs within w of each other, less the short last block's missing tokens.
    n, width, big = num_image_blocks(num_image_tokens), mode, IMAGE_BLOCK
    short = big - (num_image_tokens - (n - 1) * big)  # tokens the last block lacks
    near = min(width, n - 1)
    block_pairs = n + 2 * (near * n - near * (near + 1) // 2)
    reaching_last = min(n, width + 1)  # blocks whose window holds the last one (as many as it reaches)
    image_pairs = big * (big * block_pairs - short * reaching_last) - short * (big * reaching_last - short)
    return text_len * seq + num_image_tokens * text_len + image_pairs


def density(mode: int, num_image_tokens: int, text_len: int, tiles: TileGrid | None = None) -> float:
    """Share of a full head's attention FLOPs that head mode ``mode`` computes (1.0 full, 0.0 skip),
    exact from the block geometry, over ``num_image_tokens`` image and ``text_len`` global tokens;
    tile and pool modes need the image's ``tiles`` (a :class:`TileGrid` of those image tokens)."""
    seq = num_image_tokens + text_len
    return kept_pairs(mode, num_image_tokens, text_len, tiles) / float(seq * seq)
