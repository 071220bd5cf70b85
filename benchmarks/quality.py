"""The paper's quality tables on the bundled trained testbeds.

- delta sweep: sparsity, SSIM, PSNR and caption accuracy against the full model, both testbeds;
- ablation (SD3-style, CFG batch): AA only, AA+OC, +CFG sharing, +residual sharing; c in {none, 1, 1.5, 2};
- equal sparsity: head-wise search vs layer-wise search (one method per layer) vs a uniform window.

    PYTHONPATH=src python benchmarks/quality.py --save-embeddings /tmp/embeddings.pt   # CPU, with the encoder
    PYTHONPATH=src python benchmarks/quality.py --device cuda --embeddings /tmp/embeddings.pt --out benchmarks/results

The GPU machine has no room (64 MiB per call) for the text encoder next to the testbed weights, so
the prompts' token states are computed here with the same encoder and carried as a small file.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
from pathlib import Path

import diffusers
import torch

from ditfastattn import Plan, SearchConfig, calibrate
from ditfastattn.evaluation import evaluate
from ditfastattn.testbed import pipeline as testbed_pipeline
from ditfastattn.testbed.evaluator import caption_accuracy
from ditfastattn.testbed.pipeline import load_pipeline

TESTBED = Path(__file__).resolve().parents[1] / "src" / "ditfastattn" / "testbed"
# 1024 image tokens are 8 blocks: the paper's 1/8..1/32 windows all collapse to the diagonal block.
ARROWS = ("arrow:0.5", "arrow:0.25", "arrow:0.125")
SETS = {
    "AA": ("full",) + ARROWS,
    "AA+OC": ("full", "cache") + ARROWS,
    "AA+OC+CFG": ("full", "cache", "cfg_share") + ARROWS + tuple(f"cfg_share+{a}" for a in ARROWS),
    "AA+OC+RS": ("full", "cache") + ARROWS + tuple(a.replace("arrow", "arrow_residual") for a in ARROWS),
}
DELTAS = (0.1, 0.2, 0.4, 0.6, 1.0)


def prompts(name: str, count: int) -> list[str]:
    return [line.strip() for line in (TESTBED / name).read_text().splitlines() if line.strip()][:count]


def save_embeddings(path: Path, count: int) -> None:
    from ditfastattn.testbed.text import encode_prompts

    texts = prompts("calibration_prompts.txt", count) + prompts("heldout_prompts.txt", count) + [""]
    states, pooled = encode_prompts(texts)
    torch.save({"prompts": texts, "states": states, "pooled": pooled}, path)
    print(f"{len(texts)} prompt embeddings -> {path}")


def use_embeddings(path: Path) -> None:
    """Serve the testbed pipelines' prompt encoding from a precomputed table."""
    table = torch.load(path)
    index = {text: i for i, text in enumerate(table["prompts"])}

    def encode(texts, device="cpu", dtype=torch.float32):
        rows = torch.tensor([index[t] for t in ([texts] if isinstance(texts, str) else texts)])
        return table["states"][rows].to(device, dtype), table["pooled"][rows].to(device, dtype)

    testbed_pipeline.encode_prompts = encode


def run(kind: str, args) -> dict:
    pipe = load_pipeline(kind, device=args.device, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    calibration, heldout = prompts("calibration_prompts.txt", args.prompts), prompts("heldout_prompts.txt", args.prompts)
    base = SearchConfig(num_inference_steps=args.steps, candidates=SETS["AA+OC"], seed=0)

    def search(name, **changes):
        plan = calibrate(pipe, calibration, dataclasses.replace(base, **changes), progress=False)
        print(f"  {kind} {name}: sparsity {plan.summary()['sparsity']:.3f}", flush=True)
        return plan

    plans: dict[str, Plan] = {}
    for delta in DELTAS:
        plans[f"head delta={delta:g}"] = search(f"head delta={delta:g}", delta=delta)
        plans[f"layer delta={delta:g}"] = search(f"layer delta={delta:g}", delta=delta, granularity="layer")
    for window in ARROWS:
        plans[f"uniform {window}"] = Plan.uniform(pipe.transformer, args.steps, window, num_image_tokens=1024, text_len=32)
    if kind == "sd3":
        for name, candidates in SETS.items():
            plans[f"ablation {name}"] = search(name, delta=args.ablation_delta, candidates=candidates)
        for c in (None, 1.0, 1.5, 2.0):
            plans[f"ablation c={c}"] = search(f"c={c}", delta=args.ablation_delta, head_coefficient=c)

    def captions(images, texts):
        return {"caption_accuracy": caption_accuracy(images, texts, device=args.device)}

    results = evaluate(pipe, heldout, plans, num_inference_steps=args.steps, seed=1, extra_metrics=captions)
    return results


def table(results: dict, prefix: str) -> list[str]:
    rows = ["| plan | sparsity | SSIM | PSNR (dB) | caption acc. |", "|---|---|---|---|---|"]
    reference = results["reference"]
    rows.append(f"| full attention | 0.000 | 1.000 | inf | {reference['caption_accuracy']:.3f} |")
    for name, row in results.items():
        if name.startswith(prefix):
            rows.append(
                f"| {name} | {row['sparsity']:.3f} | {row['ssim']:.3f} | {row['psnr']:.1f} | {row['caption_accuracy']:.3f} |"
            )
    return rows


def plot(all_results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_results), figsize=(5.5 * len(all_results), 4), squeeze=False)
    for axis, (kind, results) in zip(axes[0], all_results.items()):
        for prefix, style in (("head delta", "o-"), ("layer delta", "s--"), ("uniform", "^:")):
            points = sorted((r["sparsity"], r["psnr"]) for n, r in results.items() if n.startswith(prefix))
            axis.plot(*zip(*points), style, label={"head delta": "head-wise search", "layer delta": "layer-wise search",
                                                   "uniform": "uniform arrow window"}[prefix])
        axis.set_title(f"{kind}-style testbed")
        axis.set_xlabel("attention sparsity")
        axis.set_ylabel("PSNR vs full attention (dB)")
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--ablation-delta", type=float, default=0.4)
    parser.add_argument("--kinds", default="sd3,flux")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--embeddings", type=Path, default=None, help="precomputed prompt embeddings")
    parser.add_argument("--save-embeddings", type=Path, default=None, help="write them and stop")
    args = parser.parse_args()
    if args.save_embeddings:
        save_embeddings(args.save_embeddings, args.prompts)
        return
    if args.embeddings:
        use_embeddings(args.embeddings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    all_results = {kind: run(kind, args) for kind in args.kinds.split(",")}
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "steps": args.steps,
        "prompts": args.prompts,
        "ablation_delta": args.ablation_delta,
        "candidates": SETS["AA+OC"],
    }
    (out / "quality.json").write_text(json.dumps({"meta": meta, "results": all_results}, indent=1))
    lines = [f"Testbeds, {args.steps} steps, {args.prompts} held-out prompts, {meta['device']}, {meta['date']}", ""]
    for kind, results in all_results.items():
        for title, prefix in (("delta sweep, head-wise", "head delta"), ("layer-wise", "layer delta"), ("uniform window", "uniform"), ("ablation", "ablation")):
            rows = table(results, prefix)
            if len(rows) > 3:
                lines += [f"### {kind}: {title}", ""] + rows + [""]
    (out / "quality.md").write_text("\n".join(lines))
    plot(all_results, out / "quality_sparsity.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
