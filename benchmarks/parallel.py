"""Plans under diffusers' Ulysses context parallelism: FLUX.1-dev-sized step time on several GPUs.

    torchrun --nproc-per-node 2 benchmarks/parallel.py    # 2 GPUs: results/parallel_2gpu.json
    torchrun --nproc-per-node 4 benchmarks/parallel.py    # 4 GPUs: results/parallel_4gpu.json
    python benchmarks/parallel.py --smoke                  # CPU, 2 gloo processes, tiny FLUX: checks the script
    torchrun --nproc-per-node 2 benchmarks/parallel.py --calibrate 0.2   # also times calibration

One process per GPU, each holding the whole model (random bf16 weights, eager), at 2048x2048
(16384 image tokens, 512 text). Two synthetic plans at attention sparsity 0.68 (``--target``):
``iid`` draws every head at every step anew (e2e.py's plans), ``persistent`` keeps each head's
step-1 method for the whole generation, as searched plans tend to, which leaves whole ranks with
the full heads of a layer. In one run:

- one GPU (rank 0 alone, the others waiting): stock diffusers and each plan;
- Ulysses over all ranks (``enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``):
  stock, each plan, and each plan with ``balance_heads=True``;
- each rank's attention time: the op on its heads at every (step, layer) of each plan, stock SDPA
  where its heads are all full (what the runtime runs), with and without head placement. A
  layer's all-to-all waits for its slowest rank, so ``imbalance`` = sum over (step, layer) of the
  slowest rank's time / sum of the ranks' mean (1.0 is even); ``slowest_over_mean`` compares the
  ranks' totals. The placement's own estimate (from FLOPs) is logged alongside.

With ``--calibrate DELTA``, ``ditfastattn.calibrate`` (one prompt, ``--steps`` steps, budget DELTA)
runs on one GPU and under Ulysses (a FluxPipeline over the same transformer, precomputed prompt
embeddings, no VAE): wall seconds of each, and the share of (step, layer, head) choices the two
plans agree on (1.0 but for ties that bf16 rounding flips).

Step times: median of steps 1..N-1 of one generation (CUDA events on rank 0, after a 2-step
warm-up generation). Targets: a plan's speed-up under Ulysses within 5% of its one-GPU speed-up,
and with head placement the slowest rank's attention time within 5% of the mean.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from e2e import FLUX_DEV, FLUX_TINY, build_transformer, environment, measure, model_inputs, synthetic_plan, timesteps

import ditfastattn
from ditfastattn.methods import parse_method
from ditfastattn.placement import permute_plan, place_heads

HERE = Path(__file__).resolve().parent
TEXT_LEN = 512


def persistent_plan(plan):
    """``plan`` with every head's step-1 method at every later step."""
    methods = [plan.methods[0]] + [plan.methods[1]] * (plan.num_steps - 1)
    provenance = {**plan.provenance, "source": plan.provenance["source"] + ", step 1 kept"}
    return ditfastattn.Plan(plan.model, methods, provenance)


def _timer(device):
    """Median milliseconds of ``fn`` over a few runs after one warm-up (CUDA events on the GPU)."""
    def timed(fn, runs: int = 5) -> float:
        fn()
        if device.type != "cuda":
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - start))
            return statistics.median(times)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(runs + 1)]
        events[0].record()
        for event in events[1:]:
            fn()
            event.record()
        events[-1].synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in zip(events, events[1:]))

    return timed


def rank_attention_ms(plan, rank: int, world: int, image_tokens: int, text_len: int, device, dtype, impl: str):
    """(steps - 1, layers) milliseconds of rank ``rank``'s attention at steps 1.. of ``plan``."""
    layer = plan.model.layers[0]  # FLUX: every layer has the same heads, head dim and text
    heads = layer.heads // world
    g = torch.Generator(device).manual_seed(rank)
    q, k, v = (torch.randn(1, text_len + image_tokens, heads, layer.head_dim, generator=g, device=device, dtype=dtype)
               for _ in range(3))
    out = torch.empty_like(q)
    timed = _timer(device)
    cache: dict[tuple, float] = {}

    def row_ms(names: tuple) -> float:
        methods = [parse_method(name) for name in names]
        if all(m.exact for m in methods):  # the runtime runs diffusers' own attention
            return timed(lambda: F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))))
        if not any(m.computes for m in methods):  # every head cached: nothing runs
            return 0.0
        modes = ditfastattn.ops.mode_tensor([m.mode(image_tokens) for m in methods], device)
        return timed(lambda: ditfastattn.ops.headwise_attention(q, k, v, modes, text_start=0, text_len=text_len,
                                                                out=out, impl=impl))

    table = []
    for rows in plan.methods[1:]:  # step 0 is full on every rank
        table.append([])
        for names in rows:
            key = tuple(names[rank * heads:(rank + 1) * heads])
            if key not in cache:
                cache[key] = row_ms(key)
            table[-1].append(cache[key])
    return table


def calibration(pipe, inputs, args, size: int, impl: str) -> tuple[dict, ditfastattn.Plan]:
    """Wall seconds and sparsity of ``ditfastattn.calibrate`` on ``pipe`` at ``--calibrate``, and its plan."""
    prompt = {"prompt_embeds": inputs["encoder_hidden_states"], "pooled_prompt_embeds": inputs["pooled_projections"]}
    config = ditfastattn.SearchConfig(delta=args.calibrate, num_inference_steps=args.steps, height=size, width=size,
                                      impl=impl)
    started = time.perf_counter()
    plan = ditfastattn.calibrate(pipe, [prompt], config, progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - started, "sparsity": plan.summary()["sparsity"]}, plan


def imbalance(per_rank: list[list[list[float]]]) -> dict:
    """Imbalance of the ranks' (steps, layers) attention times."""
    cells = list(zip(*(sum(table, []) for table in per_rank)))  # per (step, layer): every rank's time
    slowest = sum(max(cell) for cell in cells)
    mean = sum(statistics.fmean(cell) for cell in cells)
    totals = [sum(sum(row) for row in table) for table in per_rank]
    return {"rank_ms": totals, "imbalance": slowest / mean if mean else 1.0,
            "slowest_over_mean": max(totals) / statistics.fmean(totals) if any(totals) else 1.0}


def run(rank: int, world: int, args) -> dict | None:
    """One rank's share of the benchmark; rank 0 returns the results."""
    smoke = args.smoke
    device = torch.device("cpu") if smoke else torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    dtype = torch.float32 if smoke else torch.bfloat16
    impl = "reference" if smoke else "auto"
    text_len = 16 if smoke else TEXT_LEN
    size = 256 if smoke else args.size
    image_tokens = (size // 16) ** 2
    model = build_transformer("flux", FLUX_TINY if smoke else FLUX_DEV, device, dtype)
    inputs = model_inputs("flux", FLUX_TINY if smoke else FLUX_DEV, size, text_len, 1, device, dtype)
    steps = timesteps("flux", args.steps, 1, device, dtype)
    full = ditfastattn.Plan.uniform(model, args.steps, "full", num_image_tokens=image_tokens, text_len=text_len)
    iid = synthetic_plan(full, args.target, image_tokens, text_len)
    plans = {"iid": iid, "persistent": persistent_plan(iid)}
    result = {"world_size": world, "size": size, "image_tokens": image_tokens, "text_len": text_len,
              "steps_per_generation": args.steps, "target_sparsity": args.target, "plans": {}}
    for name, plan in plans.items():
        summary = plan.summary(image_tokens, text_len)
        result["plans"][name] = {"sparsity": statistics.fmean(summary["sparsity_per_step"][1:])}

    def timed_plan(plan, **options) -> dict:
        ditfastattn.apply(model, plan, impl=impl, **options)
        try:
            return measure(model, inputs, steps)
        finally:
            ditfastattn.remove(model)

    pipe = None
    if args.calibrate is not None:
        pipe = FluxPipeline(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                            tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if rank == 0:
        single = result["one_gpu"] = {"stock": measure(model, inputs, steps)}
        for name, plan in plans.items():
            single[name] = timed_plan(plan)
        if pipe is not None:
            result["calibration"] = {"delta": args.calibrate}
            result["calibration"]["one_gpu"], one_plan = calibration(pipe, inputs, args, size, impl)
    dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)

    from diffusers.models._modeling_parallel import ContextParallelConfig

    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    ulysses = result["ulysses"] = {"stock": measure(model, inputs, steps)}
    for name, plan in plans.items():
        ulysses[name] = timed_plan(plan)
        ulysses[f"{name}_balanced"] = timed_plan(plan, balance_heads=True)
    if pipe is not None:
        calibrated, many_plan = calibration(pipe, inputs, args, size, impl)
        if rank == 0:
            choices = [a == b for rows, others in zip(one_plan.methods, many_plan.methods)
                       for heads, other in zip(rows, others) for a, b in zip(heads, other)]
            result["calibration"]["ulysses"] = {**calibrated, "same_choices": sum(choices) / len(choices)}

    attention = {}
    for name, plan in plans.items():
        placements = place_heads(plan, world, num_image_tokens=image_tokens, text_len=text_len)
        attention[name] = rank_attention_ms(plan, rank, world, image_tokens, text_len, device, dtype, impl)
        attention[f"{name}_balanced"] = rank_attention_ms(permute_plan(plan, placements), rank, world, image_tokens,
                                                          text_len, device, dtype, impl)
        result["plans"][name]["estimated_imbalance"] = {
            "before": statistics.fmean(p.imbalance_before for p in placements),
            "after": statistics.fmean(p.imbalance_after for p in placements)}
    gathered = [None] * world
    dist.all_gather_object(gathered, attention)
    if rank:
        return None
    result["attention"] = {name: imbalance([ranks[name] for ranks in gathered]) for name in attention}
    one, many = result["one_gpu"], result["ulysses"]
    for name in plans:
        speedup_one = one["stock"]["ms"] / one[name]["ms"]
        for variant in (name, f"{name}_balanced"):
            speedup = many["stock"]["ms"] / many[variant]["ms"]
            many[variant].update(speedup=speedup, of_one_gpu_speedup=speedup / speedup_one,
                                 scaling=one[name]["ms"] / (world * many[variant]["ms"]))
        one[name]["speedup"] = speedup_one
    many["stock"]["scaling"] = one["stock"]["ms"] / (world * many["stock"]["ms"])
    result["environment"] = environment(device)
    return result


def table(result: dict) -> str:
    world = result["world_size"]
    lines = [f"FLUX.1-dev-sized {result['size']}^2, {world} ranks (Ulysses); step ms, median of steps 1..",
             f"{'variant':22} {'1 GPU':>8} {f'{world} GPUs':>8} {'speedup':>8} {'of 1-GPU':>8} {'scaling':>8}"]
    one, many = result["one_gpu"], result["ulysses"]
    for variant, row in many.items():
        base = one.get(variant.removesuffix("_balanced"), {})
        lines.append(f"{variant:22} {base.get('ms', float('nan')):8.2f} {row['ms']:8.2f} "
                     f"{row.get('speedup', 1.0):8.3f} {row.get('of_one_gpu_speedup', float('nan')):8.3f} "
                     f"{row['scaling']:8.3f}")
    if "calibration" in result:
        cal = result["calibration"]
        lines.append(f"calibrate at delta {cal['delta']:g}: 1 GPU {cal['one_gpu']['seconds']:.1f} s (sparsity "
                     f"{cal['one_gpu']['sparsity']:.3f}), {world} GPUs {cal['ulysses']['seconds']:.1f} s (sparsity "
                     f"{cal['ulysses']['sparsity']:.3f}); same choices {cal['ulysses']['same_choices']:.4f}")
    lines.append("attention per rank (ms, steps 1..): imbalance (sum of slowest / mean), slowest total / mean")
    for name, row in result["attention"].items():
        ranks = " ".join(f"{ms:8.1f}" for ms in row["rank_ms"])
        lines.append(f"{name:22} {ranks}   {row['imbalance']:6.3f}  {row['slowest_over_mean']:6.3f}")
    return "\n".join(lines)


def _rank_main(rank: int, world: int, args, backend: str) -> None:
    if args.smoke:
        torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
        torch.accelerator.device_count = lambda: 1  # diffusers picks each rank's device by it; the CPU has none
        dist.init_process_group(backend, init_method=f"file://{args.rendezvous}", rank=rank, world_size=world)
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend)
    try:
        result = run(rank, world, args)
    finally:
        dist.destroy_process_group()
    if result is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(table(result), flush=True)
        print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny FLUX on the CPU: 2 gloo processes, reference op")
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels (default 2048)")
    parser.add_argument("--steps", type=int, default=6, help="steps per generation (default 6)")
    parser.add_argument("--target", type=float, default=0.68, help="attention sparsity of the plans (default 0.68)")
    parser.add_argument("--calibrate", type=float, default=None, metavar="DELTA",
                        help="also time ditfastattn.calibrate at this budget, on one GPU and under Ulysses")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON (default results/parallel_<N>gpu.json; smoke: out/parallel_smoke.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.smoke:
        args.out = args.out or HERE.parent / "out" / "parallel_smoke.json"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.rendezvous = args.out.parent / f"parallel_rendezvous_{os.getpid()}"
        args.rendezvous.unlink(missing_ok=True)
        torch.multiprocessing.start_processes(_rank_main, args=(2, args, "gloo"), nprocs=2, start_method="fork")
        args.rendezvous.unlink(missing_ok=True)
        return
    if "RANK" not in os.environ:
        parser.error("run it under torchrun --nproc-per-node N (N >= 2 GPUs), or with --smoke on the CPU")
    world = int(os.environ["WORLD_SIZE"])
    if world < 2:
        parser.error("Ulysses needs 2 or more processes: torchrun --nproc-per-node N with N >= 2")
    args.out = args.out or HERE / "results" / f"parallel_{world}gpu.json"
    _rank_main(int(os.environ["RANK"]), world, args, "nccl")


if __name__ == "__main__":
    main()
