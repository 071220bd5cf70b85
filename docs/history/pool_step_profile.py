"""Where pooled plans lose time end to end at 1024² (lab, GPU): one FLUX.1-dev-sized step (random
bf16 weights) under a plain synthetic plan, the same plan recorded with the image grid, and the
pooled one (``e2e.py --pool``'s), each timed and profiled (CUDA kernels by total time, host time).

    PYTHONPATH=src python docs/history/pool_step_profile.py OUT.json [--size 1024]
"""
import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "benchmarks")
import e2e  # noqa: E402
import ditfastattn  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--target", type=float, default=0.68)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    _, config, _, text_len, batch = e2e.MODELS["flux"]
    model = e2e.build_transformer("flux", config, device, dtype)
    inputs = e2e.model_inputs("flux", config, args.size, text_len, batch, device, dtype)
    steps = e2e.timesteps("flux", 8, batch, device, dtype)
    tokens = e2e.image_tokens("flux", args.size, config)
    side = math.isqrt(tokens)
    full = ditfastattn.Plan.uniform(model, len(steps), "full", num_image_tokens=tokens, text_len=text_len)
    gridded = ditfastattn.Plan.uniform(model, len(steps), "full", num_image_tokens=tokens, text_len=text_len,
                                       grid=(1, side, side))
    plans = {"stock": None, "plain": e2e.synthetic_plan(full, args.target, tokens, text_len),
             "plain, grid recorded": e2e.synthetic_plan(gridded, args.target, tokens, text_len),
             "pooled": e2e.synthetic_plan(gridded, args.target, tokens, text_len, mix=e2e.POOL_MIX)}
    rows = {}
    torch.set_grad_enabled(False)  # as e2e.py measures (inference)
    for name, plan in plans.items():
        if plan is not None:
            ditfastattn.apply(model, plan)
        try:
            for _ in range(2):
                e2e.step_times(model, inputs, steps)
            times = [e2e.step_times(model, inputs, steps)[1:] for _ in range(3)]
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                started = time.perf_counter()
                e2e.step_times(model, inputs, steps)
                host = time.perf_counter() - started
        finally:
            if plan is not None:
                ditfastattn.remove(model)
        kernels = sorted((e for e in prof.key_averages() if str(e.device_type).endswith("CUDA")),
                         key=lambda e: -e.self_device_time_total)
        rows[name] = {
            "ms_per_step_median": statistics.median([t for run in times for t in run]),
            "profiled_wall_s": host,
            "kernels_ms_per_step": sum(e.self_device_time_total for e in kernels) / 1e3 / len(steps),
            "kernels": [{"name": e.key[:120], "count_per_step": e.count / len(steps),
                         "ms_per_step": e.self_device_time_total / 1e3 / len(steps)} for e in kernels],
            "plan_sparsity": None if plan is None else plan.summary()["sparsity"],
        }
        print(f"== {name}: {rows[name]['ms_per_step_median']:.1f} ms a step, kernels "
              f"{rows[name]['kernels_ms_per_step']:.1f} ms", flush=True)
        for k in rows[name]["kernels"][:6]:
            print(f"   {k['ms_per_step']:8.2f} ms  x{k['count_per_step']:6.1f}  {k['name'][:90]}", flush=True)
    plain = {k["name"]: k for k in rows["plain, grid recorded"]["kernels"]}
    pooled = {k["name"]: k for k in rows["pooled"]["kernels"]}
    moved = sorted(set(plain) | set(pooled), key=lambda n: -abs(pooled.get(n, {}).get("ms_per_step", 0)
                                                                  - plain.get(n, {}).get("ms_per_step", 0)))
    print("== pooled - plain (grid recorded), per step:", flush=True)
    for n in moved[:10]:
        a, b = plain.get(n, {}), pooled.get(n, {})
        print(f"   {b.get('ms_per_step', 0) - a.get('ms_per_step', 0):+8.3f} ms  x{a.get('count_per_step', 0):6.1f} -> "
              f"x{b.get('count_per_step', 0):6.1f}  {n[:90]}", flush=True)
    args.out.write_text(json.dumps({"environment": e2e.environment(device), "size": args.size,
                                    "target": args.target, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
