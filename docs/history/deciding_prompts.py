"""A target's deciding pass over the prompts its fitting pass did not run, against over all of them
(CPU check of quality, issue 16's search time; not kept).

A target's search fits its budget on a first pass over the first ``fit_prompts`` prompts and decides
the plan on a second pass over every prompt, so one prompt of eight is denoised twice (about 1/8 of
plain denoising beyond the batch's). ``patches/deciding_prompts_split.diff`` (on 8ce3566) runs the
deciding passes over the others instead (``calibration._pass_calls``). With it applied, the search
runs each way at the same targets (the old way by handing the deciding pass every prompt; ``all7``:
over the first 7 prompts, the fitting pass's among them, as many as the split decides on), scored
like ``quality.py`` (16 held-out prompts x 2 seeds, SSIM against full attention, paired bootstrap
over prompts).

    git apply docs/history/patches/deciding_prompts_split.diff
    cd docs/history && PYTHONPATH=../../src python deciding_prompts.py flux OUT.json --targets 0.6,0.7 --embeddings EMB.pt
    (other prompts: --heldout-seed 4242 --seeds 5,6 with embeddings of quality.calibration_prompts(8, 2026)
    + quality.heldout_prompts(4242) + [""], as quality.save_embeddings writes them; another draw of the
    searches: --search-seed 1)

Stop 70 (CALIBRATION_NOTES.md): ``results/deciding_prompts_{flux,sd3}{,_heldout4242}_cpu.json``,
``results/deciding_prompts_flux_search1_cpu.json`` (0.7 only), ``results/deciding_prompts_flux_all7_search{0,1}_cpu.json``,
written by this script's first form (47b90b8): the same searches and scores, each row keyed
``deciding_prompts`` by way and the difference in a row of its own, where ``compare_searches`` now
names the way ``search`` and adds the difference to the second way's row.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402
from ditfastattn import calibration  # noqa: E402
from oracle_heads import compare_searches, recommended_search, target_parser, testbed  # noqa: E402

library_pass_calls = calibration._pass_calls


def every_prompt_decides(pipe, config, prompts, call):
    """The calls before the patch: the first pass over the first fit_prompts, the second over all."""
    return library_pass_calls(pipe, config, prompts, call)[0], call


def first_seven_decide(pipe, config, prompts, call):
    """The first pass over the first fit_prompts, the second over the first 7, those among them."""
    seven = calibration._pipeline_call(pipe, config, calibration.prompt_kwargs(prompts[:7])[0])
    return library_pass_calls(pipe, config, prompts, call)[0], seven


WAYS = {"all": every_prompt_decides, "rest": library_pass_calls, "all7": first_seven_decide}


def main():
    parser = target_parser()
    parser.add_argument("--cache", default="head")
    parser.add_argument("--sensitivity", default="auto", help="recommended_search's sensitivity ('auto': the schedule's)")
    parser.add_argument("--ways", default="all,rest",
                        help="two of: all (the deciding pass over all 8 prompts), rest (over the 7 the fitting pass "
                             "did not run), all7 (over the first 7, the fitting pass's among them); the difference "
                             "is the second's from the first's")
    parser.add_argument("--search-seed", type=int, default=0,
                        help="SearchConfig.seed (the calibration run's generator): another draw of both searches")
    args = parser.parse_args()
    pipe = testbed(args.kind, Path(args.embeddings), "cpu")
    held = q.heldout_prompts(args.heldout_seed)
    cal = q.calibration_prompts(8, 2026)
    steps, seeds = args.steps, [int(s) for s in args.seeds.split(",")]
    refs = {seed: q.images(pipe, held, steps, seed) for seed in seeds}
    sensitivity = {} if args.sensitivity == "committed" else {"sensitivity": args.sensitivity}
    variants = [(way, {"_pass_calls": WAYS[way]}) for way in args.ways.split(",")]
    rows = []
    for target in (float(t) for t in args.targets.split(",")):
        config = recommended_search(args.kind, steps, target, cache=args.cache, fit_prompts=1,
                                    seed=args.search_seed, **sensitivity)
        rows += compare_searches(pipe, cal, held, steps, seeds, refs, config, variants, args.kind)
        result = {"kind": args.kind, "steps": steps, "seeds": seeds, "heldout_seed": args.heldout_seed,
                  "cache": args.cache, "sensitivity": args.sensitivity, "search_seed": args.search_seed,
                  "calibration_prompts": "the 8 of quality.calibration_prompts(8, 2026)", "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
