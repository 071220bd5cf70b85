"""Uniform pooled-KV attention against uniform arrow windows, end to end on a testbed (CPU).

Pool heads are patched into the layer runtime here (at every step); arrows run as plans.

    PYTHONPATH=src python docs/history/pooled_kv_uniform.py flux 16
"""
import sys, math, time
from pathlib import Path
import numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, "benchmarks"); sys.path.insert(0, "docs/history")
from oracle_heads import testbed
import quality as q
import ditfastattn
from ditfastattn import Plan
from ditfastattn.runtime import LayerRuntime

kind = sys.argv[1]; N = int(sys.argv[2]) if len(sys.argv) > 2 else 16
STEPS = 20
pipe = testbed(kind, Path(".carry/emb.pt"), "cpu")
held = q.heldout_prompts(2026)[:N]
POOL = {"p": None, "rows": 0, "removed": 0.0, "total": 0.0}

def pooled_rows(qq, kk, vv, layout, p):
    _, rows, cols = layout.grid
    s, n = layout.image_start, layout.image_len
    def pool(x):
        img = x[:, s:s + n]
        B, _, H, D = img.shape
        img = img.reshape(B, rows, cols, H * D).permute(0, 3, 1, 2)
        img = F.avg_pool2d(img, p, ceil_mode=True).permute(0, 2, 3, 1).reshape(B, -1, H, D)
        return torch.cat([x[:, :s], img, x[:, s + n:]], 1), img.shape[1]
    kp, m = pool(kk); vp, _ = pool(vv)
    bias = torch.zeros(kp.shape[1], dtype=qq.dtype); bias[s:s + m] = math.log(p * p)
    qi = qq[:, s:s + n]
    out = F.scaled_dot_product_attention(qi.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=bias.view(1, -1))
    return out.transpose(1, 2), m

attend = LayerRuntime.attend
def patched(self, q_, k_, v_, *, dense, **kw):
    p = POOL["p"]
    if p is None:
        return attend(self, q_, k_, v_, dense=dense, **kw)
    attend(self, q_, k_, v_, dense=dense, **kw)  # sets self.geometry
    layout = self.geometry.layout
    out = dense().clone()
    img, m = pooled_rows(q_, k_, v_, layout, p)
    s, n = layout.image_start, layout.image_len
    out[:, s:s + n] = img.to(out.dtype)
    S = q_.shape[1]
    POOL["removed"] += n * (n - m); POOL["total"] += S * S
    return out
LayerRuntime.attend = patched

t0 = time.perf_counter()
refs = q.images(pipe, held, STEPS, 1)
print("full", round(time.perf_counter() - t0, 1), "s", flush=True)
results = {}
def score(name, imgs, sparsity):
    s, p = q.per_image(imgs, refs)
    s = np.asarray(s)
    boot = np.random.default_rng(1).integers(0, len(s), (2000, len(s)))
    lo, hi = np.percentile(s[boot].mean(1), [2.5, 97.5])
    print(f"{name:16s} sparsity {sparsity:.3f}  SSIM {s.mean():.3f} [{lo:.3f}, {hi:.3f}]  PSNR {np.mean(p):.1f}", flush=True)
for w in ("arrow:0.5", "arrow:0.25", "arrow:0.125"):
    plan = Plan.uniform(pipe.transformer, STEPS, w)
    with q.applied(pipe, plan):
        imgs = q.images(pipe, held, STEPS, 1)
    score(w, imgs, plan.summary(1024, 32)["sparsity"])
full = Plan.uniform(pipe.transformer, STEPS, "full")
for p in (2, 4):
    POOL.update(p=p, removed=0.0, total=0.0)
    with q.applied(pipe, full):
        imgs = q.images(pipe, held, STEPS, 1)
    score(f"pool:{p}", imgs, POOL["removed"] / POOL["total"])
    POOL["p"] = None
