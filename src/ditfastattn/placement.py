"""Plan-aware head placement for Ulysses context parallelism.

diffusers' Ulysses attention gives rank ``r`` of ``W`` the contiguous heads ``[r * H / W, (r + 1) * H / W)``
of every layer, and each layer's all-to-all waits for its slowest rank, at every step. Under a
head-wise plan those ranks' loads differ (one may hold all the ``full`` heads, another all the
cached ones). :func:`place_heads` finds, per layer, an order of its heads that evens the ranks'
loads; :func:`permute_heads` reorders a layer's projection weights to match, and
:func:`permute_plan` the plan's head order, so that the permuted model under the permuted plan
computes what the original computes under the original plan.

A layer's imbalance is ``sum over steps of the slowest rank's cost / sum over steps of the ranks'
mean cost``: the time the layer takes against perfectly even ranks (1.0 is even).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .model import _is_int
from .plan import Plan

logger = logging.getLogger(__name__)

# Attention projections holding one block of head_dim rows (q, k, v) or columns (output) per head.
_ROW_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
_COLUMN_PROJECTIONS = ("to_out.0", "to_add_out")
# Swaps that gain less than this share of a layer's load are noise, not progress.
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class LayerPlacement:
    """One layer's head order: ``permutation[j]`` is the original head at position ``j`` (rank
    ``j // (heads / world_size)`` runs it), with the layer's imbalance before and after."""

    layer: str
    permutation: tuple[int, ...]
    imbalance_before: float
    imbalance_after: float


def head_costs(plan: Plan, layer: int, num_image_tokens: int | None = None, text_len: int | None = None) -> np.ndarray:
    """(steps, heads) share of a full head's attention FLOPs each head of ``layer`` computes per step;
    the geometry is the plan's provenance unless given, as in :meth:`Plan.summary` (which counts
    alike: tile windows and pooled keys on the plan's grid, a full step's residual capture)."""
    return _layer_costs(plan, num_image_tokens, text_len)[layer]


def _layer_costs(plan: Plan, num_image_tokens: int | None, text_len: int | None) -> list[np.ndarray]:
    """Every layer's (steps, heads) costs, counted once for the whole plan."""
    costs = plan._head_costs(plan._resolve(num_image_tokens, text_len))
    return [np.array([rows[layer] for rows in costs]) for layer in range(len(plan.model.layers))]


def imbalance(costs: np.ndarray, permutation, world_size: int) -> float:
    """Imbalance of the (steps, heads) ``costs`` with heads in ``permutation`` order over ``world_size`` ranks."""
    loads = _rank_loads(costs, permutation, world_size)
    mean = loads.mean(axis=1).sum()
    return float(loads.max(axis=1).sum() / mean) if mean > 0 else 1.0


def _rank_loads(costs: np.ndarray, permutation, world_size: int) -> np.ndarray:
    """(steps, ranks) summed cost of each rank's heads."""
    ordered = costs[:, list(permutation)]
    return ordered.reshape(costs.shape[0], world_size, -1).sum(axis=2)


def _check_world_size(plan: Plan, world_size: int) -> None:
    if not (_is_int(world_size) and world_size >= 1):
        raise ValueError(f"world_size must be an int >= 1 (the Ulysses degree); got {world_size!r}")
    for layer in plan.model.layers:
        if layer.heads % world_size:
            divisors = [d for d in range(1, layer.heads + 1) if layer.heads % d == 0]
            raise ValueError(
                f"layer {layer.name} has {layer.heads} heads, which {world_size} ranks cannot split evenly "
                f"(Ulysses gives every rank heads / ulysses_degree of them); use a ulysses_degree in {divisors}"
            )


def _balanced_order(costs: np.ndarray, world_size: int) -> list[int]:
    """A head order with even rank loads: longest-processing-time on the heads' summed costs, then
    swaps between ranks while one lowers the summed per-step maximum (what the steps wait for)."""
    steps, heads = costs.shape
    per_rank = heads // world_size
    totals = costs.sum(axis=0)
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    load = [0.0] * world_size
    for head in sorted(range(heads), key=lambda h: (-totals[h], h)):
        rank = min((r for r in range(world_size) if len(ranks[r]) < per_rank), key=lambda r: (load[r], r))
        ranks[rank].append(head)
        load[rank] += totals[head]
    loads = np.stack([costs[:, members].sum(axis=1) for members in ranks], axis=1)  # (steps, ranks)
    improved = True
    while improved:
        improved = False
        for ra in range(world_size):
            for rb in range(ra + 1, world_size):
                for ia, a in enumerate(ranks[ra]):
                    for ib, b in enumerate(ranks[rb]):
                        delta = costs[:, b] - costs[:, a]
                        trial = loads.copy()
                        trial[:, ra] += delta
                        trial[:, rb] -= delta
                        if trial.max(axis=1).sum() < loads.max(axis=1).sum() - _TOLERANCE * max(1.0, loads.sum()):
                            ranks[ra][ia], ranks[rb][ib], loads, improved = b, a, trial, True
                            a = b
    return [head for members in ranks for head in sorted(members)]


def place_heads(plan: Plan, world_size: int, *, num_image_tokens: int | None = None,
                text_len: int | None = None) -> list[LayerPlacement]:
    """Per layer of ``plan``, the head order that balances ``world_size`` Ulysses ranks (never worse
    than the identity order). Deterministic, so every rank computes the same placement."""
    _check_world_size(plan, world_size)
    placements = []
    every_layer = _layer_costs(plan, num_image_tokens, text_len)
    for layer, costs in zip(plan.model.layers, every_layer):
        identity = list(range(layer.heads))
        before = imbalance(costs, identity, world_size)
        order = _balanced_order(costs, world_size)
        after = imbalance(costs, order, world_size)
        if after >= before:
            order, after = identity, before
        placements.append(LayerPlacement(layer.name, tuple(order), before, after))
        logger.debug("%s: imbalance %.3f -> %.3f over %d ranks", layer.name, before, after, world_size)
    return placements


def invert(placements) -> list[LayerPlacement]:
    """The placements that put each layer's heads back in their original order."""
    inverted = []
    for placement in placements:
        order = [0] * len(placement.permutation)
        for position, head in enumerate(placement.permutation):
            order[head] = position
        inverted.append(LayerPlacement(placement.layer, tuple(order), placement.imbalance_after,
                                       placement.imbalance_before))
    return inverted


def _permutations(plan: Plan, placements) -> dict[str, list[int]]:
    by_name = {placement.layer: list(placement.permutation) for placement in placements}
    unknown = sorted(set(by_name) - set(plan.layer_names))
    if unknown:
        raise ValueError(f"placements name layers the plan does not have: {unknown}")
    for layer in plan.model.layers:
        order = by_name.get(layer.name)
        if order is not None and sorted(order) != list(range(layer.heads)):
            raise ValueError(f"{layer.name}: {order} is not a permutation of its {layer.heads} heads")
    return by_name


def permute_plan(plan: Plan, placements) -> Plan:
    """``plan`` with each placed layer's heads (methods and per-head calibration scores) in the
    placement's order; the permutations are recorded in its provenance."""
    orders = _permutations(plan, placements)
    names = plan.layer_names

    def reorder(rows):
        return [row if row is None or names[i] not in orders else [row[h] for h in orders[names[i]]]
                for i, row in enumerate(rows)]

    methods = [reorder(layers) for layers in plan.methods]
    scores = plan.scores
    if isinstance(scores, dict) and isinstance(scores.get("rse"), list):
        scores = {**scores, "rse": [reorder(layers) for layers in scores["rse"]]}
    provenance = {**plan.provenance, "head_order": {**plan.provenance.get("head_order", {}), **orders}}
    return Plan(plan.model, methods, provenance, scores)


def permute_heads(transformer: torch.nn.Module | list[torch.nn.Module], plan: Plan, placements) -> Plan:
    """Reorder the heads of every placed layer of ``transformer`` in place (q/k/v projection rows,
    output projection columns, norms across heads) and return the plan permuted to match.
    ``transformer`` may be a list of models the plan runs on (a pipeline's experts), reordered alike.

    Heads are independent in attention, so the permuted model under the returned plan computes what
    the original model computes under ``plan`` (up to the summation order of the output projection).
    A layer whose parameters are not all known to hold heads in blocks, or shared by every head, is
    refused before any weight (of any of the models) changes.
    """
    reorder_heads(transformer, plan, placements)
    return permute_plan(plan, placements)


def reorder_heads(transformer: torch.nn.Module | list[torch.nn.Module], plan: Plan, placements) -> list:
    """:func:`permute_heads`' reordering of the weights, returned as ``(module, parameter name, dim,
    index)`` edits, which :func:`restore_heads` undoes on those very modules (a LoRA added since
    wraps a projection but keeps it, as its base layer, where a second walk from the model would
    not find it)."""
    orders = _permutations(plan, placements)
    models = [transformer] if isinstance(transformer, torch.nn.Module) else transformer
    edits = []
    for model in models:
        for layer in plan.model.layers:
            if layer.name in orders:
                edits += _layer_edits(model, layer.name, layer.heads, layer.head_dim, orders[layer.name])
    _gather(edits, invert=False)
    return edits


def restore_heads(edits) -> None:
    """Put back the weights :func:`reorder_heads` reordered (bit for bit: a gather by the inverse order)."""
    _gather(edits, invert=True)


def _gather(edits, invert: bool) -> None:
    with torch.no_grad():
        for module, name, dim, index in edits:
            parameter = module._parameters[name]
            order = torch.argsort(index) if invert else index
            parameter.copy_(parameter.index_select(dim, order.to(parameter.device)))


def _layer_edits(transformer, name: str, heads: int, head_dim: int, order: list[int]) -> list:
    """(module, parameter name, dim, index) for every parameter of layer ``name`` to reorder;
    ValueError for a layout this does not know."""
    attention = transformer.get_submodule(name)
    inner = heads * head_dim
    index = torch.tensor([h * head_dim + d for h in order for d in range(head_dim)])
    edits, known = [], set()
    for path, parameter in attention.named_parameters():
        module_path, _, kind = path.rpartition(".")
        _require_plain(f"{name}.{path}", parameter)
        owner = attention.get_submodule(module_path)
        if module_path in _ROW_PROJECTIONS and parameter.shape[0] == inner:
            edits.append((owner, kind, 0, index))
        elif module_path in _COLUMN_PROJECTIONS and kind == "weight" and parameter.shape[-1] == inner:
            edits.append((owner, kind, parameter.dim() - 1, index))
        elif module_path in _COLUMN_PROJECTIONS and kind == "bias":
            pass  # added after the sum over heads
        elif module_path.startswith("norm") and parameter.shape == (head_dim,):
            pass  # one norm shared by every head
        elif module_path.startswith("norm") and parameter.shape == (inner,):
            edits.append((owner, kind, 0, index))  # a norm across heads: its statistics ignore the order
        else:
            raise ValueError(f"{name}.{path} {tuple(parameter.shape)}: permute_heads does not know how it holds "
                             f"the {heads} heads; it reorders separate to_q/to_k/to_v (and add_*_proj) projections")
        known.add(module_path)
    if not known & {"to_out.0", "to_add_out"}:
        edits.append(_single_block_output(transformer, name, inner, index))
    return edits


def _single_block_output(transformer, name: str, inner: int, index: torch.Tensor):
    """A single-stream block (FLUX, Chroma) projects [attention output, MLP] through its ``proj_out``."""
    parent = transformer.get_submodule(name.rpartition(".")[0])
    proj_out, proj_mlp = getattr(parent, "proj_out", None), getattr(parent, "proj_mlp", None)
    if not (isinstance(proj_out, torch.nn.Linear) and isinstance(proj_mlp, torch.nn.Linear)
            and proj_out.in_features == inner + proj_mlp.out_features):
        raise ValueError(f"{name} has no output projection (to_out) and its block is not a FLUX-style single block "
                         "(proj_out over [attention, proj_mlp]); permute_heads cannot reorder its heads")
    columns = torch.cat([index, torch.arange(inner, proj_out.in_features)])
    _require_plain(f"{name.rpartition('.')[0]}.proj_out.weight", proj_out.weight)
    return proj_out, "weight", 1, columns


def _require_plain(path: str, parameter: torch.Tensor) -> None:
    """Quantized weights (bitsandbytes, GGUF, torchao) pack rows or keep per-row scales beside the
    tensor, so reordering the tensor's rows alone would silently mix heads: refuse them. So are
    weights offloaded to the meta device (accelerate's cpu_offload), whose values live elsewhere: a
    reorder of the meta tensor changes nothing while the plan's heads move (0.013 off)."""
    if parameter.is_meta:
        raise ValueError(f"{path} is offloaded (on the meta device, its values kept by an offload hook); "
                         "balance_heads reorders weights in place: apply without balance_heads, or without offloading")
    if type(parameter) is not torch.nn.Parameter or type(parameter.data) is not torch.Tensor:
        raise ValueError(f"{path} is a quantized weight ({type(parameter).__name__} of "
                         f"{type(parameter.data).__name__}); balance_heads cannot reorder its heads: apply without "
                         "balance_heads")
