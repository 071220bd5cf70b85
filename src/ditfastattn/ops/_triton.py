"""Fused Triton kernel of head-wise attention: one launch, every head in its own mode.

Work is cut into query tiles of ``BLOCK_M`` rows counted from the start of each segment (text
queries, image queries), so an image query tile lies inside one 128-token image block. Each tile
attends over two key ranges: all text keys, and an image range that is every image key for full
heads and text queries, and the band of blocks ``|i - j| <= w`` for an arrow head's image queries.
Key tiles are counted from the start of their range, so with ``BLOCK_N`` dividing 128 every band
edge falls on a tile edge and only the last tile of a range can be partial; that one tile is
masked, all others run the unmasked loop.

The 1-D grid enumerates heads in order of decreasing work (full, then arrows by width, then skip),
ranked inside the kernel from ``head_modes`` so the host never reads them: the block scheduler
starts the heavy tiles first and mixed plans end on short tiles. Skip programs exit at once
(writing only ``-inf`` log-sum-exps when asked).

On Hopper, full key tiles and query tiles come through host-side TMA descriptors over a 2-D view
of q/k/v when their strides allow one; otherwise, and for the masked tails, plain pointer loads.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .._geometry import IMAGE_BLOCK, MODE_FULL, MODE_SKIP

_LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)
FULL = tl.constexpr(MODE_FULL)
SKIP = tl.constexpr(MODE_SKIP)
# Decided where the kernel is decorated, so launcher and kernel agree on interpreter mode.
_INTERPRET = bool(triton.knobs.runtime.interpret)
# The interpreter is slow per operation, not per element: few large tiles keep CI fast.
INTERPRET_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64}


@triton.jit
def _round(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x rounded to nearest-even in dtype, as the GPU converts. The interpreter truncates float32
    to bf16, a biased error; there the rounding is done on the bits and the value kept in float32."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            y = bits.to(tl.float32, bitcast=True)
        else:
            y = x.to(dtype).to(tl.float32)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _update(acc, m_i, l_i, q, k, v, qk_scale, valid, DTYPE: tl.constexpr, MASKED: tl.constexpr,
            INTERPRET: tl.constexpr):
    """Online-softmax step over one key tile; scores kept in log2 units (exp2, log2e in qk_scale)."""
    if INTERPRET:
        # The interpreter multiplies bf16 as raw uint16 bits; float32 operands give the exact
        # products the tensor cores form, so the arithmetic matches the GPU's.
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where(valid[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(_round(p, DTYPE, INTERPRET), v, acc)
    return acc, m_new, l_i


@triton.jit
def _full_tile(acc, m_i, l_i, q, k_desc, v_desc, K, V, k_row, v_row, k_col, v_col, k_off, v_off,
               sks, skd, svs, svd, pos, qk_scale, offs_n, offs_d, USE_TMA: tl.constexpr, INTERPRET: tl.constexpr):
    if USE_TMA:
        k = k_desc.load([k_row + pos, k_col])
        v = v_desc.load([v_row + pos, v_col])
    else:
        rows = (pos + offs_n).to(tl.int64)
        k = tl.load(K + k_off + rows[:, None] * sks + offs_d[None, :] * skd)
        v = tl.load(V + v_off + rows[:, None] * svs + offs_d[None, :] * svd)
    return _update(acc, m_i, l_i, q, k, v, qk_scale, offs_n, k.dtype, False, INTERPRET)


@triton.jit
def _tail_tile(acc, m_i, l_i, q, K, V, k_off, v_off, sks, skd, svs, svd, start, length, qk_scale,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, INTERPRET: tl.constexpr):
    """The partial last tile of keys [start, start + length), masked; nothing when there is none."""
    tail = length % BLOCK_N
    if tail > 0:
        # Pointer loads with zero fill: the rows past the range may be another segment or memory
        # outside q/k/v, and a zeroed V row keeps a masked column from carrying NaN into acc.
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        valid = offs_n < tail
        rows = (start + length - tail + offs_n).to(tl.int64)
        k = tl.load(K + k_off + rows[:, None] * sks + offs_d[None, :] * skd, mask=valid[:, None], other=0.0)
        v = tl.load(V + v_off + rows[:, None] * svs + offs_d[None, :] * svd, mask=valid[:, None], other=0.0)
        acc, m_i, l_i = _update(acc, m_i, l_i, q, k, v, qk_scale, valid, k.dtype, True, INTERPRET)
    return acc, m_i, l_i


@triton.jit
def _headwise_kernel(
    Q, K, V, O, LSE, MODES, s_modes,
    q_desc, k_desc, v_desc,
    sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sob, sos, soh, sod,
    q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, v_rb, v_rh, v_ch,
    batch, seq_len, num_heads, text_start, text_len, image_start, num_image, qk_scale,
    HEADS_POW2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IMAGE_BLOCK: tl.constexpr, USE_TMA: tl.constexpr, RETURN_LSE: tl.constexpr, INTERPRET: tl.constexpr,
):
    n_text_tiles = tl.cdiv(text_len, BLOCK_M)
    n_tiles = n_text_tiles + tl.cdiv(num_image, BLOCK_M)
    pid = tl.program_id(0)
    rank = pid // (batch * n_tiles)
    rest = pid % (batch * n_tiles)
    tile = rest // batch
    b = rest % batch

    # Rank heads by work, descending (ties by index): full > arrow by width > skip > padding.
    idx = tl.arange(0, HEADS_POW2)
    modes = tl.load(MODES + idx * s_modes, mask=idx < num_heads, other=SKIP - 1)
    key = tl.where(modes == FULL, 1 << 30, modes)
    ahead = (key[None, :] > key[:, None]) | ((key[None, :] == key[:, None]) & (idx[None, :] < idx[:, None]))
    ranks = tl.sum(ahead.to(tl.int32), 1)
    h = tl.sum(tl.where(ranks == rank, idx, 0), 0)
    mode = tl.sum(tl.where(ranks == rank, modes, 0), 0)

    # Query rows of this tile: text tiles first (they do a full row of work), then image tiles.
    # Arrow image tiles see the band of blocks around their own; all other tiles see every image key.
    is_image = tile >= n_text_tiles
    image_tile = tile - n_text_tiles
    q_start = tl.where(is_image, image_start + image_tile * BLOCK_M, text_start + tile * BLOCK_M)
    q_end = tl.where(is_image, image_start + num_image, text_start + text_len)
    banded = is_image & (mode >= 0)
    block = image_tile * BLOCK_M // IMAGE_BLOCK
    w = tl.minimum(tl.maximum(mode, 0), tl.cdiv(num_image, IMAGE_BLOCK))
    lo = tl.where(banded, tl.maximum(block - w, 0) * IMAGE_BLOCK, 0)
    hi = tl.where(banded, tl.minimum((block + w + 1) * IMAGE_BLOCK, num_image), num_image)
    offs_m = q_start + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_end
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    if mode != SKIP:
        offs_d = tl.arange(0, HEAD_DIM)
        if USE_TMA:
            q = q_desc.load([b * q_rb + h * q_rh + q_start, h * q_ch])
        else:
            q = tl.load(Q + b64 * sqb + h64 * sqh + offs_m.to(tl.int64)[:, None] * sqs + offs_d[None, :] * sqd,
                        mask=(offs_m < seq_len)[:, None], other=0.0)
        k_off = b64 * skb + h64 * skh
        v_off = b64 * svb + h64 * svh
        k_row = b * k_rb + h * k_rh
        v_row = b * v_rb + h * v_rh
        k_col = h * k_ch
        v_col = h * v_ch
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        # One pipelined loop over the whole tiles of both key ranges (image band or all image keys,
        # then text keys), then the partial last tile of each range, masked.
        start1 = image_start + lo
        len1 = hi - lo
        n1 = len1 // BLOCK_N
        n_full = n1 + text_len // BLOCK_N
        offs_n = tl.arange(0, BLOCK_N)
        if not INTERPRET:
            for j in tl.range(0, n_full):
                pos = tl.where(j < n1, start1 + j * BLOCK_N, text_start + (j - n1) * BLOCK_N)
                acc, m_i, l_i = _full_tile(acc, m_i, l_i, q, k_desc, v_desc, K, V, k_row, v_row, k_col, v_col,
                                           k_off, v_off, sks, skd, svs, svd, pos, qk_scale, offs_n, offs_d,
                                           USE_TMA, INTERPRET)
        else:
            # The interpreter (numpy 2) cannot take a run-time bound in range(); a while loop can.
            j = 0
            while j < n_full:
                pos = tl.where(j < n1, start1 + j * BLOCK_N, text_start + (j - n1) * BLOCK_N)
                acc, m_i, l_i = _full_tile(acc, m_i, l_i, q, k_desc, v_desc, K, V, k_row, v_row, k_col, v_col,
                                           k_off, v_off, sks, skd, svs, svd, pos, qk_scale, offs_n, offs_d,
                                           USE_TMA, INTERPRET)
                j += 1
        acc, m_i, l_i = _tail_tile(acc, m_i, l_i, q, K, V, k_off, v_off, sks, skd, svs, svd, start1, len1,
                                   qk_scale, BLOCK_N, HEAD_DIM, INTERPRET)
        acc, m_i, l_i = _tail_tile(acc, m_i, l_i, q, K, V, k_off, v_off, sks, skd, svs, svd, text_start, text_len,
                                   qk_scale, BLOCK_N, HEAD_DIM, INTERPRET)
        out = _round(acc / l_i[:, None], O.dtype.element_ty, INTERPRET).to(O.dtype.element_ty)
        o_ptrs = O + b64 * sob + h64 * soh + offs_m.to(tl.int64)[:, None] * sos + offs_d[None, :] * sod
        tl.store(o_ptrs, out, mask=row_ok[:, None])
        if RETURN_LSE:
            lse = (m_i + tl.math.log2(l_i)) * LN2
            tl.store(LSE + (b64 * num_heads + h64) * seq_len + offs_m, lse, mask=row_ok)
    elif RETURN_LSE:
        tl.store(LSE + (b64 * num_heads + h64) * seq_len + offs_m,
                 tl.full([BLOCK_M], float("-inf"), tl.float32), mask=row_ok)


def _set_block_shapes(nargs):
    """Descriptors carry their box shape, which depends on the tuned tile sizes."""
    if isinstance(nargs["q_desc"], TensorDescriptor):
        nargs["q_desc"].block_shape = [nargs["BLOCK_M"], nargs["HEAD_DIM"]]
        nargs["k_desc"].block_shape = [nargs["BLOCK_N"], nargs["HEAD_DIM"]]
        nargs["v_desc"].block_shape = [nargs["BLOCK_N"], nargs["HEAD_DIM"]]


def _configs():
    # Query tiles stay at 128 rows (one image block, two warpgroups); key tiles of 64 or 128 rows
    # both divide the image block, so band edges stay on tile edges for every config.
    shapes = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3),
              (128, 128, 4, 2), (128, 128, 4, 3)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=_set_block_shapes)
        for m, n, w, s in shapes
    ]


if _INTERPRET:
    _launch = _headwise_kernel
else:
    _launch = triton.autotune(configs=_configs(), key=["seq_len", "HEAD_DIM", "USE_TMA"])(_headwise_kernel)


@functools.lru_cache(maxsize=None)
def _has_tma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _tma_view(t: torch.Tensor):
    """(row_per_batch, row_per_head, col_per_head, rows, cols) of a 2-D TMA view, or None.

    Element (b, s, h, d) sits at row ``b*rb + h*rh + s``, column ``h*ch + d`` of a 2-D view with the
    sequence stride as row pitch. Covers contiguous (B, S, H, D), slices of fused QKV projections
    and (B, H, S, D) transposes; anything else takes the pointer path.
    """
    batch, seq, heads, dim = t.shape
    sb, ss, sh, sd = t.stride()
    elem = t.element_size()
    if sd != 1 or t.data_ptr() % 16 or (ss * elem) % 16 or ss < dim:
        return None
    rb = 0
    if batch > 1:
        if sb % ss:
            return None
        rb = sb // ss
    rh = ch = 0
    if heads > 1:
        if sh % ss == 0:
            rh = sh // ss
        elif (sh * elem) % 16 == 0 and (heads - 1) * sh + dim <= ss:
            ch = sh
        else:
            return None
    return rb, rh, ch, (batch - 1) * rb + (heads - 1) * rh + seq, (heads - 1) * ch + dim


def attention(q, k, v, head_modes, text_start, text_len, out, scale, return_lse):
    """Launch the kernel; no host sync. Returns ``(out, lse or None)``."""
    if not scale > 0:
        raise ValueError(f"the Triton kernel needs a positive softmax scale; got {scale}")
    batch, seq, heads, dim = q.shape
    num_image = seq - text_len
    image_start = text_len if text_start == 0 else 0
    lse = torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device) if return_lse else None
    if batch * seq * heads == 0:
        if lse is not None:
            lse.fill_(float("-inf"))
        return out, lse

    views = None
    if _INTERPRET or _has_tma(q.device.index if q.device.index is not None else torch.cuda.current_device()):
        views = [_tma_view(t) for t in (q, k, v)]
        if any(view is None for view in views):
            views = None
    if views is None:
        descs = (q, k, v)
        coeffs = [0] * 9
    else:
        descs = tuple(
            TensorDescriptor(t, [rows, cols], [t.stride(1), 1], [IMAGE_BLOCK, dim])
            for t, (_, _, _, rows, cols) in zip((q, k, v), views)
        )
        coeffs = [c for view in views for c in view[:3]]

    def grid(meta):
        block_m = meta["BLOCK_M"]
        return (heads * batch * (triton.cdiv(text_len, block_m) + triton.cdiv(num_image, block_m)),)

    args = (
        q, k, v, out, lse if lse is not None else out, head_modes, head_modes.stride(0), *descs,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *coeffs,
        batch, seq, heads, text_start, text_len, image_start, num_image, scale * _LOG2E,
    )
    meta = dict(
        HEADS_POW2=triton.next_power_of_2(heads), HEAD_DIM=dim, IMAGE_BLOCK=IMAGE_BLOCK,
        USE_TMA=views is not None, RETURN_LSE=return_lse, INTERPRET=_INTERPRET,
    )
    if _INTERPRET:
        config = dict(INTERPRET_CONFIG)
        _set_block_shapes({"q_desc": descs[0], "k_desc": descs[1], "v_desc": descs[2], "HEAD_DIM": dim, **config})
        _launch[grid](*args, **meta, **config)
    else:
        with torch.cuda.device(q.device):
            _launch[grid](*args, **meta)
    return out, lse

