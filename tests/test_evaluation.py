"""The quality harness on tiny random pipelines (prompts as precomputed embeddings)."""

from __future__ import annotations

import pytest
import torch
from conftest import embeds, make_pipeline, negative_embeds

from ditfastattn import Plan, SearchConfig
from ditfastattn.evaluation import delta_sweep, evaluate, image_metrics, video_metrics


def test_image_metrics_identical_and_different():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=generator)
    same = image_metrics(images, images)
    assert same["ssim"] == pytest.approx(1.0) and same["psnr"] > 60
    noisy = image_metrics((images + 0.1 * torch.randn(images.shape, generator=generator)).clamp(0, 1), images)
    assert noisy["ssim"] < 0.99 and 10 < noisy["psnr"] < 30
    with pytest.raises(ValueError, match="differ in shape"):
        image_metrics(images[:1], images)


def test_metrics_refuse_pictures_outside_zero_to_one():
    # 0..255 pictures, uint8 or float, were clamped to [0, 1]: SSIM 0.14 for pictures that score 0.95.
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    bytes_ = (images * 255).round().to(torch.uint8)
    cases = [(bytes_, TypeError, r"must be floating point in \[0, 1\].*got torch.uint8: divide 0..255 pictures by 255"),
             (images * 255, ValueError, r"must be in \[0, 1\]; they range over \[0.*, 25\d.*\]: divide 0..255"),
             (images - 1e-3, ValueError, r"must be in \[0, 1\]")]
    for bad, error, match in cases:
        with pytest.raises(error, match=f"images {match}"):
            image_metrics(bad, images)
        with pytest.raises(error, match=f"references {match}"):
            image_metrics(images, bad)
        with pytest.raises(error, match=f"videos {match}"):
            video_metrics(torch.stack([bad, bad], dim=1), torch.stack([images, images], dim=1))
    assert image_metrics(images, images.clamp(0.2, 0.8))["ssim"] < 1  # the range's own values pass


def prompts(count=2):
    return [{**embeds(1, seed=i), **negative_embeds(1, seed=10 + i)} for i in range(count)]


def test_evaluate_full_plan_is_identical_and_compressed_is_not(tmp_path):
    pipe = make_pipeline("sd35")
    plans = {"all-full": Plan.uniform(pipe.transformer, 3, "full", num_image_tokens=1024, text_len=7),
             "cache": Plan.uniform(pipe.transformer, 3, "cache", num_image_tokens=1024, text_len=7)}
    extra = lambda images, prompts: {"mean": images.mean().item()}  # noqa: E731
    results = evaluate(pipe, prompts(), plans, num_inference_steps=3, out_dir=tmp_path, extra_metrics=extra,
                       height=64, width=64, guidance_scale=4.0)
    assert results["reference"]["sparsity"] == 0.0 and "mean" in results["reference"]
    assert results["all-full"]["ssim"] == pytest.approx(1.0) and results["all-full"]["psnr"] > 60
    assert results["cache"]["sparsity"] == pytest.approx(2 / 3)
    assert results["cache"]["ssim"] < 1.0
    assert len(list((tmp_path / "cache").glob("*.png"))) == 2
    with pytest.raises(ValueError, match="'reference' names"):
        evaluate(pipe, prompts(), {"reference": plans["cache"]}, num_inference_steps=3)


def test_delta_sweep_orders_quality():
    pipe = make_pipeline("flux")
    flux_prompts = [embeds(1, seed=i) for i in range(2)]
    config = SearchConfig(num_inference_steps=4, height=48, width=56)
    results, plans = delta_sweep(pipe, flux_prompts, flux_prompts, [0.0, 1.0], config, progress=False)
    assert set(plans) == {"delta=0", "delta=1"}
    assert results["delta=0"]["sparsity"] == 0.0 and results["delta=0"]["psnr"] > 60
    assert results["delta=1"]["sparsity"] > 0.3 and results["delta=1"]["psnr"] < results["delta=0"]["psnr"]


def test_delta_sweep_evaluates_as_it_calibrated_and_keeps_each_plan(tmp_path, monkeypatch):
    # The compared images ran without the calibration's pipeline arguments (another size and
    # guidance: 64 x 64 against 48 x 56 here) and with impl="auto"; a measured sensitivity was
    # measured again for every delta; plans were saved only once every image was made.
    import ditfastattn.calibration as calibration
    import ditfastattn.evaluation as evaluation

    pipe = make_pipeline("flux")
    flux_prompts = [embeds(1, seed=i) for i in range(2)]
    config = SearchConfig(num_inference_steps=3, pipeline_kwargs={"height": 48, "width": 56, "guidance_scale": 2.0},
                          impl="reference", sensitivity="measure", candidates=("full", "cache", "arrow:0.5"))
    calls, measured, saved = [], [], []
    original = evaluation.generate
    monkeypatch.setattr(evaluation, "generate", lambda pipe, prompts, **kwargs: (
        calls.append(kwargs), saved.append(sorted(p.name for p in tmp_path.glob("plan_*.json"))),
        original(pipe, prompts, **kwargs))[-1])
    measure = calibration.measure_sensitivity
    monkeypatch.setattr(calibration, "measure_sensitivity", lambda *a, **k: measured.append(1) or measure(*a, **k))
    applied = []
    apply = evaluation.apply
    monkeypatch.setattr(evaluation, "apply", lambda pipe, plan, **k: applied.append(k) or apply(pipe, plan, **k))
    results, plans = delta_sweep(pipe, flux_prompts, flux_prompts, [0.1, 0.9], config, out_dir=tmp_path, progress=False)
    assert all(call["height"] == 48 and call["width"] == 56 and call["guidance_scale"] == 2.0 for call in calls)
    assert applied == [{"impl": "reference"}] * 2
    assert len(measured) == 1
    assert saved[0] == ["plan_delta=0.1.json", "plan_delta=0.9.json"]  # before the first image
    assert plans["delta=0.9"].provenance["search"]["sensitivity"] == plans["delta=0.1"].provenance["search"]["sensitivity"]



def test_evaluate_refuses_a_pipeline_with_a_plan_and_settings_given_twice():
    from ditfastattn import apply, remove

    pipe = make_pipeline("flux")
    plan = Plan.uniform(pipe.transformer, 3, "cache", num_image_tokens=1024, text_len=7)
    apply(pipe, plan)
    # Its "full attention" reference ran under the plan (0.85 off per pixel), the error only after it.
    with pytest.raises(RuntimeError, match=r"a ditfastattn plan is applied to this pipeline: call ditfastattn.remove\(pipe\) first"):
        evaluate(pipe, [embeds(1)], {"plan": plan}, num_inference_steps=3)
    remove(pipe)
    sized = [{**embeds(1), "height": 64}]
    assert set(evaluate(pipe, sized, {}, num_inference_steps=2, height=64)) == {"reference"}  # given alike: once
    with pytest.raises(ValueError, match="the prompt dicts set height=64 but 48 is given too"):
        evaluate(pipe, sized, {}, num_inference_steps=2, height=48)
