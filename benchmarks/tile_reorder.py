"""Tile windows at video sizes: the reorder into tile order against the attention it serves, and tile
plans against cuDNN SDPA dense, flash SDPA and FlexAttention with the same block mask.

Shapes (bf16, batch 1, head dim 128): HunyuanVideo-like, a 33 x 45 x 80 grid (720p x 129 frames:
118800 video tokens) then 256 text tokens, 24 heads; Wan-like, 21 x 45 x 80 (720p x 81 frames:
75600 tokens), no text in self-attention, 40 heads. Tiles of 2 x 8 x 8 (both grids are ragged: the
pad slots of partial tiles cost work the density does not count, reported as ``pad_slot_share``).

Rows per shape: the reorder alone (keys and values gathered into tile order: all the Triton op adds
per call, since its kernel reads queries and writes outputs at their raster rows; the Gluon kernel
reads every tile in place, so its op adds only the tile order's bookkeeping); cuDNN SDPA and flash SDPA dense; per tile
plan (every head the window whose density is nearest 0.5, 0.32 and 0.2) the op (``impl="triton"``
and ``impl="gluon"``, reorder included; the Gluon output compared with the Triton one), the Triton
kernel alone on keys already in tile order, and
FlexAttention (compiled) on the tile-ordered sequence with the same block mask (128-slot blocks:
one tile each; pad slots masked; its own reorder not timed). Density is exact from the
geometry (``ditfastattn.ops.density``); "x cuDNN" is the speed-up over cuDNN dense and "of ideal" that
speed-up times the density (100% = the full 1/density); "per tile" that speed-up times the share of
pairs a kernel of whole 128-slot tiles computes, pad slots included (what a ragged grid leaves). The reorder's share is its time over the
op's at each plan. FlexAttention's output is compared with the op's (``rel_err_vs_op``), so the
block mask is checked to be the same (``--smoke`` compares the op with the reference too). Times are ``triton.testing.do_bench`` medians over at least 10 calls. The rows
run cheapest first across shapes (reorder, cuDNN, ours; then flash; then FlexAttention, which
compiles per shape); rows that would start after ``--budget-s`` are left out and listed.

    PYTHONPATH=src python3 benchmarks/tile_reorder.py OUT.json [--shapes hunyuan wan] [--budget-s 120] [--no-flex]
    PYTHONPATH=src python3 benchmarks/tile_reorder.py OUT.json --smoke   # tiny shapes, CPU, Triton interpreter
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

if "--smoke" in sys.argv:  # before Triton is imported: the kernel then runs in the interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from gluon_ab import eager_ms  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

from ditfastattn import ops  # noqa: E402
from ditfastattn.ops import TokenLayout, _triton, headwise_attention  # noqa: E402
from ditfastattn.ops._tile_order import pad_slots, slot_order, tiled_keys  # noqa: E402

SHAPES = {
    "hunyuan": {"grid": (33, 45, 80), "text": 256, "heads": 24, "dim": 128},
    "wan": {"grid": (21, 45, 80), "text": 0, "heads": 40, "dim": 128},
    # What the pad slots cost: HunyuanVideo's and Wan's grids in tiles of 1 x 8 x 16 (ragged along
    # rows only; the default tile at 720p), and a grid of whole 2 x 8 x 8 tiles of about its size.
    "hunyuan-1x8x16": {"grid": (33, 45, 80), "text": 256, "heads": 24, "dim": 128, "tile": (1, 8, 16)},
    "wan-1x8x16": {"grid": (21, 45, 80), "text": 0, "heads": 40, "dim": 128, "tile": (1, 8, 16)},
    "hunyuan-whole": {"grid": (32, 48, 80), "text": 256, "heads": 24, "dim": 128},
    "hunyuan-whole-1x8x16": {"grid": (32, 48, 80), "text": 256, "heads": 24, "dim": 128, "tile": (1, 8, 16)},
    # 2-D windows on images at 2048² (128 x 128 patches, whole 1 x 8 x 16 tiles): FLUX.1 (512 text
    # tokens, head dim 128) and SD3 (333, head dim 64).
    "flux-2k": {"grid": (1, 128, 128), "text": 512, "heads": 24, "dim": 128, "tile": (1, 8, 16)},
    "sd3-2k": {"grid": (1, 128, 128), "text": 333, "heads": 24, "dim": 64, "tile": (1, 8, 16)},
}
DEFAULT_SHAPES = ("hunyuan", "wan")
SMOKE_SHAPES = {
    "hunyuan": {"grid": (3, 10, 12), "text": 16, "heads": 2, "dim": 32},
    "wan": {"grid": (3, 9, 9), "text": 0, "heads": 2, "dim": 32},
}
TILE = (2, 8, 8)  # unless a shape names its own
TARGETS = (0.5, 0.32, 0.2)
BLOCK = ops.IMAGE_BLOCK


def window_for(target: float, layout: TokenLayout) -> tuple[tuple[int, int, int], float]:
    """A tile window (half-widths) of density within 0.01 of ``target``, the one whose extent is the
    most even share of each axis (else the nearest), and its density."""
    tiles = layout.tile_grid()
    best = None
    for half in ((t, h, w) for t in range(tiles.counts[0]) for h in range(tiles.counts[1])
                 for w in range(tiles.counts[2])):
        density = ops.density(ops.tile_mode(*half), layout.image_len, layout.num_global, tiles)
        shares = [min(2 * w + 1, n) / n for w, n in zip(half, tiles.counts)]
        far = abs(density - target) > 0.01
        key = (far, 0.0 if far else max(shares) / min(shares), abs(density - target))
        if best is None or key < best[0]:
            best = (key, half, density)
    return best[1], best[2]


class Shape:
    """One shape's inputs, layout (video first, then text), tile order and timing."""

    def __init__(self, name: str, spec: dict, device: str, dtype: torch.dtype):
        grid, text, heads, dim = spec["grid"], spec["text"], spec["heads"], spec["dim"]
        tile = spec.get("tile", TILE)
        image = math.prod(grid)
        self.name, self.heads, self.dim = name, heads, dim
        self.layout = TokenLayout(image + text, 0, image, grid, tile)
        self.tiles = self.layout.tile_grid()
        gen = torch.Generator(device=device).manual_seed(0)
        self.q, self.k, self.v = (torch.randn(1, image + text, heads, dim, generator=gen, device=device).to(dtype)
                                  for _ in range(3))
        self.out = torch.empty_like(self.q)
        self.scale = dim ** -0.5
        self.order = slot_order(self.layout, self.q.device)
        self.valid = ~pad_slots(self.layout, self.q.device)
        self._flex = None
        self.info = {
            "tokens": image + text, "grid": grid, "tile": tile, "text": text, "heads": heads, "dim": dim,
            "tiles": self.tiles.counts, "slots": self.tiles.slots,
            "pad_slot_share": (self.tiles.slots - image) / image,
        }

    def op(self, mode: int, impl: str = "triton", out: torch.Tensor | None = None):
        modes = torch.full((self.heads,), mode, dtype=torch.int32, device=self.q.device)
        out = self.out if out is None else out
        return lambda: headwise_attention(self.q, self.k, self.v, modes, segments=self.layout, out=out, impl=impl)

    def gluon_vs_triton(self, mode: int) -> float:
        """Relative difference of the Gluon op's output from the Triton op's (both bf16)."""
        other = torch.empty_like(self.out)
        self.op(mode, "gluon", other)()
        self.op(mode)()
        return float((other.float() - self.out.float()).norm() / self.out.float().norm())

    def computed_density(self, half: tuple[int, int, int]) -> float:
        """The (query, key) pairs a tile-order kernel computes, pad slots included (whole 128-slot
        tiles), over a dense head's: what the pad slots leave of the ideal speed-up."""
        image_pairs = ops.IMAGE_BLOCK ** 2
        for n, w in zip(self.tiles.counts, half):
            image_pairs *= sum(min(i + w, n - 1) - max(i - w, 0) + 1 for i in range(n))
        text, slots = self.layout.num_global, self.tiles.slots
        return (text * (text + slots) + slots * text + image_pairs) / (text + self.layout.image_len) ** 2

    def kernel_only(self, mode: int, **options):
        """The tiled launch alone, on keys already in tile order (``options``: config, warmup)."""
        modes = torch.full((self.heads,), mode, dtype=torch.int32, device=self.q.device)
        keys = tiled_keys(self.k, self.v, None, self.layout)
        return lambda: _triton.attention(self.q, self.k, self.v, modes, 0, self.layout.image_len, self.out,
                                         self.scale, False, tiled=keys, **options)

    def reorder(self, gather: bool = True):
        """Keys and values into tile order (not ``gather``: what the Gluon op adds, which reads them in place)."""
        return lambda: tiled_keys(self.k, self.v, None, self.layout, gather=gather)

    def dense(self, backend):
        qh, kh, vh = (t.transpose(1, 2) for t in (self.q, self.k, self.v))

        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qh, kh, vh)

        return run

    def error_vs_reference(self, mode: int) -> float:
        """Relative error of the op's output (in ``out``) against the float32 reference."""
        modes = torch.full((self.heads,), mode, dtype=torch.int32, device=self.q.device)
        reference = headwise_attention(self.q.float(), self.k.float(), self.v.float(), modes, segments=self.layout,
                                       impl="reference")
        return float((self.out.float() - reference).norm() / reference.norm())

    def flex(self, half: tuple[int, int, int], compiled: bool):
        """FlexAttention over q, k, v in tile order with the tile window as its block mask, and a
        check of its output against the op's (in ``out``)."""
        if self._flex is None:
            self._flex = self._flex_setup(compiled)
        qt, kt, vt, window, mask_mod, attend = self._flex
        window.copy_(torch.tensor(half))  # read by mask_mod, which stays one function: no recompilation
        seq = qt.shape[2]
        block_mask = create_block_mask(mask_mod, None, None, seq, seq, device=qt.device, BLOCK_SIZE=BLOCK,
                                       _compile=compiled)

        def run():
            return attend(qt, kt, vt, block_mask=block_mask, scale=self.scale)

        def error_vs_op():
            flex_out = run().transpose(1, 2)[:, self.valid].float()
            ours = self.out.index_select(1, self.order[self.valid]).float()
            return float((flex_out - ours).norm() / ours.norm())

        return run, error_vs_op

    def _flex_setup(self, compiled: bool):
        qt, kt, vt = (t.index_select(1, self.order).transpose(1, 2).contiguous() for t in (self.q, self.k, self.v))
        slots, (_, n_h, n_w), (tt, th, tw) = self.tiles.slots, self.tiles.counts, self.tiles.tile
        frames, rows, cols = self.tiles.grid
        window = torch.zeros(3, dtype=torch.int64, device=qt.device)

        def coords(slot):
            """Tile coordinates of a tile-order image slot, and whether it holds a patch."""
            tile, offset = slot // BLOCK, slot % BLOCK
            a, b, c = tile // (n_h * n_w), tile // n_w % n_h, tile % n_w
            inside = ((a * tt + offset // (th * tw) < frames) & (b * th + offset // tw % th < rows)
                      & (c * tw + offset % tw < cols))
            return a, b, c, inside

        def mask_mod(batch, head, q_idx, kv_idx):
            qa, qb, qc, _ = coords(q_idx)
            ka, kb, kc, k_inside = coords(kv_idx)
            near = ((qa - ka).abs() <= window[0]) & ((qb - kb).abs() <= window[1]) & ((qc - kc).abs() <= window[2])
            q_global, k_global = q_idx >= slots, kv_idx >= slots  # text after the image
            return (k_global | k_inside) & (q_global | k_global | near)

        return qt, kt, vt, window, mask_mod, torch.compile(flex_attention) if compiled else flex_attention


def precompile(shapes) -> float:
    """Compile every configuration the tiled launch tunes over, ahead, in threads (compilation
    releases the GIL); returns the seconds it took."""
    start = time.time()
    jobs = [(shape, config) for shape in shapes for config in _triton.tile_configs(shape.dim)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda job: job[0].kernel_only(ops.tile_mode(0, 0, 0), config=job[1], warmup=True)(),
                      jobs))
    return time.time() - start


def timer(smoke: bool):
    if not smoke:
        return eager_ms

    def wall(fn):  # the interpreter on the CPU: one sanity run, not a measurement
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return wall


def run(args) -> dict:
    smoke = args.smoke
    device, started = ("cpu" if smoke else "cuda"), time.time()
    bench = timer(smoke)
    specs = SMOKE_SHAPES if smoke else SHAPES
    shapes = [Shape(name, specs[name], device, torch.bfloat16) for name in args.shapes]
    results = {s.name: {**s.info, "rows": [], "skipped": []} for s in shapes}
    triton_rows, gluon_rows = "triton" in args.impls, "gluon" in args.impls and not smoke
    if triton_rows and not smoke:
        print(f"precompiled the tiled launch in {precompile(shapes):.1f} s", flush=True)
    plans = {s.name: [(target, *window_for(target, s.layout)) for target in TARGETS] for s in shapes}

    def add(shape, label, kind, fn, density=None, **extra):
        result = results[shape.name]
        if time.time() - started > args.budget_s:
            result["skipped"].append(label)
            print(f"{shape.name}: {label}: skipped (budget)", flush=True)
            return None
        ms = bench(fn)
        row = {"label": label, "kind": kind, "ms": ms, "density": density, **extra}
        result["rows"].append(row)
        print(f"{shape.name}: {label}: {ms:.3f} ms", flush=True)
        return ms

    for shape in shapes:
        add(shape, "reorder: k, v into tile order", "reorder", shape.reorder())
        if not smoke:
            add(shape, "reorder for the Gluon op (reads in place)", "reorder_gluon", shape.reorder(gather=False))
        if not smoke:
            add(shape, "cuDNN SDPA (dense)", "cudnn", shape.dense(SDPBackend.CUDNN_ATTENTION), 1.0)
        for target, half, density in plans[shape.name]:
            mode = ops.tile_mode(*half)
            computed = shape.computed_density(half)
            if triton_rows:
                if add(shape, f"ours: tile {half} (~{target})", "ours", shape.op(mode), density, window=half,
                       computed_density=computed) and smoke:
                    results[shape.name]["rows"][-1]["rel_err_vs_reference"] = shape.error_vs_reference(mode)
                add(shape, f"ours, kernel only: tile {half} (~{target})", "kernel", shape.kernel_only(mode), density,
                    window=half)
            gluon_ms = gluon_rows and add(shape, f"ours, Gluon: tile {half} (~{target})", "gluon",
                                          shape.op(mode, "gluon"), density, window=half, computed_density=computed)
            if gluon_ms and triton_rows:
                results[shape.name]["rows"][-1]["rel_diff_vs_triton"] = shape.gluon_vs_triton(mode)
    if not smoke:
        for shape in shapes:
            add(shape, "flash SDPA (dense)", "flash", shape.dense(SDPBackend.FLASH_ATTENTION), 1.0)
    if not args.no_flex:
        for shape in shapes:
            for target, half, density in plans[shape.name]:
                flex, error_vs_op = shape.flex(half, compiled=not smoke)
                label = f"Flex + block mask: tile {half} (~{target})"
                if add(shape, label, "flex", flex, density, window=half) is not None:
                    shape.op(ops.tile_mode(*half))()
                    results[shape.name]["rows"][-1]["rel_err_vs_op"] = error_vs_op()
    for shape in shapes:
        summarise(results[shape.name])
    return results


def summarise(result: dict) -> None:
    """Speed-ups over cuDNN, shares of the ideal, and the reorder's share of the op's time."""
    rows = result["rows"]
    cudnn = next((r["ms"] for r in rows if r["kind"] == "cudnn"), None)
    reorder = {kind: next((r["ms"] for r in rows if r["kind"] == f"reorder{suffix}"), None)
               for kind, suffix in (("ours", ""), ("gluon", "_gluon"))}
    for row in rows:
        if cudnn is not None and row["density"] is not None:
            row["speedup_vs_cudnn"] = cudnn / row["ms"]
            row["ideal_speedup"] = 1.0 / row["density"]
            row["share_of_ideal"] = row["speedup_vs_cudnn"] * row["density"]
            if row.get("computed_density") is not None:
                row["share_of_ideal_per_computed_tile"] = row["speedup_vs_cudnn"] * row["computed_density"]
        if reorder.get(row["kind"]) is not None:
            row["reorder_share"] = reorder[row["kind"]] / row["ms"]


def print_table(name: str, result: dict) -> None:
    print(f"\n{name}: {result['tokens']} tokens, grid {result['grid']} in {result['tiles']} tiles of {result['tile']} "
          f"(pad slots {result['pad_slot_share']:.1%}), {result['heads']} heads")
    print(f"{'row':58s} {'ms':>9s} {'density':>8s} {'x cuDNN':>8s} {'of ideal':>9s} {'per tile':>9s} {'reorder':>8s}")
    for r in result["rows"]:
        def cell(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else "-"

        print(f"{r['label']:58s} {r['ms']:9.3f} {cell('density', '8.3f'):>8s} {cell('speedup_vs_cudnn', '8.2f'):>8s} "
              f"{cell('share_of_ideal', '9.1%'):>9s} {cell('share_of_ideal_per_computed_tile', '9.1%'):>9s} "
              f"{cell('reorder_share', '8.2%'):>8s}")
    if result["skipped"]:
        print("skipped (budget):", result["skipped"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON results path")
    parser.add_argument("--shapes", nargs="*", default=list(DEFAULT_SHAPES), choices=list(SHAPES))
    parser.add_argument("--impls", nargs="*", default=["triton", "gluon"], choices=["triton", "gluon"],
                        help="the op's kernels to time (Gluon: not with --smoke)")
    parser.add_argument("--budget-s", type=float, default=120.0, help="start no row after this long")
    parser.add_argument("--no-flex", action="store_true", help="leave FlexAttention out (it compiles per shape)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through Triton's interpreter")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="_compile flag", category=DeprecationWarning)
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": "none (smoke)" if args.smoke else torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "smoke": args.smoke,
    }
    start = time.time()
    summary["results"] = run(args)
    summary["tuned_configs"] = {str(key): config for key, config in _triton._chosen.items()}
    summary["wall_s"] = round(time.time() - start, 1)
    for name, result in summary["results"].items():
        print_table(name, result)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
