"""Same-run A/B of Gluon kernel variants against the committed kernel (GPU, sm_90).

Each variant is a copy of ``ops/_gluon.py`` (an edited copy, or an older one from git:
``git show COMMIT:src/ditfastattn/ops/_gluon.py > /tmp/prev.py``), loaded beside the committed
module. Every plan of ``kernel.py`` at each of its shapes runs through the committed kernel, each
variant, and the committed kernel again (its repeat shows the run's noise), with cuDNN SDPA dense
timed in the same round; ``ROUNDS`` interleaved rounds of ``do_bench`` (eager, L2 flushed before
each call) and ``do_bench_cudagraph`` medians. Before and after timing, every variant's output is
compared with the committed kernel's (bit for bit, else the largest difference).

    PYTHONPATH=src python3 benchmarks/gluon_ab.py OUT.json NAME=PATH [NAME=PATH ...] [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import triton

import ditfastattn.ops
from kernel import SHAPES, cudnn_dense, image_range, plan_density, plans, shape_inputs

MODES = ("eager", "graph")


def load_variant(path: str, name: str):
    """``path`` as module ``ditfastattn.ops._ab_<name>``, so that its relative imports resolve."""
    spec = importlib.util.spec_from_file_location(f"{ditfastattn.ops.__name__}._ab_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def eager_ms(fn) -> float:
    """``do_bench``'s median (eager, L2 flushed) over at least 10 calls: its 100 ms window holds a
    single call at video sizes (100-500 ms), a median of one sample."""
    estimate = triton.testing.do_bench(fn, warmup=0, rep=1, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=max(100.0, 10 * estimate), return_mode="median")


def time_both(fn) -> dict:
    return {"eager": eager_ms(fn), "graph": triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")}


def token_range(module, shape) -> tuple[int, int]:
    """The two ints a kernel version's ``attention`` takes after the modes: the image range, or (before
    the op took token layouts, at 8af6848 and earlier) the text range."""
    if "text_start" in inspect.signature(module.attention).parameters:
        return (0 if shape["text_first"] else shape["image"]), shape["text"]
    return image_range(shape)


def setup(shape, kernels):
    """Inputs of ``shape`` and, per plan, one launch closure per kernel name."""
    text, image, dim = shape["text"], shape["image"], shape["dim"]
    q, k, v, _ = shape_inputs(shape)
    outs = {name: torch.empty_like(q) for name in kernels}
    cases = {}
    for plan_name, modes in plans(shape).items():
        modes_t = torch.tensor(modes, dtype=torch.int32, device="cuda")
        fns = {name: (lambda module=module, out=outs[name], modes_t=modes_t:
                      module.attention(q, k, v, modes_t, *token_range(module, shape), out, 1 / math.sqrt(dim), False))
               for name, module in kernels.items()}
        cases[plan_name] = {"fns": fns, "density": plan_density(modes, image, text)}
    return cases, lambda: cudnn_dense(q, k, v), outs


def compare(setups, names) -> list[dict]:
    """Each kernel's output against the committed kernel's (``out`` poisoned first: skip heads keep it)."""
    rows = []
    for shape_name, (cases, _, outs) in setups.items():
        for plan_name, case in cases.items():
            got = {}
            for name in names:
                outs[name].fill_(float("nan"))
                case["fns"][name]()
                got[name] = outs[name].clone()
            base = got[names[0]].nan_to_num(7.0)
            for name in names[1:]:
                other = got[name].nan_to_num(7.0)
                rows.append({"shape": shape_name, "plan": plan_name, "kernel": name,
                             "bitwise_equal": torch.equal(base, other),
                             "max_abs_diff": (base.float() - other.float()).abs().max().item()})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON results path")
    parser.add_argument("variants", nargs="+", help="NAME=PATH of a copy of ops/_gluon.py")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    variants = dict(spec.split("=", 1) for spec in args.variants)
    committed = load_variant(str(Path(ditfastattn.ops.__file__).with_name("_gluon.py")), "committed")
    kernels = {"committed": committed, **{name: load_variant(path, name) for name, path in variants.items()},
               "committed_again": committed}
    names = list(kernels)
    setups = {shape_name: setup(shape, kernels) for shape_name, shape in SHAPES.items()}
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "variants": variants, "compare_before": compare(setups, names), "rounds": []}
    for round_index in range(args.rounds):
        timings = {}
        for shape_name, (cases, cudnn, _) in setups.items():
            reference = time_both(cudnn)
            timings[shape_name] = {"cudnn": reference}
            for plan_name, case in cases.items():
                row = {name: time_both(fn) for name, fn in case["fns"].items()}
                timings[shape_name][plan_name] = row
                print(f"round {round_index} {shape_name} {plan_name}: " + " ".join(
                    f"{name} {100 * reference['graph'] * case['density'] / row[name]['graph']:.1f}%"
                    for name in names), flush=True)
        result["rounds"].append(timings)
    result["compare_after"] = compare(setups, names)
    summary = []
    for shape_name, (cases, _, _) in setups.items():
        for plan_name, case in cases.items():
            share = {mode: {name: statistics.median(
                100 * r[shape_name]["cudnn"][mode] * case["density"] / r[shape_name][plan_name][name][mode]
                for r in result["rounds"]) for name in names} for mode in MODES}
            summary.append({"shape": shape_name, "plan": plan_name, "density": case["density"],
                            "percent_of_ideal": share})
    result["summary"] = summary
    Path(args.out).write_text(json.dumps(result, indent=1))
    unequal = [row for row in result["compare_after"] if not row["bitwise_equal"]]
    print(f"{len(unequal)} of {len(result['compare_after'])} outputs differ from the committed kernel's bit for bit")


if __name__ == "__main__":
    main()
