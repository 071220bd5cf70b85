"""Pool heads on stock attention kernels (PyTorch's SDPA), beside the fused kernels: those whose factor
leaves partial patches at the grid's edges (the kernels run the others themselves).

A pool head's image queries attend to two key sets: the global keys with the image tokens outside
whole patches (``own``), and the means of the whole ``p x p`` patches, each weighted ``p * p``
(``pooled``: a ``log(p * p)`` score bias). Stock kernels take no per-key bias on their fast paths,
so one of two exact forms carries it:

- widened (no log-sum-exp asked for, as the runtime calls it): one SDPA call over both sets with
  the bias folded into extra head-dim columns (queries 1, pooled keys the bias / scale split into
  two parts of the inputs' dtype, own keys 0), padded to head dim + 8; cuDNN first, which ran it at
  0.22-0.54 of the ideal speed-up on an H100 where FlashAttention-2 ran it at 0.11-0.27
  (``docs/history/pool_forms.py``);
- merged (with the log-sum-exp): one flash call per set, merged by their log-sum-exps, the pooled
  one's raised by ``log(p * p)``.

Global queries attend to every key in one more call. Means accumulate in float32 and are rounded
to the inputs' dtype, as the kernels read them. CUDA runs ``_scaled_dot_product_flash_attention``
for the merged form, the CPU (the kernels' interpreter tests) its CPU twin.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._geometry import TileGrid
from ._host_copy import device_tensor


def _flash(q, k, v, scale):
    """(B, h, Sq, D), (B, h, Sk, D) -> out (B, h, Sq, D) in q's dtype, lse (B, h, Sq) float32."""
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out, lse.float()


# Extra head-dim columns of the widened form: the bias's two parts, then zeros to keep rows 16-byte aligned.
_WIDEN = 8
# cuDNN first for the widened head dim (D + 8): FlashAttention-2 ran it 2x slower on an H100.
_WIDENED_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                     SDPBackend.MATH]


def _widened(image, own_k, own_v, pooled_k, pooled_v, bias: float, scale: float):
    """Image queries (B, h, n, D) over the own and pooled keys, the pooled ones raised by ``bias``,
    in one SDPA call: ``scale * (q . k + 1 * hi + 1 * lo) = scale * q . k + bias`` on pooled keys,
    ``hi + lo = bias / scale`` as near as two numbers of the inputs' dtype get."""
    batch, heads, rows, dim = image.shape
    own, keys = own_k.shape[2], own_k.shape[2] + pooled_k.shape[2]
    hi = torch.tensor(bias / scale, dtype=image.dtype).item()
    lo = bias / scale - hi
    query = image.new_zeros(batch, heads, rows, dim + _WIDEN)
    query[..., :dim] = image
    query[..., dim : dim + 2] = 1.0
    key = image.new_zeros(batch, heads, keys, dim + _WIDEN)
    key[:, :, :own, :dim], key[:, :, own:, :dim] = own_k, pooled_k
    key[:, :, own:, dim], key[:, :, own:, dim + 1] = hi, lo
    value = image.new_zeros(batch, heads, keys, dim + _WIDEN)
    value[:, :, :own, :dim], value[:, :, own:, :dim] = own_v, pooled_v
    with sdpa_kernel(_WIDENED_BACKENDS, set_priority=True):
        return F.scaled_dot_product_attention(query, key, value, scale=scale)[..., :dim]


@functools.lru_cache(maxsize=64)
def _own_keys(seq: int, image_start: int, grid: tuple[int, int, int], factor: int, device: torch.device) -> torch.Tensor:
    """Sequence indices of the global keys and the image tokens outside whole patches (built once
    per shape: finding them reads the device)."""
    frames, rows, cols = grid
    loose = torch.ones(frames, rows, cols, dtype=torch.bool)
    loose[:, : rows // factor * factor, : cols // factor * factor] = False
    index = torch.arange(seq)
    image_end = image_start + frames * rows * cols
    return torch.cat([index[:image_start], image_start + loose.flatten().nonzero().flatten(), index[image_end:]]).to(device)


# Room for every row of a long plan (FLUX, 50 steps: 57 x 50): a miss copies from the host.
@functools.lru_cache(maxsize=8192)
def _head_index(heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The heads as an index tensor on ``device``, made once per device and heads."""
    return device_tensor(heads, torch.int64, device)


def _key_sets(k, v, tiles: TileGrid, factor: int, image_start: int):
    """``(own keys, own values, pooled keys, pooled values)``, each (B, h, K, D); a set may be empty.
    The patch means accumulate in float32 (torch's reductions of fp16 / bf16 do) and come out in
    the inputs' dtype."""
    frames, rows, cols = tiles.grid
    whole_rows, whole_cols = rows // factor * factor, cols // factor * factor
    batch, heads, seq, dim = k.shape
    own = _own_keys(seq, image_start, tiles.grid, factor, k.device)

    def means(x):
        grid = x[:, :, image_start : image_start + tiles.tokens].reshape(batch, heads, frames, rows, cols, dim)
        grid = grid[:, :, :, :whole_rows, :whole_cols].reshape(
            batch, heads, frames, whole_rows // factor, factor, whole_cols // factor, factor, dim)
        return grid.mean(dim=(4, 6)).reshape(batch, heads, -1, dim)

    return k[:, :, own], v[:, :, own], means(k), means(v)


def attention(q, k, v, heads: tuple[int, ...], factor: int, image_start: int, tiles: TileGrid, out, scale,
              lse_out=None, *, global_rows=True) -> None:
    """Pool heads ``heads`` (of factor ``factor``) of ``q, k, v`` (B, S, H, D) into ``out`` (and
    ``lse_out`` (B, H, S), when given); ``global_rows=False`` leaves the global-query rows unwritten."""
    if heads == tuple(range(heads[0], heads[0] + len(heads))):  # adjacent heads: views, no gather
        index = slice(heads[0], heads[0] + len(heads))
        qh, kh, vh = (t[:, :, index].transpose(1, 2) for t in (q, k, v))
    else:
        index = _head_index(heads, q.device)
        qh, kh, vh = (t.index_select(2, index).transpose(1, 2) for t in (q, k, v))
    seq, image_end = q.shape[1], image_start + tiles.tokens

    def write(rows: slice, result, lse):
        out[:, rows, index] = result.transpose(1, 2).to(out.dtype)
        if lse_out is not None:
            lse_out[:, index, rows] = lse

    if global_rows:
        for rows in (slice(0, image_start), slice(image_end, seq)):
            if rows.stop > rows.start and lse_out is None:
                write(rows, F.scaled_dot_product_attention(qh[:, :, rows], kh, vh, scale=scale), None)
            elif rows.stop > rows.start:
                write(rows, *_flash(qh[:, :, rows], kh, vh, scale))
    image = qh[:, :, image_start:image_end]
    own_k, own_v, pooled_k, pooled_v = _key_sets(kh, vh, tiles, factor, image_start)
    if lse_out is None and own_k.shape[2] and pooled_k.shape[2]:
        result = _widened(image, own_k, own_v, pooled_k, pooled_v, math.log(factor * factor), scale)
        write(slice(image_start, image_end), result, None)
        return
    parts = []
    if own_k.shape[2]:
        parts.append(_flash(image, own_k, own_v, scale))
    if pooled_k.shape[2]:
        result, lse = _flash(image, pooled_k, pooled_v, scale)
        parts.append((result, lse + math.log(factor * factor)))
    if len(parts) == 1:
        write(slice(image_start, image_end), *parts[0])
        return
    (out_a, lse_a), (out_b, lse_b) = parts
    lse = torch.logaddexp(lse_a, lse_b)
    merged = torch.lerp(out_a.float(), out_b.float(), torch.exp(lse_b - lse)[..., None])  # b's share of the weight
    write(slice(image_start, image_end), merged, lse)
