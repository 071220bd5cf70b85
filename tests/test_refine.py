"""Refinement of the step weights in the searched plan's context (SearchConfig(refine=...))."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import embeds, make_pipeline, negative_embeds

import ditfastattn
from ditfastattn import SearchConfig, refine
from ditfastattn.calibration import prompt_kwargs
from ditfastattn.sensitivity import KINDS

STEPS = 5
SIZE = {"height": 48, "width": 56}
CANDIDATES = ("full", "cache", "arrow:0.5", "arrow:0.25")


def search(kind: str, **kwargs) -> SearchConfig:
    guidance = {"guidance_scale": 4.0} if kind != "flux" else {}
    return SearchConfig(num_inference_steps=STEPS, candidates=CANDIDATES, head_coefficient=None, budget="generation",
                        target_sparsity=0.45, **guidance, **SIZE, **kwargs)


def prompts(kind: str) -> list[dict]:
    return [{**embeds(1, seed=i), **(negative_embeds(1, seed=20 + i) if kind != "flux" else {})} for i in range(2)]


def test_step_groups_cover_the_steps_after_the_first_in_order():
    for steps in (2, 3, 11, 12, 50):
        groups = refine.step_groups(steps)
        assert [s for g in groups for s in g] == list(range(1, steps))
        assert len(groups) == min(refine.MAX_GROUPS, steps - 1)
        assert max(map(len, groups)) - min(map(len, groups)) <= 1


def test_corrected_steps_scale_each_run_by_its_drop_over_its_counted_error():
    steps = {"cache": [1.0, 2.0, 3.0, 4.0, 5.0], "arrow": [1.0, 0.5, 0.5, 0.5, 0.5]}
    groups = [range(1, 3), range(3, 5)]
    counted = np.zeros((5, len(KINDS)))
    counted[1:, KINDS.index("cache")] = [1.0, 1.0, 2.0, 2.0]
    counted[1:3, KINDS.index("arrow")] = 4.0  # the plan ran no arrows in the second run
    drops = {(0, "cache"): 0.2, (1, "cache"): 0.4, (0, "arrow"): 0.8}
    out = refine.corrected_steps(steps, groups, counted, drops)
    ratio = {("cache", 0): 0.2 / 2.0, ("cache", 1): 0.4 / 4.0, ("arrow", 0): 0.8 / 8.0}
    expected = {"cache": [2.0 * ratio["cache", 0], 3.0 * ratio["cache", 0], 4.0 * ratio["cache", 1], 5.0 * ratio["cache", 1]],
                "arrow": [0.5 * ratio["arrow", 0]] * 2 + [0.5 * ratio["arrow", 0]] * 2}  # unmeasured: the kind's mean ratio
    later = np.concatenate([expected["cache"], expected["arrow"]])
    scale = np.exp(np.log(later).mean())
    assert out["cache"][0] == 1.0 and out["arrow"][0] == 1.0  # step 0 computes everything: untouched
    np.testing.assert_allclose(out["cache"][1:], np.array(expected["cache"]) / scale, rtol=1e-5)
    np.testing.assert_allclose(out["arrow"][1:], np.array(expected["arrow"]) / scale, rtol=1e-5)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_refined_calibration_lands_on_the_target_and_replays_bit_for_bit(kind, recorder):
    pipe = make_pipeline(kind)
    plan = ditfastattn.calibrate(pipe, prompts(kind), search(kind, refine=1), progress=False)
    report = plan.provenance["search"]["refine"]
    assert len(report) == 1 and report[0]["final_rse"] > 0
    measured = [r for kind_ratios in report[0]["ratios"].values() for r in kind_ratios if r is not None]
    assert measured and all(r > 0 for r in measured)
    if kind == "flux":  # the tiny SD3's few heads move its sparsity in steps of about 0.05: unrefined misses too
        assert abs(plan.summary()["sparsity"] - 0.45) <= 0.02 + 1e-9
    # The plan's stored sensitivity is the corrected one the last search used: reusing it
    # without refinement finds the same plan.
    again = ditfastattn.calibrate(pipe, prompts(kind), search(kind, sensitivity=plan.provenance["search"]["sensitivity"]),
                                  progress=False)
    assert again.methods == plan.methods


def test_replayed_runs_measure_what_whole_passes_measure(monkeypatch):
    """Each run's pass replays the plan's own outputs before it: the drops must equal those of
    passes that run every step (a replay that skipped what a cache head reads would differ)."""
    pipe = make_pipeline("flux")
    config = search("flux")
    plan = ditfastattn.calibrate(pipe, prompts("flux"), config, progress=False)
    assert any(m == "cache" for rows in plan.methods[2:] for heads in rows for m in heads)

    def drops_of(session_plan):
        from ditfastattn._calibration_session import run_pass
        from ditfastattn.adapters import adapter_for
        from ditfastattn.calibration import _pipeline_call

        spec = adapter_for(pipe.transformer).describe(pipe.transformer)
        call = _pipeline_call(pipe, config, prompt_kwargs(prompts("flux"))[0])
        session, _ = run_pass(pipe, spec, call, config, None, forced=session_plan)
        weights = np.ones(session.rse.shape)
        _, report = refine.refine_sensitivity(pipe, spec, call, config, session, weights, None, progress=False)
        return report["ratios"]

    replayed = drops_of(plan)
    monkeypatch.setattr(refine, "_replay_start", lambda methods, first, history: 0)
    assert drops_of(plan) == replayed


def test_refine_is_checked_before_any_work():
    with pytest.raises(ValueError, match="refine"):
        SearchConfig(refine=-1)
    with pytest.raises(ValueError, match="refine needs num_inference_steps >= 2"):
        SearchConfig(refine=1, num_inference_steps=1)
