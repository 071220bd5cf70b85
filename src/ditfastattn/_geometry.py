"""Block geometry of arrow attention: the one place where windows become blocks and FLOPs.

Image tokens are cut into blocks of ``IMAGE_BLOCK`` tokens counted from the first image token
(the last block may be partial). An arrow head with half-width ``w`` lets an image query in
block ``i`` see the image keys of blocks ``j`` with ``|i - j| <= w`` plus every text key; text
queries see everything. Plans store windows as fractions of the image tokens so that one plan
carries across resolutions; :func:`window_blocks` is the only conversion.
"""

from __future__ import annotations

import math

IMAGE_BLOCK = 128

# Integer head modes understood by the attention op.
MODE_FULL = -1
MODE_SKIP = -2


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


def kept_pairs(mode: int, num_image_tokens: int, text_len: int) -> int:
    """Exact number of (query, key) pairs a head computes under ``mode``, over the joint sequence."""
    seq = num_image_tokens + text_len
    if mode == MODE_SKIP:
        return 0
    if mode == MODE_FULL:
        return seq * seq
    if mode < 0:
        raise ValueError(f"unknown head mode {mode}")
    blocks = num_image_blocks(num_image_tokens)
    sizes = [min(IMAGE_BLOCK, num_image_tokens - b * IMAGE_BLOCK) for b in range(blocks)]
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    image_pairs = 0
    for i, size in enumerate(sizes):
        lo, hi = max(0, i - mode), min(blocks, i + mode + 1)
        image_pairs += size * (text_len + prefix[hi] - prefix[lo])
    return text_len * seq + image_pairs


def density(mode: int, num_image_tokens: int, text_len: int) -> float:
    """Share of a full head's attention FLOPs that ``mode`` computes (1.0 full, 0.0 skip)."""
    seq = num_image_tokens + text_len
    return kept_pairs(mode, num_image_tokens, text_len) / float(seq * seq)
