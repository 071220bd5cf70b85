"""A target's budget-fitting first pass with each layer deciding on its scores of the step before
(CPU check of quality, issue 16's search time).

A target's per-head search (``cache="head"``) runs two passes; the first, over ``fit_prompts`` of
the prompts, only gives the scores that ``TargetController`` predicts the rest of the generation
from. Over one prompt it is host-bound on a GPU: each layer waits for its scores to reach the host
before it can decide and run (0.23x plain denoising of eight prompts at FLUX.1-dev 1024², where the
prompt's own work is 0.125x). Lagged, each layer decides on its scores of the previous step, read
without waiting, and step 1 runs every head exact. The second pass is unchanged. Here both first
passes feed the library's second pass at the same targets, scored like ``quality.py`` (16 held-out
prompts x 2 seeds, SSIM against full attention, paired bootstrap over prompts).

    cd docs/history && PYTHONPATH=../../src python lagged_fit.py flux OUT.json --targets 0.6,0.7 --embeddings EMB.pt
    (other prompts: --heldout-seed 4242 --seeds 5,6 with embeddings of quality.calibration_prompts(8, 2026)
    + quality.heldout_prompts(4242) + [""], as quality.save_embeddings writes them)

Stop 68 (CALIBRATION_NOTES.md): ``results/lagged_fit_{flux,sd3}_cpu.json`` (``fit_prompts=2``) and
``results/lagged_fit_{flux,sd3}_heldout4242_fit1_cpu.json`` (``--fit-prompts 1``, other prompts and seeds),
``results/lagged_fit_few_steps_cpu.json`` (``--targets 0.5 --seeds 1 --steps 4|6|10``).
Stop 69: ``--lag second`` lags the deciding pass instead (the first as the library runs it, lagged
from 8 steps): ``results/lagged_decide_{flux,sd3}_0.6_cpu.json`` (``--targets 0.6``).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402
from ditfastattn import calibration  # noqa: E402
from oracle_heads import compare_searches, recommended_search, target_parser, testbed  # noqa: E402

library_run_pass = calibration.run_pass


def run_pass_lagged(lagged: bool, second: bool = False):
    """calibration's run_pass with a target's first pass (``second``: its second, deciding pass)
    lagged or not, whatever the step count."""
    def run_pass(*args, **kwargs):
        # The first pass of a search takes a lagged argument; the second, the controller's budgets.
        if ("delta_for" if second else "lagged") in kwargs:
            kwargs["lagged"] = lagged
        return library_run_pass(*args, **kwargs)

    return run_pass


def main():
    parser = target_parser()
    parser.add_argument("--fit-prompts", type=int, default=2)
    parser.add_argument("--sensitivity", default="auto", help="recommended_search's sensitivity ('auto': the schedule's)")
    parser.add_argument("--lag", choices=["first", "second"], default="first",
                        help="which pass is lagged or not (second: the deciding pass, the first as the library runs it)")
    args = parser.parse_args()
    pipe = testbed(args.kind, Path(args.embeddings), "cpu")
    held = q.heldout_prompts(args.heldout_seed)
    cal = q.calibration_prompts(8, 2026)
    steps, seeds = args.steps, [int(s) for s in args.seeds.split(",")]
    refs = {seed: q.images(pipe, held, steps, seed) for seed in seeds}
    second = args.lag == "second"
    variants = ((f"waiting {args.lag} pass", {"run_pass": run_pass_lagged(False, second)}),
                (f"lagged {args.lag} pass", {"run_pass": run_pass_lagged(True, second)}))
    rows = []
    for target in (float(t) for t in args.targets.split(",")):
        config = recommended_search(args.kind, steps, target, cache="head", sensitivity=args.sensitivity,
                                    fit_prompts=args.fit_prompts)
        rows += compare_searches(pipe, cal, held, steps, seeds, refs, config, variants, args.kind)
        result = {"kind": args.kind, "steps": steps, "seeds": seeds, "heldout_seed": args.heldout_seed,
                  "fit_prompts": args.fit_prompts, "sensitivity": args.sensitivity, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
