"""Paired differences between two result files scored on the same held-out prompts and seeds.

Each file holds ``per_prompt_ssim`` (plan name -> SSIM per held-out prompt, its mean over seeds), as
exact_target.py and oracle_heads.py write them. For each plan name both files hold: the mean SSIM
of each and the difference (first - second) with a 95% paired bootstrap interval over prompts
(``oracle_heads.paired_difference``, as score_paired reports them).

    PYTHONPATH=../../src python paired_runs.py results/exact_target_flux_0.7_rs_cpu.json results/oracle_heads_flux_0.7.json

With ``--curves`` the second file is benchmarks/results/quality.json instead: each plan ("head",
"layer") against the committed curve of its granularity (``--group`` names the head-wise one; the
layer-wise one is "layer-wise, " + it) on ``--kind``'s testbed, interpolated prompt by prompt at
sparsity ``--at`` (the plans' own, for a comparison at matched sparsity).
"""
import argparse
import json
from pathlib import Path

import numpy as np
from oracle_heads import paired_difference


def paired(first: dict, second: dict) -> dict:
    out = {}
    for name in sorted(first["per_prompt_ssim"].keys() & second["per_prompt_ssim"].keys()):
        a, b = first["per_prompt_ssim"][name], second["per_prompt_ssim"][name]
        if len(a) != len(b):
            raise ValueError(f"{name}: {len(a)} against {len(b)} prompts; the files were scored on other prompts")
        out[name] = {"first": sum(a) / len(a), "second": sum(b) / len(b), **paired_difference(a, b)}
    return out


def curve_at(quality: dict, kind: str, group: str, at: float) -> list[float]:
    """The committed curve ``group`` of ``kind`` at sparsity ``at``, prompt by prompt (linear between
    its plans, as quality.py reads it)."""
    rows = quality["results"][kind]
    points = sorted((rows["plans"][name]["sparsity"], rows["plans"][name]["ssim"]) for name in rows["groups"][group])
    xs = [x for x, _ in points]
    if not xs[0] <= at <= xs[-1]:
        raise ValueError(f"{group}: sparsity {at} is outside the curve ({xs[0]:.3f}-{xs[-1]:.3f})")
    return [float(np.interp(at, xs, [ssim[i] for _, ssim in points])) for i in range(len(points[0][1]))]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("--curves", action="store_true", help="the second file is quality.json")
    p.add_argument("--kind", default="flux")
    p.add_argument("--group", default="generation budget + step and head sensitivity, cache auto")
    p.add_argument("--at", type=float, help="the sparsity to read the curves at")
    args = p.parse_args()
    first, second = json.loads(args.first.read_text()), json.loads(args.second.read_text())
    if args.curves:
        groups = {"head": args.group, "layer": f"layer-wise, {args.group}"}
        second = {"per_prompt_ssim": {name: curve_at(second, args.kind, group, args.at) for name, group in groups.items()}}
    print(json.dumps(paired(first, second), indent=1))


if __name__ == "__main__":
    main()
