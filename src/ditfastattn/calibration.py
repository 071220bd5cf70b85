"""Calibration: the search's settings (:class:`SearchConfig`) and :func:`calibrate`, which runs the
calibration passes (:mod:`ditfastattn._calibration_session` scores and decides each layer), fits a
budget to a sparsity target (:mod:`ditfastattn._target`), and writes the plan with its scores and
provenance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ._calibration_session import run_pass
from ._host_outputs import releasing_pinned
from ._target import TOLERANCE, TargetController, cached_schedule, predicted_sparsity, reachable_sparsity
from .adapters import adapter_for, check_cfg_sharing
from .methods import parse_method
from .plan import Plan
from .runtime import _transformer_of
from .runtime.caches import named, refuse_layer_skipping_caches
from .runtime.parallel import context_parallel
from .runtime.session import experts_of
from .ops import IMPLEMENTATIONS
from .search import fit_delta
from .sensitivity import KINDS as SENSITIVITY_KINDS
from .sensitivity import MODES as SENSITIVITY_MODES
from .sensitivity import (measure_sensitivity, probe_method, relative_squared_error, schedule_weigher,
                          weights_array)

logger = logging.getLogger("ditfastattn")

ARROWS = ("arrow:0.125", "arrow:0.0625", "arrow:0.03125")
# Tile windows for models whose calls give the image grid (video families, SD3, FLUX.1, Chroma): the
# query's own tiles, a small space-time neighbourhood, a wider one, and one axis at a time (whole
# frames of the nearby frames, or the same place across the whole clip), for the search to choose
# per head. On a single frame the temporal ones coincide with their spatial part and count once.
TILES = ("tile:0,0,0", "tile:0.125,0.25,0.25", "tile:0.25,0.5,0.5", "tile:0,1,1", "tile:1,0,0")
# Pooled keys over 2 x 2 and 4 x 4 patches, beside the arrows: for models whose calls give the image
# grid and pad no tokens (SD3, FLUX.1, the video families without a text mask).
POOLS = ("pool:2", "pool:4")
DEFAULT_CANDIDATES = ("full", "cache") + ARROWS
PAPER_HEAD_COEFFICIENT = 1.5  # c of the per-head bound under the per-layer budget (the paper's best)
METHOD_SETS: dict[str, tuple[str, ...]] = {
    "aa": ("full",) + ARROWS,
    "aa+oc": DEFAULT_CANDIDATES,
    "aa+oc+pk": DEFAULT_CANDIDATES + POOLS,
    "ta+oc": ("full", "cache") + TILES,
    "aa+oc+cfg": DEFAULT_CANDIDATES + ("cfg_share",) + tuple(f"cfg_share+{a}" for a in ARROWS),
    "aa+oc+rs": DEFAULT_CANDIDATES + tuple(a.replace("arrow", "arrow_residual") for a in ARROWS),
    "aa+oc+cfg+rs": DEFAULT_CANDIDATES
    + ("cfg_share",)
    + tuple(f"cfg_share+{a}" for a in ARROWS)
    + tuple(a.replace("arrow", "arrow_residual") for a in ARROWS),
}


def _number(name: str, value, low: float | None = None) -> float:
    """``value`` as a finite number (not a bool), at least ``low``; else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be a number >= {low:g}; got {value!r}")
    return float(value)


def _integer(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    return int(value)


def _check_sensitivity(sensitivity) -> None:
    """None, one of ``SENSITIVITY_MODES``, a measurement ({"layers": {...}, "steps": {kind: [...]}}) or layer weights."""
    if sensitivity is None or (isinstance(sensitivity, str) and sensitivity in SENSITIVITY_MODES):
        return
    if not isinstance(sensitivity, dict):
        raise ValueError(
            f"sensitivity must be None, 'auto', 'measure', 'schedule', 'measure+schedule', a measurement from a calibrated plan's "
            f"provenance['search']['sensitivity'], or a dict of layer weights; got {sensitivity!r}"
        )
    structured = "layers" in sensitivity or "steps" in sensitivity
    layers = sensitivity.get("layers") or {} if structured else sensitivity
    steps = sensitivity.get("steps") or {} if structured else {}
    values = list(layers.values()) + [w for per_step in steps.values() for w in per_step]
    if not all(not isinstance(w, bool) and isinstance(w, numbers.Real) and math.isfinite(w) and w > 0 for w in values):
        raise ValueError("sensitivity weights must be finite numbers > 0")
    unknown = set(steps) - set(SENSITIVITY_KINDS)
    if unknown:
        raise ValueError(f"sensitivity steps name unknown kinds {sorted(unknown)}; known: {SENSITIVITY_KINDS}")


# Pipeline arguments calibration sets itself, and the setting that controls each.
_OWN_ARGUMENTS = {"num_inference_steps": "num_inference_steps", "generator": "seed", "output_type": None}


def _check_own_arguments(keys, where: str) -> None:
    for key in keys:
        if key in _OWN_ARGUMENTS:
            field = _OWN_ARGUMENTS[key]
            fix = f"set SearchConfig.{field} instead" if field else "calibration reads the latents itself"
            raise ValueError(f"{where} cannot set {key!r}, which calibration passes to the pipeline: {fix}")


def check_cfg_guidance(candidates, guidance_scale) -> None:
    """cfg_share reuses the conditional half of a CFG batch, which a pipeline builds only with
    guidance above 1 (a ``guidance_scale`` that is not a number is left to the pipeline)."""
    if not any(parse_method(name).shares_cfg for name in candidates):
        return
    if isinstance(guidance_scale, numbers.Real) and not isinstance(guidance_scale, bool) and guidance_scale <= 1:
        raise ValueError(
            f"cfg_share candidates need classifier-free guidance as one [unconditional; conditional] batch, which "
            f"guidance_scale {guidance_scale:g} turns off: set guidance_scale above 1, or drop the cfg_share candidates"
        )


@dataclass(frozen=True)
class SearchConfig:
    """Settings of :func:`calibrate`.

    Attributes:
        delta: error budget per layer and step: the sum over heads of each head's score, where a
            head's score is its squared error over the layer's variance times the head count (so
            the sum is the head count times the layer's relative squared error). 0 keeps
            everything full. With a target, the first pass's budget (see ``cache``).
        target_sparsity: instead of a bare delta, the attention sparsity to reach (0 < t < 1):
            a first pass at ``delta`` records every candidate's scores, the budget that meets the
            target on those scores is solved for, and a second pass calibrates with it, adjusting
            the budget layer by layer (see :class:`TargetController`); it lands within about 0.02.
            Step 0 always runs every head full, so a target above ``1 - 1 / num_inference_steps``
            is refused at once, and one above what the candidates can remove (every head after
            step 0 at its cheapest candidate) after the first pass.
        target_speedup: the same, as the ideal attention speed-up ``1 / (1 - sparsity)``.
        fit_prompts: with a target, how many of the prompts (the first ones) a search's first pass
            at ``delta`` runs: it only fits the budget, whose scores are ratios to the layer's
            variance and do not grow with the batch, and the second pass, which decides the plan,
            runs them all. None: every prompt. ``cache="auto"``'s uncompressed pass runs every
            prompt (its final latents are what the plans are compared with). Two of eight on the
            testbeds: head-wise curves within -0.002 to +0.006 SSIM of eight's, and a target's
            default search 3.9x plain denoising at FLUX.1-dev 1024² x 8 prompts instead of 4.6x.
        head_coefficient: ``c`` in the per-head bound ``score <= c * delta / heads``; None disables it.
            ``"auto"`` (the default): the paper's 1.5 under the per-layer budget, None under the
            generation budget (which prices every head on its own).
        candidates: method names to choose from; must include ``full``. See ``METHOD_SETS`` for
            the paper's ablation sets ("aa", "aa+oc", "aa+oc+cfg", "aa+oc+rs", "aa+oc+cfg+rs") and
            "ta+oc", tile windows (``TILES``) with caching for models whose calls give the image grid
            (video; a model without one refuses ``tile:`` candidates at its first call), and
            "aa+oc+pk", the default with pooled keys (``POOLS``) beside the arrows (models with an
            image grid and no padding mask; with ``sensitivity="measure"``, whose head weights tell
            the heads that pool well: without them FLUX gained nothing at 0.7).
        num_inference_steps, height, width, guidance_scale: passed to the pipeline (None: its default).
        seed: seed of the calibration run's generator.
        costs: optional measured relative latency per method name (``full`` = 1); by default the
            exact attention-FLOP share from the block geometry.
        impl: attention op implementation (see :data:`ditfastattn.ops.IMPLEMENTATIONS`).
        granularity: ``"head"`` (the method) or ``"layer"``: one method for all heads of a layer
            at a step, under the same budget and per-head bound; a baseline for comparisons.
        budget: ``"layer"`` (the paper: ``delta`` bounds every layer at every step) or
            ``"generation"``: one exchange rate for all layers and steps, each head taking the
            candidate that minimises ``cost + score / delta`` (the Lagrangian of a single error
            budget over the whole generation; see :func:`ditfastattn.search.solve_priced`).
            Larger ``delta`` still compresses more; best used with a target. ``"auto"`` (the
            default): ``"generation"`` with a target (unless a head coefficient is set), else
            ``"layer"``, so a bare delta keeps the paper's meaning. At a target of 0.6 these
            defaults lead the paper's settings by 0.03-0.04 SSIM on the SD3 testbed and 0.10-0.13
            on FLUX's (docs/history/CALIBRATION_NOTES.md).
        cache: ``"head"``: ``cache`` is a candidate like the others, chosen head by head.
            ``"step"``: caching is decided per step, for every head of the step or for none. A
            step whose attention outputs all come from the step before leaves the model in a
            consistent, slightly older state; one that mixes reused and fresh heads does not, and
            costs the final output far more than its heads' scores add up to (on the FLUX testbed
            40-90x more at the same sparsity; docs/history/CALIBRATION_NOTES.md). The steps cached
            whole follow the step cache's schedule: every other step after step 0, or, for a
            target below that, as many steps as the target holds, spread evenly
            (:func:`cached_schedule`); the search places windows at the other steps for the rest
            of the target. The single-step probes' weights were tried for choosing the steps and
            chose worse ones. Needs a target, ``budget="generation"`` and a ``cache`` candidate.
            ``"auto"`` (the default): where caching per step applies (a target, the generation
            budget and a ``cache`` candidate), both searches, and the plan whose final latents on
            the calibration prompts are nearer those of full attention. One uncompressed pass
            gives the latents to compare with and the scores the per-step search fits its budget
            on (its windows' errors hardly depend on the trajectory), so four passes in all, as
            many as two searches of two (one of them over ``fit_prompts`` prompts only); the
            per-head search keeps a first pass of its own at
            ``delta`` (fitted on uncompressed scores, whose cache errors are one step's change, it
            spent its budget worse: -0.04 SSIM at SD3's 0.7). Elsewhere ``"head"`` (said once in
            the log when a target was set). On the testbeds caching per step is far better on FLUX
            and worse on SD3 at high sparsity (benchmarks/results/quality.md). ``cache="head"``
            searches in two passes instead of four.
        sensitivity: how much a local error matters to the final output. ``"measure"`` probes it
            first (see :mod:`ditfastattn.sensitivity`): per layer (one denoising pass each) and
            per step and kind of method (cache, and a band standing for every window shape; one
            pass each, the steps before the probed one replayed, so about ``layers + steps``
            passes in all). A measurement from a
            calibrated plan's ``provenance["search"]["sensitivity"]`` reuses it, as does a plain
            ``{layer name: weight}`` dict (layers only). Every score is multiplied by its weight,
            so the budget goes where a unit of local error does the least damage. ``"schedule"``:
            step weights without probes, from the pipeline's own noise levels, ``(sigma_s -
            sigma_{s+1})²`` at step s (see :func:`ditfastattn.sensitivity.schedule_step_weights`;
            needs a scheduler with ``sigmas``, as the flow-matching ones have); no layer or head
            weights. ``"measure+schedule"``: the layer and head weights measured as by
            ``"measure"``, the step weights from the noise levels instead of the step probes, so
            about ``layers`` passes instead of ``layers + steps`` (at 0.6 sparsity it ties
            ``"measure"`` on SD3 and on FLUX's first prompts and trails it by 0.024 SSIM on others;
            docs/history/CALIBRATION_NOTES.md). ``"auto"`` (the default): ``"schedule"`` where
            the scheduler gives noise levels that fall at every step (the flow-matching ones),
            else no weights, said once in the log; on the testbeds the schedule's weights lift
            SSIM at 0.6 sparsity by 0.02-0.07 over none under every budget tried, at no cost.
            None: all 1 (the paper's search).
        offload_outputs: keep every layer's previous-step output (what the ``cache`` candidate
            reuses) in pinned host memory between steps, copied out behind the layer and back one
            layer ahead on a side stream, so the GPU holds about two instead of one per layer.
            The host holds one pass's outputs at a time (FLUX at 2048² x 8 prompts: 44 GiB), and
            gives the pinned blocks back when ``calibrate`` returns (through
            ``torch.accelerator.empty_host_cache``, or torch 2.11's private equivalent).
            ``None`` decides at the first layer: offload on CUDA when all layers' outputs would
            take more than half the free GPU memory.
        pipeline_kwargs: extra keyword arguments for the pipeline call (e.g. SD3's skip-layer
            guidance). Not ``num_inference_steps``, ``generator`` or ``output_type``, which
            calibration sets; an argument is given once over these, the prompt dicts and the
            fields above. ``cfg_share`` candidates need the guidance above 1, checked before any work.
    """

    delta: float = 0.2
    target_sparsity: float | None = None
    target_speedup: float | None = None
    fit_prompts: int | None = 2
    head_coefficient: float | str | None = "auto"
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    num_inference_steps: int = 50
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    costs: dict[str, float] | None = None
    impl: str = "auto"
    granularity: str = "head"
    budget: str = "auto"
    cache: str = "auto"
    offload_outputs: bool | None = None
    sensitivity: str | dict[str, float] | None = "auto"
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.candidates, str):  # one name, not one per character
            object.__setattr__(self, "candidates", (self.candidates,))
        if not (isinstance(self.candidates, (tuple, list)) and all(isinstance(n, str) for n in self.candidates)):
            raise TypeError(f"candidates must be a tuple or list of method names; got {self.candidates!r}")
        _number("delta", self.delta, low=0.0)
        if self.target_sparsity is not None and self.target_speedup is not None:
            raise ValueError("give target_sparsity or target_speedup, not both")
        if self.target_sparsity is not None and not 0 < _number("target_sparsity", self.target_sparsity) < 1:
            raise ValueError(f"target_sparsity must be in (0, 1); got {self.target_sparsity!r}")
        if self.target_speedup is not None and not _number("target_speedup", self.target_speedup) > 1:
            raise ValueError(f"target_speedup must be > 1; got {self.target_speedup!r}")
        if self.fit_prompts is not None:
            _integer("fit_prompts", self.fit_prompts, low=1)
        _check_sensitivity(self.sensitivity)
        _integer("num_inference_steps", self.num_inference_steps, low=1)
        probed = self.sensitivity in SENSITIVITY_MODES and self.sensitivity != "auto"
        if self.num_inference_steps < 2 and (self.target is not None or probed):
            what = "a sparsity target" if self.target is not None else f"sensitivity={self.sensitivity!r}"
            raise ValueError(f"{what} needs num_inference_steps >= 2: step 0 always runs every head full")
        if self.target is not None and self.target > 1 - 1 / self.num_inference_steps:
            raise ValueError(
                f"{self._target_name} is out of reach in {self.num_inference_steps} steps: step 0 always runs every "
                f"head full, so a plan removes at most {1 - 1 / self.num_inference_steps:.3f} of the attention FLOPs; "
                "lower the target or raise num_inference_steps"
            )
        _integer("seed", self.seed, low=0)
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), low=1)
        if self.guidance_scale is not None:
            _number("guidance_scale", self.guidance_scale)
        if self.head_coefficient not in (None, "auto"):
            _number("head_coefficient", self.head_coefficient)
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}; got {self.impl!r}")
        if self.offload_outputs not in (None, True, False):
            raise ValueError(f"offload_outputs must be True, False or None (decide from free memory); got {self.offload_outputs!r}")
        if not isinstance(self.pipeline_kwargs, dict):
            raise TypeError(f"pipeline_kwargs must be a dict of pipeline keyword arguments; got {type(self.pipeline_kwargs).__name__}")
        _check_own_arguments(self.pipeline_kwargs, "pipeline_kwargs")
        if self.head_coefficient not in (None, "auto") and not self.head_coefficient > 0:
            raise ValueError(f"head_coefficient must be > 0, None or 'auto'; got {self.head_coefficient!r}")
        if self.budget not in ("auto", "layer", "generation"):
            raise ValueError(f"budget must be 'auto', 'layer' or 'generation'; got {self.budget!r}")
        if self.budget == "generation" and self.head_coefficient not in (None, "auto"):
            raise ValueError("budget='generation' prices every head on its own: set head_coefficient=None")
        if self.granularity not in ("head", "layer"):
            raise ValueError(f"granularity must be 'head' or 'layer'; got {self.granularity!r}")
        names = tuple(parse_method(name).name for name in self.candidates)  # raises on unknown names
        if "full" not in names:
            raise ValueError("candidates must include 'full' (the exact method keeps every program feasible)")
        if self.cache not in ("head", "step", "auto"):
            raise ValueError(f"cache must be 'head', 'step' or 'auto'; got {self.cache!r}")
        if self.cache == "step":
            if "cache" not in names:
                raise ValueError("cache='step' caches whole steps: add 'cache' to the candidates")
            if self.target is None:
                raise ValueError("cache='step' sizes its schedule of cached steps to a target: set "
                                 "target_sparsity or target_speedup")
            if self._budget() != "generation":
                raise ValueError("cache='step' searches the windows of the other steps under one exchange "
                                 "rate: set budget='generation' (and head_coefficient=None)")
        object.__setattr__(self, "candidates", tuple(dict.fromkeys(names)))
        if self.sensitivity in ("measure", "measure+schedule"):
            probe_method(names)  # raises when no candidate can probe
        guidance = self.guidance_scale if self.guidance_scale is not None else self.pipeline_kwargs.get("guidance_scale")
        check_cfg_guidance(names, guidance)
        if self.costs is not None:
            if not isinstance(self.costs, dict):
                raise TypeError(f"costs must be a dict {{method name: relative latency}}; got {type(self.costs).__name__}")
            unknown = set(map(lambda n: parse_method(n).name, self.costs)) - set(names)
            if unknown:
                raise ValueError(f"costs name methods that are not candidates: {sorted(unknown)}")
            for method, cost in self.costs.items():
                _number(f"costs[{method!r}]", cost, low=0.0)

    def _budget(self) -> str:
        if self.budget != "auto":
            return self.budget
        return "generation" if self.target is not None and self.head_coefficient in (None, "auto") else "layer"

    def _resolved(self) -> "SearchConfig":
        """The settings a search runs with: the ``"auto"`` budget and head coefficient decided, and
        ``cache="auto"`` kept only where caching per step applies (else ``"head"``)."""
        budget = self._budget()
        coefficient = self.head_coefficient
        if coefficient == "auto":
            coefficient = None if budget == "generation" else PAPER_HEAD_COEFFICIENT
        cache = self.cache
        if cache == "auto" and not (self.target is not None and budget == "generation" and "cache" in self.candidates):
            cache = "head"
        return dataclasses.replace(self, budget=budget, head_coefficient=coefficient, cache=cache)

    @property
    def target(self) -> float | None:
        """The sparsity to reach, from either target; None for a bare delta."""
        if self.target_speedup is not None:
            return 1.0 - 1.0 / self.target_speedup
        return self.target_sparsity

    @property
    def _target_name(self) -> str:
        if self.target_speedup is not None:
            return f"target_speedup {self.target_speedup:g} (sparsity {self.target:.3f})"
        return f"target_sparsity {self.target_sparsity:g}"

    @classmethod
    def from_method_set(cls, name: str, **kwargs) -> "SearchConfig":
        if name not in METHOD_SETS:
            raise ValueError(f"unknown method set {name!r}; choose one of {sorted(METHOD_SETS)}")
        return cls(candidates=METHOD_SETS[name], **kwargs)


def prompt_kwargs(prompts: str | dict | Sequence[str | dict]) -> tuple[dict[str, Any], str]:
    """Pipeline keyword arguments for one batched run, and a hash that identifies the prompts.

    A bare string or dict is one prompt.
    """
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of strings or of dicts of pipeline kwargs; got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    digest = hashlib.sha256()
    if all(isinstance(p, str) for p in prompts):
        digest.update(json.dumps(prompts).encode())
        return {"prompt": prompts}, digest.hexdigest()
    if not all(isinstance(p, dict) for p in prompts):
        kinds = sorted({type(p).__name__ for p in prompts})
        raise TypeError(f"prompts must be all strings or all dicts of pipeline keyword arguments; got {kinds}")
    keys = set(prompts[0])
    if any(set(p) != keys for p in prompts):
        raise ValueError("every prompt dict must have the same keys")
    merged: dict[str, Any] = {}
    for key in sorted(keys):
        values = [p[key] for p in prompts]
        if torch.is_tensor(values[0]):
            merged[key] = torch.cat(values, dim=0)
            digest.update(merged[key].detach().float().cpu().numpy().tobytes())
        elif all(v == values[0] for v in values):
            merged[key] = values[0]
            digest.update(repr(values[0]).encode())
        else:
            raise ValueError(f"prompt dicts disagree on the non-tensor argument {key!r}")
    return merged, digest.hexdigest()


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
    config: each rank scores its own heads, the scores are pooled, and every rank returns the same
    plan of all heads (the one a single process finds, up to float rounding of the scores), which
    applies with or without parallelism. Ring attention and tensor parallelism are refused.
    """
    config = SearchConfig() if config is None else config
    if not isinstance(config, SearchConfig):
        raise TypeError(f"config must be a SearchConfig (e.g. SearchConfig(delta=0.2)); got {type(config).__name__}")
    requested, config = config, config._resolved()
    if requested.cache == "auto" and config.cache == "head" and config.target is not None:
        logger.info("ditfastattn calibrate: cache='auto' caches per head: caching per step needs budget='generation' "
                    "and a 'cache' candidate")
    transformer, pipeline = _transformer_of(pipe)
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
    seconds: dict[str, Any] = {"sensitivity": 0.0, "passes": [], "solver": 0.0}
    sensitivity = config.sensitivity
    by_schedule = sensitivity in ("auto", "schedule", "measure+schedule")
    schedule: list[float] = []  # the step weights from the noise levels, read at each pass's start
    weigh_steps = schedule_weigher(config.candidates, schedule, sensitivity) if by_schedule else None
    if sensitivity in ("measure", "measure+schedule"):
        started = time.perf_counter()
        sensitivity = measure_sensitivity(pipe, spec, call, config, progress=progress, weigh_steps=weigh_steps)
        seconds["sensitivity"] = time.perf_counter() - started
    elif by_schedule:
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
        searched = {mode: _search(pipe, spec, call, dataclasses.replace(config, cache=mode), weights,
                                  (_Counted(bar, len(prompts)), _Counted(bar, fit_count)), seconds, weigh_steps,
                                  uncompressed if mode == "step" else None, fit_call)
                    for mode in modes}
        if config.cache == "auto":
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
        "height": config.height,
        "width": config.width,
        "guidance_scale": config.guidance_scale,
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
    if len(session.experts) > 1:  # where the second expert took over: apply() checks it against its own run
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
    steps = config.num_inference_steps
    cached = cached_schedule(steps, config.target) if config.cache == "step" else None
    fitted_on = "an uncompressed pass" if first is not None else f"a first pass at delta {config.delta:.4g}"
    if first is None:
        started = time.perf_counter()
        session, latents = run_pass(pipe, spec, call if fit_call is None else fit_call, config,
                                    bar if fit_call is None else fit_bar, weights=weights,
                                    cached_steps=cached, weigh_steps=weigh_steps)
        seconds["passes"].append(time.perf_counter() - started)
        seconds["solver"] += session.solver_seconds
        if config.target is None:
            return _Searched(session, latents, config.delta, None, cached)
        first = session
    if cached is not None and first.switch_steps:
        # A second expert's first step has nothing of its own to reuse (it computes): windows there.
        cached = cached - frozenset(first.switch_steps)
    reachable = reachable_sparsity(first, spec, config, cached)
    if config.target > reachable:
        most = ("every head after step 0 at its cheapest candidate" if cached is None else
                f"steps {sorted(cached)} cached whole, every head of the others at its cheapest window")
        raise ValueError(
            f"{config._target_name} is out of reach: with these candidates at this resolution a plan removes "
            f"at most {reachable:.3f} of the attention FLOPs ({most}); lower the target, or add candidates that "
            "remove more (such as 'cache', or narrower windows)"
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
    _check_own_arguments(prompts, "prompt dicts")
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


__all__ = ["SearchConfig", "calibrate", "METHOD_SETS", "DEFAULT_CANDIDATES"]
