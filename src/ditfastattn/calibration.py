"""Calibration: :func:`calibrate` runs the search (its settings: :mod:`ditfastattn.search_config`), the
calibration passes (:mod:`ditfastattn._calibration_session` scores and decides each layer), fits a
budget to a sparsity target (:mod:`ditfastattn._target`), and writes the plan with its scores and
provenance.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import numbers
import time
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ._calibration_session import run_pass
from ._host_outputs import releasing_pinned
from ._prompts import prompt_kwargs
from ._target import TOLERANCE, TargetController, cached_schedule, predicted_sparsity, reachable_sparsity
from .adapters import adapter_for, check_cfg_sharing
from .plan import Plan
from .runtime import _transformer_of
from .runtime.caches import named, refuse_layer_skipping_caches
from .runtime.parallel import context_parallel, ranks_agree
from .runtime.session import experts_of
from .search import fit_delta
from .search_config import SearchConfig, check_cfg_guidance, check_own_arguments
from .sensitivity import KINDS as SENSITIVITY_KINDS
from .sensitivity import measure_sensitivity, relative_squared_error, schedule_weigher, weights_array

logger = logging.getLogger("ditfastattn")


# The fewest steps at which a target's first pass decides on the step before's scores. On the testbeds
# it tied deciding on its own at 6-20 steps, and lost 0.04 SSIM on SD3 at 4, where step 1 (all exact)
# is a third of the decided steps and each step's scores are far from the next's
# (docs/history/CALIBRATION_NOTES.md, stop 68).
LAGGED_FIT_STEPS = 8


@releasing_pinned
def calibrate(pipe, prompts: Sequence[str | dict], config: SearchConfig | None = None, *, progress: bool = True) -> Plan:
    """Search a head-wise plan for ``pipe`` on ``prompts`` (strings, or dicts of pipeline kwargs).

    Runs one denoising pass over all prompts as one batch, deciding every layer at every step
    after the first (two passes with a target, the first over ``fit_prompts`` of the prompts; four
    with its default ``cache="auto"``; more with ``sensitivity="measure"``'s probes).
    Returns a :class:`Plan` that keeps every candidate's per-head scores, the settings, and a hash
    of the prompts. Applying it with :func:`ditfastattn.apply` to the same prompts and seed
    reproduces the calibration run's outputs bit for bit. A pipeline with a second expert (Wan 2.2
    A14B's ``transformer_2``) is searched over both experts' steps, as :func:`ditfastattn.apply` runs it.

    Under diffusers' Ulysses context parallelism, call it on every rank with the same prompts and
    config (refused on every rank where they differ, or where one rank's are refused): each rank
    scores its own heads, the scores are pooled, and every rank returns the same plan of all heads
    (the one a single process finds, up to float rounding of the scores), which applies with or
    without parallelism. Ring attention and tensor parallelism are refused.
    """
    transformer, pipeline = _transformer_of(pipe)
    # Under Ulysses every rank searches its heads of one search: the same inputs, refused alike.
    with ranks_agree(transformer, "ditfastattn.calibrate") as shared:
        config = SearchConfig() if config is None else config
        if not isinstance(config, SearchConfig):
            raise TypeError(f"config must be a SearchConfig (e.g. SearchConfig(delta=0.2)); got {type(config).__name__}")
        requested, config = config, config._resolved()
        if requested.cache == "auto" and config.cache == "head" and config.target is not None:
            logger.info("ditfastattn calibrate: cache='auto' caches per head: caching per step needs "
                        "budget='generation' and a 'cache' candidate")
        if pipeline is None:
            raise TypeError("calibrate needs the pipeline (it runs a denoising pass), not only its transformer")
        refuse_layer_skipping_caches(named(experts_of(transformer, pipeline), pipeline),
                                     "calibration measures every layer at every step")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        kwargs, prompts_hash = prompt_kwargs(prompts)
        adapter = adapter_for(transformer, context_parallel=context_parallel(transformer))  # Ulysses: run_pass checks it
        check_cfg_sharing(adapter, config.candidates, pipeline)
        spec = adapter.describe(transformer)
        call = _pipeline_call(pipe, config, kwargs)
        fit_call = _fit_call(pipe, config, prompts, call)
        fit_count = len(prompts) if fit_call is call else config.fit_prompts
        # Prompt dicts may set the guidance too; unset, it is the pipeline's default. (An odd batch that
        # still reaches the transformer is refused at its first call.)
        check_cfg_guidance(config.candidates, call.get("guidance_scale", _default_argument(pipe, "guidance_scale")))
        shared.update({f"SearchConfig.{f.name}": getattr(config, f.name) for f in dataclasses.fields(config)
                       if f.name != "offload_outputs"}, prompts=prompts_hash, pipeline_arguments=call)
    seconds: dict[str, Any] = {"sensitivity": 0.0, "passes": [], "solver": 0.0}
    sensitivity = weighing = config.sensitivity
    if isinstance(sensitivity, dict) and (sensitivity.get("probe") or {}).get("steps") == "schedule":
        # A reused measurement whose step weights its run read off its own schedule (which moves with the
        # resolution and the scheduler's shift): this run reads them off its own, as that run did.
        layered = any(sensitivity.get(key) for key in ("layers", "heads"))
        sensitivity, weighing = ({**sensitivity, "steps": {}}, "measure+schedule") if layered else ({}, "auto")
        logger.info("ditfastattn calibrate: the sensitivity's step weights were read off its own run's schedule; "
                    "this run reads them off its own")
    by_schedule = weighing in ("auto", "schedule", "measure+schedule")
    schedule: list[float] = []  # the step weights from the noise levels, read at each pass's start
    weigh_steps = schedule_weigher(config.candidates, schedule, weighing) if by_schedule else None
    if sensitivity in ("measure", "measure+schedule"):
        started = time.perf_counter()
        sensitivity = measure_sensitivity(pipe, spec, call, config, progress=progress, weigh_steps=weigh_steps)
        seconds["sensitivity"] = time.perf_counter() - started
    elif by_schedule and not isinstance(sensitivity, dict):
        sensitivity = {}
    weights = weights_array(sensitivity or None, spec, config.candidates, config.num_inference_steps)
    steps = config.num_inference_steps
    modes = ("head", "step") if config.cache == "auto" else (config.cache,)
    # The bar counts layers decided times the pass's prompts, so that a first pass over fit_prompts
    # advances it as little as it costs (cache="auto" adds the uncompressed pass and a second search).
    prompt_passes = len(prompts) + (0 if config.target is None else fit_count)
    prompt_passes += 2 * len(prompts) if config.cache == "auto" else 0
    final_rse, uncompressed = None, None
    with tqdm(
        total=prompt_passes * (steps - 1) * len(spec.layers), desc="ditfastattn calibrate", unit="layer x prompt",
        disable=not progress,
    ) as bar:
        if config.cache == "auto":
            # The latents both searches are compared with, and the scores the per-step search fits on.
            started = time.perf_counter()
            full = Plan(spec, [[["full"] * layer.heads for layer in spec.layers] for _ in range(steps)])
            uncompressed, reference = run_pass(pipe, spec, call, config, _Counted(bar, len(prompts)), weights=weights,
                                               forced=full, weigh_steps=weigh_steps)
            seconds["passes"].append(time.perf_counter() - started)
            by_step = dataclasses.replace(config, cache="step")
            reachable = reachable_sparsity(uncompressed, spec, by_step, _whole_steps(by_step, uncompressed))
            if config.target > reachable + 1e-9:  # equal up to rounding: reachable
                logger.info("ditfastattn calibrate: cache='auto' caches per head only: caching whole steps removes at "
                            "most %.3f of the attention FLOPs here, short of the target %.3f", reachable, config.target)
                modes = ("head",)
                bar.total -= len(prompts) * (steps - 1) * len(spec.layers)  # the per-step search's pass
                bar.refresh()
        searched = {mode: _search(pipe, spec, call, dataclasses.replace(config, cache=mode), weights,
                                  (_Counted(bar, len(prompts)), _Counted(bar, fit_count)), seconds, weigh_steps,
                                  uncompressed if mode == "step" else None, fit_call)
                    for mode in modes}
        if len(searched) > 1:
            # The additive score cannot rank the two (it misjudges partly cached steps): their outputs can.
            final_rse = {mode: relative_squared_error(found.latents, reference) for mode, found in searched.items()}
            logger.info("ditfastattn calibrate: final relative squared error, caching per head %.4g, per step %.4g",
                        final_rse["head"], final_rse["step"])
    if by_schedule and schedule:  # as a measurement, so that the plan's provenance reuses it exactly
        sensitivity = {**sensitivity, "steps": {kind: list(schedule) for kind in SENSITIVITY_KINDS},
                       "probe": {**sensitivity.get("probe", {}), "steps": "schedule"}}
    elif by_schedule:  # "auto" with a schedule it could not read: no weights, as with None
        sensitivity = None
    mode = min(searched, key=final_rse.get) if final_rse else modes[0]
    found = searched[mode]
    session = found.session
    image_tokens, text_len = session.geometry or (None, None)
    provenance = {
        "source": "calibrate",
        "pipeline": type(pipe).__name__,
        "num_inference_steps": steps,
        "height": call.get("height"),  # as passed: the config's, pipeline_kwargs' or the prompt dicts'
        "width": call.get("width"),
        "guidance_scale": call.get("guidance_scale"),
        "seed": config.seed,
        "num_prompts": len(prompts),
        "prompts_sha256": prompts_hash,
        "num_image_tokens": image_tokens,
        "text_len": text_len,
        "search": {
            "delta": found.delta,
            "score": "head squared error / layer variance x heads",
            "head_coefficient": config.head_coefficient,
            "candidates": list(config.candidates),
            "costs": config.costs,
            "impl": config.impl,
            "granularity": config.granularity,
            "budget": config.budget,
            "cache": mode,
            "sensitivity": sensitivity,
            "seconds": {key: [round(x, 3) for x in value] if isinstance(value, list) else round(value, 3)
                        for key, value in seconds.items()},
        },
    }
    # Where a second expert took over (none: one expert), which apply() checks against its own run: a
    # one-expert plan on a pipeline with two ran its rows on the second expert without a word.
    provenance["expert_switch_steps"] = list(session.switch_steps)
    if found.cached is not None:
        provenance["search"]["cached_steps"] = sorted(found.cached)
    if final_rse is not None:  # cache="auto": both searches' final errors, the lower one kept
        provenance["search"]["cache_final_rse"] = {key: float(f"{value:.6g}") for key, value in final_rse.items()}
    if context_parallel(transformer):  # searched on the scores of each rank's heads, pooled
        provenance["search"]["ulysses_degree"] = session.degree
    if session.tiles is not None:  # tile: windows need the grid to be counted and drawn
        provenance.update(grid=list(session.tiles.grid), tile=list(session.tiles.tile))
    if config.target is not None:
        provenance["search"].update(
            {
                "target_sparsity": config.target,
                "first_pass_delta": 0.0 if mode == "step" and uncompressed is not None else config.delta,
                "first_pass_prompts": len(prompts) if mode == "step" and uncompressed is not None else fit_count,
                "predicted_sparsity": found.predicted,
                "delta_per_step_layer": [
                    [round(session.layer_delta.get((step, index), 0.0), 6) for index in range(len(spec.layers))]
                    for step in range(steps)
                ],
            }
        )
    scores = {"metric": "rse", "candidates": list(config.candidates), "rse": _scores(session.rse, spec)}
    plan = Plan(spec, session.plan.methods, provenance, scores)
    sparsity = plan.summary()["sparsity"]
    if config.target is not None and abs(sparsity - config.target) > TOLERANCE:
        logger.warning(
            "ditfastattn calibrate: sparsity %.3f misses the target %.3f by more than %g (the second pass's "
            "activations differ from the first's); calibrate again with delta=%.4g as the starting point",
            sparsity, config.target, TOLERANCE, found.delta,
        )
    logger.info("calibrated %s, attention sparsity %.3f", plan, sparsity)
    return plan


class _Searched(NamedTuple):
    session: Any  # the last pass's session: the plan and its scores
    latents: torch.Tensor  # its final latents
    delta: float  # the budget searched at (with a target, the fitted one)
    predicted: float | None  # with a target, the sparsity the first pass's scores predicted
    cached: frozenset[int] | None  # cache="step": the steps cached whole


def _search(pipe, spec, call, config: SearchConfig, weights, bars: tuple, seconds: dict, weigh_steps=None,
            first=None, fit_call=None) -> _Searched:
    """The calibration passes of one search (two with a target: the first, over ``fit_call``'s
    prompts, to fit the budget, unless ``first``, a finished pass's session, gives the scores to fit
    it on). ``bars``: the progress of a pass over every prompt, and of one over ``fit_call``'s."""
    bar, fit_bar = bars
    cached = cached_schedule(config.num_inference_steps, config.target) if config.cache == "step" else None
    fitted_on = "an uncompressed pass" if first is not None else f"a first pass at delta {config.delta:.4g}"
    if first is None:
        started = time.perf_counter()
        # A target's first pass only gives the scores the second predicts from: each layer decides on
        # its scores of the step before, read without waiting for the GPU (a pass over few prompts
        # would otherwise wait on the host at every layer), where steps are many enough to be alike.
        lagged = config.target is not None and config.num_inference_steps >= LAGGED_FIT_STEPS
        session, latents = run_pass(pipe, spec, call if fit_call is None else fit_call, config,
                                    bar if fit_call is None else fit_bar, weights=weights,
                                    cached_steps=cached, weigh_steps=weigh_steps, lagged=lagged)
        seconds["passes"].append(time.perf_counter() - started)
        seconds["solver"] += session.solver_seconds
        if config.target is None:
            return _Searched(session, latents, config.delta, None, cached)
        first = session
    cached = _whole_steps(config, first)
    reachable = reachable_sparsity(first, spec, config, cached)
    if config.target > reachable + 1e-9:  # equal up to rounding is reachable
        most = ("every head after step 0 at its cheapest candidate" if cached is None else
                f"steps {sorted(cached)} cached whole, every head of the others at its cheapest window")
        more = "narrower windows" if "cache" in config.candidates else "'cache', or narrower windows"
        more += "; or cache='head', which caches any step's heads" if cached is not None else ""
        raise ValueError(
            f"{config._target_name} is out of reach: with these candidates at this resolution a plan removes "
            f"at most {reachable:.3f} of the attention FLOPs ({most}); lower the target, or add candidates that "
            f"remove more ({more})"
        )

    def predict(delta):
        return predicted_sparsity(first, spec, config, delta, cached)

    fitted = fit_delta(predict, config.target, config.delta)
    predicted = predict(fitted)
    logger.info(
        "ditfastattn calibrate: on %s, delta %.4g meets sparsity %.3f (%.3f)", fitted_on, fitted, config.target,
        predicted,
    )
    controller = TargetController(first, spec, config, fitted, cached)
    started = time.perf_counter()
    session, latents = run_pass(
        pipe, spec, call, dataclasses.replace(config, delta=fitted), bar, weights=weights,
        delta_for=controller, cached_steps=cached, weigh_steps=weigh_steps,
    )
    seconds["passes"].append(time.perf_counter() - started)
    seconds["solver"] += session.solver_seconds
    return _Searched(session, latents, fitted, predicted, cached)


def _whole_steps(config: SearchConfig, first) -> frozenset[int] | None:
    """With ``cache="step"``, the steps cached whole (None otherwise), given a finished pass."""
    if config.cache != "step":
        return None
    cached = cached_schedule(config.num_inference_steps, config.target)
    # A second expert's first step has nothing of its own to reuse (it computes): windows there.
    return cached - frozenset(first.switch_steps)


class _Counted:
    """A progress bar that a pass over ``prompts`` prompts advances ``prompts`` at each layer decided."""

    def __init__(self, bar: tqdm, prompts: int):
        self.bar, self.prompts = bar, prompts

    def update(self, layers: int = 1) -> None:
        self.bar.update(layers * self.prompts)

    def set_postfix(self, **kwargs) -> None:
        self.bar.set_postfix(**kwargs)


def _fit_call(pipe, config: SearchConfig, prompts: list, call: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's keyword arguments for a target's first pass: the first ``fit_prompts``
    prompts (``call`` itself when that is all of them or there is no target)."""
    if config.target is None or config.fit_prompts is None or config.fit_prompts >= len(prompts):
        return call
    per_prompt = sorted(key for key, value in config.pipeline_kwargs.items() if _per_prompt(value, len(prompts)))
    if per_prompt:
        raise ValueError(
            f"pipeline_kwargs {per_prompt} look like one value per prompt, but a target's first pass runs only the "
            f"first fit_prompts={config.fit_prompts} prompts: give them in the prompt dicts, or set fit_prompts=None"
        )
    return _pipeline_call(pipe, config, prompt_kwargs(prompts[: config.fit_prompts])[0])


def _per_prompt(value, count: int) -> bool:
    """Whether a pipeline argument looks like one entry per prompt: a batch of tensors, or a list
    of as many non-numbers (a list of numbers is a schedule, such as ``sigmas``)."""
    if torch.is_tensor(value):
        return value.dim() > 0 and value.shape[0] == count
    return (isinstance(value, (list, tuple)) and len(value) == count
            and not all(isinstance(item, numbers.Number) for item in value))


def _pipeline_call(pipe, config: SearchConfig, prompts: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's keyword arguments for a pass (the step count, generator and output type
    aside): pipeline_kwargs, the prompts' and the config's, each argument given once."""
    check_own_arguments(prompts, "prompt dicts")
    call = dict(config.pipeline_kwargs)
    both = sorted(set(call) & set(prompts))
    if both:
        raise ValueError(f"pipeline_kwargs and the prompts both set {both}: give each argument once")
    call.update(prompts)
    for name in ("height", "width", "guidance_scale"):
        value = getattr(config, name)
        if value is not None:
            if name in call and call[name] != value:
                raise ValueError(f"{name} is SearchConfig.{name}={value!r} but {call[name]!r} in the pipeline "
                                 "arguments (pipeline_kwargs or the prompt dicts): give it once")
            call[name] = value
    for name in ("sigmas", "timesteps"):  # a schedule of its own sets the step count (diffusers' retrieve_timesteps)
        schedule = call.get(name)
        if schedule is not None and hasattr(schedule, "__len__") and getattr(schedule, "ndim", 1) == 1 \
                and len(schedule) != config.num_inference_steps:
            raise ValueError(
                f"the pipeline arguments' {name} give {len(schedule)} steps but the search runs "
                f"num_inference_steps={config.num_inference_steps}: the plan holds a row per step, so give one of "
                f"{name} per step or set num_inference_steps={len(schedule)}"
            )
    parameters = _call_parameters(pipe)
    if parameters is not None and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(call) - set(parameters))
        if unknown:
            raise ValueError(f"{type(pipe).__name__} takes no argument {', '.join(map(repr, unknown))} "
                             "(from pipeline_kwargs or the prompt dicts)")
    return call


def _call_parameters(pipe):
    """The parameters of the pipeline's ``__call__``; None where its signature cannot be read."""
    try:
        return inspect.signature(type(pipe).__call__).parameters
    except (TypeError, ValueError):
        return None


def _default_argument(pipe, name: str):
    """The default of the pipeline call's argument ``name``; None where its signature has none."""
    parameter = (_call_parameters(pipe) or {}).get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def _scores(rse: np.ndarray, spec) -> list:
    """(steps, layers, heads, candidates) as nested lists, None where nothing was measured."""
    rows = []
    for step in range(rse.shape[0]):
        rows.append(
            [
                None if np.isnan(rse[step, index]).all() else [[round(float(x), 7) for x in head] for head in rse[step, index, : layer.heads]]
                for index, layer in enumerate(spec.layers)
            ]
        )
    return rows


__all__ = ["calibrate"]
