"""Local error of pooled keys and values against arrow windows, per head (FLUX or SD3 testbed, CPU).

    PYTHONPATH=src python docs/history/pooled_kv_local_error.py flux
"""
import sys, math
from pathlib import Path
import numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, "benchmarks"); sys.path.insert(0, "docs/history")
from oracle_heads import testbed
import quality as q
import ditfastattn
from ditfastattn import Plan, ops
from ditfastattn.methods import parse_method
from ditfastattn.runtime import LayerRuntime

kind = sys.argv[1]
STEPS, KEEP = 20, {3, 8, 13, 18}
pipe = testbed(kind, Path(".carry/emb.pt"), "cpu")
records = []
attend = LayerRuntime.attend
def recording(self, q_, k_, v_, **kw):
    out = attend(self, q_, k_, v_, **kw)
    if self.session.step in KEEP:
        records.append((self.session.step, self.name, q_.clone(), k_.clone(), v_.clone(), self.geometry))
    return out
LayerRuntime.attend = recording
ditfastattn.apply(pipe, Plan.uniform(pipe.transformer, STEPS, "full"))
prompt = q.heldout_prompts(2026)[0]
with torch.no_grad():
    pipe(prompt=[prompt], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent")
ditfastattn.remove(pipe)

def pooled(qq, kk, vv, layout, p):
    # (B,S,H,D) -> (B,H,S,D); image keys/values averaged over p x p patches, each standing for p*p keys
    _, rows, cols = layout.grid
    s, n = layout.image_start, layout.image_len
    def pool(x):
        img = x[:, s:s + n]  # B,n,H,D
        B, _, H, D = img.shape
        img = img.reshape(B, rows, cols, H * D).permute(0, 3, 1, 2)
        img = F.avg_pool2d(img, p, ceil_mode=True).permute(0, 2, 3, 1).reshape(B, -1, H, D)
        return torch.cat([x[:, :s], img, x[:, s + n:]], 1), img.shape[1]
    kp, m = pool(kk); vp, _ = pool(vv)
    bias = torch.zeros(kp.shape[1]); bias[s:s + m] = math.log(p * p)
    out = F.scaled_dot_product_attention(qq.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=bias.view(1, -1))
    return out.transpose(1, 2)

names = ["arrow:0.25", "arrow:0.125", "arrow:0.0625", "pool:2", "pool:4"]
rows_out = []
for step, name, qq, kk, vv, geom in records:
    layout = geom.layout
    exact = F.scaled_dot_product_attention(qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2)).transpose(1, 2)
    var = ((exact - exact.mean(1, keepdim=True)) ** 2).sum()
    H = qq.shape[2]
    errs = []
    for m in names:
        if m.startswith("pool"):
            out = pooled(qq, kk, vv, layout, int(m.split(":")[1]))
        else:
            modes = torch.full((H,), parse_method(m).mode(layout.image_len, layout.tile_grid()), dtype=torch.int32)
            out = ops.headwise_attention(qq, kk, vv, modes, **geom.op, impl="reference", global_rows=False)
        rows_ = slice(layout.image_start, layout.image_start + layout.image_len)
        errs.append((((out[:, rows_] - exact[:, rows_]) ** 2).sum((0, 1, 3)) / var * H).numpy())
    rows_out.append((step, name, np.array(errs)))
print("grid", records[0][5].layout.grid, "image", records[0][5].layout.image_len, "seq", records[0][2].shape)
E = np.stack([r[2] for r in rows_out])  # (layer-steps, methods, heads)
for i, m in enumerate(names):
    print(f"{m:14s} total error {E[:, i].sum():9.3f}  median head {np.median(E[:, i]):.4f}")
def cmp(a, b):
    ia, ib = names.index(a), names.index(b)
    win = E[:, ia] < E[:, ib]
    mixed = np.mean([0 < w.sum() < w.size for w in win])
    print(f"{a} beats {b}: {win.mean():.2f} of heads; layer-steps where heads disagree: {mixed:.2f}; "
          f"sum of per-head min {np.minimum(E[:, ia], E[:, ib]).sum():.3f} vs per-layer min "
          f"{np.minimum(E[:, ia].sum(1), E[:, ib].sum(1)).sum():.3f}")
cmp("pool:2", "arrow:0.25"); cmp("pool:4", "arrow:0.0625"); cmp("pool:2", "arrow:0.125"); cmp("pool:4", "arrow:0.125")
for step in sorted(KEEP):
    sel = [i for i, r in enumerate(rows_out) if r[0] == step]
    print(step, " ".join(f"{m}={E[sel, i].sum():.2f}" for i, m in enumerate(names)))
