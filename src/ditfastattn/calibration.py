"""Calibration: one denoising run that picks every head's method, layer by layer, step by step.

At every step after the first, each attention layer (in execution order) computes its exact
output and every candidate's output, scores each head by the relative squared error of the layer's
own output, and solves the head-wise integer program (:mod:`ditfastattn.search`). The chosen,
compressed output is what flows on, so later layers and steps see what inference will see.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import ops
from ._geometry import MODE_SKIP
from .adapters import adapter_for, check_cfg_sharing
from .methods import Method, parse_method
from .plan import Plan
from .runtime import LayerRuntime, Session, _Buffers, _transformer_of, compile_row, install, uninstall
from .search import solve_layer

logger = logging.getLogger("ditfastattn")

ARROWS = ("arrow:0.125", "arrow:0.0625", "arrow:0.03125")
DEFAULT_CANDIDATES = ("full", "cache") + ARROWS
METHOD_SETS: dict[str, tuple[str, ...]] = {
    "aa": ("full",) + ARROWS,
    "aa+oc": DEFAULT_CANDIDATES,
    "aa+oc+cfg": DEFAULT_CANDIDATES + ("cfg_share",) + tuple(f"cfg_share+{a}" for a in ARROWS),
    "aa+oc+rs": DEFAULT_CANDIDATES + tuple(a.replace("arrow", "arrow_residual") for a in ARROWS),
    "aa+oc+cfg+rs": DEFAULT_CANDIDATES
    + ("cfg_share",)
    + tuple(f"cfg_share+{a}" for a in ARROWS)
    + tuple(a.replace("arrow", "arrow_residual") for a in ARROWS),
}


@dataclass(frozen=True)
class SearchConfig:
    """Settings of :func:`calibrate`.

    Attributes:
        delta: RSE budget per layer and step (sum over heads). 0 keeps everything full.
        head_coefficient: ``c`` in the per-head bound ``rse <= c * delta / heads``; None disables it.
        candidates: method names to choose from; must include ``full``. See ``METHOD_SETS`` for
            the paper's ablation sets ("aa", "aa+oc", "aa+oc+cfg", "aa+oc+rs", "aa+oc+cfg+rs").
        num_inference_steps, height, width, guidance_scale: passed to the pipeline (None: its default).
        seed: seed of the calibration run's generator.
        costs: optional measured relative latency per method name (``full`` = 1); by default the
            exact attention-FLOP share from the block geometry.
        impl: attention op implementation (see :data:`ditfastattn.ops.IMPLEMENTATIONS`).
        granularity: ``"head"`` (the method) or ``"layer"``: one method for all heads of a layer
            at a step, with the same budget; a baseline for comparisons.
        offload_outputs: keep every layer's previous-step output (what the ``cache`` candidate
            reuses) in pinned host memory between steps, copied out behind the layer and back one
            layer ahead on a side stream, so the GPU holds about two instead of one per layer.
            ``None`` decides at the first layer: offload on CUDA when all layers' outputs would
            take more than half the free GPU memory.
        pipeline_kwargs: extra keyword arguments for the pipeline call.
    """

    delta: float = 0.2
    head_coefficient: float | None = 1.5
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    num_inference_steps: int = 50
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    costs: dict[str, float] | None = None
    impl: str = "auto"
    granularity: str = "head"
    offload_outputs: bool | None = None
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not (isinstance(self.delta, (int, float)) and self.delta >= 0):
            raise ValueError(f"delta must be a number >= 0; got {self.delta!r}")
        if self.head_coefficient is not None and not self.head_coefficient > 0:
            raise ValueError(f"head_coefficient must be > 0 or None; got {self.head_coefficient!r}")
        if self.granularity not in ("head", "layer"):
            raise ValueError(f"granularity must be 'head' or 'layer'; got {self.granularity!r}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1; got {self.num_inference_steps}")
        names = tuple(parse_method(name).name for name in self.candidates)  # raises on unknown names
        if "full" not in names:
            raise ValueError("candidates must include 'full' (the exact method keeps every program feasible)")
        object.__setattr__(self, "candidates", tuple(dict.fromkeys(names)))
        if self.costs is not None:
            unknown = set(map(lambda n: parse_method(n).name, self.costs)) - set(names)
            if unknown:
                raise ValueError(f"costs name methods that are not candidates: {sorted(unknown)}")

    @classmethod
    def from_method_set(cls, name: str, **kwargs) -> "SearchConfig":
        if name not in METHOD_SETS:
            raise ValueError(f"unknown method set {name!r}; choose one of {sorted(METHOD_SETS)}")
        return cls(candidates=METHOD_SETS[name], **kwargs)


def prompt_kwargs(prompts: Sequence[str | dict]) -> tuple[dict[str, Any], str]:
    """Pipeline keyword arguments for one batched run, and a hash that identifies the prompts."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    digest = hashlib.sha256()
    if all(isinstance(p, str) for p in prompts):
        digest.update(json.dumps(prompts).encode())
        return {"prompt": prompts}, digest.hexdigest()
    if not all(isinstance(p, dict) for p in prompts):
        raise TypeError("prompts must be all strings or all dicts of pipeline keyword arguments")
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


class _HostOutputs:
    """Layer outputs parked in host memory between denoising steps (pinned, async on CUDA).

    The host queues layers faster than the GPU runs them, so copies out are bounded: each
    output stays referenced until its copy is done, and at most ``IN_FLIGHT`` are pending.
    """

    IN_FLIGHT = 2

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.host: dict[tuple[int, int], torch.Tensor] = {}
        self.loading: dict[tuple[int, int], tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        self.storing: deque[tuple[torch.Tensor, torch.cuda.Event]] = deque()

    def store(self, key: tuple[int, int], tensor: torch.Tensor) -> None:
        host = self.host.get(key)
        if host is None or host.shape != tensor.shape or host.dtype != tensor.dtype:
            host = self.host[key] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.stream is not None)
        if self.stream is None:
            host.copy_(tensor)
            return
        self.stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        self.storing.append((tensor, done))
        while len(self.storing) > self.IN_FLIGHT:
            self.storing.popleft()[1].synchronize()

    def prefetch(self, key: tuple[int, int], device: torch.device) -> None:
        if key in self.loading or key not in self.host:
            return
        host = self.host[key]
        out = torch.empty(host.shape, dtype=host.dtype, device=device)
        event = None
        if self.stream is None:
            out.copy_(host)
        else:
            # `out` may reuse memory that queued compute still reads: the copy waits for it.
            self.stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self.stream):
                out.copy_(host, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
        self.loading[key] = (out, event)

    def take(self, key: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        self.prefetch(key, device)
        if key not in self.loading:
            return None
        out, event = self.loading.pop(key)
        if event is not None:
            torch.cuda.current_stream(device).wait_event(event)
        return out


class _CalibrationSession(Session):
    """A session whose plan rows are decided on the fly from the candidates' errors."""

    def __init__(self, transformer, plan, adapter, impl, *, config: SearchConfig, progress: tqdm | None):
        super().__init__(transformer, plan, adapter, impl)
        self.config = config
        self.candidates: list[Method] = [parse_method(name) for name in config.candidates]
        self.progress = progress
        shape = (plan.num_steps, len(plan.model.layers), max(l.heads for l in plan.model.layers), len(self.candidates))
        self.rse = np.full(shape, np.nan)
        self.decided: set[tuple[int, int]] = set()
        self.compiled: dict[tuple[int, int, int, torch.device], Any] = {}
        self.residuals: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
        self.locked: dict[tuple[int, int], float] = {}  # (layer, head) -> residual window since last full
        self.geometry: tuple[int, int] | None = None
        self._stock: torch.Tensor | None = None  # the exact output of the layer just decided
        self.offload: _HostOutputs | None = None
        self._offload_decided = config.offload_outputs is False

    # decisions -----------------------------------------------------------------------------
    def row(self, layer: LayerRuntime, q, k, v, text_start, text_len, dense):
        key = (self.step, layer.index)
        self._stock = None
        if self.offload is not None and self.step > 0:
            restored = self.offload.take((layer.index, self.call), q.device)
            if restored is not None:
                layer.slots.setdefault(self.call, _Buffers()).out = restored
            if layer.index + 1 < len(self.layers) or self.step < self.plan.num_steps - 1:
                self.offload.prefetch(((layer.index + 1) % len(self.layers), self.call), q.device)
        if self.step > 0 and key not in self.decided:
            self._decide(layer, q, k, v, text_start, text_len, dense)
        image_tokens = q.shape[1] - text_len
        if self.geometry is None and text_len:
            self.geometry = (image_tokens, text_len)
        methods = [parse_method(name) for name in self.plan.methods[self.step][layer.index]]
        route_full = self.route_full(q, k, v, text_start, text_len)
        compiled_key = (self.step, layer.index, image_tokens, q.device, route_full)
        if compiled_key not in self.compiled:
            capture = [MODE_SKIP] * len(methods)
            self.compiled[compiled_key] = compile_row(
                methods, keep=True, capture=capture, num_image_tokens=image_tokens, device=q.device, route_full=route_full
            )
        row = self.compiled[compiled_key]
        if row.residual_add is not None:
            self._load_residuals(layer, methods, image_tokens)
        return row

    def _candidate_outputs(self, layer: LayerRuntime, q, k, v, text_start, text_len, exact):
        """Yield (candidate index, output) one at a time, so memory stays bounded."""
        image_tokens = q.shape[1] - text_len
        heads = q.shape[2]
        slot = layer.slots[self.call]
        residuals = self.residuals.get((layer.index, self.call), {})
        by_mode: dict[int, list[int]] = {}
        for index, method in enumerate(self.candidates):
            if method.kind == "cache":
                yield index, slot.out
            else:
                by_mode.setdefault(method.mode(image_tokens), []).append(index)
        for mode, indices in by_mode.items():
            if mode < 0:
                if all(self.candidates[i].name == "full" for i in indices):
                    continue  # exact by definition: its error row stays 0
                base = exact
            else:
                modes = torch.full((heads,), mode, dtype=torch.int32, device=q.device)
                base = ops.headwise_attention(q, k, v, modes, text_start=text_start, text_len=text_len, impl=self.impl)
            for index in indices:
                method = self.candidates[index]
                out = base
                if method.kind == "arrow_residual":
                    out = base + residuals[mode]
                if method.cfg_share:
                    half = out.shape[0] // 2
                    out = torch.cat([out[half:], out[half:]], dim=0)
                yield index, out

    def _decide(self, layer: LayerRuntime, q, k, v, text_start, text_len, dense) -> None:
        step, index, heads = self.step, layer.index, q.shape[2]
        if q.shape[0] % 2 and any(m.cfg_share for m in self.candidates):
            raise ValueError(
                f"cfg_share candidates need a CFG batch [unconditional; conditional]; {layer.name} got batch "
                f"{q.shape[0]}: set guidance_scale > 1 or drop the cfg_share candidates"
            )
        image_tokens, layer_text = q.shape[1] - text_len, text_len
        stock = dense()
        exact = stock.float()
        variance = (exact - exact.mean(dim=(0, 1, 3), keepdim=True)).pow(2).sum(dim=(0, 1, 3))
        variance = variance.clamp_min(torch.finfo(torch.float32).tiny)
        # Errors stay on the device until all candidates are scored: one host read per layer-step.
        errors = torch.zeros(len(self.candidates), heads, dtype=torch.float32, device=q.device)
        for candidate, out in self._candidate_outputs(layer, q, k, v, text_start, text_len, stock):
            errors[candidate] = (out.float() - exact).pow(2).sum(dim=(0, 1, 3)) / variance
        rse = errors.T.double().cpu().numpy()
        cost = np.array([self._cost(m, image_tokens, layer_text) for m in self.candidates])[None, :].repeat(heads, 0)
        allowed = self._allowed(index, heads, image_tokens)
        if self.config.granularity == "layer":
            choice = self._layer_choice(rse, cost, allowed)
        else:
            choice = solve_layer(rse, cost, self.config.delta, self.config.head_coefficient, allowed)
        chosen = [self.candidates[c] for c in choice]
        for head, method in enumerate(chosen):
            if method.kind == "full" and not method.cfg_share:
                self.locked.pop((index, head), None)
            elif method.kind == "arrow_residual":
                self.locked[(index, head)] = method.fraction
        self.plan.methods[step][index] = [m.name for m in chosen]
        self._stock = stock
        self.rse[step, index, :heads] = rse
        self.decided.add((step, index))
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(step=step, refresh=False)

    def _layer_choice(self, rse: np.ndarray, cost: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """The cheapest single method for all heads whose summed error fits the budget."""
        fits = allowed.all(axis=0) & (rse.sum(axis=0) <= self.config.delta)
        total = np.where(fits, cost.sum(axis=0) + 1e-7 * rse.sum(axis=0), np.inf)
        return np.full(rse.shape[0], int(np.argmin(total)))

    def _cost(self, method: Method, image_tokens: int, text_len: int) -> float:
        if self.config.costs is not None and method.name in self.config.costs:
            return float(self.config.costs[method.name])
        return method.cost(image_tokens, text_len)

    def _allowed(self, layer: int, heads: int, image_tokens: int) -> np.ndarray:
        allowed = np.ones((heads, len(self.candidates)), dtype=bool)
        seen: set[tuple] = set()
        for index, method in enumerate(self.candidates):
            # Windows that round to the same blocks at this resolution are one candidate.
            signature = (method.kind, method.cfg_share, method.mode(image_tokens))
            if signature in seen:
                allowed[:, index] = False
            seen.add(signature)
            if method.kind == "arrow_residual":
                for head in range(heads):
                    locked = self.locked.get((layer, head))
                    allowed[head, index] &= locked is None or locked == method.fraction
        return allowed

    def dense(self, layer: LayerRuntime, dense) -> torch.Tensor:
        stock, self._stock = self._stock, None
        return stock if stock is not None else dense()

    # residuals -----------------------------------------------------------------------------
    def _residual_modes(self, image_tokens: int) -> set[int]:
        return {m.mode(image_tokens) for m in self.candidates if m.kind == "arrow_residual"}

    def after(self, layer: LayerRuntime, q, k, v, out, text_start, text_len) -> None:
        self._keep_residuals(layer, q, k, v, out, text_start, text_len)
        if not self._offload_decided:
            self._decide_offload(layer.slots[self.call].out)
        if self.offload is not None:
            slot = layer.slots[self.call]
            if self.step < self.plan.num_steps - 1:  # the last step's outputs are never read
                self.offload.store((layer.index, self.call), slot.out)
            slot.out = None

    def _decide_offload(self, output: torch.Tensor) -> None:
        self._offload_decided = True
        need = output.nbytes * len(self.layers)
        offload = self.config.offload_outputs
        if offload is None and output.device.type == "cuda":
            free = torch.cuda.mem_get_info(output.device)[0]
            offload = need > free / 2
            logger.info(
                "ditfastattn calibrate: previous-step outputs need %.1f GiB, %.1f GiB free on the GPU: %s",
                need / 2**30, free / 2**30, "kept in host memory" if offload else "kept on the GPU",
            )
        if offload:
            self.offload = _HostOutputs(output.device)

    def _keep_residuals(self, layer: LayerRuntime, q, k, v, out, text_start, text_len) -> None:
        """Keep full - arrow for every residual window on heads that ran plain full at this step."""
        windows = self._residual_modes(q.shape[1] - text_len)
        if not windows:
            return
        methods = [parse_method(name) for name in self.plan.methods[self.step][layer.index]]
        full = [m.kind == "full" and not m.cfg_share for m in methods]
        if not any(full):
            return
        mask = torch.tensor(full, device=q.device).view(1, 1, -1, 1)
        store = self.residuals.setdefault((layer.index, self.call), {})
        for mode in windows:
            modes = torch.tensor([mode if f else MODE_SKIP for f in full], dtype=torch.int32, device=q.device)
            arrow = torch.empty_like(out)
            ops.headwise_attention(q, k, v, modes, text_start=text_start, text_len=text_len, out=arrow, impl=self.impl)
            previous = store.get(mode)
            store[mode] = torch.where(mask, out - arrow, previous if previous is not None else torch.zeros_like(out))

    def _load_residuals(self, layer: LayerRuntime, methods: list[Method], image_tokens: int) -> None:
        store = self.residuals[(layer.index, self.call)]
        slot = layer.slots[self.call]
        residual = None
        for mode in {m.mode(image_tokens) for m in methods if m.kind == "arrow_residual"}:
            mask = torch.tensor(
                [m.kind == "arrow_residual" and m.mode(image_tokens) == mode for m in methods], device=store[mode].device
            ).view(1, 1, -1, 1)
            residual = torch.where(mask, store[mode], residual if residual is not None else torch.zeros_like(store[mode]))
        slot.residual = residual

    def _start_generation(self) -> None:
        super()._start_generation()
        self.residuals.clear()

    def end_call(self, module, args, kwargs, output) -> None:
        super().end_call(module, args, kwargs, output)
        if self.step == self.plan.num_steps - 1:
            for key in [key for key in self.residuals if key[1] == self.call]:
                del self.residuals[key]


def calibrate(pipe, prompts: Sequence[str | dict], config: SearchConfig | None = None, *, progress: bool = True) -> Plan:
    """Search a head-wise plan for ``pipe`` on ``prompts`` (strings, or dicts of pipeline kwargs).

    Runs one denoising pass over all prompts as one batch, deciding every layer at every step
    after the first. Returns a :class:`Plan` that keeps the per-head RSE of every candidate, the
    settings, and a hash of the prompts. Applying it with :func:`ditfastattn.apply` to the same
    prompts and seed reproduces the calibration run's outputs bit for bit.
    """
    config = config or SearchConfig()
    transformer, pipeline = _transformer_of(pipe)
    if pipeline is None:
        raise TypeError("calibrate needs the pipeline (it runs a denoising pass), not only its transformer")
    kwargs, prompts_hash = prompt_kwargs(prompts)
    adapter = adapter_for(transformer)
    check_cfg_sharing(adapter, config.candidates)
    spec = adapter.describe(transformer)
    steps = config.num_inference_steps
    initial = Plan(spec, [[["full"] * layer.heads for layer in spec.layers] for _ in range(steps)])
    bar = tqdm(total=(steps - 1) * len(spec.layers), desc="ditfastattn calibrate", unit="layer", disable=not progress)

    def make_session(transformer, plan, adapter, impl):
        return _CalibrationSession(transformer, plan, adapter, impl, config=config, progress=bar)

    session = install(pipe, initial, config.impl, session_cls=make_session)
    call = dict(config.pipeline_kwargs)
    call.update(kwargs)
    for name in ("height", "width", "guidance_scale"):
        if getattr(config, name) is not None:
            call[name] = getattr(config, name)
    try:
        with torch.no_grad():
            pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(config.seed), output_type="pt", **call)
    finally:
        uninstall(pipe)
        bar.close()
    missing = (steps - 1) * len(spec.layers) - len(session.decided)
    if missing:
        raise RuntimeError(f"calibration decided only {len(session.decided)} layer-steps; {missing} were never run")
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
            "delta": config.delta,
            "head_coefficient": config.head_coefficient,
            "candidates": list(config.candidates),
            "costs": config.costs,
            "impl": config.impl,
            "granularity": config.granularity,
        },
    }
    scores = {"metric": "rse", "candidates": list(config.candidates), "rse": _scores(session.rse, spec)}
    plan = Plan(spec, session.plan.methods, provenance, scores)
    logger.info("ditfastattn: calibrated %s, attention sparsity %.3f", plan, plan.summary()["sparsity"])
    return plan


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
