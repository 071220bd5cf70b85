"""Method names, block geometry, plan validation, summary and the JSON format."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_flux, tiny_sd3

from ditfastattn import Plan, PlanMismatchError
from ditfastattn._geometry import MODE_FULL, MODE_SKIP, TileGrid, density, kept_pairs, window_blocks
from ditfastattn.adapters import adapter_for
from ditfastattn.methods import CFG_BATCH, FACTOR, FRACTION, KINDS, PREVIOUS_OUTPUT, RESIDUAL, WINDOW, Method, parse_method
from ditfastattn.model import LayerSpec, ModelSpec, TokenLayout
from ditfastattn.ops._dense import head_mask


@pytest.mark.parametrize(
    "name,method",
    [
        ("full", Method("full")),
        ("cache", Method("cache")),
        ("arrow:0.125", Method("arrow", 0.125)),
        ("arrow:.5", Method("arrow", 0.5)),
        ("arrow_residual:0.0625", Method("arrow_residual", 0.0625)),
        ("cfg_share", Method("cfg_share")),
        ("cfg_share+arrow:0.25", Method("cfg_share", 0.25)),
    ],
)
def test_parse_method_round_trips(name, method):
    assert parse_method(name) == method
    assert parse_method(method.name) == method


@pytest.mark.parametrize("name", ["arrow", "arrow:0", "arrow:1.5", "arrow:x", "window:0.1", "cfg_share+cache", "", 3])
def test_unknown_method_is_rejected(name):
    with pytest.raises(ValueError, match="unknown method"):
        parse_method(name)


def _examples(kind):
    """A name of each of ``kind``'s forms, its placeholders filled."""
    return [form.replace(FRACTION, "0.25").replace(WINDOW, "0.5,0,1").replace(FACTOR, "3") for form in kind.forms]


def test_the_method_registry_is_complete_and_consistent():
    tiles = TileGrid((1, 32, 32), (1, 8, 16))  # 1024 image tokens
    colours = set()
    for kind in KINDS.values():
        assert kind.forms and kind.reads in (None, PREVIOUS_OUTPUT, RESIDUAL, CFG_BATCH), kind.name
        for name in _examples(kind):
            method = parse_method(name)
            assert method.kind == kind.name and method.name == name and parse_method(method.name) == method
            cost = method.cost(1024, 77, tiles)
            assert 0.0 <= cost <= (0.5 if method.shares_cfg else 1.0), name
            assert (cost > 0) == method.computes, name
            assert method.exact <= (cost == 1.0 and kind.reads is None), name
            if kind.needs_grid:
                with pytest.raises(ValueError, match="needs the image grid"):
                    method.mode(1024)
            else:
                assert method.cost(1024, 77) == cost
        # how plan pictures draw it: an RGB colour of its own
        assert len(kind.colour) == 3 and all(0.0 <= c <= 1.0 for c in kind.colour), kind.name
        colours.add(kind.colour)
    assert len(colours) == len(KINDS)
    assert [kind.name for kind in KINDS.values() if kind.exact] == ["full"]
    with pytest.raises(ValueError, match="unknown method") as error:
        parse_method("bogus:1")
    for kind in KINDS.values():
        for form in kind.forms:
            assert repr(form) in str(error.value)


def test_plan_pictures_take_names_without_an_extension_and_refuse_unknown_ones(tmp_path):
    # The picture is written to a temporary name first: matplotlib, left to infer the format from
    # it, refused "tmp" for a name without an extension (which savefig writes as a PNG).
    from ditfastattn.visualize import plot_plan

    plan = Plan.uniform(tiny_flux(), 2, "cache", num_image_tokens=256, text_len=7)
    assert plot_plan(plan, tmp_path / "heatmap").read_bytes().startswith(b"\x89PNG")
    assert plot_plan(plan, tmp_path / "heatmap.SVG").read_bytes().lstrip().startswith(b"<?xml")
    with pytest.raises(ValueError, match=rf"cannot write {tmp_path / 'heatmap.tmp'}: matplotlib writes no .tmp "
                                         r"pictures; end the name in one of .*\.png.*\.svg"):
        plot_plan(plan, tmp_path / "heatmap.tmp")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["heatmap", "heatmap.SVG"]


def test_plan_pictures_count_every_method_kind():
    from ditfastattn.visualize import kind_shares

    plan = Plan.uniform(tiny_flux(), 2, "full")
    names = [name for kind in KINDS.values() for name in _examples(kind)]
    methods = [plan.methods[0], [[names[(layer * len(heads) + head) % len(names)] for head in range(len(heads))]
                                 for layer, heads in enumerate(plan.methods[1])]]
    shares = kind_shares(Plan(plan.model, methods))
    assert set(shares) == set(KINDS)
    assert all(shares[kind][1].sum() > 0 for kind in KINDS)
    assert sum(shares.values()) == pytest.approx(torch.ones(2, len(plan.layer_names)).numpy())


@pytest.mark.parametrize(
    "fraction,tokens,expected",
    [(0.125, 16384, 8), (0.0625, 16384, 4), (0.03125, 16384, 2), (0.125, 4096, 2), (0.03125, 4096, 0), (1.0, 1000, 4)],
)
def test_window_blocks(fraction, tokens, expected):
    assert window_blocks(fraction, tokens) == expected


@pytest.mark.parametrize("mode", [MODE_FULL, MODE_SKIP, 0, 1, 5, 50])
@pytest.mark.parametrize("before,image_len,after", [(0, 1000, 0), (77, 300, 0), (0, 130, 333), (50, 300, 200),
                                                    (0, 1, 0), (3, 128, 0), (0, 256, 9), (0, 129, 0), (0, 1408, 0)])
def test_kept_pairs_counts_the_mask(mode, before, image_len, after):
    # Cost depends on the global token count only, wherever the global segments sit (Kontext: both sides).
    # Arrows in closed form: whole and partial last blocks, windows wider than the image.
    seq = before + image_len + after
    layout = TokenLayout(seq, before, image_len)
    counted = 0 if mode == MODE_SKIP else int(head_mask(mode, layout).sum())
    assert kept_pairs(mode, image_len, before + after) == counted
    assert density(mode, image_len, before + after) == pytest.approx(counted / seq**2)


def test_method_costs():
    tokens, text = 4096, 333
    assert parse_method("full").cost(tokens, text) == 1.0
    assert parse_method("cache").cost(tokens, text) == 0.0
    arrow = parse_method("arrow:0.125").cost(tokens, text)
    assert 0.0 < arrow < 1.0
    assert parse_method("arrow_residual:0.125").cost(tokens, text) == arrow
    assert parse_method("cfg_share+arrow:0.125").cost(tokens, text) == arrow / 2
    assert parse_method("cfg_share").cost(tokens, text) == 0.5


def test_uniform_plan_and_summary():
    model = tiny_sd3(dual=True)
    plan = Plan.uniform(model, 5, "cache", num_image_tokens=1024, text_len=7)
    assert plan.num_steps == 5
    assert plan.layer_names == ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"]
    assert all(m == "full" for rows in plan.methods[0] for m in rows)
    summary = plan.summary()
    assert summary["sparsity"] == pytest.approx(4 / 5)
    assert summary["sparsity_per_step"] == pytest.approx([0, 1, 1, 1, 1])
    assert summary["method_counts"] == {"cache": 36, "full": 9}
    assert summary["speedup_estimate"] == pytest.approx(5.0)
    assert Plan.uniform(model, 5, "full").summary(1024, 7)["sparsity"] == 0.0


def test_summary_weights_layers_by_their_flops():
    model = tiny_sd3(dual=True)
    plan = Plan.uniform(model, 2, "full")
    methods = [[list(h) for h in rows] for rows in plan.methods]
    methods[1][1] = ["cache"] * 3  # the image-only attn2 layer: 1024^2 pairs, joint layers 1031^2
    summary = Plan(plan.model, methods).summary(num_image_tokens=1024, text_len=7)
    joint, image = 1031**2, 1024**2
    assert summary["sparsity_per_step"][1] == pytest.approx(image / (2 * joint + image))
    assert summary["sparsity_per_layer"]["transformer_blocks.0.attn2"] == pytest.approx(0.5)


def test_summary_counts_the_window_a_full_step_computes_for_a_later_residual():
    # Head 0 of the image-only layer: full, full, arrow_residual, arrow_residual, full, cache,
    # arrow_residual. Its residual is kept at steps 1 and 4 (the last full step before each run),
    # which compute that window too; step 0 and the cached step keep none.
    model = tiny_sd3(dual=True)
    plan = Plan.uniform(model, 7, "full")
    methods = [[list(h) for h in rows] for rows in plan.methods]
    for step, method in {2: "arrow_residual:0.25", 3: "arrow_residual:0.25", 5: "cache", 6: "arrow_residual:0.25"}.items():
        methods[step][1][0] = method
    summary = Plan(plan.model, methods).summary(num_image_tokens=1024, text_len=7)
    step_flops = (2 * 1031**2 + 1024**2) * 3
    window = density(window_blocks(0.25, 1024), 1024, 0) * 1024**2
    assert window < 1024**2
    want = [0, -window, 1024**2 - window, 1024**2 - window, -window, 1024**2, 1024**2 - window]
    assert summary["sparsity_per_step"] == pytest.approx([w / step_flops for w in want])


def test_summary_needs_a_resolution():
    plan = Plan.uniform(tiny_flux(), 2, "cache")
    with pytest.raises(ValueError, match="num_image_tokens"):
        plan.summary()


def _with(plan, step, layer, head, method):
    methods = [[list(h) for h in rows] for rows in plan.methods]
    methods[step][layer][head] = method
    return methods


@pytest.mark.parametrize(
    "step,method,match",
    [
        (0, "cache", "step 0 must compute"),
        (0, "arrow_residual:0.5", "step 0 must compute"),
        (2, "bogus", "unknown method"),
    ],
)
def test_validation_errors(step, method, match):
    plan = Plan.uniform(tiny_flux(), 3, "arrow:0.5")
    with pytest.raises(ValueError, match=match):
        Plan(plan.model, _with(plan, step, 0, 1, method))


def test_residual_needs_an_earlier_full_step():
    plan = Plan.uniform(tiny_flux(), 3, "arrow:0.5")
    methods = _with(plan, 0, 0, 0, "arrow:0.5")
    methods[1][0][0] = "arrow_residual:0.5"
    with pytest.raises(ValueError, match="needs an earlier 'full' step"):
        Plan(plan.model, methods)


def test_one_residual_window_per_full_step():
    plan = Plan.uniform(tiny_flux(), 3, "arrow_residual:0.5")
    with pytest.raises(ValueError, match="one residual window per full step"):
        Plan(plan.model, _with(plan, 2, 0, 0, "arrow_residual:0.25"))


def test_shape_errors():
    plan = Plan.uniform(tiny_flux(), 2, "full")
    with pytest.raises(ValueError, match="3 heads"):
        Plan(plan.model, [plan.methods[0], [plan.methods[1][0][:2]] + plan.methods[1][1:]])
    with pytest.raises(ValueError, match="layers"):
        Plan(plan.model, [plan.methods[0], plan.methods[1][:2]])


def test_json_round_trip(tmp_path):
    model = tiny_sd3(dual=True)
    plan = Plan.uniform(model, 4, "arrow_residual:0.25", num_image_tokens=256, text_len=7)
    methods = _with(plan, 2, 1, 2, "cache")
    methods[3][0][0] = "cfg_share+arrow:0.5"
    scores = {"candidates": ["full", "cache"], "rse": [[[[0.0, 0.5]] * 3] * 3] * 4}
    plan = Plan(plan.model, methods, plan.provenance, scores)
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan
    assert loaded.provenance == plan.provenance
    assert loaded.scores == scores
    assert loaded.summary() == plan.summary()
    data = json.loads(path.read_text())
    assert data["type"] == "ditfastattn.plan" and data["version"] == 1
    assert data["model"]["class"] == "SD3Transformer2DModel"
    assert data["methods"][3][0].split()[0] == "cfg_share+arrow:0.5"
    assert {"library_version", "date", "num_image_tokens", "text_len"} <= set(data["provenance"])


@pytest.mark.parametrize(
    "content,match",
    [
        ("{not json", "not valid JSON"),
        ('{"type": "something else"}', "not a ditfastattn plan"),
        ('{"type": "ditfastattn.plan", "version": 99}', "format version 99"),
        ('{"type": "ditfastattn.plan", "version": 1, "model": {}}', "corrupt"),
        # rows of lists, as a hand-written file might hold them: named, not "'list' has no attribute 'split'"
        ('{"type": "ditfastattn.plan", "version": 1, "num_steps": 1, "model": {}, "methods": [[["full"]]]}',
         "one string per layer: its heads' methods separated by spaces"),
        ('{"type": "ditfastattn.plan", "version": 1, "num_steps": 1, "model": {}, "methods": "full"}',
         "one string per layer: its heads' methods separated by spaces"),
        # Nested past Python's recursion limit: a RecursionError, not the ValueError of a bad file.
        ('{"type": "ditfastattn.plan", "version": 1, "model": ' + "[" * 10**5 + "]" * 10**5 + "}",
         "nests its JSON too deeply for a plan; the plan file is corrupt"),
    ],
)
def test_load_rejects_bad_files(tmp_path, content, match):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        Plan.load(path)


def test_save_errors_name_the_path_given(tmp_path):
    plan = Plan.uniform(tiny_flux(), 3, "cache")
    with pytest.raises(FileNotFoundError, match=f"cannot write {tmp_path / 'no' / 'plan.json'}: the folder .* does not exist"):
        plan.save(tmp_path / "no" / "plan.json")
    with pytest.raises(IsADirectoryError, match=f"cannot write {tmp_path}: it is a folder"):
        plan.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_save_writes_through_a_link_and_refuses_what_is_not_a_file(tmp_path):
    import os

    plan = Plan.uniform(tiny_flux(), 3, "cache")
    target = tmp_path / "target.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    plan.save(link)  # the link stays, its file is the plan (a regular file replaced the link before)
    assert link.is_symlink() and Plan.load(target) == plan
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match=r"pipe.json: it exists and is not a regular file"):
        plan.save(fifo)
    assert fifo.is_fifo()
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    with pytest.raises(OSError, match=r"loop.json: it is a link that leads back to itself"):
        plan.save(loop)
    loop.unlink()
    with pytest.raises(FileNotFoundError, match="the folder .*target.json is not a folder"):  # not a "loop"
        plan.save(target / "plan.json")
    # The longest name the file system takes (the temporary name beside it passed the limit, after the work).
    long = tmp_path / ("q" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 5) + ".json")
    plan.save(long)
    assert Plan.load(long) == plan
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["target.json", "link.json", "pipe.json", long.name])


def test_plans_that_run_otherwise_are_not_equal():
    plan = Plan.uniform(tiny_flux(), 3, "tile:0.5,0.5,0.5", grid=(1, 16, 24))
    assert plan.provenance["tile"] == [1, 16, 8]  # the default written out
    for key, value in (("grid", [1, 24, 16]), ("tile", [1, 8, 16]), ("expert_switch_steps", [1])):
        assert Plan(plan.model, plan.methods, {**plan.provenance, key: value}) != plan, key
    assert Plan(plan.model, plan.methods, {**plan.provenance, "date": "another day"}) == plan
    # Alike where nothing differs in how they run: no switch steps recorded is none; a grid recorded
    # for a plan no method of which it sizes.
    arrows = Plan.uniform(tiny_flux(), 3, "arrow:0.25")
    assert Plan(arrows.model, arrows.methods, {"expert_switch_steps": [], "grid": [1, 16, 24]}) == arrows


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no plan file"):
        Plan.load(tmp_path / "missing.json")


def test_plan_for_another_model_names_both_sides():
    plan = Plan.uniform(tiny_flux(), 3, "cache")
    sd3 = tiny_sd3()
    with pytest.raises(PlanMismatchError, match=r"made for FluxTransformer2DModel.*model is SD3Transformer2DModel"):
        plan.check_compatible(adapter_for(sd3).describe(sd3))
    with pytest.raises(PlanMismatchError, match="3 denoising steps but the pipeline runs 5"):
        plan.check_compatible(plan.model, 5)


def test_unsupported_model():
    with pytest.raises(TypeError, match="does not support Linear"):
        Plan.uniform(torch.nn.Linear(2, 2), 2, "full")


# --- plans of tile windows: the grid they were made for -------------------------------------------

VIDEO = ModelSpec("video", "VideoTransformer", (LayerSpec("joint", 2, 32, True), LayerSpec("image_only", 3, 16, False)))


def _kept(mode, layout) -> int:
    """(query, key) pairs the dense oracle's mask keeps: the count the summary must reproduce."""
    return int(head_mask(mode, layout).sum())


def test_tile_plans_record_their_grid_and_summarise_from_the_tile_geometry():
    grid, text = (3, 10, 12), 16  # ragged along every axis in 2 x 8 x 8 tiles
    plan = Plan.uniform(VIDEO, 3, "tile:0,0.5,1", grid=grid, tile=(2, 8, 8), text_len=text)
    assert plan.provenance["grid"] == [3, 10, 12] and plan.provenance["tile"] == [2, 8, 8]
    assert plan.provenance["num_image_tokens"] == 360
    summary = plan.summary()
    assert summary["grid"] == grid and summary["tile"] == (2, 8, 8) and summary["num_image_tokens"] == 360
    mode = parse_method("tile:0,0.5,1").mode(360, TileGrid(grid, (2, 8, 8)))
    kept = {True: _kept(mode, TokenLayout(360 + text, text, 360, grid, (2, 8, 8))),
            False: _kept(mode, TokenLayout(360, 0, 360, grid, (2, 8, 8)))}
    flops = {layer.text: (360 + text * layer.text) ** 2 * layer.heads * layer.head_dim for layer in VIDEO.layers}
    computed = sum(kept[layer.text] * layer.heads * layer.head_dim for layer in VIDEO.layers)
    assert 0 < computed < sum(flops.values())
    step = 1 - computed / sum(flops.values())
    assert summary["sparsity_per_step"] == pytest.approx([0.0, step, step])
    assert summary["sparsity_per_layer"]["image_only"] == pytest.approx(2 / 3 * (1 - kept[False] / 360**2))
    # Another tile shape changes the geometry it counts, as it changes what the op computes.
    other = Plan.uniform(VIDEO, 3, "tile:0,0.5,1", grid=grid, tile=(1, 8, 16), text_len=text)
    assert other.provenance["tile"] == [1, 8, 16] and other.summary()["sparsity"] != summary["sparsity"]


def test_tile_plans_round_trip_with_their_grid_and_old_plans_load_unchanged(tmp_path):
    plan = Plan.uniform(VIDEO, 2, "tile:1,0,0.25", grid=(2, 16, 16), tile=(1, 8, 16), text_len=5)
    plan.save(tmp_path / "tile.json")
    loaded = Plan.load(tmp_path / "tile.json")
    assert loaded.provenance == plan.provenance and loaded.summary() == plan.summary()
    # A plan file from before grids were recorded: no grid keys, the same summary of its band heads.
    image = Plan.uniform(tiny_flux(), 2, "arrow:0.25", num_image_tokens=256, text_len=7)
    image.save(tmp_path / "image.json")
    data = json.loads((tmp_path / "image.json").read_text())
    assert "grid" not in data["provenance"] and "tile" not in data["provenance"]
    assert Plan.load(tmp_path / "image.json").summary() == image.summary()


def test_a_tile_plan_without_its_grid_names_the_fix():
    plan = Plan.uniform(VIDEO, 2, "tile:0,0,0", num_image_tokens=360, text_len=16)
    with pytest.raises(ValueError, match=r"tile windows or pooled keys \(tile:0,0,0\).*not record: pass grid=\(frames, rows, cols\)"):
        plan.summary()
    assert plan.summary(grid=(3, 10, 12))["sparsity"] == Plan.uniform(
        VIDEO, 2, "tile:0,0,0", grid=(3, 10, 12), text_len=16).summary()["sparsity"]
    recorded = Plan.uniform(VIDEO, 2, "tile:0,0,0", grid=(3, 10, 12), text_len=16)
    with pytest.raises(ValueError, match="records for 360 image tokens, not 512: pass grid="):
        recorded.summary(512)
    assert recorded.summary(grid=(2, 16, 16))["num_image_tokens"] == 512
    with pytest.raises(ValueError, match=r"holds 512 patches, not num_image_tokens=360"):
        recorded.summary(360, grid=(2, 16, 16))
    # A tile alone is taken on the plan's own grid; a plan that records none needs the grid too.
    assert recorded.summary(tile=(1, 8, 16)) == recorded.summary(grid=(3, 10, 12), tile=(1, 8, 16))
    with pytest.raises(ValueError, match="tile= needs the image grid"):
        Plan.uniform(VIDEO, 2, "arrow:0.5", num_image_tokens=360, text_len=16).summary(tile=(1, 8, 16))
    # Band plans need no grid; without text layers the text length is 0.
    image_only = ModelSpec("wan", "WanTransformer3DModel", (VIDEO.layers[1],))
    assert Plan.uniform(image_only, 2, "tile:0,0,0", grid=(3, 10, 12)).summary()["text_len"] == 0
    assert Plan.uniform(VIDEO, 2, "arrow:0.5", num_image_tokens=360, text_len=16).summary()["grid"] is None


@pytest.mark.parametrize("switches", [5, "1", [1.5], [True], [-1], [2], None])
def test_expert_switch_steps_are_checked(switches, tmp_path):
    # Read as a list of steps by inspect, the picture and the runtime: anything else failed there.
    plan = Plan.uniform(tiny_flux(), 2, "full")
    with pytest.raises(ValueError, match=r"expert_switch_steps must be a list of step indices \(ints in \[0, 2\)\)"):
        Plan(plan.model, plan.methods, {"expert_switch_steps": switches})
    data = plan.to_json()
    data["provenance"]["expert_switch_steps"] = switches
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="corrupt ditfastattn plan: provenance expert_switch_steps"):
        Plan.load(tmp_path / "plan.json")
    for steps in ([], [0], [1]):
        assert Plan(plan.model, plan.methods, {"expert_switch_steps": steps}).provenance["expert_switch_steps"] == steps


@pytest.mark.parametrize(
    "provenance,match",
    [
        ({"grid": [3, 10, 12], "num_image_tokens": 100}, "holds 360 patches, but num_image_tokens is 100"),
        ({"tile": [2, 8, 8]}, "needs the grid it cuts"),
        ({"grid": [3, 10]}, "a grid must be 3 positive ints"),
        ({"grid": [3, 10, 12], "tile": [2, 8, 4]}, "a tile must hold 128 patches"),
    ],
)
def test_recorded_grids_are_checked(provenance, match, tmp_path):
    plan = Plan.uniform(VIDEO, 2, "full")
    with pytest.raises(ValueError, match=match):
        Plan(VIDEO, plan.methods, provenance)
    data = plan.to_json()
    data["provenance"].update(provenance)
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="corrupt"):
        Plan.load(tmp_path / "plan.json")
