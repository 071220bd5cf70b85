"""The patch-mean kernel's block size (lab script, stop 49): the buffer of pool heads' patch means at
8-128 patches a program, per layer's worth of heads (4 or 24) at FLUX 1K / 2K and SD3 1K, each
output against the first block size's (bit for bit) and timed beside dense SDPA on the same keys.
It sets the op's private block size, so it lives here, not under benchmarks/.

    PYTHONPATH=src python3 docs/history/pool_means_block.py OUT.json

H100, 2026-12-06 at 0407282: ``results/pool_means_block_h100.json``: 8 patches a program is the
fastest or within 5% everywhere, 1.2-2.7x faster than the 32 it was (the op takes 8 since).
"""
import json, sys, math
import torch, triton
from ditfastattn.ops import _pool_means as pm
from ditfastattn.ops._launch import DirectLaunches
from ditfastattn._geometry import TileGrid

def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "rows": []}
shapes = {"FLUX-1K": (1, 4096, 512, (1, 64, 64), 128, 24), "FLUX-2K": (1, 16384, 512, (1, 128, 128), 128, 24),
          "SD3-1K": (2, 4096, 333, (1, 64, 64), 64, 24)}
for name, (B, img, text, grid, D, H) in shapes.items():
    S = img + text
    k = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    tiles = TileGrid(grid)
    base = k.float().mean()  # touch
    dense = bench(lambda: torch.nn.functional.scaled_dot_product_attention(k.transpose(1,2), k.transpose(1,2), v.transpose(1,2)))
    for p in (2, 4):
        for nheads in (4, 24):
            heads = list(range(0, H, H // nheads))[:nheads]
            slot_heads = torch.tensor(heads, dtype=torch.int32, device="cuda")
            fused = ((p, tuple(heads)),)
            ref = None
            for block in (8, 16, 32, 64, 128):
                if block * p * p > 2048 * 4:
                    continue
                pm._BLOCK_P = block
                pm._launches = DirectLaunches(pm._means_kernel)
                out = pm.kernel_means(k, v, fused, slot_heads, text if name != "SD3-1K" else 0, tiles)
                if ref is None:
                    ref = out.clone()
                ok = bool(torch.equal(out, ref))
                t = bench(lambda: pm.kernel_means(k, v, fused, slot_heads, text if name != "SD3-1K" else 0, tiles))
                row = dict(shape=name, p=p, heads=nheads, block_p=block, us=t * 1e3, same=ok, dense_sdpa_us=dense * 1e3)
                res["rows"].append(row); print(row, flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
