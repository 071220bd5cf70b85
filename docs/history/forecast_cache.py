"""Cached steps that forecast each attention output from the last two computed steps, against
reusing the last one (the step cache), end to end on a testbed (CPU).

Every attention module of the transformer is hooked here (its output after the output projection,
which is linear, so this is what caching every head of the layer gives); a step is cached whole or
computed whole, on fixed schedules.

    PYTHONPATH=src python docs/history/forecast_cache.py flux OUT.json [PROMPTS] [--embeddings E.pt]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "docs/history")
import quality as q  # noqa: E402
from oracle_heads import testbed  # noqa: E402


class Forecast:
    """Hooks every attention module: at a cached step its output is predicted from the last two
    computed outputs (``mode``: "reuse", "step": linear in the step index, "sigma": linear in the
    scheduler's noise level, "half": half the step-index slope)."""

    def __init__(self, pipe):
        self.pipe, self.cached, self.mode = pipe, frozenset(), "reuse"
        self.step, self.slot, self.timestep = -1, 0, None
        self.history: dict[tuple, list] = {}
        self.handles = [pipe.transformer.register_forward_pre_hook(self._new_call, with_kwargs=True)]
        for name, module in pipe.transformer.named_modules():
            if name.endswith(".attn"):
                self.handles.append(module.register_forward_hook(self._hook(name)))

    def _new_call(self, module, args, kwargs):
        """A step is a new timestep; FLUX's true CFG calls the transformer twice a step (call slots)."""
        timestep = float(kwargs["timestep"].flatten()[0])
        if timestep != self.timestep:
            self.step, self.slot, self.timestep = self.step + 1, 0, timestep
        else:
            self.slot += 1

    def _x(self, step):
        return float(self.pipe.scheduler.sigmas[step]) if self.mode == "sigma" else float(step)

    def _hook(self, name):
        def hook(module, args, output):
            history = self.history.setdefault((name, self.slot), [])
            if self.step not in self.cached:
                history[:] = (history + [(self.step, output)])[-2:]
                return output
            (a, out_a) = history[-1]
            if self.mode == "reuse" or len(history) < 2:
                return out_a
            (b, out_b) = history[0]
            slope = (self._x(self.step) - self._x(a)) / (self._x(a) - self._x(b))
            if self.mode == "half":
                slope /= 2
            if isinstance(out_a, tuple):
                return tuple(x + slope * (x - y) for x, y in zip(out_a, out_b))
            return out_a + slope * (out_a - out_b)
        return hook

    def run(self, prompts, steps, seed, cached, mode):
        self.cached, self.mode = frozenset(cached), mode
        self.step, self.slot, self.timestep, self.history = -1, 0, None, {}
        return q.images(self.pipe, prompts, steps, seed)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("kind")
    parser.add_argument("out")
    parser.add_argument("prompts", nargs="?", type=int, default=16)
    parser.add_argument("--embeddings", default=".carry/embeddings.pt")
    parser.add_argument("--heldout-seed", type=int, default=2026)
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--modes", default="reuse,step,sigma,half")
    args = parser.parse_args()
    pipe = testbed(args.kind, Path(args.embeddings), "cpu")
    prompts = q.heldout_prompts(args.heldout_seed)[:args.prompts]
    steps, seeds = args.steps, [int(s) for s in args.seeds.split(",")]
    schedules = {  # name -> cached steps (step 0 always computed)
        "every 2nd computed": [s for s in range(steps) if s % 2 == 1],
        "every 3rd computed": [s for s in range(steps) if s % 3 != 0],
        "every 4th computed": [s for s in range(steps) if s % 4 != 0],
    }
    hooks = Forecast(pipe)
    started = time.perf_counter()
    refs = {seed: hooks.run(prompts, steps, seed, (), "reuse") for seed in seeds}
    print(f"full: {time.perf_counter() - started:.0f} s", flush=True)
    rows = []
    for schedule, cached in schedules.items():
        for mode in args.modes.split(","):
            scores = [q.per_image(hooks.run(prompts, steps, seed, cached, mode), refs[seed]) for seed in seeds]
            ssim, psnr = (np.mean([score[i] for score in scores], 0) for i in (0, 1))
            rows.append({"schedule": schedule, "mode": mode, "sparsity": len(cached) / steps,
                         "ssim_per_prompt": ssim.tolist(), "ssim": float(ssim.mean()),
                         "psnr": float(psnr.mean())})
            print(f"{schedule:20s} {mode:6s} sparsity {len(cached) / steps:.2f} SSIM {ssim.mean():.4f} "
                  f"(worst {ssim.min():.3f})", flush=True)
    Path(args.out).write_text(json.dumps({"kind": args.kind, "steps": steps, "seeds": seeds, "prompts": prompts,
                                          "heldout_seed": args.heldout_seed, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
