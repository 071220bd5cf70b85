"""Experiment: pooled keys and values as a per-head method (``pool:<f>``), patched in from outside.

A ``pool:<f>`` head's image queries attend to the global keys and to the image keys and values
averaged over p x p patches of the grid (p = 1 / f), each pooled key standing for the p * p it
replaces (a log(p * p) score bias); global queries attend to every key, as in arrow heads. Its cost
is counted from the pooled key count. ``install()`` registers the kind and routes the op's pooled
heads here (the reference path: CPU only, no kernel), so that calibration, plans and the runtime
treat it as any other method. Not part of the library.

    PYTHONPATH=src python pooled_kv.py exact_target.py OUT.json --kind flux --target 0.7 --cache step \
        --embeddings emb.pt --add "pool:0.5;pool:0.25"
"""
import math
import runpy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import ditfastattn.methods as methods
from ditfastattn import ops
from ditfastattn._geometry import MODE_SKIP, TILE_FLAG

POOL_FLAG = 1 << 29


def is_pool_mode(mode: int) -> bool:
    return POOL_FLAG <= mode < TILE_FLAG


def _geometry(method, num_image_tokens, tiles):
    return POOL_FLAG | round(1 / method.fraction)


def _pooled_keys(image_len: int, p: int, tiles) -> int:
    if tiles is None:
        return math.ceil(image_len / (p * p))
    frames, rows, cols = tiles.grid
    return frames * math.ceil(rows / p) * math.ceil(cols / p)


def install() -> None:
    methods.KINDS["pool"] = methods.MethodKind("pool", (f"pool:{methods.FRACTION}",), _geometry, (0.10, 0.65, 0.65))
    methods.parse_method.cache_clear()
    density, attention = methods.density, ops.headwise_attention

    def pooled_density(mode, num_image_tokens, text_len, tiles=None):
        if not is_pool_mode(mode):
            return density(mode, num_image_tokens, text_len, tiles)
        seq, kept = num_image_tokens + text_len, _pooled_keys(num_image_tokens, mode & ~POOL_FLAG, tiles)
        return (text_len * seq + num_image_tokens * (text_len + kept)) / float(seq * seq)

    def pooled_attention(q, k, v, head_modes, *, segments=None, out=None, global_rows=True, **options):
        values = [int(m) for m in head_modes.tolist()]
        if not any(is_pool_mode(m) for m in values):
            return attention(q, k, v, head_modes, segments=segments, out=out, global_rows=global_rows, **options)
        layout = segments
        if layout is None or getattr(layout, "grid", None) is None or options.get("key_padding") is not None:
            raise NotImplementedError("pool heads need a TokenLayout with a grid and no padding")
        out = torch.empty_like(q) if out is None else out
        rest = torch.tensor([MODE_SKIP if is_pool_mode(m) else m for m in values], dtype=torch.int32, device=q.device)
        if any(not is_pool_mode(m) for m in values):
            attention(q, k, v, rest, segments=segments, out=out, global_rows=global_rows, **options)
        s, n = layout.image_start, layout.image_len
        frames, rows, cols = layout.grid
        for p in sorted({m & ~POOL_FLAG for m in values if is_pool_mode(m)}):
            heads = torch.tensor([h for h, m in enumerate(values) if m == POOL_FLAG | p], device=q.device)
            qh, kh, vh = (t.index_select(2, heads).transpose(1, 2).float() for t in (q, k, v))  # (B, h, S, D)

            def pool(x):
                b, h, _, d = x.shape
                grid = x[:, :, s:s + n].reshape(b, h * frames, rows, cols, d).permute(0, 1, 4, 2, 3).reshape(b, -1, rows, cols)
                grid = F.avg_pool2d(grid, p, ceil_mode=True)
                grid = grid.reshape(b, h * frames, d, -1).permute(0, 1, 3, 2).reshape(b, h, -1, d)
                return torch.cat([x[:, :, :s], grid, x[:, :, s + n:]], dim=2), grid.shape[2]

            kp, kept = pool(kh)
            vp, _ = pool(vh)
            bias = torch.zeros(kp.shape[2], device=q.device)
            bias[s:s + kept] = math.log(p * p)
            scale = options.get("scale")
            image = F.scaled_dot_product_attention(qh[:, :, s:s + n], kp, vp, attn_mask=bias.view(1, -1), scale=scale)
            out[:, s:s + n, heads] = image.transpose(1, 2).to(out.dtype)
            if global_rows:
                for rows_ in (slice(0, s), slice(s + n, q.shape[1])):
                    if rows_.stop > rows_.start:
                        full = F.scaled_dot_product_attention(qh[:, :, rows_], kh, vh, scale=scale)
                        out[:, rows_, heads] = full.transpose(1, 2).to(out.dtype)
        return out

    methods.density = pooled_density
    ops.headwise_attention = pooled_attention


if __name__ == "__main__":
    install()
    script = Path(sys.argv[1])
    if not script.is_absolute() and not script.exists():
        script = Path(__file__).resolve().parent / script
    sys.argv = [str(script)] + sys.argv[2:]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")
