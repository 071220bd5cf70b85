"""Calibration (search) time of a FLUX.1-dev-sized transformer next to its plain denoising time.

    python benchmarks/search_time.py            # CUDA GPU: benchmarks/results/search_time.json
    python benchmarks/search_time.py --smoke    # tiny model on the CPU (reference op): checks the script

Random bf16 weights, 8 prompts in one batch (random T5-sized prompt embeddings of 512 tokens),
guidance 3.5, FLUX's scheduler, at 1024² (4096 image tokens) and 2048² (16384). A full 50-step
run at 2K does not fit one 10-minute GPU call, so each run is a few steps long: the time per step
is the median over steps that do the measured work (plain: steps 1.., after the first call's
warm-up; search: steps 2.., since step 0 searches nothing and step 1 also compiles and tunes the
kernels), and the 50-step times are extrapolated: plain = 50 x step, search = plain step (step 0)
+ 49 x search step. Few steps read low, as their plans are not a whole generation's: at 1024²
``--steps-1k 4 50`` runs the search whole (each pass's measured ``sum_s`` in the JSON). If the
batch does not fit the GPU's memory during search, it halves and the JSON says so. With ``--profile`` each run takes one more step, under torch.profiler and left out of
the timings: its kernel table, its wall time and its kernels' total time (the rest is the GPU
waiting on the host) for plain denoising and for search, side by side.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import time
from pathlib import Path

# So that running out of memory means calibration needs more than the GPU has, not fragmentation
# (at 2K with 8 prompts the default allocator failed with 12 GiB reserved but unused). Set before
# torch initializes CUDA.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402

import ditfastattn  # noqa: E402
from e2e import FLUX_DEV, FLUX_TINY, build_transformer, environment, flux_image_ids

HERE = Path(__file__).resolve().parent
FULL_STEPS = 50
# FLUX.1-dev's scheduler configuration.
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)


class DenoisePipeline:
    """What calibrate needs of a FLUX pipeline: ``transformer``, ``scheduler`` and a call that runs
    FluxPipeline's denoising loop on packed random latents from prompt embeddings (no text
    encoders, no VAE) and returns them as FluxPipeline does with ``output_type="latent"``. Records the wall time of every step in ``step_seconds``."""

    def __init__(self, transformer, scheduler: FlowMatchEulerDiscreteScheduler):
        self.transformer = transformer
        self.scheduler = scheduler
        self.step_seconds: list[float] = []
        self.calls: list[dict] = []  # every call's batch and step_seconds (a target's search makes several)
        self.profile_step: int | None = None  # a step to run under torch.profiler (its table in `profile`)
        self.profile: str | None = None
        # That step's wall time and the device time of its kernels: their difference is the time the
        # GPU waited on the host (profiler overhead included).
        self.profile_times: dict | None = None

    def _mu(self, image_tokens: int) -> float:
        """FLUX's resolution-dependent shift: linear in the image token count between two anchors."""
        c = self.scheduler.config
        slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        return c.base_shift + slope * (image_tokens - c.base_image_seq_len)

    @torch.no_grad()
    def __call__(self, num_inference_steps=FULL_STEPS, generator=None, output_type="latent", prompt_embeds=None,
                 pooled_prompt_embeds=None, height=1024, width=1024, guidance_scale=3.5, **unused):
        transformer = self.transformer
        device, dtype = prompt_embeds.device, transformer.dtype
        batch, text_len = prompt_embeds.shape[:2]
        rows, cols = height // 16, width // 16
        latents = randn_tensor((batch, rows * cols, transformer.config.in_channels), generator=generator,
                               device=device, dtype=dtype)
        img_ids = flux_image_ids(rows, cols, device, dtype)
        txt_ids = torch.zeros(text_len, 3, device=device, dtype=dtype)
        guidance = torch.full((batch,), guidance_scale, device=device, dtype=torch.float32)
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        self.scheduler.set_timesteps(sigmas=sigmas, device=device, mu=self._mu(rows * cols))
        self.step_seconds = []
        self.calls.append({"batch": batch, "step_seconds": self.step_seconds})
        for index, t in enumerate(self.scheduler.timesteps):
            profiler = None
            if index == self.profile_step:
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                profiler.start()
            start = time.perf_counter()
            noise = transformer(
                hidden_states=latents, timestep=t.expand(batch).to(dtype) / 1000, guidance=guidance,
                pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds,
                txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
            )[0]
            latents = self.scheduler.step(noise, t, latents, return_dict=False)[0]
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.step_seconds.append(time.perf_counter() - start)
            if profiler is not None:
                profiler.stop()
                events = profiler.key_averages()
                self.profile = events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60)
                self.profile_times = {"wall_s": self.step_seconds[-1],
                                      "device_s": sum(e.self_device_time_total for e in events
                                                      if e.device_type == DeviceType.CUDA) / 1e6}
                self.profile_step = None
        return FluxPipelineOutput(images=latents)


def prompts(batch: int, text_len: int, config: dict, device, dtype) -> list[dict]:
    g = torch.Generator(device).manual_seed(0)
    return [
        {"prompt_embeds": torch.randn(1, text_len, config["joint_attention_dim"], generator=g, device=device,
                                      dtype=dtype),
         "pooled_prompt_embeds": torch.randn(1, config["pooled_projection_dim"], generator=g, device=device,
                                             dtype=dtype)}
        for _ in range(batch)
    ]


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.reset_peak_host_memory_stats()


def host_pinned_peak_gib(device) -> float | None:
    """Peak pinned host memory since the last reset_peak (blocks as torch's allocator rounds them)."""
    if device.type != "cuda":
        return None
    return torch.cuda.host_memory_stats().get("allocated_bytes.peak", float("nan")) / 2**30


def rse_summary(plan) -> dict:
    """Per candidate: share of finite scores, median and minimum RSE over steps, layers and heads;
    with the per-head bound c * delta / heads they say why a head could or could not compress."""
    scores = plan.scores
    heads = [head for rows in scores["rse"] for layer in rows if layer is not None for head in layer]
    rse = np.array(heads, dtype=float)
    finite = np.isfinite(rse)
    return {
        name: {"finite": float(finite[:, i].mean()), "median": float(np.nanmedian(rse[:, i])),
               "min": float(np.nanmin(rse[:, i]))}
        for i, name in enumerate(scores["candidates"])
    }


class LogLines(logging.Handler):
    """The library's log lines of one calibration (e.g. where previous-step outputs were kept)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run_size(pipe: DenoisePipeline, size: int, batch: int, plain_steps: int, search_steps: int, text_len: int,
             config: dict, impl: str, offload: bool | None, device, dtype, profile: bool = False,
             target: dict | None = None, method_set: str = "aa+oc") -> dict:
    embeds = prompts(batch, text_len, config, device, dtype)
    merged = {key: torch.cat([p[key] for p in embeds]) for key in embeds[0]}
    # A profiled step is one more step, left out of the timings (the profiler slows it).
    extra = 1 if profile else 0
    plain_steps, search_steps = plain_steps + extra, search_steps + extra
    reset_peak(device)
    pipe.profile_step = plain_steps - 1 if profile else None
    pipe(num_inference_steps=plain_steps, height=size, width=size, generator=torch.Generator().manual_seed(0),
         **merged)
    plain = list(pipe.step_seconds)
    row = {"size": size, "image_tokens": (size // 16) ** 2, "text_len": text_len, "plain_steps": plain,
           "plain_peak_gib": peak_gib(device)}
    if pipe.profile is not None:  # the plain step's own kernels, to tell the search's extra work apart
        row["profile_last_plain_step"] = pipe.profile.splitlines()
        row["profile_last_plain_step_times"] = pipe.profile_times
        pipe.profile = None
    del merged
    attempts = []
    while True:
        search = ditfastattn.SearchConfig.from_method_set(
            method_set, delta=0.2, num_inference_steps=search_steps, height=size, width=size, impl=impl,
            offload_outputs=offload, **(target or {}))
        reset_peak(device)
        log, library = LogLines(), logging.getLogger("ditfastattn")
        library.addHandler(log)
        library.setLevel(logging.INFO)
        pipe.profile_step = search_steps - 1 if profile else None
        pipe.calls = []
        try:
            plan = ditfastattn.calibrate(pipe, embeds[:batch], search, progress=False)
            break
        except torch.OutOfMemoryError as err:
            attempts.append({"batch": batch, "error": str(err).splitlines()[0]})
        finally:
            library.removeHandler(log)
        # Out of the except block, so the failed run's frames and tensors can be freed.
        gc.collect()
        torch.cuda.empty_cache()
        batch //= 2
        if batch == 0:
            raise RuntimeError(f"calibration does not fit at {size}x{size}: {attempts}")
    searched = list(pipe.step_seconds)
    plain_step = statistics.median(plain[1:len(plain) - extra])
    measured = statistics.median(searched[2:len(searched) - extra])
    # A smaller batch that fit stands for the asked one at a cost linear in the batch (an upper
    # bound: the integer programs on the host do not grow with the batch).
    search_step = measured * len(embeds) / batch
    coefficient = plan.provenance["search"]["head_coefficient"]  # None under a target's generation budget
    row.update(
        search_batch=batch, search_attempts=attempts, search_log=log.lines, search_steps=searched, search_peak_gib=peak_gib(device),
        search_host_pinned_peak_gib=host_pinned_peak_gib(device),
        plain_step_s=plain_step, search_step_s_measured=measured, search_step_s=search_step,
        search_over_plain=search_step / plain_step, plain_50_s=FULL_STEPS * plain_step,
        search_sum_s=sum(searched[:len(searched) - extra]),
        search_50_s=plain_step + (FULL_STEPS - 1) * search_step, sparsity=plan.summary()["sparsity"],
        solver_s_per_search_step=plan.provenance["search"]["seconds"]["solver"] / (search_steps - 1), rse=rse_summary(plan),
        head_bound=None if coefficient is None else coefficient * search.delta / config["num_attention_heads"],
    )
    if target is not None:
        # Each pass as the search's steps are timed above: its step 0 + 49 x median(its steps 2..),
        # at the batch that fit (not scaled: the first pass runs fewer prompts by design).
        # sum_s: the pass's measured time (with a 50-step search, --steps-1k P 50, the whole pass's).
        passes = [{**call, "pass_50_s": call["step_seconds"][0] + (FULL_STEPS - 1) * statistics.median(
            call["step_seconds"][2:len(call["step_seconds"]) - extra]),
            "sum_s": sum(call["step_seconds"][:len(call["step_seconds"]) - extra])} for call in pipe.calls]
        row.update(target=target, passes=passes, search_50_s=sum(p["pass_50_s"] for p in passes),
                   cache=plan.provenance["search"]["cache"])
        row["search_over_plain_50"] = row["search_50_s"] / row["plain_50_s"]
    if pipe.profile is not None:
        row["profile_last_search_step"] = pipe.profile.splitlines()
        row["profile_last_search_step_times"] = pipe.profile_times
        print(pipe.profile, flush=True)
        pipe.profile = None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU with the reference op")
    parser.add_argument("--batch", type=int, default=8, help="calibration prompts, one batch")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="default 1024 2048 (smoke: 256)")
    parser.add_argument("--steps-1k", type=int, nargs=2, default=(4, 6), metavar=("PLAIN", "SEARCH"))
    parser.add_argument("--steps-2k", type=int, nargs=2, default=(3, 4), metavar=("PLAIN", "SEARCH"))
    parser.add_argument("--offload", choices=["auto", "on", "off"], default="auto",
                        help="SearchConfig.offload_outputs: previous-step outputs in host memory (auto: if they "
                             "would take over half the free GPU memory)")
    parser.add_argument("--profile", action="store_true",
                        help="the last plain and the last search step under torch.profiler (tables, wall and kernel "
                             "time in the JSON)")
    parser.add_argument("--target", type=float, default=None,
                        help="time a target's search (every pass) instead of one pass at delta 0.2")
    parser.add_argument("--fit-prompts", default=str(ditfastattn.SearchConfig.fit_prompts),
                        help="with --target: SearchConfig.fit_prompts (its default), or 'all'")
    parser.add_argument("--cache", choices=["auto", "head", "step"], default="auto",
                        help="with --target: SearchConfig.cache (auto: both searches, the better kept)")
    parser.add_argument("--method-set", default="aa+oc", choices=sorted(ditfastattn.METHOD_SETS),
                        help="the candidates (aa+oc: the default; aa+oc+pk adds pooled keys)")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default results/search_time.json; smoke: out/)")
    args = parser.parse_args()
    offload = {"auto": None, "on": True, "off": False}[args.offload]
    target = None if args.target is None else {
        "target_sparsity": args.target, "fit_prompts": None if args.fit_prompts == "all" else int(args.fit_prompts),
        "cache": args.cache}
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    config = FLUX_TINY if args.smoke else FLUX_DEV
    text_len = 16 if args.smoke else 512
    sizes = args.sizes or ([256] if args.smoke else [1024, 2048])
    out = args.out or (HERE.parent / "out" / "search_time_smoke.json" if args.smoke else HERE / "results" / "search_time.json")
    start = time.perf_counter()
    pipe = DenoisePipeline(build_transformer("flux", config, device, dtype), FlowMatchEulerDiscreteScheduler(**SCHEDULER))
    print(f"[{time.perf_counter() - start:6.1f} s] model built", flush=True)
    result = {
        "environment": environment(device), "smoke": args.smoke, "model": "FluxTransformer2DModel, FLUX.1-dev config",
        "prompts": args.batch,
        "search": f"SearchConfig(delta=0.2{''.join(f', {k}={v}' for k, v in (target or {}).items())}), "
                  f"candidates {args.method_set!r}",
        "allocator": os.environ["PYTORCH_CUDA_ALLOC_CONF"], "offload_outputs": args.offload,
        "method": "per-step wall times (synchronized) of a few-step run; 50-step times extrapolated: "
                  "plain = 50 x median(plain steps 1..), search = plain step + 49 x median(search steps 2..); "
                  "a profiled last step (--profile) is left out",
        "runs": [],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        plain_steps, search_steps = args.steps_2k if size >= 2048 else args.steps_1k
        result["runs"].append(run_size(pipe, size, args.batch, plain_steps, search_steps, text_len, config,
                                       "reference" if args.smoke else "auto", offload, device, dtype, args.profile,
                                       target, args.method_set))
        # Written after every size, so a run cut short by a time limit still leaves its results.
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"[{time.perf_counter() - start:6.1f} s] {size} done", flush=True)
    rows = result["runs"]
    print("size  batch  plain s/step  search s/step  ratio  solver s/step  plain 50 steps  search 50 steps  peak GiB")
    for r in rows:
        scaled = f" (scaled from batch {r['search_batch']})" if r["search_batch"] != args.batch else ""
        print(f"{r['size']:4}  {r['search_batch']:5}  {r['plain_step_s']:12.3f}  {r['search_step_s']:13.3f}  "
              f"{r['search_over_plain']:5.2f}  {r['solver_s_per_search_step']:13.3f}  {r['plain_50_s']:12.1f} s  "
              f"{r['search_50_s']:13.1f} s  {r['search_peak_gib'] or float('nan'):8.1f}{scaled}")
        if r["search_host_pinned_peak_gib"]:
            print(f"      pinned host memory at its peak: {r['search_host_pinned_peak_gib']:.1f} GiB")
        bound = "none" if r["head_bound"] is None else f"{r['head_bound']:.4f}"
        print(f"      plan sparsity {r['sparsity']:.3f}; min RSE per candidate (head bound {bound}): "
              + ", ".join(f"{name} {v['min']:.3g}" for name, v in r["rse"].items() if name != "full"))
        if "passes" in r:
            print(f"      target search (kept: caching per {r['cache']}): passes (batch, 50-step s) "
                  + ", ".join(f"({p['batch']}, {p['pass_50_s']:.1f})" for p in r["passes"])
                  + f"; {r['search_50_s']:.1f} s in all, {r['search_over_plain_50']:.2f}x plain denoising")
        if "profile_last_search_step_times" in r:
            plain, search = r["profile_last_plain_step_times"], r["profile_last_search_step_times"]
            print(f"      profiled step (wall / kernels): plain {plain['wall_s']:.3f} / {plain['device_s']:.3f} s, "
                  f"search {search['wall_s']:.3f} / {search['device_s']:.3f} s")

if __name__ == "__main__":
    main()
