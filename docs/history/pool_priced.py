"""Pooled keys priced at what they cost on the GPU today, at one target of *time* (lab script, issue 16).

The search prices a candidate by its share of a full head's FLOPs; on an H100 (benchmarks/pool_speed.py
at FLUX 2048²) a pool head runs at 0.53 (pool:2) and 0.42 (pool:4) of its ideal speed-up where an
arrow of the same density runs at 0.97 and 0.93. ``SearchConfig(costs=...)`` takes measured costs:
pool heads priced at their FLOP share times those ratios (arrows at their FLOP share), so a
``target_sparsity`` becomes a target of attention time. Two plans of the recommended search at that
target, head-wise with the default candidates and with pool:2 / pool:4 priced so, scored like
quality.py; whether pooled keys still win at equal time, and what share of heads the search gives them.
The target itself counts FLOPs, so the pooled plan gets ``--pool-target``, a little above, to land at
about the same priced (time) sparsity; each plan's FLOP and priced sparsity are reported.

    PYTHONPATH=src python pool_priced.py OUT.json --kind flux --target 0.6 --pool-target 0.63 --cache auto --embeddings emb.pt

``--slowdown pool:2=R,pool:4=R`` replaces those ratios: on the fused kernels (e34980a) 0.97 / 0.93 and
0.93 / 0.87 (``results/pool_speed_h100_aff3355.json``), 1.04 and 1.07.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402
from e2e import environment  # noqa: E402
from exact_target import write_result  # noqa: E402
from oracle_heads import recommended_search, score_paired  # noqa: E402
from pooled_target import arguments, pool_share, setup  # noqa: E402

from ditfastattn import calibrate, ops  # noqa: E402
from ditfastattn.methods import parse_method  # noqa: E402

# Time per FLOP of a pool head against an arrow's at FLUX 2048² on an H100, on SDPA
# (../docs/history/results/pool_speed_sdpa_h100_1893693.json).
SLOWDOWN = {"pool:2": 0.97 / 0.53, "pool:4": 0.93 / 0.42}
TOKENS, TEXT, GRID = 1024, 32, (1, 32, 32)  # the testbeds' layout


def priced_sparsity(plan, costs) -> float:
    """1 - the plan's attention time as the search priced it (every head of steps 1.., layers by head dim)."""
    tiles = ops.TileGrid(GRID)
    total = kept = 0.0
    for step in plan.methods[1:]:
        for layer, heads in zip(plan.model.layers, step):
            for name in heads:
                method = parse_method(name)
                share = costs.get(method.name, method.cost(TOKENS, TEXT, tiles))
                kept += share * layer.head_dim
                total += layer.head_dim
    return 1.0 - kept / total


def main():
    args = arguments(0.6, "auto", **{"--pool-target": dict(type=float, default=None,
                                                          help="FLOP target of the pooled plan (default --target)"),
                                     "--slowdown": dict(default=None, help="pool:2=R,pool:4=R (default: on SDPA)")})
    slowdown = SLOWDOWN if args.slowdown is None else {
        name: float(ratio) for name, ratio in (item.split("=") for item in args.slowdown.split(","))}
    started = time.perf_counter()
    pipe, cal, held, seeds = setup(args)
    tiles = ops.TileGrid(GRID)
    costs = {name: parse_method(name).cost(TOKENS, TEXT, tiles) * ratio for name, ratio in slowdown.items()}
    plans, seconds = {}, {}
    pooled = {"candidates": q.SETS["AA+OC+PK"], "costs": costs}
    for name, target, extra in (("head", args.target, {}),
                                ("head+pool priced", args.pool_target or args.target, pooled)):
        config = recommended_search(args.kind, args.steps, target, cache=args.cache, **extra)
        t0 = time.perf_counter()
        plans[name] = calibrate(pipe, cal, config, progress=False)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(name, round(plans[name].summary()["sparsity"], 4), round(priced_sparsity(plans[name], costs), 4),
              seconds[name], flush=True)
    scored, ssim, differences = score_paired(pipe, plans, held, args.steps, seeds,
                                             [("head+pool priced", "head")])
    meta = {**environment(torch.device("cpu")), "kind": args.kind, "target": args.target,
            "pool_target": args.pool_target or args.target, "cache": args.cache,
            "costs": costs, "heldout_seed": args.heldout_seed, "steps": args.steps, "heldout": len(held),
            "seeds": seeds, "calibration_seconds": seconds, "seconds": round(time.perf_counter() - started, 1)}
    write_result(args.out, meta, plans, scored, ssim, differences,
                 {k: {"pool_share": pool_share(plans[k]), "priced_sparsity": priced_sparsity(plans[k], costs),
                      "min_ssim": float(min(r["ssim"]))} for k, r in scored.items()})


if __name__ == "__main__":
    main()
