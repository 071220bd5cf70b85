"""The main job: calibrate the bundled trained SD3-style testbed, then compare with full attention."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from . import apply, remove
from ._files import write_atomically
from .calibration import calibrate
from .search_config import SearchConfig
from .visualize import plot_comparison, plot_plan

TESTBED = Path(__file__).resolve().parent / "testbed"
# The testbed's 1024 image tokens are only 8 blocks, so the paper's 1/8..1/32 windows all collapse
# to the diagonal block; wider bands give the search real choices at this resolution.
DEMO_CANDIDATES = ("full", "cache", "arrow:0.5", "arrow:0.25", "arrow:0.125")


PROMPT_FILES = ("calibration_prompts.txt", "heldout_prompts.txt")
OUTPUTS = ("plan.json", "plan.png", "results.json", "comparison.png")  # what a run writes into its folder


def _prompts(name: str, count: int | None = None) -> list[str]:
    lines = [line.strip() for line in (TESTBED / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:count]


def check_outputs(out: Path) -> None:
    """Raise ValueError where a folder sits on a file name the demo writes into ``out``."""
    blocked = [name for name in OUTPUTS if (out / name).is_dir()]
    if blocked:
        raise ValueError(f"{out / blocked[0]} is a folder, where the demo writes a file; give another output folder")


def available_prompts() -> int:
    """How many calibration and held-out prompts the demo can take each."""
    return min(len(_prompts(name)) for name in PROMPT_FILES)


def _generate(pipe, prompts, steps, seed):
    start = time.perf_counter()
    images = pipe(prompt=prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt").images
    return images, (time.perf_counter() - start) / len(prompts)


def run_demo(out: Path, *, delta: float = 0.2, steps: int = 20, num_prompts: int = 6, device: str = "cpu") -> dict:
    from .testbed.evaluator import caption_accuracy, image_metrics
    from .testbed.pipeline import load_pipeline
    from .testbed.text import get_text_encoder

    if not 1 <= num_prompts <= available_prompts():
        raise ValueError(f"num_prompts must be in [1, {available_prompts()}] (the bundled prompts); got {num_prompts}")
    config = SearchConfig(delta=delta, candidates=DEMO_CANDIDATES, num_inference_steps=steps, seed=0)
    check_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"ditfastattn demo: bundled SD3-style testbed (trained MMDiT, 64x64, {steps} steps) on {device}")
    pipe = load_pipeline("sd3", device=device, dtype=torch.float32)
    get_text_encoder(str(pipe._execution_device))  # loaded now, not inside the first pass's progress bar
    calibration_prompts, heldout = (_prompts(name, num_prompts) for name in PROMPT_FILES)

    print(f"1/3 calibrating on {len(calibration_prompts)} prompts (delta={delta})")
    start = time.perf_counter()
    plan = calibrate(pipe, calibration_prompts, config)
    calibration_seconds = time.perf_counter() - start

    print(f"2/3 generating {len(heldout)} held-out prompts with full attention")
    _generate(pipe, heldout[:1], 2, seed=1)  # warm-up, so neither timed run pays first-call costs
    reference, full_time = _generate(pipe, heldout, steps, seed=1)
    print("3/3 generating them again with the plan")
    apply(pipe, plan)
    compressed, plan_time = _generate(pipe, heldout, steps, seed=1)
    remove(pipe)

    metrics = image_metrics(compressed, reference)
    summary = plan.summary()
    result = {
        "attention_sparsity": summary["sparsity"],
        "calibration_seconds": calibration_seconds,
        "seconds_per_image_full": full_time,
        "seconds_per_image_plan": plan_time,
        "ssim": metrics["ssim"],
        "psnr": metrics["psnr"],
        "caption_accuracy_full": caption_accuracy(reference, heldout),
        "caption_accuracy_plan": caption_accuracy(compressed, heldout),
        **({"lpips": metrics["lpips"]} if "lpips" in metrics else {}),
    }
    # Every file made in a folder beside them first, then moved in by four renames at the very end: an
    # interrupt leaves an earlier run's set whole (written one by one after the work, one left a new plan
    # beside old results).
    staging = Path(tempfile.mkdtemp(prefix=".ditfastattn-demo-", dir=out))
    try:
        plan.save(staging / "plan.json")
        plot_plan(plan, staging / "plan.png", title=f"testbed plan, delta={delta}")
        text = json.dumps(result, indent=1)
        write_atomically(staging / "results.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
        title = (f"delta={delta}: attention sparsity {summary['sparsity']:.0%}, SSIM {metrics['ssim']:.3f}, "
                 f"PSNR {metrics['psnr']:.1f} dB")
        plot_comparison(reference, compressed, heldout, staging / "comparison.png", title=title)
        for name in OUTPUTS:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    rows = [
        ("attention sparsity", "0%", f"{summary['sparsity']:.1%}"),
        (f"seconds per image ({device})", f"{full_time:.2f}", f"{plan_time:.2f}"),
        ("SSIM vs full", "1.000", f"{metrics['ssim']:.3f}"),
        ("PSNR vs full (dB)", "inf", f"{metrics['psnr']:.1f}"),
        ("caption accuracy", f"{result['caption_accuracy_full']:.3f}", f"{result['caption_accuracy_plan']:.3f}"),
    ]
    if "lpips" in metrics:
        rows.append(("LPIPS vs full", "0.000", f"{metrics['lpips']:.3f}"))
    print(f"\n{'':<26}{'full attention':>16}{'ditfastattn':>14}")
    for name, full, ours in rows:
        print(f"{name:<26}{full:>16}{ours:>14}")
    print(f"\ncalibration took {calibration_seconds:.1f} s. Attention is a small share of this tiny model's CPU time;")
    print("the speed-up shows on a GPU with the fused kernel at full size (benchmarks/README.md).")
    print(f"wrote {out / 'comparison.png'}, {out / 'plan.json'}, {out / 'plan.png'}, {out / 'results.json'}")
    return result
