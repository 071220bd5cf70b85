"""Same-run A/B of the Gluon kernel's tiled launch (tile windows) against other versions (GPU, sm_90).

Each variant is a copy of ``ops/_gluon.py`` (an edited copy, or one from git: ``git show
COMMIT:src/ditfastattn/ops/_gluon.py > /tmp/prev.py``). A version whose tiled launch reads tiles in
place (``TILES_IN_PLACE``) runs as the op does; an earlier one took queries, keys and values gathered
into tile order, and runs twice: as its op did (keys and values gathered, then its launch, which
gathers the queries) and on keys and values gathered beforehand (``NAME_launch``). At
``tile_reorder.py``'s shapes and windows, every head one window, each round times with ``do_bench``
(eager, L2 flushed) and ``do_bench_cudagraph`` medians: cuDNN SDPA dense, the committed op, each
variant, and the committed op again (its repeat shows the run's noise). The outputs are compared
bit for bit before timing. ``--real-text F`` keeps the first F of the text keys and pads the rest
(a key mask, as HunyuanVideo's pipeline passes, marked ``global_only`` as the runtime marks it; the
cuDNN column stays unmasked).

    PYTHONPATH=src python3 benchmarks/gluon_ab_tiles.py OUT.json NAME=PATH [NAME=PATH ...] [--shapes ...] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import triton
from gluon_ab import MODES, load_variant, time_both
from tile_reorder import SHAPES, TARGETS, Shape, window_for
from torch.nn.attention import SDPBackend

from ditfastattn import ops
from ditfastattn.ops import _gluon
from ditfastattn.ops._tile_order import tiled_keys

DEFAULT_SHAPES = ("hunyuan-1x8x16", "wan-1x8x16", "hunyuan", "hunyuan-whole")


def text_mask(shape: Shape, real_text: float | None) -> torch.Tensor | None:
    """The key mask (1, S), True at padding, that keeps the first ``real_text`` of the text keys
    (after the image), or None."""
    if real_text is None:
        return None
    text_start = shape.layout.image_start + shape.layout.image_len
    mask = torch.zeros(1, shape.q.shape[1], dtype=torch.bool, device=shape.q.device)
    mask[:, text_start + round(real_text * (mask.shape[1] - text_start)):] = True
    return mask


def launches(shape: Shape, mode: int, variants: dict, key_mask: torch.Tensor | None = None) -> dict:
    """The launch closures of one window: the committed op, each variant's (see the module's
    docstring), the committed op again; and their outputs."""
    modes = torch.full((shape.heads,), mode, dtype=torch.int32, device="cuda")
    args = (shape.q, shape.k, shape.v, modes, shape.layout.image_start, shape.layout.image_len)
    padding = None if key_mask is None else ops.Padding(key_mask, global_only=True)
    gathered = tiled_keys(shape.k, shape.v, key_mask, shape.layout)
    fns, outs = {}, {}

    def add(name, module, keys=None):
        out = outs[name] = torch.empty_like(shape.out)
        in_place = getattr(module, "TILES_IN_PLACE", False)

        # A version that orders the tile heads' query tiles gets the host modes, as the op passes them.
        order = {"modes": (mode,) * shape.heads} if getattr(module, "ORDERS_TILES", False) else {}

        def fn():
            tiled = keys or tiled_keys(shape.k, shape.v, key_mask, shape.layout, gather=not in_place)
            module.attention(*args, out, shape.scale, False, padding, tiled=tiled, **order)

        fns[name] = fn

    add("committed", _gluon)
    for name, module in variants.items():
        add(name, module)
        if not getattr(module, "TILES_IN_PLACE", False):
            add(f"{name}_launch", module, gathered)
    fns["committed_again"] = fns["committed"]
    return {"fns": fns, "outs": outs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON results path")
    parser.add_argument("variants", nargs="+", help="NAME=PATH of a copy of ops/_gluon.py")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), choices=sorted(SHAPES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--real-text", type=float, default=None,
                        help="share of the text keys kept; the rest are padding (a key mask)")
    args = parser.parse_args()
    paths = dict(spec.split("=", 1) for spec in args.variants)
    variants = {name: load_variant(path, name) for name, path in paths.items()}
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "cudnn": torch.backends.cudnn.version(), "variants": paths, "real_text": args.real_text, "compare": [],
              "rounds": []}
    setups = {}
    for shape_name in args.shapes:
        shape = Shape(shape_name, SHAPES[shape_name], "cuda", torch.bfloat16)
        for target in TARGETS:
            half, density = window_for(target, shape.layout)
            case = launches(shape, ops.tile_mode(*half), variants, text_mask(shape, args.real_text))
            for fn in case["fns"].values():
                fn()
            base = case["outs"]["committed"]
            result["compare"].append({"shape": shape_name, "window": half, **{
                other: {"bitwise_equal": torch.equal(base, out),
                        "max_abs_diff": (base.float() - out.float()).abs().max().item()}
                for other, out in case["outs"].items() if other != "committed"}})
            setups[(shape_name, half)] = (shape, case, density, shape.computed_density(half))
        print(f"{shape_name}: compared", flush=True)
    for round_index in range(args.rounds):
        timings = []
        for (shape_name, half), (shape, case, density, computed) in setups.items():
            cudnn = time_both(shape.dense(SDPBackend.CUDNN_ATTENTION))
            row = {"shape": shape_name, "window": half, "density": density, "computed_density": computed,
                   "cudnn": cudnn, **{fn_name: time_both(fn) for fn_name, fn in case["fns"].items()}}
            timings.append(row)
            print(f"round {round_index} {shape_name} {half}: " + " ".join(
                f"{fn_name} {100 * cudnn['graph'] * density / row[fn_name]['graph']:.1f}%" for fn_name in case["fns"]),
                flush=True)
        result["rounds"].append(timings)
    summary = []
    for index, ((shape_name, half), (_, case, density, computed)) in enumerate(setups.items()):
        rows = [timings[index] for timings in result["rounds"]]
        summary.append({"shape": shape_name, "window": half, "density": density, "percent_of_ideal": {
            mode: {fn_name: statistics.median(100 * r["cudnn"][mode] * density / r[fn_name][mode] for r in rows)
                   for fn_name in case["fns"]} for mode in MODES},
            "percent_per_computed_tile": {fn_name: statistics.median(
                100 * r["cudnn"]["graph"] * computed / r[fn_name]["graph"] for r in rows) for fn_name in case["fns"]}})
    result["summary"] = summary
    Path(args.out).write_text(json.dumps(result, indent=1))
    unequal = [row for row in result["compare"] if not all(v["bitwise_equal"] for k, v in row.items()
                                                          if isinstance(v, dict))]
    print(f"{len(unequal)} of {len(result['compare'])} windows differ from the committed kernel's output bit for bit")


if __name__ == "__main__":
    main()
