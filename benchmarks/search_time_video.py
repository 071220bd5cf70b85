"""Calibration (search) time per step of the video families at their 720p token counts, next to plain denoising.

    PYTHONPATH=src python3 benchmarks/search_time_video.py             # CUDA GPU: results/search_time_video.json
    PYTHONPATH=src python3 benchmarks/search_time_video.py --smoke     # tiny models on the CPU (reference op)

HunyuanVideo (720p x 129 frames: 118,800 video tokens + 256 masked text) and Wan 2.1 14B (720p x 81
frames: 75,600 video tokens, self-attention without text) with random bf16 weights at ``e2e.py``'s
reduced depth (every block of a kind costs the same, so the ratio holds at the released depth), one
prompt (random text embeddings), the other inputs as ``e2e.py`` builds them. ``pipe`` is a minimal
pipeline in this script: a flow-matching Euler loop over the transformer, the scheduler's timesteps
as the video pipelines pass them. Each run is a few steps long: plain = median(plain steps 1..),
search = median(search steps 2..) (step 0 searches nothing; step 1 also compiles the kernels). The
search is ``SearchConfig(delta=0.2)`` with the default candidates, and with ``--tiles`` three 3-D
tile windows besides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before torch initializes CUDA

import torch  # noqa: E402

import ditfastattn  # noqa: E402
from e2e import (MODELS, SMOKE_VIDEO, VIDEO, VIDEO_DEPTH, build_transformer, environment, parse_size,  # noqa: E402
                 released_blocks, timesteps, video_inputs)
from search_time import peak_gib, reset_peak  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_RUNS = ("hunyuanvideo:720x1280x129", "wan:720x1280x81")
TILE_CANDIDATES = ("tile:0.25,0.25,0.25", "tile:0.2,0.2,0.2", "tile:0.16,0.16,0.16")


@dataclass
class VideoOutput:
    frames: torch.Tensor  # the latents, as diffusers' video pipelines return them with output_type="latent"


class VideoPipeline:
    """What calibrate needs of a video pipeline: ``transformer`` and a call that denoises random
    latents from prompt embeddings (no text encoder, no VAE). Records each step's wall time."""

    def __init__(self, kind: str, transformer, config: dict, size: tuple[int, int, int], text_len: int):
        self.kind, self.transformer, self.config, self.size, self.text_len = kind, transformer, config, size, text_len
        self.step_seconds: list[float] = []

    @torch.no_grad()
    def __call__(self, num_inference_steps=50, generator=None, output_type="latent", prompt_embeds=None, **unused):
        device, dtype = prompt_embeds.device, prompt_embeds.dtype
        batch = prompt_embeds.shape[0]
        g = torch.Generator(device).manual_seed(generator.initial_seed() if generator is not None else 0)

        def randn(*shape):
            return torch.randn(shape, generator=g, device=device, dtype=dtype)

        inputs = video_inputs(self.kind, self.config, self.size, self.text_len, batch, randn, device, dtype)
        inputs["encoder_hidden_states"] = prompt_embeds
        latents = inputs.pop("hidden_states")
        self.step_seconds = []
        for t in timesteps(self.kind, num_inference_steps, batch, device, dtype):
            start = time.perf_counter()
            velocity = self.transformer(hidden_states=latents, **t, **inputs)[0]
            latents = latents - velocity / num_inference_steps
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.step_seconds.append(time.perf_counter() - start)
        return VideoOutput(frames=latents)


def run_model(kind: str, size, args, device, dtype) -> dict:
    released = MODELS[kind][2 if args.smoke else 1]
    config = released if args.smoke else {**released, **VIDEO_DEPTH[kind]}
    text_len = 16 if args.smoke else MODELS[kind][3]
    text_dim = config.get("text_embed_dim", config.get("text_dim"))
    pipe = VideoPipeline(kind, build_transformer(kind, config, device, dtype), config, size, text_len)
    prompt = {"prompt_embeds": torch.randn(1, text_len, text_dim, generator=torch.Generator(device).manual_seed(0),
                                           device=device, dtype=dtype)}
    plain_steps, search_steps = args.steps
    reset_peak(device)
    pipe(num_inference_steps=plain_steps, **prompt)
    plain = list(pipe.step_seconds)
    plain_peak = peak_gib(device)
    candidates = ditfastattn.SearchConfig().candidates + (TILE_CANDIDATES if args.tiles else ())
    search = ditfastattn.SearchConfig(delta=0.2, num_inference_steps=search_steps, candidates=candidates,
                                      impl="reference" if args.smoke else "auto")
    reset_peak(device)
    plan = ditfastattn.calibrate(pipe, [prompt], search, progress=False)
    searched = list(pipe.step_seconds)
    plain_step = statistics.median(plain[1:])
    search_step = statistics.median(searched[2:])
    blocks = released_blocks(config)
    return {
        "model": kind, "size": list(size), "blocks": blocks, "released_blocks": released_blocks(released),
        "candidates": list(candidates), "plain_steps_s": plain, "search_steps_s": searched,
        "plain_step_s": plain_step, "search_step_s": search_step, "search_over_plain": search_step / plain_step,
        "search_step_s_released_depth": search_step * released_blocks(released) / blocks,
        "solver_s_per_search_step": plan.provenance["search"]["seconds"]["solver"] / (search_steps - 1),
        "plain_peak_gib": plain_peak, "search_peak_gib": peak_gib(device), "sparsity": plan.summary()["sparsity"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="KIND:HxWxF (video kinds of e2e.py)")
    parser.add_argument("--steps", type=int, nargs=2, default=(3, 4), metavar=("PLAIN", "SEARCH"))
    parser.add_argument("--tiles", action="store_true", help="three 3-D tile windows among the candidates too")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU with the reference op")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default results/search_time_video.json; smoke: out/)")
    args = parser.parse_args()
    runs = [(kind, parse_size(size)) for kind, size in (r.split(":") for r in args.runs)]
    unknown = sorted({kind for kind, _ in runs} - set(VIDEO))
    if unknown:
        parser.error(f"not video kinds: {unknown} (choose from {sorted(VIDEO)})")
    if min(args.steps) < 3:
        parser.error("--steps needs at least 3 of each: the medians leave out the first (and the search's second)")
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.smoke:
        runs = [(kind, SMOKE_VIDEO) for kind, _ in runs]
    out = args.out or (HERE.parent / "out" / "search_time_video_smoke.json" if args.smoke
                       else HERE / "results" / "search_time_video.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"environment": environment(device), "smoke": args.smoke, "search": "SearchConfig(delta=0.2)",
              "method": "per-step wall times (synchronized) of a few-step run: plain = median(steps 1..), "
                        "search = median(search steps 2..)", "runs": []}
    start = time.perf_counter()
    for kind, size in runs:
        result["runs"].append(run_model(kind, size, args, device, dtype))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # Written after every model, so a run cut short by a time limit still leaves its results.
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"[{time.perf_counter() - start:6.1f} s] {kind} done", flush=True)
    print("model          plain s/step  search s/step  search/plain  solver s/step  peak GiB plain/search  sparsity")
    for r in result["runs"]:
        print(f"{r['model']:14} {r['plain_step_s']:12.3f}  {r['search_step_s']:13.3f}  {r['search_over_plain']:12.2f}  "
              f"{r['solver_s_per_search_step']:13.3f}  {r['plain_peak_gib'] or float('nan'):8.1f} / "
              f"{r['search_peak_gib'] or float('nan'):6.1f}  {r['sparsity']:8.3f}")


if __name__ == "__main__":
    main()
