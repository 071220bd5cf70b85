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
  with the narrowest arrow among the candidates (``cache`` when there is none).
- Steps: for each kind of method among the candidates (``cache``, and the narrowest arrow standing
  for everything that computes approximately), one pass per step with every head of every layer
  compressed at that step only. The steps before it replay the uncompressed pass's transformer
  outputs instead of running, so probing step s costs the steps from s on.

The weight of a score at (step, layer, method) is ``steps[kind][step] * layers[layer]``: layer
weights are normalised to a geometric mean of 1, step weights over all kinds and steps together
(so the exchange rate between caching and arrows is kept).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ._calibration_session import run_pass
from .methods import parse_method
from .plan import Plan

logger = logging.getLogger(__name__)

KINDS = ("cache", "arrow")


def probe_method(candidates) -> str:
    """The narrowest plain arrow among the candidates, else ``cache``."""
    arrow = arrow_probe(candidates)
    if arrow is not None:
        return arrow
    if "cache" in candidates:
        return "cache"
    raise ValueError("the sensitivity probe needs an 'arrow:<f>' or 'cache' candidate")


def arrow_probe(candidates) -> str | None:
    arrows = [parse_method(name) for name in candidates]
    arrows = [m for m in arrows if m.kind == "arrow"]
    return min(arrows, key=lambda m: m.fraction).name if arrows else None


def kind_of(method) -> str | None:
    """Which step profile weighs a method's scores: ``cache``, ``arrow`` (every approximate
    computation) or None (``full``, exact)."""
    if method.reads_previous_output:
        return "cache"
    if method.exact:
        return None
    return "arrow"


def relative_squared_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    output, reference = output.double(), reference.double()
    variance = (reference - reference.mean()).pow(2).sum().clamp_min(torch.finfo(torch.float64).tiny)
    return float((output - reference).pow(2).sum() / variance)


def _normalised(ratios: np.ndarray) -> np.ndarray:
    ratios = np.maximum(ratios, 1e-12)
    return ratios / np.exp(np.log(ratios).mean())


def measure_sensitivity(pipe, spec, call: dict[str, Any], config, *, progress: bool = True) -> dict[str, Any]:
    """``{"layers": {layer name: weight}, "steps": {kind: [weight per step]}, "probe": {...}}``
    for ``config.sensitivity``; ``call`` holds the pipeline's keyword arguments of the calibration
    run (prompts included).
    """
    steps = config.num_inference_steps  # at least 2 (SearchConfig checks)
    layer_probe = probe_method(config.candidates)
    step_probes = {"cache": "cache" if "cache" in config.candidates else None, "arrow": arrow_probe(config.candidates)}
    step_probes = {kind: method for kind, method in step_probes.items() if method is not None}

    def plan_with(method: str, where) -> Plan:
        rows = [
            [[method if step > 0 and where(step, index) else "full"] * layer.heads for index, layer in enumerate(spec.layers)]
            for step in range(steps)
        ]
        return Plan(spec, rows)

    def probe(method: str, where, **kwargs):
        """(layer RSE where measured (steps, layers), final RSE) of one probe."""
        probe_config = dataclasses.replace(config, candidates=("full", method), sensitivity=None)
        session, latents = run_pass(pipe, spec, call, probe_config, None, forced=plan_with(method, where), **kwargs)
        # A layer's mean score over its heads is the layer's relative squared error.
        heads = np.array([layer.heads for layer in spec.layers])
        mask = np.arange(session.rse.shape[2])[None, None, :] < heads[None, :, None]
        layer_rse = np.where(mask, session.rse[..., 1], 0.0).sum(axis=2) / heads[None, :]
        return layer_rse, relative_squared_error(latents, reference)

    passes = 1 + len(spec.layers) + len(step_probes) * (steps - 1)
    recorded: dict = {}
    with tqdm(total=passes, desc="ditfastattn sensitivity", unit="pass", disable=not progress) as bar:
        _, reference = run_pass(
            pipe, spec, call, dataclasses.replace(config, candidates=("full",), sensitivity=None), None,
            forced=plan_with("full", lambda step, index: False), measure=set(), record=recorded,
        )
        bar.update(1)
        layer_ratios = []
        for index in range(len(spec.layers)):
            layer_rse, final = probe(layer_probe, lambda step, i, index=index: i == index, measure={index})
            layer_ratios.append(final / max(float(layer_rse[1:, index].mean()), 1e-12))
            bar.update(1)
        step_ratios = {kind: np.ones(steps) for kind in step_probes}
        for kind, method in step_probes.items():
            for step in range(1, steps):
                # A cache probe reads the previous step's outputs: that step runs, the ones before replay.
                replay_until = step - 1 if kind == "cache" else step
                layer_rse, final = probe(
                    method, lambda s, i, step=step: s == step, measure_steps={step}, replay=(recorded, replay_until)
                )
                step_ratios[kind][step] = final / max(float(layer_rse[step].sum()), 1e-12)
                bar.update(1)
    layers = _normalised(np.array(layer_ratios))
    measured = np.concatenate([ratios[1:] for ratios in step_ratios.values()]) if step_ratios else np.ones(0)
    scale = np.exp(np.log(np.maximum(measured, 1e-12)).mean()) if measured.size else 1.0
    result = {
        "layers": {layer.name: float(f"{w:.6g}") for layer, w in zip(spec.layers, layers)},
        "steps": {
            kind: [1.0] + [float(f"{w:.6g}") for w in np.maximum(ratios[1:], 1e-12) / scale]
            for kind, ratios in step_ratios.items()
        },
        "probe": {"layers": layer_probe, "steps": step_probes},
    }
    logger.info(
        "ditfastattn sensitivity: layer weights %s; step weights %s",
        ", ".join(f"{layer.name} {w:.3g}" for layer, w in zip(spec.layers, layers)),
        "; ".join(f"{kind} " + " ".join(f"{w:.2g}" for w in ws[1:]) for kind, ws in result["steps"].items()),
    )
    return result


def weights_array(sensitivity: dict | None, spec, candidates, steps: int) -> np.ndarray:
    """(steps, layers, candidates) score weights from a sensitivity measurement (see
    :func:`measure_sensitivity`), or from a plain ``{layer name: weight}`` dict (layers only)."""
    shape = (steps, len(spec.layers), len(candidates))
    if sensitivity is None:
        return np.ones(shape)
    layered = "layers" in sensitivity or "steps" in sensitivity
    layer_weights = sensitivity.get("layers") if layered else sensitivity
    weights = np.ones(shape)
    if layer_weights is not None:
        names = [layer.name for layer in spec.layers]
        missing = [name for name in names if name not in layer_weights]
        if missing:
            raise ValueError(
                f"sensitivity has no weight for {len(missing)} of the model's layers (first: {missing[0]!r}); "
                "measure it for this model with sensitivity='measure'"
            )
        weights *= np.array([float(layer_weights[name]) for name in names])[None, :, None]
    for kind, per_step in (sensitivity.get("steps") or {}).items() if layered else ():
        if len(per_step) != steps:
            raise ValueError(
                f"sensitivity has {kind} weights for {len(per_step)} steps but the search runs {steps}; "
                f"measure it for {steps} steps with sensitivity='measure'"
            )
        columns = [c for c, name in enumerate(candidates) if kind_of(parse_method(name)) == kind]
        weights[:, :, columns] *= np.asarray(per_step, dtype=np.float64)[:, None, None]
    return weights
