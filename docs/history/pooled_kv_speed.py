"""GPU: what pooled keys and values (pool:<f>, pooled_kv.py) cost with stock attention kernels.

A pool head's image queries attend to the text keys and to p x p-averaged image keys, each pooled key
weighted p * p (a log(p * p) score bias). Stock kernels take no per-key bias on their fast paths, so
two forms are timed against dense cuDNN / flash SDPA on the same tensors: the pooled attention with
the bias as an additive mask (SDPA's memory-efficient kernel), and two flash calls (text keys;
pooled image keys) merged by their log-sum-exps with log(p * p) added to the pooled one's. Pooling
itself (avg_pool2d of K and V) is timed inside both. Correctness: each against a float32 reference.

    python pooled_kv_speed.py OUT.json
"""
import json
import math
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench


def pool(x, rows, cols, p, text):
    """(B, H, S, D) with text first: the image part averaged over p x p patches."""
    b, h, _, d = x.shape
    img = x[:, :, text:].reshape(b * h, rows, cols, d).permute(0, 3, 1, 2)
    img = F.avg_pool2d(img, p).permute(0, 2, 3, 1).reshape(b, h, -1, d)
    return img


def pooled_masked(q, k, v, rows, cols, p, text):
    kp, vp = pool(k, rows, cols, p, text), pool(v, rows, cols, p, text)
    keys, values = torch.cat([k[:, :, :text], kp], 2), torch.cat([v[:, :, :text], vp], 2)
    bias = torch.zeros(keys.shape[2], device=q.device, dtype=q.dtype)
    bias[text:] = math.log(p * p)
    image = F.scaled_dot_product_attention(q[:, :, text:], keys, values, attn_mask=bias.expand(1, 1, 1, -1))
    return image


def pooled_merged(q, k, v, rows, cols, p, text):
    kp, vp = pool(k, rows, cols, p, text), pool(v, rows, cols, p, text)
    qi = q[:, :, text:]
    o1, l1 = torch.ops.aten._scaled_dot_product_flash_attention(qi, k[:, :, :text], v[:, :, :text])[:2]
    o2, l2 = torch.ops.aten._scaled_dot_product_flash_attention(qi, kp, vp)[:2]
    l2 = l2 + math.log(p * p)
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    return ((o1 * w1[..., None] + o2 * w2[..., None]) / (w1 + w2)[..., None]).to(q.dtype)


def reference(q, k, v, rows, cols, p, text):
    return pooled_masked(q.float(), k.float(), v.float(), rows, cols, p, text)


def main():
    out = sys.argv[1]
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for name, side in (("flux 1024", 64), ("flux 2048", 128)):
        text, heads, dim = 512, 24, 128
        seq = text + side * side
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = do_bench(lambda: F.scaled_dot_product_attention(q, k, v))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = do_bench(lambda: F.scaled_dot_product_attention(q, k, v))
        for p in (2, 4):
            ref = reference(q, k, v, side, side, p, text)
            row = {"shape": name, "p": p, "cudnn_ms": cudnn, "flash_ms": flash}
            for form, fn in (("masked", pooled_masked), ("merged", pooled_merged)):
                got = fn(q, k, v, side, side, p, text)
                row[f"{form}_rel_error"] = float((got.float() - ref).norm() / ref.norm())
                row[f"{form}_ms"] = do_bench(lambda: fn(q, k, v, side, side, p, text))
            pooled_keys = text + side * side // (p * p)
            image_share = (side * side) * pooled_keys / (seq * seq)  # the image rows' pairs; text rows not timed
            row["ideal_share_of_dense"] = image_share
            row["merged_of_ideal"] = cudnn * image_share / row["merged_ms"]
            print(json.dumps(row), flush=True)
            results["rows"].append(row)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
