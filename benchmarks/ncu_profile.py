"""Where the Gluon kernel's warps spend their time, from Nsight Compute's sampled warp states.

Two steps. On the GPU (sm_90, ncu installed), profile one call of a case and export the raw
metrics and the per-instruction source page::

    ncu --clock-control none --profile-from-start off --set full -f -o /tmp/r \\
        python3 benchmarks/ncu_profile.py case FLUX-1K "arrow 1/32" gluon
    ncu -i /tmp/r.ncu-rep --page raw --csv > r.raw.csv
    ncu -i /tmp/r.ncu-rep --page source --csv --print-source sass > r.source.csv

(``case`` runs the call three times, then once more between cudaProfilerStart and Stop; impl
``cudnn`` profiles cuDNN SDPA dense instead.) Then, anywhere, summarise::

    python3 benchmarks/ncu_profile.py regions r.source.csv r.raw.csv FLUX-1K "arrow 1/32" [--out J]

The sampled warp time is split by kind of code, told apart by how often each instruction ran
(per warp, four warps a consumer warpgroup): once per loop step of a consumer warpgroup, once per
item (the step between items and the epilogue; with a partial key tile in every item, as SD3's 333
text keys, also that tile's masking), once per program (start-up and end), the
producer warp's code, and the idle warps of the producer's warpgroup (samples at a barrier the
whole kernel long, left out of the shares).
"""

from __future__ import annotations

import argparse
import csv
import json
import math

from kernel import SHAPES, cudnn_dense, plans, shape_inputs
from tile_share import TILE, head_tiles

from ditfastattn.ops import MODE_SKIP

SMS = 132  # H100 SXM: the program count when the raw export lacks the launch's grid size
RAW_METRICS = {
    "duration_us": "gpu__time_duration.sum",
    "sm_clock_ghz": "sm__cycles_elapsed.avg.per_second",
    "tensor_pipe_active_pct": "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
    "issue_active_pct": "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "instructions": "smsp__inst_executed.sum",
}
STALL_PREFIX = "smsp__average_warps_issue_stalled_"


def run_case(shape_name: str, plan_name: str, impl: str) -> None:
    import torch

    from ditfastattn.ops import headwise_attention

    shape = SHAPES[shape_name]
    q, k, v, text_start = shape_inputs(shape)
    out = torch.empty_like(q)
    modes = torch.tensor(plans(shape)[plan_name], dtype=torch.int32, device="cuda")
    if impl == "cudnn":
        def call():
            cudnn_dense(q, k, v)
    else:
        def call():
            headwise_attention(q, k, v, modes, text_start=text_start, text_len=shape["text"], out=out, impl=impl)
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def work_counts(shape: dict, modes: list[int]) -> tuple[int, int, int]:
    """(work items, computed tiles, programs) of one launch of the kernel on ``modes``."""
    tiles_per_head = math.ceil(shape["text"] / TILE) + math.ceil(shape["image"] / TILE)
    items = shape["batch"] * tiles_per_head * sum(mode != MODE_SKIP for mode in modes)
    tiles = shape["batch"] * sum(head_tiles(mode, shape["image"], shape["text"]) for mode in modes)
    return items, tiles, min(items, SMS)


def read_source(path: str) -> list[dict]:
    with open(path) as f:
        rows = list(csv.reader(f))
    header = rows[1]
    index = {}
    for i, name in enumerate(header):
        index.setdefault(name, i)
    stalls = [name for name in header if name.startswith("stall_") and "Not Issued" not in name]
    instructions = []
    for row in rows[2:]:
        if not row or not row[0].startswith("0x"):
            continue
        instructions.append({
            "sass": row[index["Source"]].strip(),
            "executed": int(row[index["Instructions Executed"]] or 0),
            "samples": int(row[index["# Samples"]] or 0),
            "stalls": {name[len("stall_"):]: int(row[index[name]] or 0) for name in stalls},
        })
    return instructions


def kind(instruction: dict, items: int, tiles: int, programs: int) -> str:
    executed = instruction["executed"]
    if instruction["sass"].startswith("NOP") and instruction["samples"] == instruction["stalls"]["barrier"] > 0:
        return "idle"
    if executed == 4 * (tiles - items):
        return "consumer loop step"
    if executed in (4 * items, 4 * (items - programs)):
        return "consumer item boundary and epilogue"
    if executed == 4 * programs:
        return "once per program (start-up, end)"
    if executed in (tiles, tiles - items, tiles - programs, items, items - programs):
        return "producer"
    return "other"


def regions(source: str, raw: str, shape_name: str, plan_name: str) -> dict:
    shape = SHAPES[shape_name]
    with open(raw) as f:
        header, _units, values = list(csv.reader(f))[:3]
    metrics = dict(zip(header, values))
    items, tiles, programs = work_counts(shape, plans(shape)[plan_name])
    if "launch__grid_size" in metrics:  # the launch's own count, on a GPU of any SM count
        programs = int(float(metrics["launch__grid_size"]))
    summary: dict[str, dict] = {}
    for instruction in read_source(source):
        entry = summary.setdefault(kind(instruction, items, tiles, programs), {"samples": 0, "stalls": {}})
        entry["samples"] += instruction["samples"]
        for name, count in instruction["stalls"].items():
            entry["stalls"][name] = entry["stalls"].get(name, 0) + count
    counted = sum(entry["samples"] for name, entry in summary.items() if name != "idle")
    shares = {}
    for name, entry in sorted(summary.items(), key=lambda item: -item[1]["samples"]):
        if name == "idle":
            continue
        top = sorted(entry["stalls"].items(), key=lambda item: -item[1])[:4]
        shares[name] = {"share": entry["samples"] / counted,
                        "top_stalls": {stall: count / entry["samples"] for stall, count in top if count}}
    result = {"shape": shape_name, "plan": plan_name, "items": items, "tiles": tiles, "programs": programs,
              "warp_time_by_code": shares,
              **{key: float(metrics[name]) for key, name in RAW_METRICS.items() if name in metrics},
              "stalls_per_issue": {name[len(STALL_PREFIX):-len("_per_issue_active.ratio")]: float(value)
                                   for name, value in metrics.items()
                                   if name.startswith(STALL_PREFIX) and name.endswith("_per_issue_active.ratio")
                                   and float(value) >= 0.01}}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    case = commands.add_parser("case", help="one call inside a profiler range (run under ncu)")
    case.add_argument("shape", choices=list(SHAPES))
    case.add_argument("plan")
    case.add_argument("impl", choices=["gluon", "triton", "cudnn"])
    summary = commands.add_parser("regions", help="summarise ncu's CSV exports")
    summary.add_argument("source", help="--page source --print-source sass CSV")
    summary.add_argument("raw", help="--page raw CSV")
    summary.add_argument("shape", choices=list(SHAPES))
    summary.add_argument("plan")
    summary.add_argument("--out", help="JSON path")
    args = parser.parse_args()
    if args.command == "case":
        run_case(args.shape, args.plan, args.impl)
        return
    result = regions(args.source, args.raw, args.shape, args.plan)
    for name, entry in result["warp_time_by_code"].items():
        stalls = ", ".join(f"{stall} {share:.0%}" for stall, share in entry["top_stalls"].items())
        print(f"{name:40s} {entry['share']:6.1%}  ({stalls})")
    print({key: result[key] for key in RAW_METRICS if key in result})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
