"""The search's settings: :class:`SearchConfig`, its candidate sets, and the checks that refuse a bad
setting before any pass runs."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from .methods import parse_method
from .ops import IMPLEMENTATIONS
from .sensitivity import KINDS as SENSITIVITY_KINDS
from .sensitivity import MEASUREMENT_KEYS, WEIGHT_KEYS
from .sensitivity import MODES as SENSITIVITY_MODES
from .sensitivity import probe_method

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


def _check_sensitivity(sensitivity, num_steps: int) -> None:
    """None, one of ``SENSITIVITY_MODES``, a measurement ({"layers": {...}, "steps": {kind: [...]}})
    of ``num_steps`` steps, or layer weights."""
    if sensitivity is None or (isinstance(sensitivity, str) and sensitivity in SENSITIVITY_MODES):
        return
    what = ("sensitivity must be None, 'auto', 'measure', 'schedule', 'measure+schedule', a measurement from a "
            "calibrated plan's provenance['search']['sensitivity'], or a dict of layer weights")
    if not isinstance(sensitivity, dict):
        raise ValueError(f"{what}; got {sensitivity!r}")
    structured = any(key in sensitivity for key in WEIGHT_KEYS)
    if structured and set(sensitivity) - set(MEASUREMENT_KEYS):
        raise ValueError(f"sensitivity has keys {sorted(set(sensitivity) - set(MEASUREMENT_KEYS))} that a measurement "
                         f"does not; its keys are {MEASUREMENT_KEYS}")
    if not structured and any(isinstance(w, (dict, list, tuple)) for w in sensitivity.values()):
        raise ValueError(f"{what}: a measurement's keys are {WEIGHT_KEYS} (a layer-weight dict maps layer "
                         f"names to numbers); got keys {sorted(sensitivity, key=repr)}")
    layers = sensitivity.get("layers") or {} if structured else sensitivity
    steps = sensitivity.get("steps") or {} if structured else {}
    if not isinstance(layers, dict) or not isinstance(steps, dict):
        raise ValueError(f"{what}: its 'layers' must map layer names to weights and its 'steps' kinds of method to "
                         f"lists of weights, one per step; got {sensitivity!r}")
    unknown = set(steps) - set(SENSITIVITY_KINDS)
    if unknown:
        raise ValueError(f"sensitivity steps name unknown kinds {sorted(unknown)}; known: {SENSITIVITY_KINDS}")
    for kind, per_step in steps.items():
        if not isinstance(per_step, (list, tuple)):
            raise ValueError(f"sensitivity steps[{kind!r}] must be a list of weights, one per step; got {per_step!r}")
    values = list(layers.values()) + [w for per_step in steps.values() for w in per_step]
    if not all(not isinstance(w, bool) and isinstance(w, numbers.Real) and math.isfinite(w) and w > 0 for w in values):
        raise ValueError("sensitivity weights must be finite numbers > 0")
    for kind, per_step in steps.items():
        if len(per_step) != num_steps:
            raise ValueError(f"sensitivity has {kind} weights for {len(per_step)} steps but the search runs {num_steps}; "
                             f"measure it for {num_steps} steps with sensitivity='measure'")


# Pipeline arguments calibration sets itself, and the setting that controls each.
_OWN_ARGUMENTS = {"num_inference_steps": "num_inference_steps", "generator": "seed", "output_type": None,
                  "return_dict": None}


def check_own_arguments(keys, where: str) -> None:
    """Refuse pipeline arguments that calibration passes itself (``where`` names their source)."""
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
            runs them all. None: every prompt. From 8 steps on, each layer of the first pass decides
            on its scores of the step before, so that it never waits for them to reach the host.
            ``cache="auto"``'s uncompressed pass runs every prompt (its final latents are what the
            plans are compared with). One of eight on the testbeds: per-head searches at 0.6 and
            0.7 within -0.014 to +0.021 SSIM of two's (mean +0.006, two prompt sets); that pass
            over one took 0.23-0.26x plain denoising of the eight at FLUX.1-dev 1024², over two
            0.36x (H100, while it still waited on the host at each layer).
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
    fit_prompts: int | None = 1
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
        _integer("num_inference_steps", self.num_inference_steps, low=1)
        _check_sensitivity(self.sensitivity, self.num_inference_steps)
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
        if _integer("seed", self.seed, low=0) >= 2**63:  # torch generators take a signed 64-bit seed
            raise ValueError(f"seed must be below 2**63; got {self.seed!r}")
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
        check_own_arguments(self.pipeline_kwargs, "pipeline_kwargs")
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
        if self.target is not None and set(names) == {"full"}:
            raise ValueError(f"{self._target_name} needs candidates that remove attention; 'full' alone removes none: "
                             "add some (the default candidates, or a METHOD_SETS entry)")
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
            costs = {}
            for method, cost in self.costs.items():
                name = parse_method(method).name  # the search looks costs up by canonical name
                if name in costs:
                    raise ValueError(f"costs give {name!r} twice (as {method!r} and another spelling); give it once")
                costs[name] = _number(f"costs[{method!r}]", cost, low=0.0)
            unknown = set(costs) - set(names)
            if unknown:
                raise ValueError(f"costs name methods that are not candidates: {sorted(unknown)}")
            full = costs.get("full", 1.0)
            # Unpriced candidates cost their FLOP share, below a full head's where that costs more than 0.
            if self.target is not None and (full <= 0 or all(costs.get(name, full - 1) >= full
                                                            for name in names if name != "full")):
                # The search would find no plan cheaper than full attention, and spend both passes on it.
                raise ValueError(
                    f"{self._target_name} needs a candidate that costs less than 'full' ({full:g}); the costs "
                    f"given make none cheaper: {costs}"
                )
            object.__setattr__(self, "costs", costs)

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
