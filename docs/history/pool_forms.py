"""GPU: which stock-kernel form runs a pool head's image rows fastest (lab script, issue 16).

Image queries against two key sets, the global keys with the loose image tokens (bias 0) and the
p x p patch means (bias log(p * p)). Forms, each against the float32 formula:
- merged: two flash calls merged by log-sum-exp (the library's form at the time);
- widened: one call, the bias folded into an extra head-dim column (q: 1, k: bias / scale), padded
  to a multiple of 8, under flash and under cuDNN;
- masked: one call with a (1, 1, 1, K) additive mask, under cuDNN and the memory-efficient kernel;
- flex: FlexAttention (compiled) with the bias as a score_mod.
Dense cuDNN over every key is the yardstick of speed (the image rows' share of a full head).

    python pool_forms.py OUT.json
"""
import json
import math
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention
from triton.testing import do_bench

flex = torch.compile(flex_attention, dynamic=False)


def flash_lse(q, k, v):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]


def merged(q, k_own, v_own, k_pool, v_pool, bias):
    o1, l1 = flash_lse(q, k_own, v_own)
    o2, l2 = flash_lse(q, k_pool, v_pool)
    l2 = l2 + bias
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    t = w1 + w2
    return (o1.float() * (w1 / t)[..., None] + o2.float() * (w2 / t)[..., None]).to(q.dtype)


def widened(backend):
    def run(q, k_own, v_own, k_pool, v_pool, bias):
        b, h, n, d = q.shape
        scale = d ** -0.5
        extra = 8
        qw = torch.cat([q, q.new_ones(b, h, n, 1), q.new_zeros(b, h, n, extra - 1)], -1)
        keys = torch.cat([k_own, k_pool], 2)
        column = torch.cat([keys.new_zeros(b, h, k_own.shape[2], 1), keys.new_full((b, h, k_pool.shape[2], 1), bias / scale)], 2)
        kw = torch.cat([keys, column, keys.new_zeros(b, h, keys.shape[2], extra - 1)], -1)
        vw = torch.cat([torch.cat([v_own, v_pool], 2), keys.new_zeros(b, h, keys.shape[2], extra)], -1)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qw, kw, vw, scale=scale)[..., :d]
    return run


def masked(backend):
    def run(q, k_own, v_own, k_pool, v_pool, bias):
        keys, values = torch.cat([k_own, k_pool], 2), torch.cat([v_own, v_pool], 2)
        mask = torch.zeros(keys.shape[2], device=q.device, dtype=q.dtype)
        mask[k_own.shape[2]:] = bias
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.view(1, 1, 1, -1).expand(q.shape[0], q.shape[1], q.shape[2], -1))
    return run


def flexed(q, k_own, v_own, k_pool, v_pool, bias):
    keys, values = torch.cat([k_own, k_pool], 2), torch.cat([v_own, v_pool], 2)
    own = k_own.shape[2]

    def score_mod(score, b, h, qi, ki):
        return score + torch.where(ki >= own, bias, 0.0)

    return flex(q, keys, values, score_mod=score_mod)


def reference(q, k_own, v_own, k_pool, v_pool, bias):
    keys, values = torch.cat([k_own, k_pool], 2).float(), torch.cat([v_own, v_pool], 2).float()
    mask = torch.zeros(keys.shape[2], device=q.device)
    mask[k_own.shape[2]:] = bias
    s = (q.float() @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5 + mask
    return torch.softmax(s, -1) @ values


def main():
    out = sys.argv[1]
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    forms = {"merged": merged, "widened flash": widened(SDPBackend.FLASH_ATTENTION),
             "widened cudnn": widened(SDPBackend.CUDNN_ATTENTION), "masked cudnn": masked(SDPBackend.CUDNN_ATTENTION),
             "masked efficient": masked(SDPBackend.EFFICIENT_ATTENTION), "flex": flexed}
    for name, side in (("flux 1024", 64), ("flux 2048", 128)):
        text, heads, dim = 512, 24, 128
        seq = text + side * side
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense = do_bench(lambda: F.scaled_dot_product_attention(q, k, v))
        for p in (2, 4):
            qi = q[:, :, text:]
            pooled = [x[:, :, text:].reshape(1, heads, side // p, p, side // p, p, dim).mean((3, 5)).reshape(1, heads, -1, dim)
                      for x in (k, v)]
            args = (qi, k[:, :, :text], v[:, :, :text], pooled[0], pooled[1], math.log(p * p))
            ref = reference(qi[:, :4], *(a[:, :4] for a in args[1:5]), args[5])
            share = side * side * (text + side * side // (p * p)) / seq**2
            row = {"shape": name, "p": p, "cudnn_dense_ms": dense, "image_rows_share": share}
            for form, fn in forms.items():
                try:
                    got = fn(*args)
                    row[f"{form} rel_error"] = float((got[:, :4].float() - ref).norm() / ref.norm())
                    row[f"{form} ms"] = do_bench(lambda: fn(*args))
                    row[f"{form} of_ideal"] = dense * share / row[f"{form} ms"]
                except Exception as err:  # a backend that refuses the call
                    row[f"{form} error"] = f"{type(err).__name__}: {str(err)[:200]}"
            print(json.dumps(row), flush=True)
            results["rows"].append(row)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
