"""Same-run A/B of the Gluon kernel's tiled launch (tile windows) against an earlier version (GPU, sm_90).

The earlier version is a copy of ``ops/_gluon.py`` from git (``git show COMMIT:src/ditfastattn/ops/_gluon.py
> /tmp/prev.py``) whose tiled launch took queries, keys and values gathered into tile order (before
the launch read them in place). At ``tile_reorder.py``'s shapes and windows, every head one window,
each round times with ``do_bench`` (eager, L2 flushed) and ``do_bench_cudagraph`` medians: cuDNN SDPA
dense; the committed op (what ``headwise_attention`` launches: nothing gathered); the earlier op
(keys and values gathered, then its launch, which gathers the queries); the earlier launch on keys
and values gathered beforehand; and the committed op again (its repeat shows the run's noise). The
outputs are compared bit for bit before timing.

    PYTHONPATH=src python3 benchmarks/gluon_ab_tiles.py OUT.json before=/tmp/prev.py [--shapes ...] [--rounds 2]
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


def launches(shape: Shape, mode: int, earlier) -> dict:
    """The launch closures of one window: committed op, earlier op, earlier launch alone."""
    modes = torch.full((shape.heads,), mode, dtype=torch.int32, device="cuda")
    outs = {name: torch.empty_like(shape.out) for name in ("committed", "earlier", "earlier_launch")}
    args = (shape.q, shape.k, shape.v, modes, shape.layout.image_start, shape.layout.image_len)
    gathered = tiled_keys(shape.k, shape.v, None, shape.layout)

    def committed():
        keys = tiled_keys(shape.k, shape.v, None, shape.layout, gather=not _gluon.TILES_IN_PLACE)
        _gluon.attention(*args, outs["committed"], shape.scale, False, tiled=keys)

    def before():
        earlier.attention(*args, outs["earlier"], shape.scale, False, tiled=tiled_keys(shape.k, shape.v, None,
                                                                                         shape.layout))

    def before_launch():
        earlier.attention(*args, outs["earlier_launch"], shape.scale, False, tiled=gathered)

    return {"fns": {"committed": committed, "earlier": before, "earlier_launch": before_launch,
                    "committed_again": committed}, "outs": outs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON results path")
    parser.add_argument("variant", help="NAME=PATH of the earlier ops/_gluon.py")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), choices=sorted(SHAPES))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    name, path = args.variant.split("=", 1)
    earlier = load_variant(path, name)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "cudnn": torch.backends.cudnn.version(), "variant": {name: path}, "compare": [], "rounds": []}
    setups = {}
    for shape_name in args.shapes:
        shape = Shape(shape_name, SHAPES[shape_name], "cuda", torch.bfloat16)
        for target in TARGETS:
            half, density = window_for(target, shape.layout)
            case = launches(shape, ops.tile_mode(*half), earlier)
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
