"""GPU memory of the head weights' Fisher pass at FLUX.1-dev size (lab script, stop 53).

``sensitivity="measure"`` takes each head's weight from one pass with gradients
(``measure_head_fisher``): a backward pass through the whole transformer at every step. Without
checkpointing it holds every block's activations for the whole batch. This builds FLUX.1-dev with
random bf16 weights (no download) and runs that pass on 8 prompts, checkpointed as the library does
now, then without (``_checkpoint_blocks`` replaced by a no-op), recording the peak GPU memory, the
time per step and any out-of-memory error, and checks the two give the same weights where both run.

    PYTHONPATH=src python docs/history/fisher_memory.py OUT.json [--sizes 1024 2048] [--steps 3]

Results: ``results/fisher_memory_h100.json`` (CALIBRATION_NOTES.md, stop 53).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from e2e import FLUX_DEV, FLUX_TINY, build_transformer, environment  # noqa: E402
from search_time import SCHEDULER, DenoisePipeline, prompts  # noqa: E402

from ditfastattn import SearchConfig, sensitivity  # noqa: E402
from ditfastattn.adapters import adapter_for  # noqa: E402
from ditfastattn.calibration import prompt_kwargs  # noqa: E402


def fisher_run(pipe, spec, call, config, checkpointed: bool) -> dict:
    own = sensitivity._checkpoint_blocks
    if not checkpointed:
        sensitivity._checkpoint_blocks = lambda experts: []
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        fisher = sensitivity.measure_head_fisher(pipe, spec, call, config)
        error = None
    except torch.OutOfMemoryError as err:
        fisher, error = None, str(err).splitlines()[0]
    finally:
        sensitivity._checkpoint_blocks = own
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    row = {"checkpointed": checkpointed, "peak_gib": peak, "seconds": seconds,
           "step_seconds": list(pipe.step_seconds), "error": error}
    return row, fisher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: checks the script")
    args = parser.parse_args()
    device, dtype = (torch.device("cpu"), torch.float32) if args.smoke else (torch.device("cuda"), torch.bfloat16)
    model, text_len = (FLUX_TINY, 16) if args.smoke else (FLUX_DEV, 512)
    transformer = build_transformer("flux", model, device, dtype)
    transformer.requires_grad_(True)  # as a loaded model is: the pass must not build weight gradients
    pipe = DenoisePipeline(transformer, FlowMatchEulerDiscreteScheduler(**SCHEDULER))
    spec = adapter_for(transformer).describe(transformer)
    result = {"environment": environment(device), "model": "FluxTransformer2DModel, FLUX.1-dev config, random bf16",
              "batch": args.batch, "steps": args.steps, "runs": []}
    for size in args.sizes:
        call, _ = prompt_kwargs(prompts(args.batch, text_len, model, device, dtype))
        call.update(height=size, width=size)
        config = SearchConfig(num_inference_steps=args.steps, height=size, width=size)
        weights = {}
        for checkpointed in (True, False):
            row, fisher = fisher_run(pipe, spec, call, config, checkpointed)
            weights[checkpointed] = fisher
            result["runs"].append({"size": size, **row})
            print(json.dumps({"size": size, **{k: v for k, v in row.items() if k != "step_seconds"}}), flush=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        if weights[True] is not None and weights[False] is not None:
            both = weights[True][1:], weights[False][1:]
            result["runs"][-1]["max_relative_difference"] = float(np.max(np.abs(both[0] - both[1]) / np.maximum(both[1], 1e-30)))
            print("max relative difference", result["runs"][-1]["max_relative_difference"], flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
