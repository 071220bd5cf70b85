"""Where a target's search step spends its time (stop 67): FLUX.1-dev size, random bf16 weights.

Profiles one step (the second to last) of plain denoising and of each pass of a cache="head"
target search (fit_prompts=1, 8 prompts) and writes, per profiled step, a chrome trace and a
summary: kernel time per name, the GPU's idle gaps and the host op open when each began.

    OUT=DIR python docs/history/search_profile.py [SIZE [STEPS]]     # from the repository root, CUDA
    OUT=DIR SMOKE=1 python docs/history/search_profile.py 256 6      # tiny model on the CPU (no kernels)

Stop 67's run (H200, e9b1877): results/search_profile_1024_h200_e9b1877.json.
"""
import gzip
import json
import os
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
sys.path.insert(0, "benchmarks")
import torch  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

import ditfastattn  # noqa: E402
from e2e import FLUX_DEV, build_transformer  # noqa: E402
import search_time as st  # noqa: E402

OUT = os.environ["OUT"]
size = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 8
prof_step = steps - 2


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Pipe(st.DenoisePipeline):
    """Profiles step ``prof_step`` of every call, trace to $OUT/trace_<tag>_<call>.json.gz."""

    tag = "plain"

    @torch.no_grad()
    def __call__(self, *a, **kw):
        call_index = len(self.calls)
        original = self.transformer.forward
        counter = {"n": 0}
        n_steps = kw.get("num_inference_steps", steps)
        pipe = self

        def forward(*args, **kwargs):
            i = counter["n"]
            counter["n"] += 1
            if i != min(prof_step, n_steps - 1):
                return original(*args, **kwargs)
            sync()
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                      torch.profiler.ProfilerActivity.CUDA])
            prof.start()
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            sync()
            wall = time.perf_counter() - t0
            prof.stop()
            path = f"/tmp/trace_{pipe.tag}_{call_index}.json"
            prof.export_chrome_trace(path)
            summarize(path, f"{pipe.tag}_{call_index}", wall, kwargs["hidden_states"].shape[0])
            return out

        self.transformer.forward = forward
        try:
            return super().__call__(*a, **kw)
        finally:
            self.transformer.forward = original


def summarize(path, name, wall, batch):
    events = json.load(open(path))["traceEvents"]
    with gzip.open(f"{OUT}/trace_{name}.json.gz", "wt") as f:
        json.dump(events, f)
    if not any(e.get("cat") == "kernel" for e in events):
        print(name, "no kernels", wall)
        return
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    cpu_ops = [e for e in events if e.get("cat") in ("cpu_op", "python_function", "cuda_runtime") and "dur" in e]
    by_name = {}
    for k in kernels:
        by_name.setdefault(k["name"][:70], [0, 0.0])
        by_name[k["name"][:70]][0] += 1
        by_name[k["name"][:70]][1] += k["dur"]
    busy, gaps, end = 0.0, [], None
    for k in kernels:
        s, e = k["ts"], k["ts"] + k["dur"]
        if end is None or s > end:
            if end is not None:
                gaps.append((end, s - end))
            busy += k["dur"]
            end = e
        elif e > end:
            busy += e - end
            end = e
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    # what the host was inside at each gap start: innermost cpu op / runtime call covering it
    attributed = {}
    for start, length in gaps:
        if length < 20:
            continue
        covering = [e for e in cpu_ops if e["ts"] <= start <= e["ts"] + e["dur"]]
        label = "|".join(e["name"][:40] for e in sorted(covering, key=lambda e: -e["dur"])[:4]) or "none"
        attributed.setdefault(label, [0, 0.0])
        attributed[label][0] += 1
        attributed[label][1] += length
    summary = {
        "name": name, "batch": batch, "wall_ms": wall * 1e3, "kernel_span_ms": span / 1e3, "gpu_busy_ms": busy / 1e3,
        "gaps_ms": sum(g for _, g in gaps) / 1e3, "gaps_over_20us": sum(1 for _, g in gaps if g >= 20),
        "kernels": sorted(([n, c, d / 1e3] for n, (c, d) in by_name.items()), key=lambda x: -x[2])[:40],
        "gap_causes": sorted(([n, c, d / 1e3] for n, (c, d) in attributed.items()), key=lambda x: -x[2])[:30],
    }
    with open(f"{OUT}/summary_{name}.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{name}: batch {batch} wall {wall*1e3:.1f} ms busy {busy/1e3:.1f} ms gaps {summary['gaps_ms']:.1f} ms", flush=True)
    for n, c, d in summary["kernels"][:15]:
        print(f"   {d:8.1f} ms {c:5d}  {n}")
    print("  gaps:")
    for n, c, d in summary["gap_causes"][:10]:
        print(f"   {d:8.1f} ms {c:5d}  {n}")


SMOKE = bool(os.environ.get("SMOKE"))
CONFIG = st.FLUX_TINY if SMOKE else FLUX_DEV
device, dtype = (torch.device("cpu"), torch.float32) if SMOKE else (torch.device("cuda"), torch.bfloat16)
pipe = Pipe(build_transformer("flux", CONFIG, device, dtype), FlowMatchEulerDiscreteScheduler(**st.SCHEDULER))
embeds = st.prompts(8, 16 if SMOKE else 512, CONFIG, device, dtype)
merged = {key: torch.cat([p[key] for p in embeds]) for key in embeds[0]}
pipe(num_inference_steps=steps, height=size, width=size, generator=torch.Generator().manual_seed(0), **merged)
print("plain steps", [round(s, 3) for s in pipe.step_seconds], flush=True)
pipe.tag = "search"
pipe.calls = []
search = ditfastattn.SearchConfig.from_method_set("aa+oc", delta=0.2, num_inference_steps=steps, height=size, width=size,
                                                  target_sparsity=0.5, fit_prompts=1, cache="head")
plan = ditfastattn.calibrate(pipe, embeds, search, progress=False)
for c in pipe.calls:
    print("pass batch", c["batch"], [round(s, 3) for s in c["step_seconds"]], flush=True)
print(plan.summary()["sparsity"], plan.provenance["search"]["seconds"])
