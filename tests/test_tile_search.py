"""Tile windows as search candidates: the search prices, deduplicates and counts them on each call's
image grid, its plans replay bit for bit, and models whose calls give no grid refuse them at once.
The image families SD3 and FLUX.1 report their grid too, so 2-D tiles compete with the 1-D band."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_pipeline, run_pipeline
from test_calibration import SIZE, config, prompts
from test_families import FAMILIES as IMAGE_FAMILIES
from test_families import MiniPipeline, calibrate_and_replay, prompt
from test_sensitivity_heads import two_layer_spec
from test_video_families import FAMILIES as VIDEO_FAMILIES
from test_video_families import GRID as VIDEO_GRID

import ditfastattn
from ditfastattn import SearchConfig
from ditfastattn import _calibration_session as calibration_session
from ditfastattn.adapters.flux import raster_grid
from ditfastattn.search_config import ARROWS, METHOD_SETS, TILES
from ditfastattn.methods import parse_method
from ditfastattn.ops._dense import head_mask
from ditfastattn.sensitivity import STAND_IN_PROBE, weights_array

STEPS = 3
# On the 3 x 8 x 12 video, 2 x 8 x 8 tiles: 2 x 1 x 2 of them. tile:0,1,0 is tile:0,0,0 there
# (one tile along rows), so the search must treat it as the same candidate.
TILE_CANDIDATES = ("full", "tile:0,0,0", "tile:1,0,0", "tile:0,0,1", "tile:0,1,0", "arrow:0.3")


def methods_of(plan) -> set[str]:
    return {m for rows in plan.methods[1:] for heads in rows for m in heads}


@pytest.mark.parametrize("family", ["hunyuanvideo", "wan"])
def test_a_search_with_tile_candidates_replays_bit_for_bit(family, recorder):
    search = SearchConfig(num_inference_steps=STEPS, delta=2.0, candidates=TILE_CANDIDATES)
    plan = calibrate_and_replay(VIDEO_FAMILIES[family], recorder, search)
    chosen = methods_of(plan)
    assert any(parse_method(m).needs_grid for m in chosen), chosen
    assert "tile:0,1,0" not in chosen  # the same tiles as tile:0,0,0, listed first
    assert tuple(plan.provenance["grid"]) == VIDEO_GRID and tuple(plan.provenance["tile"]) == (2, 8, 8)


def test_the_search_prices_tile_candidates_by_the_pairs_their_mask_keeps(monkeypatch, recorder):
    """Each layer's program gets, per candidate, the share of (query, key) pairs its mask keeps under
    that call's layout: the dense oracle's mask, counted."""
    priced = []
    choose = calibration_session.choose

    def recording(rse, cost, *args, **kwargs):
        priced.append(cost[0].copy())
        return choose(rse, cost, *args, **kwargs)

    monkeypatch.setattr(calibration_session, "choose", recording)
    pipe = MiniPipeline(VIDEO_FAMILIES["hunyuanvideo"])
    search = SearchConfig(num_inference_steps=STEPS, delta=2.0, candidates=TILE_CANDIDATES)
    ditfastattn.calibrate(pipe, [prompt(seed=1)], search, progress=False)
    (layout,) = {record["layout"] for record in recorder}  # every layer and call: video, then text
    assert layout.grid == VIDEO_GRID and len(priced) == (STEPS - 1) * 2
    computing = [index for index, name in enumerate(TILE_CANDIDATES) if parse_method(name).computes]
    want = [float(head_mask(parse_method(TILE_CANDIDATES[i]).mode(layout.image_len, layout.tile_grid()), layout).sum())
            / layout.seq_len**2 for i in computing]
    for cost in priced:
        np.testing.assert_allclose(cost[computing], want, rtol=1e-12)
    assert want[1] < min(want[2], want[3]) and want[1] == want[4]  # wider windows, and the duplicate


def test_a_target_counts_tile_windows_on_the_grid():
    pipe = MiniPipeline(VIDEO_FAMILIES["wan"])
    search = SearchConfig(num_inference_steps=8, target_sparsity=0.5, head_coefficient=None,
                          candidates=("full", "tile:0,0,0", "tile:1,0,0", "tile:0,0,1"))
    plan = ditfastattn.calibrate(pipe, [prompt(seed=1, batch=2)], search, progress=False)
    assert any(parse_method(m).needs_grid for m in methods_of(plan))
    summary = plan.summary()
    assert summary["grid"] == VIDEO_GRID and abs(summary["sparsity"] - 0.5) <= 0.02


def test_tile_candidates_on_calls_without_a_grid_are_refused_at_the_first_call():
    pipe = MiniPipeline(IMAGE_FAMILIES["qwenimage"])  # its calls give no image grid
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *args: calls.append(1))
    search = SearchConfig(num_inference_steps=STEPS, candidates=("full", "arrow:0.3", "tile:0,0.5,0.5"))
    with pytest.raises(ValueError, match=r"tile and pool candidates \(tile:0,0.5,0.5\) need the image grid .* "
                                         r"search with arrow:<f> candidates instead"):
        ditfastattn.calibrate(pipe, [prompt(seed=1)], search, progress=False)
    assert len(calls) == 1


@pytest.mark.parametrize("kind,grid", [("sd3", (1, 24, 28)), ("sd35", (1, 24, 28)), ("flux", (1, 24, 28))])
def test_image_families_report_their_grid_and_search_tiles_against_the_band(kind, grid, recorder):
    plan = search_and_replay(kind, ("full", "cache", "arrow:0.25", "tile:0,0,0", "tile:0,0.5,1"), recorder)
    assert tuple(plan.provenance["grid"]) == grid
    assert methods_of(plan) & {"tile:0,0,0", "tile:0,0.5,1"}


def search_and_replay(kind: str, candidates, recorder):
    """Calibrates the image family ``kind`` with ``candidates`` on two prompts, applies the plan to
    both at once and checks that every layer output of the calibration comes again bit for bit,
    each call with its image grid; returns the plan."""
    pipe = make_pipeline(kind)
    # No step weights: the schedule's would leave the last step (sigma 0.001 to 0) to caching alone,
    # and SD3.5's plan chooses its tiles there.
    search = config(kind, delta=0.5, candidates=candidates, sensitivity=None)
    plan = ditfastattn.calibrate(pipe, prompts(kind), search, progress=False)
    calibrated = [(r["layer"], r["step"], r["out"]) for r in recorder]
    assert all(r["layout"].grid is not None for r in recorder)  # SD3.5's image-only attn2 too
    recorder.clear()
    ditfastattn.apply(pipe, plan)
    merged = {k: torch.cat([p[k] for p in prompts(kind)]) for k in prompts(kind)[0]}
    run_pipeline(pipe, steps=search.num_inference_steps, batch=2, **SIZE, **merged,
                 **({"guidance_scale": search.guidance_scale} if search.guidance_scale else {}))
    applied = [(r["layer"], r["step"], r["out"]) for r in recorder]
    assert [a[:2] for a in applied] == [c[:2] for c in calibrated]
    assert all(torch.equal(a[2], c[2]) for a, c in zip(applied, calibrated))
    return plan


def test_flux_grids_come_only_from_raster_position_ids():
    ids = torch.cartesian_prod(torch.zeros(1), torch.arange(3.0), torch.arange(5.0))
    assert raster_grid(ids, 15) == (1, 3, 5)
    assert raster_grid(torch.cat([ids, ids + 1]), 15) == (1, 3, 5)  # a reference image after the target
    assert raster_grid(ids[torch.randperm(15, generator=torch.Generator().manual_seed(0))], 15) is None
    assert raster_grid(ids + torch.tensor([0.0, 1.0, 0.0]), 15) is None  # offset rows
    assert raster_grid(ids, 10) == (1, 2, 5) and raster_grid(ids, 12) is None  # whole rows only


def test_the_tile_method_set_covers_time_and_space():
    windows = [parse_method(name).window for name in TILES]
    assert METHOD_SETS["ta+oc"] == ("full", "cache") + TILES
    assert any(w[0] > 0 and w[1] == w[2] == 0 for w in windows)  # temporal only
    assert any(w[0] == 0 and w[1] > 0 and w[2] > 0 for w in windows)  # spatial only
    assert any(all(w) for w in windows)


def measured_probes(family: str, candidates) -> dict:
    search = SearchConfig(num_inference_steps=STEPS, delta=2.0, budget="generation", head_coefficient=None,
                          candidates=candidates, sensitivity="measure")
    plan = ditfastattn.calibrate(MiniPipeline(VIDEO_FAMILIES[family]), [prompt(seed=1), prompt(seed=2)], search,
                                 progress=False)
    measured = plan.provenance["search"]["sensitivity"]
    assert all(len(per_step) == STEPS for per_step in measured["steps"].values())
    return measured["probe"]


def test_tile_windows_are_weighed_by_a_band_probe():
    # A band probes for them, the candidates' narrowest, else the stand-in: tiles alone once got no
    # step profile (with cache) or were refused (without).
    assert measured_probes("hunyuanvideo", ("full", "cache", "tile:0,0,0", "arrow:0.3", "tile:1,0,0")) == {
        "layers": "arrow:0.3", "steps": {"cache": "cache", "arrow": "arrow:0.3"}}
    assert measured_probes("wan", ("full", "cache", "tile:0,0,0", "tile:0,1,1")) == {
        "layers": STAND_IN_PROBE, "steps": {"cache": "cache", "arrow": STAND_IN_PROBE}}
    assert measured_probes("wan", ("full", "tile:0,0,0", "tile:1,0,0")) == {
        "layers": STAND_IN_PROBE, "steps": {"arrow": STAND_IN_PROBE}}
    assert STAND_IN_PROBE == min(ARROWS, key=lambda name: parse_method(name).fraction)


def test_tile_windows_take_the_bands_step_profile():
    candidates = ("full", "cache", "arrow:0.25", "tile:0,0,0")
    weights = weights_array({"steps": {"cache": [1.0, 2.0, 3.0], "arrow": [1.0, 5.0, 7.0]}}, two_layer_spec(), candidates, 3)
    assert weights[:, 1].T.tolist() == [[1.0] * 3, [1.0, 2.0, 3.0], [1.0, 5.0, 7.0], [1.0, 5.0, 7.0]]
