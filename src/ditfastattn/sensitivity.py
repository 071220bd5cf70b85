"""How much a local attention error matters to the final output, by layer, by step and by kind of
method: probes that compress one place and measure the damage where it ends up.

The search scores a head by the error it adds to its own layer's output, but the same local error
does very different damage downstream. Measured on the FLUX testbed, the final error per unit of
local error varies about 300x across the steps of one generation (late steps matter most; caching
right after step 0 or one step before the last can matter more still), about 15x across layers,
and caching a head costs the final output several times less than an arrow with the same local
error at the same step. Each probe compresses one place and measures two things in the same
denoising pass: the local relative squared error there and the final latents' relative squared
error against the uncompressed pass; their ratio is the sensitivity.

- Layers: one pass per layer, every head of the layer compressed at every step after the first
  with the narrowest arrow among the candidates (``cache`` when nothing computes approximately).
- Steps: for each kind of method among the candidates (``cache``, and the narrowest arrow standing
  for everything that computes approximately, tile windows included), one pass per step with every
  head of every layer compressed at that step only. The steps before it replay the uncompressed
  pass's transformer outputs instead of running, so probing step s costs the steps from s on.

- Heads: within a layer, heads differ in how much of their output reaches the step's prediction.
  One extra pass, uncompressed, takes the diagonal Fisher of every head's attention output at every
  step (:func:`measure_head_fisher`); normalised to a mean of 1 over each layer's heads at each
  step, it weighs the heads against each other (``heads``). Its backward passes checkpoint the
  blocks (FLUX.1-dev at 1024² x 8 prompts: 39 GiB at the peak, a step 3.3x a plain one; at 2048²
  eight prompts do not fit an 80 GB GPU, two do). On the testbeds it lifts head-wise
  plans by 0.007-0.010 SSIM at 0.5-0.7 sparsity on SD3 (intervals above zero) and leaves FLUX
  unchanged (benchmarks/results/quality.md). Probing each head on its own, as the layers are,
  was tried and was no better than no head weights, at one pass per head.

A probe measures how a local error at one place travels, so it need not be a candidate: when the
candidates compute approximately but hold no plain arrow (tile windows only, say), the narrowest
default arrow (:data:`STAND_IN_PROBE`) probes for them. A band stands in for tile windows even when
they could be probed themselves: on the large video testbed, tiles weighed by a profile probed with
their own narrowest window made plans 0.006-0.014 SSIM worse at 0.5-0.7 sparsity than tiles weighed
by the band's profile, on two prompt sets (docs/history/CALIBRATION_NOTES.md).

The weight of a score at (step, layer, head, method) is ``steps[kind][step] * layers[layer] *
heads[layer][step][head]``: layer weights are normalised to a geometric mean of 1, step weights
over all kinds and steps together (so the exchange rate between caching and arrows is kept).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ._calibration_session import latent_output, run_pass
from .methods import parse_method
from .plan import Plan
from .runtime import LayerRuntime, Session, install, uninstall
from .runtime.parallel import context_parallel

logger = logging.getLogger(__name__)

KINDS = ("cache", "arrow")
MODES = ("auto", "measure", "schedule", "measure+schedule")  # SearchConfig.sensitivity's named ways
WEIGHT_KEYS = ("layers", "steps", "heads")  # a measurement's weights
MEASUREMENT_KEYS = WEIGHT_KEYS + ("probe",)  # ... and its probes' record
STAND_IN_PROBE = "arrow:0.03125"  # the narrowest of the default arrows (search_config.ARROWS)


def probe_method(candidates) -> str:
    """The layers' probe: :func:`arrow_probe`'s, else ``cache``."""
    arrow = arrow_probe(candidates)
    if arrow is not None:
        return arrow
    if "cache" in candidates:
        return "cache"
    raise ValueError("the sensitivity probes need a candidate besides 'full': a window ('arrow:<f>', "
                     "'tile:<ft>,<fh>,<fw>', ...) or 'cache'")


def arrow_probe(candidates) -> str | None:
    """The probe of everything that computes approximately: the narrowest plain arrow among the
    candidates, else :data:`STAND_IN_PROBE` if any of them computes approximately, else None."""
    methods = [parse_method(name) for name in candidates]
    arrows = [m for m in methods if m.kind == "arrow"]
    if arrows:
        return min(arrows, key=lambda m: m.fraction).name
    return STAND_IN_PROBE if any(kind_of(m) == "arrow" for m in methods) else None


def kind_of(method) -> str | None:
    """Which step profile weighs a method's scores: ``cache``, ``arrow`` (every approximate
    computation) or None (``full``, exact)."""
    if method.reads_previous_output:
        return "cache"
    if method.exact:
        return None
    return "arrow"


def schedule_step_weights(scheduler, steps: int) -> list[float]:
    """Step weights from the sampler's noise levels, without probes (``sensitivity="schedule"``):
    ``(sigma_s - sigma_{s+1})²`` at step s, normalised to a median of 1 over steps 1.. (step 0
    runs every head full: 1), so a typical step keeps ``delta``'s meaning: schedulers whose last
    step is tiny (the unshifted flow-matching default ends at sigma 0.001) would otherwise inflate
    every other step's weight in a short schedule. ``scheduler`` None: the pipeline never set its
    timesteps.

    An Euler step adds ``sigma_s - sigma_{s+1}`` times the velocity's error to the latents, so a
    local error at step s reaches the final latents in proportion to that step size squared, and
    what the later steps do to it varies little: on both testbeds the arrow probes' measured step
    weights over this stay within 0.7-2.1x of their median, where the weights themselves span 300x
    (docs/history/CALIBRATION_NOTES.md). The cache probes' weights follow it less closely (caching
    right after step 0 costs more, in mid steps less).

    Raises :class:`ScheduleUnreadable` (a ValueError) when the noise levels cannot be read.
    """
    if scheduler is None:
        raise ScheduleUnreadable("the pipeline did not set the timesteps of pipe.scheduler before denoising")
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or len(sigmas) < steps + 1:
        raise ScheduleUnreadable(f"{type(scheduler).__name__} gives no sigmas for {steps} steps")
    sigmas = torch.as_tensor(sigmas[: steps + 1]).detach().double().cpu().numpy()
    sizes = sigmas[:-1] - sigmas[1:]
    if not (np.isfinite(sizes).all() and (sizes > 0).all()):
        raise ScheduleUnreadable(
            f"{type(scheduler).__name__}'s sigmas {np.round(sigmas, 4).tolist()} do not fall at every step")
    squared = sizes[1:] ** 2
    if not len(squared):  # one step: step 0 alone
        return [1.0]
    return [1.0] + [float(f"{w:.6g}") for w in squared / np.median(squared)]


class ScheduleUnreadable(ValueError):
    """The scheduler gives no noise level that falls at every step (the message says why)."""


def schedule_weigher(candidates, record: list, mode: str = "schedule"):
    """``weigh_steps`` of a calibration session whose step weights come from the schedule
    (``sensitivity`` ``mode``: ``"schedule"``, ``"measure+schedule"`` or ``"auto"``): each
    approximate candidate's scores at step s times :func:`schedule_step_weights`'s weight of s
    (exact ones keep theirs); the weights land in ``record``. A schedule that cannot be read is
    refused, except under ``"auto"``, which weighs no step then (``record`` left empty) and says
    so once in the log."""
    approximate = np.array([kind_of(parse_method(name)) is not None for name in candidates])
    said = False

    def weigh(scheduler, steps: int) -> np.ndarray:
        nonlocal said
        try:
            record[:] = schedule_step_weights(scheduler, steps)
        except ScheduleUnreadable as reason:
            if mode != "auto":
                raise ValueError(f"sensitivity={mode!r} reads the noise level of every step from the pipeline's "
                                 f"scheduler, but {reason}: use sensitivity='measure' (or None)") from None
            if not said:
                logger.info("ditfastattn calibrate: sensitivity='auto' weighs no step (%s); "
                            "sensitivity='measure' measures the step weights instead", reason)
                said = True
            record[:] = []
            return np.ones((steps, len(candidates)))
        return np.where(approximate[None, :], np.asarray(record)[:, None], 1.0)

    return weigh


def relative_squared_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    output, reference = output.double(), reference.double()
    variance = (reference - reference.mean()).pow(2).sum().clamp_min(torch.finfo(torch.float64).tiny)
    return float((output - reference).pow(2).sum() / variance)


def _normalised(ratios: np.ndarray) -> np.ndarray:
    ratios = np.maximum(ratios, 1e-12)
    return ratios / np.exp(np.log(ratios).mean())


def measure_sensitivity(pipe, spec, call: dict[str, Any], config, *, progress: bool = True,
                        weigh_steps=None) -> dict[str, Any]:
    """``{"layers": {layer name: weight}, "steps": {kind: [weight per step]}, "probe": {...}}``
    for ``config.sensitivity``; ``call`` holds the pipeline's keyword arguments of the calibration
    run (prompts included).
    With ``weigh_steps`` (:func:`schedule_weigher`'s) the step weights come from the schedule: no
    step probes (``"steps"`` empty), and the first pass already reads the schedule, so a scheduler
    without one is refused before the layer probes.
    """
    steps = config.num_inference_steps  # at least 2 (SearchConfig checks)
    layer_probe = probe_method(config.candidates)
    step_probes = {"cache": "cache" if "cache" in config.candidates else None, "arrow": arrow_probe(config.candidates)}
    step_probes = {kind: method for kind, method in step_probes.items() if method is not None and weigh_steps is None}

    def plan_with(method: str, where) -> Plan:
        rows = [
            [[method if step > 0 and where(step, index) else "full"] * layer.heads for index, layer in enumerate(spec.layers)]
            for step in range(steps)
        ]
        return Plan(spec, rows)

    def probe(method: str, where, **kwargs):
        """(layer RSE where measured (steps, layers), final RSE) of one probe."""
        # A forced pass: no choice to price, so no costs (they may name candidates the probe lacks).
        probe_config = dataclasses.replace(config, candidates=("full", method), sensitivity=None, cache="head",
                                           costs=None)
        session, latents = run_pass(pipe, spec, call, probe_config, None, forced=plan_with(method, where), **kwargs)
        # A layer's mean score over its heads is the layer's relative squared error.
        heads = np.array([layer.heads for layer in spec.layers])
        mask = np.arange(session.rse.shape[2])[None, None, :] < heads[None, :, None]
        layer_rse = np.where(mask, session.rse[..., 1], 0.0).sum(axis=2) / heads[None, :]
        return layer_rse, relative_squared_error(latents, reference)

    passes = 2 + len(spec.layers) + len(step_probes) * (steps - 1)
    recorded: dict = {}
    with tqdm(total=passes, desc="ditfastattn sensitivity", unit="pass", disable=not progress) as bar:
        _, reference = reference_pass(pipe, spec, call, config, record=recorded, weigh_steps=weigh_steps)
        bar.update(1)
        if context_parallel(pipe.transformer):
            heads = None
            logger.warning(
                "ditfastattn sensitivity: head weights are not measured under context parallelism (their gradients "
                "would cross the ranks' all-to-all), layer and step weights are; for head weights, measure on one "
                "process (SearchConfig(sensitivity='measure') without enable_parallelism) and pass "
                "plan.provenance['search']['sensitivity']"
            )
        else:
            heads = head_weights(measure_head_fisher(pipe, spec, call, config), spec)
        bar.update(1)
        layer_ratios = []
        for index in range(len(spec.layers)):
            layer_rse, final = probe(layer_probe, lambda step, i, index=index: i == index, measure={index})
            # nanmean: a cache probe measures nothing where there is no previous output of its own to
            # reuse (a second expert's first step), and computes there.
            layer_ratios.append(final / max(float(np.nanmean(layer_rse[1:, index])), 1e-12))
            bar.update(1)
        step_ratios = {kind: np.ones(steps) for kind in step_probes}
        for kind, method in step_probes.items():
            for step in range(1, steps):
                # A cache probe reads the previous step's outputs: that step runs, the ones before replay.
                replay_until = step - 1 if kind == "cache" else step
                layer_rse, final = probe(
                    method, lambda s, i, step=step: s == step, measure_steps={step}, replay=(recorded, replay_until)
                )
                # NaN where the probe could not run (no cache at a second expert's first step): the
                # search cannot choose it there either, so any weight serves; it gets the mean's.
                step_ratios[kind][step] = final / max(float(layer_rse[step].sum()), 1e-12)
                bar.update(1)
    layers = _normalised(np.array(layer_ratios))
    measured = np.concatenate([ratios[1:] for ratios in step_ratios.values()]) if step_ratios else np.ones(0)
    measured = measured[np.isfinite(measured)]
    scale = np.exp(np.log(np.maximum(measured, 1e-12)).mean()) if measured.size else 1.0
    weights = {kind: np.where(np.isfinite(ratios), np.maximum(ratios, 1e-12) / scale, 1.0)
               for kind, ratios in step_ratios.items()}
    result = {
        "layers": {layer.name: float(f"{w:.6g}") for layer, w in zip(spec.layers, layers)},
        "steps": {kind: [1.0] + [float(f"{w:.6g}") for w in ws[1:]] for kind, ws in weights.items()},
        "probe": {"layers": layer_probe, "steps": step_probes},
    }
    if heads is not None:
        result["heads"] = heads
    logger.info(
        "ditfastattn sensitivity: layer weights %s; step weights %s",
        ", ".join(f"{layer.name} {w:.3g}" for layer, w in zip(spec.layers, layers)),
        "; ".join(f"{kind} " + " ".join(f"{w:.2g}" for w in ws[1:]) for kind, ws in result["steps"].items()),
    )
    return result


def reference_pass(pipe, spec, call: dict[str, Any], config, progress: tqdm | None = None, **kwargs):
    """An uncompressed pass that measures nothing: (session, final latents). ``progress`` counts
    its layer-steps; ``kwargs`` for :func:`run_pass` (``record``)."""
    steps = config.num_inference_steps
    full = Plan(spec, [[["full"] * layer.heads for layer in spec.layers] for _ in range(steps)])
    uncompressed = dataclasses.replace(config, candidates=("full",), sensitivity=None, cache="head", costs=None,
                                       target_sparsity=None, target_speedup=None)
    return run_pass(pipe, spec, call, uncompressed, progress, forced=full, measure=set(), **kwargs)


def weights_array(sensitivity: dict | None, spec, candidates, steps: int) -> np.ndarray:
    """(steps, layers, candidates) score weights from a sensitivity measurement (see
    :func:`measure_sensitivity`), or from a plain ``{layer name: weight}`` dict (layers only);
    (steps, layers, heads, candidates) when the measurement has head weights (``"heads"``)."""
    shape = (steps, len(spec.layers), len(candidates))
    if sensitivity is None:
        return np.ones(shape)
    layered = any(key in sensitivity for key in WEIGHT_KEYS)
    layer_weights = sensitivity.get("layers") if layered else sensitivity
    weights = np.ones(shape)
    names = [layer.name for layer in spec.layers]
    if layer_weights is not None:
        _check_names(layer_weights, names)
        weights *= np.array([float(layer_weights[name]) for name in names])[None, :, None]
    for kind, per_step in (sensitivity.get("steps") or {}).items() if layered else ():
        _check_steps(len(per_step), steps, f"{kind} weights")
        columns = [c for c, name in enumerate(candidates) if kind_of(parse_method(name)) == kind]
        weights[:, :, columns] *= np.asarray(per_step, dtype=np.float64)[:, None, None]
    per_head = sensitivity.get("heads") if layered else None
    if per_head is None:
        return weights
    _check_names(per_head, names)
    table = np.ones((steps, len(spec.layers), max(layer.heads for layer in spec.layers)))
    for index, layer in enumerate(spec.layers):
        rows = np.asarray(per_head[layer.name], dtype=np.float64)
        _check_steps(len(rows), steps, f"head weights of {layer.name!r}")
        if rows.shape != (steps, layer.heads) or not (np.isfinite(rows) & (rows >= 0)).all():
            raise ValueError(
                f"head weights of {layer.name!r} must be {steps} rows of {layer.heads} finite numbers >= 0 "
                f"(one per head); got shape {rows.shape}: measure them for this model with sensitivity='measure'"
            )
        table[:, index, : layer.heads] = rows
    return weights[:, :, None, :] * table[..., None]


def _check_names(weights: dict, names: list[str]) -> None:
    missing = [name for name in names if name not in weights]
    if missing:
        raise ValueError(
            f"sensitivity has no weight for {len(missing)} of the model's layers (first: {missing[0]!r}); "
            "measure it for this model with sensitivity='measure'"
        )
    unknown = sorted(set(weights) - set(names), key=str)
    if unknown:  # names of layers this model lacks: measured on another model
        raise ValueError(
            f"sensitivity names {len(unknown)} layers the model does not have (first: {unknown[0]!r}); "
            "measure it for this model with sensitivity='measure'"
        )


def _check_steps(measured: int, steps: int, what: str) -> None:
    if measured != steps:
        raise ValueError(
            f"sensitivity has {what} for {measured} steps but the search runs {steps}; "
            f"measure it for {steps} steps with sensitivity='measure'"
        )


class _TappedLayer(LayerRuntime):
    """A layer whose attention output passes through the session's tap."""

    def attend(self, q, k, v, **kwargs):
        return self.session.tap(self.index, super().attend(q, k, v, **kwargs))


class _FisherSession(Session):
    """An all-full session that, while ``taps`` is a list, adds to every layer's attention output
    a zero of one element that requires grad, so that one backward pass reaches every output; each
    output's gradient goes into ``squares`` as its heads' squared norms as soon as it is computed
    (holding the gradients themselves would take as much memory as the outputs: 12 GiB at FLUX.1-dev
    1024² x 8 prompts)."""

    layer_cls = _TappedLayer

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.taps: list[torch.Tensor] | None = None
        self.squares: list[tuple[int, torch.Tensor]] = []

    def tap(self, index: int, out: torch.Tensor) -> torch.Tensor:
        if self.taps is None:
            return out
        zero = torch.zeros((1,) * out.dim(), dtype=out.dtype, device=out.device, requires_grad=True)
        self.taps.append(zero)
        tapped = out + zero
        tapped.register_hook(functools.partial(self._square, index))
        return tapped

    def _square(self, index: int, grad: torch.Tensor) -> None:
        self.squares.append((index, torch.linalg.vector_norm(grad, dim=(0, 1, 3), dtype=torch.float32).square()))


def _samples(output) -> list[torch.Tensor]:
    """The sample of a transformer's output (a tensor, a tuple, or a diffusers output class), as a
    list of tensors: Z-Image's is a list, one per batch element."""
    sample = output if torch.is_tensor(output) else output[0]
    return [sample] if torch.is_tensor(sample) else list(sample)


def measure_head_fisher(pipe, spec, call: dict[str, Any], config) -> np.ndarray:
    """(steps, layers, heads) diagonal Fisher of every head's attention output on the uncompressed
    pass: the squared gradient of ``<v, z>`` (v the transformer's output, z ~ N(0, I), so that its
    expectation is ``diag(J J^T)``, J the Jacobian of v with respect to that output), summed over
    batch, tokens and head dimensions and over the transformer calls of a step. It says how much a
    perturbation of one head's output moves the step's prediction, which the local error does not
    see. One draw of z suffices: the sum runs over many elements (on the testbeds, two draws' head
    weights differ by 0.6% in the median). Step 0 and heads a layer does not have are 0.
    """
    steps = config.num_inference_steps
    fisher = np.zeros((steps, len(spec.layers), max(layer.heads for layer in spec.layers)))
    plan = Plan(spec, [[["full"] * layer.heads for layer in spec.layers] for _ in range(steps)])
    session = install(pipe, plan, config.impl, session_cls=_FisherSession)
    # Only the taps need gradients: the weights' would cost memory and time.
    trainable = [p for expert in session.experts for p in expert.parameters() if p.requires_grad]
    generator: dict[torch.device, torch.Generator] = {}

    def measuring(forward):  # each expert's own forward
        def measured(*args, **kwargs):
            if session.step == 0:
                return forward(*args, **kwargs)
            session.taps, session.squares = [], []
            try:
                with torch.enable_grad():
                    output = forward(*args, **kwargs)
                    samples = _samples(output)
                    # Under checkpointing the blocks run again inside the backward pass and tap
                    # again: only this forward's taps are what the gradient is asked of.
                    taps = list(session.taps)
                    if not taps:
                        return output
                    z = []
                    for sample in samples:
                        if sample.device not in generator:
                            generator[sample.device] = torch.Generator(sample.device).manual_seed(config.seed)
                        z.append(torch.randn(sample.shape, generator=generator[sample.device], device=sample.device,
                                             dtype=sample.dtype))
                    torch.autograd.grad(samples, taps, grad_outputs=z, allow_unused=True)
                if session.squares:
                    indices, squares = zip(*session.squares)
                    host = torch.cat(squares).cpu().numpy()  # one read for the whole call
                    offsets = np.cumsum([0] + [square.shape[0] for square in squares])
                    for index, start, end in zip(indices, offsets[:-1], offsets[1:]):
                        fisher[session.step, index, : end - start] += host[start:end]
            finally:
                session.taps, session.squares = None, []
            return output  # the pipeline reads it under no_grad; the backward pass freed its graph's buffers

        return measured

    bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(**{**bar_config, "disable": True})
    own_forwards = [(expert, expert.__dict__.get("forward")) for expert in session.experts]
    for expert in session.experts:
        expert.forward = measuring(expert.forward)
    for parameter in trainable:
        parameter.requires_grad_(False)
    checkpointed = _checkpoint_blocks(session.experts)
    try:
        with torch.inference_mode(False), torch.no_grad():  # the backward pass, under a caller's inference_mode too
            pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(config.seed), **latent_output(pipe),
                 **call)
    except torch.OutOfMemoryError as err:
        raise torch.OutOfMemoryError(
            f"{err}\nditfastattn sensitivity: the head weights' pass (one backward pass through the transformer a "
            "step, its blocks checkpointed) does not fit with this many prompts at this size; measure on fewer, "
            "e.g. calibrate(pipe, prompts[:2], SearchConfig(sensitivity='measure', ...)), and pass "
            "that plan's provenance['search']['sensitivity'] as SearchConfig(sensitivity=...) for the full search"
        ) from err
    finally:
        _restore_checkpointing(checkpointed)
        for parameter in trainable:
            parameter.requires_grad_(True)
        for expert, own_forward in own_forwards:
            if own_forward is None:
                del expert.forward
            else:
                expert.forward = own_forward
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(**bar_config)
        uninstall(pipe)
    return fisher


_UNSET = object()


def _checkpoint_blocks(experts) -> list[tuple[torch.nn.Module, bool, Any]]:
    """Turn on diffusers' gradient checkpointing in every block that has it, so that the backward
    pass holds the blocks' inputs instead of all their activations (FLUX.1-dev at 1024² x 8 prompts
    peaks at 39 GiB; without, it ran out of an 80 GB GPU). Returns each such module's flag and
    function as they were."""
    previous = []
    for expert in experts:
        flagged = [module for module in expert.modules() if hasattr(module, "gradient_checkpointing")]
        if not (flagged and getattr(expert, "_supports_gradient_checkpointing", False)):
            continue  # a model without diffusers' checkpointing runs as it is
        previous += [(module, module.gradient_checkpointing, module.__dict__.get("_gradient_checkpointing_func", _UNSET))
                     for module in flagged]
        expert.enable_gradient_checkpointing(_checkpointed)
    return previous


def _checkpointed(module, *args, **kwargs):
    """diffusers' checkpoint function, also taking keyword arguments: HunyuanImage 2.1's blocks get
    theirs by keyword (``attention_mask=``), which diffusers' own function refuses."""
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, **kwargs)


def _restore_checkpointing(previous: list[tuple[torch.nn.Module, bool, Any]]) -> None:
    for module, enabled, function in previous:
        module.gradient_checkpointing = enabled
        if function is _UNSET:
            module.__dict__.pop("_gradient_checkpointing_func", None)
        else:
            module._gradient_checkpointing_func = function


def head_weights(fisher: np.ndarray, spec) -> dict[str, list[list[float]]]:
    """``{layer name: [[weight per head] per step]}``: each layer's Fisher normalised to a mean of
    1 over its heads at each step (layer and step weights come from the probes); 1 where a layer
    measured nothing (step 0, an output nothing downstream reads)."""
    result = {}
    for index, layer in enumerate(spec.layers):
        per_step = fisher[:, index, : layer.heads]
        mean = per_step.mean(axis=1, keepdims=True)
        weights = np.where(mean > 0, per_step / np.where(mean > 0, mean, 1.0), 1.0)
        result[layer.name] = [[float(f"{w:.6g}") for w in row] for row in weights]
    return result
