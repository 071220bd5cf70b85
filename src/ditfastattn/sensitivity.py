"""How much each layer's local attention error matters to the final output: one probe per layer.

The search scores a head by the error it adds to its own layer's output, but the same local error
does different damage downstream depending on the layer. The probe compresses one layer at a time
(every head, every step after the first, with the narrowest arrow among the candidates, or
``cache`` when there is none) and measures two things in the same denoising pass: the layer's local
relative squared error, averaged over steps, and the final latents' relative squared error against
the uncompressed pass. Their ratio is the layer's sensitivity; normalised to a geometric mean of 1,
it weights the layer's scores in the search. It costs one denoising pass per layer plus one.
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

logger = logging.getLogger("ditfastattn")


def probe_method(candidates) -> str:
    """The narrowest plain arrow among the candidates, else ``cache``."""
    arrows = [parse_method(name) for name in candidates]
    arrows = [m for m in arrows if m.kind == "arrow" and not m.cfg_share]
    if arrows:
        return min(arrows, key=lambda m: m.fraction).name
    if "cache" in candidates:
        return "cache"
    raise ValueError("the sensitivity probe needs an 'arrow:<f>' or 'cache' candidate")


def relative_squared_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    output, reference = output.double(), reference.double()
    variance = (reference - reference.mean()).pow(2).sum().clamp_min(torch.finfo(torch.float64).tiny)
    return float((output - reference).pow(2).sum() / variance)


def measure_sensitivity(pipe, spec, call: dict[str, Any], config, *, progress: bool = True) -> dict[str, float]:
    """Per-layer weights ``{layer name: weight}`` (geometric mean 1) for ``config.sensitivity``.

    ``call`` holds the pipeline's keyword arguments of the calibration run (prompts included).
    """
    probe = probe_method(config.candidates)
    probe_config = dataclasses.replace(config, candidates=("full", probe), sensitivity=None)
    steps = config.num_inference_steps
    if steps < 2:
        raise ValueError("the sensitivity probe needs at least 2 denoising steps (step 0 always runs full)")

    def plan_with(layer: int | None) -> Plan:
        rows = [
            [[probe if step > 0 and index == layer else "full"] * spec_layer.heads for index, spec_layer in enumerate(spec.layers)]
            for step in range(steps)
        ]
        return Plan(spec, rows)

    ratios = []
    with tqdm(total=len(spec.layers) + 1, desc="ditfastattn sensitivity", unit="pass", disable=not progress) as bar:
        _, reference = run_pass(pipe, spec, call, probe_config, None, forced=plan_with(None), measure=set())
        bar.update(1)
        for index, layer in enumerate(spec.layers):
            session, latents = run_pass(pipe, spec, call, probe_config, None, forced=plan_with(index), measure={index})
            # A head's score is heads x its error share, so the mean over heads is the layer's RSE.
            local = float(np.nanmean(session.rse[1:, index, : layer.heads, 1].mean(axis=1)))
            final = relative_squared_error(latents, reference)
            ratios.append(final / max(local, 1e-12))
            bar.update(1)
    ratios = np.maximum(np.array(ratios), 1e-12)
    weights = ratios / np.exp(np.log(ratios).mean())
    logger.info(
        "ditfastattn sensitivity (probe %s): weights %s", probe,
        ", ".join(f"{layer.name} {w:.3g}" for layer, w in zip(spec.layers, weights)),
    )
    return {layer.name: float(f"{w:.6g}") for layer, w in zip(spec.layers, weights)}
