"""PyTorch reference of head-wise attention: the oracle every other implementation is checked against.

Runs on any device. It computes in float32 (float64 for float64 inputs) and only the pairs the
definition keeps: full heads attend over all keys, arrow heads gather the global keys and the band
of image blocks for each image query block (global queries attend over all keys). Each kept region
is one scaled-dot-product attention; when the log-sum-exp or a padding bias is asked for, the scores
are formed explicitly, with query rows chunked so that no score tensor grows past ``_MAX_SCORES``
elements. Nothing of size S x S is built for long sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._geometry import IMAGE_BLOCK, MODE_FULL, MODE_SKIP, num_image_blocks

_MAX_SCORES = 1 << 25


def _attend(q, k, v, scale, want_lse, bias=None):
    """q (B, h, Sq, D), k/v (B, h, Sk, D) in the compute dtype -> out (B, h, Sq, D), lse (B, h, Sq)
    or None. ``bias(r0, r1)`` gives the (B, 1, r1 - r0, Sk) scores bias of query rows [r0, r1), or is
    None. Rows whose every score is -inf give 0 and -inf."""
    if not want_lse and bias is None:
        # Same math without materialising the scores: much faster on the CPU, where the runtime uses it.
        return F.scaled_dot_product_attention(q, k, v, scale=scale), None
    batch, heads, rows, _ = q.shape
    chunk = max(1, _MAX_SCORES // max(1, batch * heads * k.shape[2]))
    outs, lses = [], []
    for start in range(0, rows, chunk):
        scores = torch.matmul(q[:, :, start : start + chunk], k.transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + bias(start, min(rows, start + chunk))
        lse = torch.logsumexp(scores, dim=-1)
        # A fully masked row has lse -inf, so its probabilities would be NaN: it outputs 0, as SDPA does.
        p = torch.exp(scores - torch.where(torch.isneginf(lse), 0, lse)[..., None])
        outs.append(torch.matmul(p, v))
        lses.append(lse)
    return torch.cat(outs, dim=2), (torch.cat(lses, dim=2) if want_lse else None)


def attention(q, k, v, head_modes, image_start, image_len, out, scale, return_lse, padding=None):
    batch, seq, _, _ = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse_out = None
    if return_lse:
        lse_out = torch.full((batch, q.shape[2], seq), float("-inf"), dtype=torch.float32, device=q.device)
    image_end = image_start + image_len
    global_rows = [rows for rows in (slice(0, image_start), slice(image_end, seq)) if rows.stop > rows.start]
    modes = [int(m) for m in head_modes.tolist()]
    flags = table = None
    if padding is not None:
        flags = padding.mask.long()
        table = torch.tensor(padding.bias, dtype=compute, device=q.device)

    def bias(rows, keys):
        """The padding bias of query rows ``rows`` (a slice) against key indices ``keys``, for _attend."""
        if flags is None:
            return None
        return lambda r0, r1: table[flags[:, rows.start + r0 : rows.start + r1, None], flags[:, None, keys]][:, None]

    def write(rows, heads, result, lse):
        out[:, rows, heads] = result.transpose(1, 2).to(out.dtype)
        if lse is not None:
            lse_out[:, heads, rows] = lse.to(torch.float32)

    everything = torch.arange(seq, device=q.device)
    global_keys = torch.cat([everything[rows] for rows in global_rows]) if global_rows else everything[:0]
    for mode in sorted(set(modes)):
        if mode <= MODE_SKIP:  # skip; out-of-range modes too, as the kernels do (the op checks them)
            continue
        heads = torch.tensor([h for h, m in enumerate(modes) if m == mode], device=q.device)
        qg, kg, vg = (t.index_select(2, heads).transpose(1, 2).to(compute) for t in (q, k, v))
        if mode == MODE_FULL:
            write(slice(0, seq), heads, *_attend(qg, kg, vg, scale, return_lse, bias(slice(0, seq), everything)))
            continue
        for rows in global_rows:
            write(rows, heads, *_attend(qg[:, :, rows], kg, vg, scale, return_lse, bias(rows, everything)))
        for block in range(num_image_blocks(image_len)):
            q0 = image_start + block * IMAGE_BLOCK
            q1 = min(image_end, q0 + IMAGE_BLOCK)
            k0 = image_start + max(0, block - mode) * IMAGE_BLOCK
            k1 = min(image_end, image_start + (block + mode + 1) * IMAGE_BLOCK)
            keys = torch.cat([global_keys, everything[k0:k1]])
            rows = slice(q0, q1)
            write(rows, heads, *_attend(qg[:, :, rows], kg[:, :, keys], vg[:, :, keys], scale, return_lse,
                                        bias(rows, keys)))
    return out, lse_out
