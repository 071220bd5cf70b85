"""GPU correctness check of the fused kernels (Triton, and Gluon on Hopper) against the float32 reference.

Several hundred random cases per kernel: head dims 32/64/128 (Gluon: 64/128), fp16/bf16, batch 1-3,
1-8 heads, text lengths 0/77/154/333/512 at the start or the end, image lengths with and without a
partial last block, a second global segment after the image (reference-image tokens, as FLUX.1
Kontext and FLUX.2 place them), key padding under each bias table (key masks, boolean and float
0/1 masks between queries and keys; runs of padding at the end of the text, scattered padded
tokens, batch elements with every key padded; half of them with no image token padded, marked
``global_only``, which tile launches under a key mask take to skip the image tiles' checks), random per-head plans (full, skip, arrows of every
width), gridded layouts (a third of the cases: frames x rows x cols with tiles of 2 x 8 x 8 or 1 x 8 x 16, most
grids ragged so that tiles are partial, tile windows of every extent mixed with full, skip and band
heads in one call, run as the op runs them: the plain launch, then the tiled one over keys and
values in tile order), tensor layouts that take the TMA path ((B, S, H, D), (B, H, S, D)
transposed, fused QKV slices) and, for Triton, one that takes the pointer path, outputs
(B, S, H, D), (B, H, S, D) and, for Gluon, one off 16-byte alignment (the epilogue's stores without
the aligned-vector hint), and every launch configuration the kernel chooses from (cases rotate
through them). Half the cases first launch on other inputs of the same layout, so that the checked
launch reuses the compiled kernel directly, without Triton's dispatch (``ops._launch``). ``out`` is
poisoned with NaN before each run: every computed element must be written and finite, skipped
heads must keep the poison bit for bit.

Error measure: relative Frobenius error over the computed heads against the reference on the same
(low-precision) inputs in float32, divided by the error of torch SDPA's memory-efficient backend
(a same-precision tensor-core kernel: P and the output rounded to the input dtype) with the
equivalent mask (from ``ops._dense``, the oracle the CPU tests use). A case passes at a ratio of at
most 2. Rows that keep no key (every visible key padded) are left out of the measure and must be
exactly 0 with log-sum-exp -inf.

    PYTHONPATH=src python3 benchmarks/kernel_check.py OUT.json [--impls triton gluon] [--cases 400] [--seed 0]
        [--budget-s 240]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditfastattn import ops
from ditfastattn.ops import (
    KEY_PADDING, MODE_FULL, MODE_SKIP, PAIR_PADDING, Padding, TokenLayout, _triton, headwise_attention,
)
from ditfastattn.ops._dense import score_bias
from ditfastattn.ops._tile_order import tiled_keys

TEXT_LENS = (0, 77, 154, 333, 512)
REFERENCE_LENS = (0, 0, 64, 130, 1024)  # global tokens after the image, behind text first
PADDING_TABLES = {"keys": KEY_PADDING, "pairs": PAIR_PADDING, "float 0/1": ((1.0, 0.0), (0.0, 0.0))}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
HEAD_DIMS = (32, 64, 128)
MAX_RATIO = 2.0
TILES = ((2, 8, 8), (1, 8, 16))
TILE_HEAD_DIMS = (64, 128)  # the video models' (CogVideoX 64; HunyuanVideo, Wan 128)
MAX_GRID_TOKENS = 4096  # the same-precision yardstick builds S x S masks per head


def kernel_module(impl):
    if impl == "gluon":
        from ditfastattn.ops import _gluon

        return _gluon
    return _triton


def random_grid(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A grid and tile shape: mostly ragged (partial tiles along some axes; a third of these only where
    a partial tile's pad slots end its block, which the Gluon kernel masks without loads), sometimes
    whole tiles, sometimes smaller than one tile."""
    tile = rng.choice(TILES)
    while True:
        draw = rng.random()
        if draw < 0.2:  # whole tiles along every axis
            grid = tuple(t * rng.randint(1, 4) for t in tile)
        elif draw < 0.45:  # whole along cols, and along rows unless a tile is one frame deep
            size_t, size_h, size_w = tile
            rows = rng.randint(1, 40) if size_t == 1 else size_h * rng.randint(1, 4)
            grid = (rng.randint(1, 3 if size_t == 1 else 9), rows, size_w * rng.randint(1, 4))
        else:
            grid = (1 if tile[0] == 1 else rng.randint(1, 9), rng.randint(1, 40), rng.randint(1, 60))
        if math.prod(grid) <= MAX_GRID_TOKENS:
            return grid, tile


def random_case(rng: random.Random, index: int, impl: str = "triton") -> dict:
    gridded = rng.random() < 0.35
    dim = rng.choice(TILE_HEAD_DIMS if gridded else HEAD_DIMS if impl == "triton" else (64, 128))
    layouts = ["bshd", "bshd", "bhsd", "fused"] + (["padded"] if impl == "triton" and not gridded else [])
    layout = rng.choice(layouts)
    heads = rng.randint(1, 8)
    text_len = rng.choice(TEXT_LENS)
    blocks = rng.randint(1, 24)
    image = blocks * ops.IMAGE_BLOCK - rng.choice([0, 0, rng.randint(1, ops.IMAGE_BLOCK - 1)])
    grid = tile = None
    if gridded:
        grid, tile = random_grid(rng)
        image = math.prod(grid)
    if layout == "padded":  # odd strides: one compiled specialization for every pointer-path case
        heads |= 1
        if (image + text_len) % 2 == 0:
            image -= 1
    image = max(image, 1)
    text_first = rng.random() < 0.5
    after = 0  # reference-image tokens after the image, behind text first
    padding = None
    if text_first:
        after = rng.choice(REFERENCE_LENS)
        if layout == "padded" and (image + text_len + after) % 2 == 0:
            after += 1
    if rng.random() < 0.35:
        padding = {"table": rng.choice(list(PADDING_TABLES)), "seed": rng.randint(0, 2**31 - 1),
                   "all_padded": rng.random() < 0.2, "global_only": rng.random() < 0.5}
    n_blocks = -(-image // ops.IMAGE_BLOCK)
    modes = [rng.choice([MODE_FULL, MODE_SKIP, rng.randint(0, n_blocks)]) for _ in range(heads)]
    if gridded:  # mostly tile heads, each a random window up to the whole grid
        counts = ops.TileGrid(grid, tile).counts
        modes = [ops.tile_mode(*(rng.randint(0, n) for n in counts)) if rng.random() < 0.6 else m for m in modes]
    configs = kernel_module(impl).tile_configs(dim)
    config = configs[index % len(configs)]
    extra = {}
    if impl == "gluon":  # few programs make each take many items (and some none)
        extra["programs"] = rng.choice([None, 1, 2, 3, 7])
    return {
        "impl": impl,
        "dim": dim, "dtype": rng.choice(list(DTYPES)), "batch": rng.choice([1, 1, 2, 3]), "heads": heads,
        "text_len": text_len, "image": image, "text_first": text_first, "after": after, "padding": padding,
        "layout": layout, "grid": grid, "tile": tile,
        "out_layout": rng.choice(["bshd", "bhsd"] + (["unaligned"] if impl == "gluon" else [])), "modes": modes,
        "return_lse": rng.random() < 0.5,
        "scale_in": rng.choice([0.5, 1.0, 2.0, 3.0]), "config": config, "warm": rng.random() < 0.5, **extra,
    }


def make_tensor(shape, dtype, layout, gen, scale=1.0):
    batch, seq, heads, dim = shape
    device = "cuda"
    if layout == "bhsd":
        return (torch.randn(batch, heads, seq, dim, generator=gen, device=device) * scale).to(dtype).transpose(1, 2)
    if layout == "padded":
        wide = torch.randn(batch, seq, heads, dim + 1, generator=gen, device=device) * scale
        return wide.to(dtype)[..., :dim]
    return (torch.randn(batch, seq, heads, dim, generator=gen, device=device) * scale).to(dtype)


def make_inputs(case, gen):
    dtype = DTYPES[case["dtype"]]
    shape = (case["batch"], case["image"] + case["text_len"] + case["after"], case["heads"], case["dim"])
    if case["layout"] == "fused":
        batch, seq, heads, dim = shape
        qkv = (torch.randn(batch, seq, 3, heads, dim, generator=gen, device="cuda") * case["scale_in"]).to(dtype)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    return tuple(make_tensor(shape, dtype, case["layout"], gen, case["scale_in"]) for _ in range(3))


def case_layout(case, seq) -> TokenLayout:
    """Text first then the image then reference tokens, or the image then text; with the case's grid."""
    return TokenLayout(seq, case["text_len"] if case["text_first"] else 0, case["image"], case["grid"], case["tile"])


def make_padding(case, batch, seq):
    """Runs of padding at the end of the first global segment (a text mask), scattered padded tokens
    anywhere, and maybe a batch element whose every token is padding; or (``global_only``) none of
    it in the image, which the padding then says (as the runtime marks a text mask)."""
    spec = case["padding"]
    if spec is None:
        return None
    gen = torch.Generator().manual_seed(spec["seed"])
    mask = torch.rand(batch, seq, generator=gen) < 0.05
    text = case["text_len"]
    for b in range(batch):
        valid = int(torch.randint(0, text + 1, (1,), generator=gen))
        start = 0 if case["text_first"] else seq - text
        mask[b, start + valid : start + text] = True
    if spec["all_padded"]:
        mask[-1] = True
    global_only = spec.get("global_only", False)
    if global_only:
        layout = case_layout(case, seq)
        mask[:, layout.image_start : layout.image_start + layout.image_len] = False
    return Padding(mask.cuda(), PADDING_TABLES[spec["table"]], global_only)


def sdpa_same_precision(q, k, v, modes, layout, padding, kept):
    """Memory-efficient SDPA in the input dtype over the kept heads, (B, S, Hk, D)."""
    bias = torch.stack([score_bias(m, layout, padding, q.dtype, q.device) for m in modes if m != MODE_SKIP], 1)
    qh, kh, vh = (t[:, :, kept].transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias.expand(q.shape[0], -1, -1, -1))
    return out.transpose(1, 2)


def make_out(case, q):
    batch, seq, heads, dim = q.shape
    if case["out_layout"] == "bhsd":
        out = torch.empty(batch, heads, seq, dim, dtype=q.dtype, device="cuda").transpose(1, 2)
    elif case["out_layout"] == "unaligned":  # one element in: the epilogue's stores without the aligned hint
        out = torch.empty(batch * seq * heads * dim + 1, dtype=q.dtype, device="cuda")[1:].view(batch, seq, heads, dim)
    else:
        out = torch.empty(batch, seq, heads, dim, dtype=q.dtype, device="cuda")
    return out.fill_(float("nan"))


def run_case(case, gen):
    q, k, v = make_inputs(case, gen)
    batch, seq, heads, dim = q.shape
    layout = case_layout(case, seq)
    padding = make_padding(case, batch, seq)
    modes = torch.tensor(case["modes"], dtype=torch.int32, device="cuda")

    def launch(q, k, v, out):
        args = (q, k, v, modes, layout.image_start, layout.image_len, out, 1.0 / math.sqrt(dim), case["return_lse"],
                padding)
        extra = {"programs": case["programs"]} if "programs" in case else {}
        out, lse = kernel_module(case["impl"]).attention(*args, config=case["config"], **extra)
        if layout.grid is None:
            return out, lse
        # The op's second launch: the tile heads in tile order (keys and values gathered where the kernel
        # does not read them in place).
        keys = tiled_keys(k, v, None if padding is None else padding.mask, layout,
                          gather=not kernel_module(case["impl"]).TILES_IN_PLACE)
        return kernel_module(case["impl"]).attention(*args, tiled=keys, lse=lse, config=case["config"], **extra)

    if case["warm"]:  # a first launch on other inputs of the same layout: the checked one skips the JIT
        warm_q, warm_k, warm_v = make_inputs(case, gen)
        launch(warm_q, warm_k, warm_v, make_out(case, warm_q))
    got, lse = launch(q, k, v, make_out(case, q))
    ref, ref_lse = headwise_attention(q.float(), k.float(), v.float(), modes, segments=layout, key_padding=padding,
                                      out=torch.zeros(q.shape, device="cuda"), impl="reference", return_lse=True)
    kept = modes != MODE_SKIP
    result = {"skip_untouched": bool(torch.isnan(got[:, :, ~kept]).all())}
    if not bool(kept.any()):
        result.update(ratio=0.0, err=0.0, base_err=0.0, finite=True, lse_err=0.0, masked_rows_ok=True)
    else:
        sub = got[:, :, kept].float()
        result["finite"] = bool(torch.isfinite(sub).all())
        # Rows that keep no key: exactly 0 (lse -inf); the measure covers the others.
        live = torch.isfinite(ref_lse[:, kept]).transpose(1, 2)[..., None]
        result["masked_rows_ok"] = bool((torch.where(live, 0, sub) == 0).all())
        if lse is not None:
            result["masked_rows_ok"] &= bool(torch.isneginf(lse[:, kept][~live[..., 0].transpose(1, 2)]).all())
        result.update(err=0.0, base_err=0.0, ratio=0.0, lse_err=0.0)
        if bool(live.any()):
            reference = torch.where(live, ref[:, :, kept], 0)
            norm = reference.norm()
            err = float((torch.where(live, sub, 0) - reference).norm() / norm)
            base = sdpa_same_precision(q, k, v, case["modes"], layout, padding, kept).float()
            base_err = float((torch.where(live, base, 0) - reference).norm() / norm)
            result.update(err=err, base_err=base_err, ratio=err / base_err if base_err > 0 else float("inf"))
            if lse is not None:
                live_lse = live[..., 0].transpose(1, 2)
                result["lse_err"] = float((lse[:, kept] - ref_lse[:, kept])[live_lse].abs().max())
    if lse is not None:
        result["lse_skip_ok"] = bool(torch.isneginf(lse[:, ~kept]).all())
    result["ok"] = (
        result["skip_untouched"] and result["finite"] and result["masked_rows_ok"] and result["ratio"] <= MAX_RATIO
        and result["lse_err"] <= 1e-3 and result.get("lse_skip_ok", True)
    )
    return result


# Grids of the precompiled tiled launches, per tile shape: ragged (pad slots masked) and whole.
_WARM_GRIDS = {(2, 8, 8): ((3, 5, 7), (2, 8, 16)), (1, 8, 16): ((1, 13, 11), (1, 8, 16))}


def compiled_in_threads(one, jobs) -> tuple[int, float]:
    """Run ``one`` on every job in threads (compilation releases the GIL); (jobs, seconds)."""
    start = time.time()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(one, jobs))
    torch.cuda.synchronize()
    return len(jobs), time.time() - start


def precompile():
    """Compile every configuration of both paths, with and without padding, and of the tiled
    launch, ragged or not, ahead, in threads (compilation releases the GIL)."""
    jobs = []
    for dtype in DTYPES.values():
        for return_lse in (False, True):
            for padded in (False, True):
                for dim in HEAD_DIMS:
                    for config in _triton.tile_configs(dim):
                        for layout in ("bshd", "padded"):
                            jobs.append((dtype, dim, layout, return_lse, padded, config, None))
                        if dim in TILE_HEAD_DIMS:
                            jobs.extend((dtype, dim, "bshd", return_lse, padded, config, grid)
                                        for grids in _WARM_GRIDS.values() for grid in grids)

    def one(job):
        dtype, dim, layout, return_lse, padded, config, grid = job
        gen = torch.Generator(device="cuda").manual_seed(0)
        image = 178 if grid is None else math.prod(grid)
        tile = None if grid is None else next(t for t, grids in _WARM_GRIDS.items() if grid in grids)
        seq = 77 + image
        q, k, v = (make_tensor((1, seq, 3, dim), dtype, layout, gen) for _ in range(3))
        modes = torch.tensor([MODE_FULL, 0, MODE_SKIP], dtype=torch.int32, device="cuda")
        padding = Padding(torch.zeros(1, seq, dtype=torch.bool, device="cuda")) if padded else None
        keys = None
        if grid is not None:
            keys = tiled_keys(k, v, None if padding is None else padding.mask, TokenLayout(seq, 77, image, grid, tile))
        _triton.attention(q, k, v, modes, 77, image, torch.empty_like(q), 0.1, return_lse, padding, tiled=keys,
                          config=config, warmup=True)

    return compiled_in_threads(one, jobs)


def gluon_variants(case) -> set:
    """The Gluon kernel's compiled variants a case launches: (dtype, head dim, LSE, key mask, pair
    table, output off 16-byte alignment, tile shape or None, pad slots ending each block, padding
    checked on global key tiles only), the plain launch's and, on a grid, the tiled one's (whose key
    mask also covers the pad slots of a ragged grid where they do not end each block)."""
    from ditfastattn.ops import _gluon

    padded = case["padding"] is not None
    pair = padded and case["padding"]["table"] != "keys"
    common = (case["dtype"], case["dim"], case["return_lse"])
    unaligned = case["out_layout"] == "unaligned"
    variants = {(*common, padded, pair, unaligned, None, False, False)}
    if case["grid"] is not None:
        tiles = ops.TileGrid(case["grid"], case["tile"])
        tail = _gluon.pad_tail(tiles)
        global_only = padded and not pair and case["padding"]["global_only"] and (tail or not tiles.ragged)
        variants.add((*common, padded or (tiles.ragged and not tail), pair, unaligned, tuple(case["tile"]), tail,
                      global_only))
    return variants


def precompile_gluon(cases):
    """Compile the Gluon kernel's variants that ``cases`` launch ahead, in threads, by launching each
    on a small input (for the tiled launch a grid of its tile shape, whole or ragged as the variant needs)."""
    from ditfastattn.ops import _gluon

    jobs = sorted(set().union(*(gluon_variants(case) for case in cases)), key=repr)

    def one(job):
        dtype, dim, return_lse, padded, pair, unaligned, tile, tail, global_only = job
        gen = torch.Generator(device="cuda").manual_seed(0)
        grid = None
        if tile is not None:  # whole tiles, or (tail) partial ones along the axis whose pad slots end a block
            grid = (tile[0] + 1, tile[1], 2 * tile[2]) if tail and tile[0] > 1 else (
                tile[0], tile[1] + 3 if tail else tile[1], 2 * tile[2])
        image = 178 if tile is None else math.prod(grid)
        q, k, v = (make_tensor((1, 77 + image, 3, dim), DTYPES[dtype], "bshd", gen) for _ in range(3))
        modes = torch.tensor([MODE_FULL, 0 if tile is None else ops.tile_mode(0, 0, 0), MODE_SKIP], dtype=torch.int32,
                             device="cuda")
        table = PAIR_PADDING if pair else KEY_PADDING
        padding = Padding(torch.zeros(1, q.shape[1], dtype=torch.bool, device="cuda"), table,
                          global_only) if padded else None
        keys = None
        if tile is not None:
            keys = tiled_keys(k, v, None if padding is None else padding.mask,
                              TokenLayout(q.shape[1], 77, image, grid, tile), gather=False)
        out = make_out({"out_layout": "unaligned" if unaligned else "bshd"}, q)
        _gluon.attention(q, k, v, modes, 77, image, out, 0.1, return_lse, padding, tiled=keys)

    return compiled_in_threads(one, jobs)


def check(impl, args):
    """Precompile, then run the cases until ``args.budget_s``; the summary."""
    rng = random.Random(args.seed)
    cases = [random_case(rng, index, impl) for index in range(args.cases)]
    try:
        n_compiled, compile_s = precompile() if impl == "triton" else precompile_gluon(cases)
        print(f"precompiled {n_compiled} {impl} kernels in {compile_s:.1f} s", flush=True)
    except Exception as err:  # the cases then compile what they need as they go
        n_compiled, compile_s = 0, 0.0
        print(f"precompile failed, compiling on demand: {err!r}", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    start = time.time()
    results, failures = [], []
    worst = None
    for case in cases:
        if time.time() - start > args.budget_s:
            break
        result = {**run_case(case, gen), "warm": case["warm"], "after": case["after"],
                  "padded": case["padding"] is not None, "tiled": case["grid"] is not None}
        results.append(result)
        if not result["ok"]:
            failures.append({"case": case, "result": result})
            print("FAIL", case, result, flush=True)
        if worst is None or result["ratio"] > worst["result"]["ratio"]:
            worst = {"case": case, "result": result}
    torch.cuda.synchronize()
    summary = {
        "cases": len(results), "failed": len(failures), "max_ratio_allowed": MAX_RATIO,
        "direct_launch_cases": sum(r["warm"] for r in results),
        "two_segment_cases": sum(r["after"] > 0 for r in results),
        "padded_cases": sum(r["padded"] for r in results),
        "tile_cases": sum(r["tiled"] for r in results),
        "worst_error_ratio": max(r["ratio"] for r in results),
        "median_error_ratio": sorted(r["ratio"] for r in results)[len(results) // 2],
        "worst_lse_abs_error": max(r["lse_err"] for r in results),
        "worst_case": worst, "failures": failures[:20], "check_s": round(time.time() - start, 1),
        "precompiled_kernels": n_compiled, "precompile_s": round(compile_s, 1),
    }
    print(f"kernel_check {impl}: {summary['cases']} cases ({summary['tile_cases']} with tile windows), "
          f"{summary['failed']} failed, worst error ratio "
          f"{summary['worst_error_ratio']:.3f} (median {summary['median_error_ratio']:.3f}), "
          f"worst |lse error| {summary['worst_lse_abs_error']:.2e}", flush=True)
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON summary path")
    parser.add_argument("--impls", nargs="*", default=["triton"], choices=["triton", "gluon"])
    parser.add_argument("--cases", type=int, default=400, help="per kernel")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=240.0, help="per kernel: stop drawing cases after this long")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda, "kernels": {},
    }
    for impl in args.impls:
        summary["kernels"][impl] = check(impl, args)
        with open(args.out, "w") as f:  # after every kernel, so a later failure keeps the rest
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
