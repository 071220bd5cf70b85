"""SearchConfig(cache="step"): caching decided per step, for every head of a step or for none."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import embeds, make_pipeline, negative_embeds, run_pipeline
from test_calibration import SIZE, TESTBED_CANDIDATES, config, prompts, sensitivity_like_the_testbeds

import ditfastattn
from ditfastattn import SearchConfig
from ditfastattn._prompts import prompt_kwargs
from ditfastattn.calibration import cached_schedule

GENERATION = {"budget": "generation", "head_coefficient": None, "cache": "step"}


def cached_rows(plan) -> list[str]:
    """Per step: "all" when every head of every layer caches, "none" when none does, else "mixed"."""
    rows = []
    for step in plan.methods:
        reused = [m == "cache" for layer in step for m in layer]
        rows.append("all" if all(reused) else "none" if not any(reused) else "mixed")
    return rows


@pytest.mark.parametrize("steps", [2, 3, 5, 12, 20, 50])
@pytest.mark.parametrize("target", [0.01, 0.1, 0.3, 0.45, 0.5, 0.6, 0.9])
def test_the_schedule_is_every_other_step_or_as_many_as_the_target_holds_spread_evenly(steps, target):
    cached = sorted(cached_schedule(steps, target))
    every_other = list(range(1, steps, 2))
    assert set(cached) <= set(every_other)  # never step 0, never two in a row
    assert len(cached) == min(len(every_other), int(np.floor(target * steps + 1e-9)))
    if len(cached) >= 2:
        gaps = np.diff(cached)
        assert gaps.max() - gaps.min() <= 2  # spread evenly over the other steps


@pytest.mark.parametrize("target", [0.3, 0.6, 0.85])
def test_a_target_is_met_with_whole_steps_cached_never_two_in_a_row(target):
    pipe = make_pipeline("flux")
    steps = 12
    search = config(
        "flux", target_sparsity=target, num_inference_steps=steps, candidates=TESTBED_CANDIDATES,
        sensitivity=sensitivity_like_the_testbeds(pipe, steps), height=64, width=64, **GENERATION,
    )
    plan = ditfastattn.calibrate(pipe, prompts("flux"), search, progress=False)
    assert abs(plan.summary()["sparsity"] - target) <= 0.02
    rows = cached_rows(plan)
    cached = plan.provenance["search"]["cached_steps"]
    assert "mixed" not in rows and [s for s, row in enumerate(rows) if row == "all"] == cached
    assert cached == sorted(cached_schedule(steps, target)) and cached


def test_a_step_cache_plan_replays_bit_for_bit(recorder):
    pipe = make_pipeline("sd3")
    search = config("sd3", target_sparsity=0.6, candidates=TESTBED_CANDIDATES, **GENERATION)
    plan = ditfastattn.calibrate(pipe, prompts("sd3"), search, progress=False)
    calibrated = [(r["layer"], r["step"], r["out"]) for r in recorder]
    assert plan.provenance["search"]["cached_steps"] == [1, 3] and "mixed" not in cached_rows(plan)
    assert any(m.startswith("arrow") for step in (2, 4) for layer in plan.methods[step] for m in layer)
    recorder.clear()
    ditfastattn.apply(pipe, plan)
    merged, _ = prompt_kwargs(prompts("sd3"))
    run_pipeline(pipe, steps=search.num_inference_steps, batch=2, **SIZE, **merged, guidance_scale=search.guidance_scale)
    applied = [(r["layer"], r["step"], r["out"]) for r in recorder]
    calibrated = calibrated[-len(applied):]  # the second pass's
    assert [a[:2] for a in applied] == [c[:2] for c in calibrated]
    assert all(torch.equal(a[2], c[2]) for a, c in zip(applied, calibrated))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"cache": "layer"}, "cache must be 'head', 'step' or 'auto'"),
        ({**GENERATION, "target_sparsity": 0.5, "candidates": ("full", "arrow:0.25")}, "cache='step' caches whole steps: add 'cache' to the candidates"),
        ({**GENERATION}, "set target_sparsity or target_speedup"),
        ({"cache": "step", "target_sparsity": 0.5, "budget": "layer"}, "set budget='generation'"),
        ({"cache": "step", "target_sparsity": 0.5, "head_coefficient": 1.5}, "set budget='generation'"),
    ],
)
def test_bad_step_cache_settings_are_refused_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchConfig(**kwargs)


def test_auto_keeps_the_search_whose_final_latents_are_nearer_full_attention(monkeypatch):
    from ditfastattn import calibration
    from ditfastattn.sensitivity import relative_squared_error

    pipe = make_pipeline("flux")
    steps = 8
    search = config(
        "flux", target_sparsity=0.5, num_inference_steps=steps, candidates=TESTBED_CANDIDATES,
        sensitivity=sensitivity_like_the_testbeds(pipe, steps), height=64, width=64, **{**GENERATION, "cache": "auto"},
    )
    head = ditfastattn.calibrate(pipe, prompts("flux"), dataclasses.replace(search, cache="head"), progress=False)
    auto = ditfastattn.calibrate(pipe, prompts("flux"), search, progress=False)
    errors = auto.provenance["search"]["cache_final_rse"]
    kept = min(errors, key=errors.get)
    assert auto.provenance["search"]["cache"] == kept and errors["head"] != errors["step"]
    assert ("mixed" not in cached_rows(auto)) == (kept == "step")
    # The per-head search is cache="head"'s own; the per-step one fits its budget on the uncompressed pass.
    assert auto.provenance["search"]["first_pass_delta"] == (0.0 if kept == "step" else search.delta)

    # The error recorded for the kept plan is its own: the plan applied, against full attention.
    merged, _ = prompt_kwargs(prompts("flux"))

    def latents():
        return pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(search.seed), output_type="latent",
                    height=64, width=64, **merged).images

    reference = latents()
    ditfastattn.apply(pipe, auto)
    assert relative_squared_error(latents(), reference) == pytest.approx(errors[kept], rel=1e-5)
    ditfastattn.remove(pipe)

    # The comparison decides: with the errors swapped the other plan is kept.
    measured = calibration.relative_squared_error
    monkeypatch.setattr(calibration, "relative_squared_error", lambda latents, reference: -measured(latents, reference))
    other = ditfastattn.calibrate(pipe, prompts("flux"), search, progress=False)
    assert other.provenance["search"]["cache"] != kept and other.methods != auto.methods
    assert (auto if kept == "head" else other).methods == head.methods


def test_measured_sensitivity_runs_under_step_caching():
    pipe = make_pipeline("flux")
    search = config("flux", target_sparsity=0.5, candidates=TESTBED_CANDIDATES, sensitivity="measure", **GENERATION)
    plan = ditfastattn.calibrate(pipe, prompts("flux"), search, progress=False)
    assert set(plan.provenance["search"]["sensitivity"]["steps"]) == {"cache", "arrow"}
    assert plan.provenance["search"]["cached_steps"] == sorted(cached_schedule(search.num_inference_steps, 0.5))


def test_a_target_beyond_the_schedule_and_the_windows_is_refused_with_the_most_reachable():
    pipe = make_pipeline("flux")
    search = config("flux", target_sparsity=0.75, candidates=("full", "cache", "arrow:0.5"), height=64, width=64, **GENERATION)
    with pytest.raises(ValueError, match=r"out of reach: .* at most 0\.\d+ .*\(steps \[1, 3\] cached whole, every head of "
                                         r"the others at its cheapest window\)"):
        ditfastattn.calibrate(pipe, prompts("flux"), search, progress=False)


def test_one_progress_bar_counts_every_pass_of_auto_by_its_prompts(monkeypatch):
    from ditfastattn import calibration

    bars = []
    real = calibration.tqdm

    def counted(*args, **kwargs):
        bars.append(real(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(calibration, "tqdm", counted)
    pipe = make_pipeline("flux")
    search = config("flux", target_sparsity=0.5, candidates=TESTBED_CANDIDATES, fit_prompts=1,
                    **{**GENERATION, "cache": "auto"})
    given = prompts("flux")
    ditfastattn.calibrate(pipe, given, search, progress=True)
    layers = len(ditfastattn.Plan.uniform(pipe.transformer, 2, "full").layer_names)
    # Layers decided times prompts: three passes over every prompt, the per-head search's first over one.
    total = (3 * len(given) + 1) * (search.num_inference_steps - 1) * layers
    assert len(given) > 1 and len(bars) == 1 and bars[0].n == bars[0].total == total


def test_auto_with_a_reused_measurement_finds_the_same_plan():
    pipe = make_pipeline("flux")
    search = config("flux", target_sparsity=0.5, candidates=TESTBED_CANDIDATES, sensitivity="measure",
                    **{**GENERATION, "cache": "auto"})
    measured = ditfastattn.calibrate(pipe, prompts("flux"), search, progress=False)
    reused = ditfastattn.calibrate(
        pipe, prompts("flux"), dataclasses.replace(search, sensitivity=measured.provenance["search"]["sensitivity"]),
        progress=False,
    )
    assert reused.methods == measured.methods
    assert reused.provenance["search"]["cache_final_rse"] == measured.provenance["search"]["cache_final_rse"]


def test_true_cfg_caches_both_calls_of_a_cached_step_and_replays_bit_for_bit(recorder):
    pipe = make_pipeline("flux")
    cfg_prompts = [{**embeds(1, seed=i), **negative_embeds(1, seed=20 + i)} for i in range(2)]
    search = config("flux", target_sparsity=0.5, candidates=TESTBED_CANDIDATES, pipeline_kwargs={"true_cfg_scale": 2.0},
                    **GENERATION)
    plan = ditfastattn.calibrate(pipe, cfg_prompts, search, progress=False)
    calibrated = [(r["layer"], r["step"], r["call"], r["out"]) for r in recorder]
    assert plan.provenance["search"]["cached_steps"] == [1, 3] and "mixed" not in cached_rows(plan)
    recorder.clear()
    ditfastattn.apply(pipe, plan)
    merged, _ = prompt_kwargs(cfg_prompts)
    run_pipeline(pipe, steps=search.num_inference_steps, batch=2, **SIZE, **merged, true_cfg_scale=2.0)
    applied = [(r["layer"], r["step"], r["call"], r["out"]) for r in recorder]
    calibrated = calibrated[-len(applied):]  # the second pass's
    assert {call for _, _, call, _ in applied} == {0, 1}
    assert [a[:3] for a in applied] == [c[:3] for c in calibrated]
    assert all(torch.equal(a[3], c[3]) for a, c in zip(applied, calibrated))


def test_whole_steps_cached_around_tile_windows_on_a_video_grid():
    from test_families import MiniPipeline, prompt
    from test_video_families import FAMILIES as VIDEO_FAMILIES

    pipe = MiniPipeline(VIDEO_FAMILIES["wan"])
    search = SearchConfig(num_inference_steps=8, target_sparsity=0.6, candidates=("full", "cache", "tile:0,0,0", "tile:1,0,0"),
                          **GENERATION)
    plan = ditfastattn.calibrate(pipe, [prompt(seed=1, batch=2)], search, progress=False)
    cached = plan.provenance["search"]["cached_steps"]
    assert cached == sorted(cached_schedule(8, 0.6)) and "mixed" not in cached_rows(plan)
    windows = {m for step in range(1, 8) if step not in cached for layer in plan.methods[step] for m in layer}
    assert windows & {"tile:0,0,0", "tile:1,0,0"}, windows
    assert abs(plan.summary()["sparsity"] - 0.6) <= 0.02
