"""PyTorch reference of head-wise attention: the oracle every other implementation is checked against.

Runs on any device. It computes in float32 (float64 for float64 inputs) and only the pairs the
definition keeps: full heads attend over all keys, arrow heads gather the text keys and the band of
image blocks for each image query block. Each kept region is one scaled-dot-product attention; when
the log-sum-exp is asked for, the scores are formed explicitly, with query rows chunked so that no
score tensor grows past ``_MAX_SCORES`` elements. Nothing of size S x S is built for long sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._geometry import IMAGE_BLOCK, MODE_FULL, MODE_SKIP, num_image_blocks

_MAX_SCORES = 1 << 25


def _attend(q, k, v, scale, want_lse):
    """q (B, h, Sq, D), k/v (B, h, Sk, D) in the compute dtype -> out (B, h, Sq, D), lse (B, h, Sq) or None."""
    if not want_lse:
        # Same math without materialising the scores: much faster on the CPU, where the runtime uses it.
        return F.scaled_dot_product_attention(q, k, v, scale=scale), None
    batch, heads, rows, _ = q.shape
    chunk = max(1, _MAX_SCORES // max(1, batch * heads * k.shape[2]))
    outs, lses = [], []
    for start in range(0, rows, chunk):
        scores = torch.matmul(q[:, :, start : start + chunk], k.transpose(-1, -2)) * scale
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.matmul(torch.exp(scores - lse[..., None]), v))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def attention(q, k, v, head_modes, text_start, text_len, out, scale, return_lse):
    batch, seq, _, _ = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse_out = None
    if return_lse:
        lse_out = torch.full((batch, q.shape[2], seq), float("-inf"), dtype=torch.float32, device=q.device)
    image_start = text_len if text_start == 0 else 0
    num_image = seq - text_len
    modes = [int(m) for m in head_modes.tolist()]

    def write(rows, heads, result, lse):
        out[:, rows, heads] = result.transpose(1, 2).to(out.dtype)
        if lse is not None:
            lse_out[:, heads, rows] = lse.to(torch.float32)

    for mode in sorted(set(modes)):
        if mode <= MODE_SKIP:  # skip; out-of-range modes too, as the kernels do (the op checks them)
            continue
        heads = torch.tensor([h for h, m in enumerate(modes) if m == mode], device=q.device)
        qg, kg, vg = (t.index_select(2, heads).transpose(1, 2).to(compute) for t in (q, k, v))
        if mode == MODE_FULL:
            write(slice(0, seq), heads, *_attend(qg, kg, vg, scale, return_lse))
            continue
        text = slice(text_start, text_start + text_len)
        if text_len:
            write(text, heads, *_attend(qg[:, :, text], kg, vg, scale, return_lse))
        for block in range(num_image_blocks(num_image)):
            q0 = image_start + block * IMAGE_BLOCK
            q1 = min(image_start + num_image, q0 + IMAGE_BLOCK)
            k0 = image_start + max(0, block - mode) * IMAGE_BLOCK
            k1 = min(image_start + num_image, image_start + (block + mode + 1) * IMAGE_BLOCK)
            keys = torch.cat([kg[:, :, text], kg[:, :, k0:k1]], dim=2)
            values = torch.cat([vg[:, :, text], vg[:, :, k0:k1]], dim=2)
            write(slice(q0, q1), heads, *_attend(qg[:, :, q0:q1], keys, values, scale, return_lse))
    return out, lse_out
