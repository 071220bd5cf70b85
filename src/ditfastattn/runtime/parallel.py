"""Plans under diffusers' Ulysses context parallelism.

Under ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))`` each of
the P ranks holds a 1/P chunk of every input stream of the transformer (text and image, split by
diffusers' context-parallel plan), and diffusers' attention trades it, by an all-to-all, for the
whole sequence of 1/P of the heads: rank r attends heads ``[r H / P, (r + 1) H / P)`` of every
layer, then trades back. :class:`UlyssesSession` makes that trade itself at the interception point
(``dispatch_attention_fn``), with the gathered tokens put back in the single-process order (all
text chunks, then all image chunks), so the plan's windows see the geometry they were planned
for. Each rank runs its own heads' slice of the plan (its cache buffers hold its own heads only,
and ``cache_budget_gib`` bounds them per rank). A call whose heads on this rank are all plain
``full`` at this step, with no buffer to keep, runs diffusers' own parallel attention untouched:
an all-full plan is stock context parallelism bit for bit. Both paths exchange the same tensors
in the same layout (a boolean key mask, such as Qwen-Image's text mask, is gathered after q, k and
v, as diffusers gathers it), so ranks may take different paths in one call.

Calibration runs there too (:class:`Ulysses` is the trade, mixed into a session class: the
applied :class:`UlyssesSession`, and calibration's): each rank scores its own heads over the whole
sequence, and :meth:`Ulysses.all_gather` pools what the layer's program needs, which every rank
then solves alike. Such a session gathers every call (it scores them all, and keeps every output
for the next step's cache candidate); its all-full rows run diffusers' attention on the tokens in
diffusers' own gathered order, so that they equal stock context parallelism bit for bit too.

``balance_heads`` permutes each layer's heads (projection weights and plan together, see
:mod:`ditfastattn.placement`) so that the ranks' per-step costs are even; ``remove()`` puts the
weights back.

A pipeline's second expert (Wan 2.2 A14B's ``transformer_2``) takes its own ``enable_parallelism``:
its own config, mesh and process group. Each call trades over the group of the expert being
called, and ``balance_heads`` permutes both experts alike. Their groups must hold the same ranks
in the same order, so that a rank runs the same heads of the plan on both (refused otherwise, as is
parallelism on one expert only).

Not supported (refused with what is): ring attention (``ring_degree > 1``), whose ranks hold
sequence chunks of every head: a window would span the chunks of several ranks, and the op
attends one whole sequence, with no query or key offsets, so it cannot run an arrow between two
chunks, nor skip the chunks no window reaches; ``ulysses_anything`` (heads or tokens that P does
not divide); tensor parallelism; ``static=True``; attention masks other than boolean key masks on
compressed layers; layouts with the text after the image (the families with a diffusers
context-parallel plan put it first).
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import torch.distributed as dist

from .._content import content_digest
from ..adapters import parallel_config, parallel_error
from ..adapters.dispatch import padding_of
from ..model import TokenLayout
from ..placement import _check_world_size, permute_plan, place_heads, reorder_heads, restore_heads
from ..plan import Plan
from .call_geometry import CallGeometry
from .session import LayerRuntime, Session, logger, refused_without_grid


def context_parallel(transformer) -> bool:
    """Whether diffusers' parallelism (of any kind) is enabled on ``transformer``."""
    return parallel_config(transformer) is not None


@contextlib.contextmanager
def ranks_agree(transformer, what: str):
    """Under diffusers' Ulysses context parallelism, ``what`` (a call that every rank makes alike)
    stops on every rank or on none. The block fills the yielded dict with what the ranks must share
    (the same keys on every rank); at its end one exchange over the Ulysses group raises on every
    rank where any rank raised in the block, or where a value differs between ranks (each rank
    would run its heads of another plan or search, or wait for the others in a collective they
    never reach). Without Ulysses the block runs as it is."""
    group = _ulysses_group(transformer)
    shared: dict = {}
    if group is None:
        yield shared
        return
    error = None
    try:
        yield shared
    except Exception as raised:
        error = raised
    mine = None if error is not None else [bytes.fromhex(content_digest(value))[:_DIGEST_BYTES]
                                           for value in shared.values()]
    everyone = _exchange(group, transformer, mine, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, message) for rank, (_, message) in enumerate(everyone) if message is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"{what} stopped on Ulysses rank {rank} of {len(everyone)} ({message}); every rank stops "
                           "with it")
    keys = list(shared)
    differ = [key for index, key in enumerate(keys) if any(digests[index] != mine[index] for digests, _ in everyone)]
    if differ:
        raise ValueError(f"{what} got other {', '.join(differ)} on the Ulysses ranks; each rank runs its heads of one "
                         "search or plan, so call it on every rank with the same arguments")


_DIGEST_BYTES, _MESSAGE_BYTES = 8, 480


def _exchange(group, transformer, digests: list[bytes] | None, message: str | None) -> list[tuple[list[bytes], str | None]]:
    """Every rank's (digests, error message), in rank order: two all-gathers (the sizes, then the
    bytes) on the group's device (:func:`_device`)."""
    count = 0 if digests is None else len(digests)
    payload = bytearray(4 + _MESSAGE_BYTES)
    if message is not None:
        text = message.encode()[:_MESSAGE_BYTES]
        payload[:4] = len(text).to_bytes(4, "little")
        payload[4:4 + len(text)] = text
    else:
        payload[:4] = (1 << 31).to_bytes(4, "little")  # no error
    payload += b"".join(digests or [])
    size = 4 + _MESSAGE_BYTES + _DIGEST_BYTES * count
    # One size for every rank's bytes: a failed rank has no digests, and pads with zeros to the others' size.
    sizes = [torch.zeros(1, dtype=torch.int64, device=_device(group, transformer)) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([size], dtype=torch.int64, device=sizes[0].device), group=group)
    longest = max(int(s) for s in sizes)
    local = torch.zeros(longest, dtype=torch.uint8, device=sizes[0].device)
    local[:size] = torch.frombuffer(payload, dtype=torch.uint8)
    gathered = [torch.empty_like(local) for _ in sizes]
    dist.all_gather(gathered, local, group=group)
    result = []
    for received in gathered:
        raw = bytes(received.cpu().numpy().tobytes())
        length = int.from_bytes(raw[:4], "little")
        text = None if length == 1 << 31 else raw[4:4 + length].decode(errors="replace")
        body = raw[4 + _MESSAGE_BYTES:]
        result.append(([body[i:i + _DIGEST_BYTES] for i in range(0, _DIGEST_BYTES * count, _DIGEST_BYTES)], text))
    return result


def _device(group, transformer) -> torch.device:
    """Where the exchange's tensors go: the CPU under gloo; under NCCL the rank's GPU as diffusers'
    enable_parallelism recorded it (the model may still be on the CPU, offloaded or on meta, and the
    process may not have set a current device)."""
    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    recorded = getattr(parallel_config(transformer), "_device", None)
    if isinstance(recorded, torch.device) and recorded.type == "cuda":
        return recorded
    return torch.device("cuda", torch.cuda.current_device())


def _ulysses_group(transformer) -> dist.ProcessGroup | None:
    """The Ulysses process group of ``transformer``, or None (no parallelism, or one ditfastattn refuses alike on every rank)."""
    config = parallel_config(transformer)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None or cp.ring_degree > 1 or getattr(cp, "_ulysses_mesh", None) is None or not dist.is_initialized():
        return None
    return cp._ulysses_mesh.get_group()


class _Group(NamedTuple):
    """One transformer's Ulysses parallelism, as this rank takes part in it."""

    config: object  # diffusers' ParallelConfig, which enable_parallelism recorded on the model
    degree: int
    rank: int  # this rank's place in its Ulysses group: it attends heads [rank H / degree, (rank + 1) H / degree)
    group: dist.ProcessGroup
    ranks: tuple[int, ...]  # the group's global ranks, by place


def _ulysses(transformer, plan: Plan, adapter) -> _Group:
    """``transformer``'s Ulysses parallelism on this rank; ValueError naming what runs for any other kind."""
    config = parallel_config(transformer)
    if getattr(config, "tensor_parallel_config", None) is not None:
        raise ValueError(parallel_error(transformer, "tensor"))
    if getattr(transformer, "_parallel_config", None) is not config:
        raise ValueError(
            f"{type(transformer).__name__}'s attention processors carry a parallel config the model does not; "
            "enable context parallelism with transformer.enable_parallelism(config=ContextParallelConfig(...))"
        )
    if adapter.CALLS != "dispatch" or hasattr(adapter, "make_processor"):
        raise ValueError(f"{adapter.MODEL_CLASS} does not attend through diffusers' dispatch_attention_fn, so "
                         "ditfastattn cannot run it under context parallelism; run one whole model per process")
    cp = config.context_parallel_config
    if cp.ring_degree > 1:
        raise ValueError(
            f"ring attention (ring_degree={cp.ring_degree}) is not supported: its ranks hold sequence chunks of every "
            "head, and a window spans the chunks of several ranks, which the op (one whole sequence per call) cannot "
            "attend piecewise. Use Ulysses: ContextParallelConfig(ulysses_degree=N)"
        )
    if cp.ulysses_anything:
        raise ValueError("ulysses_anything (heads or tokens the degree does not divide) is not supported; use "
                         "ContextParallelConfig(ulysses_degree=N) with N dividing the heads and the token counts")
    _check_world_size(plan, cp.ulysses_degree)
    mesh = cp._ulysses_mesh
    if mesh is None:
        raise ValueError("the context parallel config has no device mesh yet; call transformer.enable_parallelism(...) "
                         "before ditfastattn.apply")
    return _Group(config, cp.ulysses_degree, cp._ulysses_local_rank, mesh.get_group(), tuple(mesh.mesh.tolist()))


def rank_plan(plan: Plan, rank: int, degree: int) -> Plan:
    """The slice of ``plan`` that Ulysses rank ``rank`` of ``degree`` runs: heads
    ``[rank H / degree, (rank + 1) H / degree)`` of every layer, as a plan of a model with H / degree heads."""
    spec = plan.model
    layers = tuple(type(layer)(layer.name, layer.heads // degree, layer.head_dim, layer.text) for layer in spec.layers)
    model = type(spec)(spec.family, spec.model_class, layers)
    methods = [[heads[rank * len(heads) // degree:(rank + 1) * len(heads) // degree] for heads in rows]
               for rows in plan.methods]
    return Plan(model, methods, {**plan.provenance, "ulysses": {"rank": rank, "degree": degree}})


@functools.lru_cache(maxsize=64)
def _streams(layout: TokenLayout, local: int, degree: int) -> tuple[tuple[int, int, int], ...]:
    """(start in a rank's chunk, length there, start in the whole sequence) of each input stream
    diffusers splits: the text before the image, then the image and what follows it (a reference
    image is part of the image stream)."""
    seq = layout.seq_len
    if local * degree != seq:
        raise RuntimeError(f"each of the {degree} Ulysses ranks holds {local} tokens of this call, but the "
                           f"transformer's inputs make {seq}; ditfastattn follows diffusers' own context-parallel "
                           "plans, which split the text and image inputs in equal chunks")
    start = layout.image_start
    if start == 0 and layout.num_global:
        raise NotImplementedError("ditfastattn runs under context parallelism where the text comes before the image "
                                  "in the joint sequence (FLUX.1, FLUX.2, Qwen-Image) or there is none (Wan); "
                                  "this layout has it after the image")
    bounds = [(0, start), (start, seq - start)] if start else [(0, seq)]
    for begin, length in bounds:
        if length % degree:
            raise RuntimeError(f"a stream of {length} tokens does not split into {degree} equal chunks; pick sizes "
                               f"that ulysses_degree={degree} divides")
    streams, offset = [], 0
    for begin, length in bounds:
        streams.append((offset, length // degree, begin))
        offset += length // degree
    return tuple(streams)


def _reorder(t: torch.Tensor, streams, degree: int, dim: int, to_ours: bool) -> torch.Tensor:
    """``t``'s whole sequence (along ``dim``) from diffusers' gathered order (rank by rank, each
    rank's chunk of every stream) to the single-process order (stream by stream), or back."""
    out = t.new_empty(t.shape)
    ours, theirs = (out, t) if to_ours else (t, out)
    chunks = theirs.unflatten(dim, (degree, t.shape[dim] // degree))
    for offset, length, begin in streams:
        mine = ours.narrow(dim, begin, length * degree).unflatten(dim, (degree, length))
        rank_by_rank = chunks.narrow(dim + 1, offset, length)
        (mine if to_ours else rank_by_rank).copy_(rank_by_rank if to_ours else mine)
    return out


class Ulysses:
    """The Ulysses trade of a session class on one rank (mixed in before :class:`Session` or a
    subclass of it): each attention call's chunk of the sequence for the rank's heads over all of
    it, the session's row on those, and the output traded back.

    The session calls :meth:`join` before ``Session.__init__``; it says by :meth:`_runs_stock`
    which calls keep diffusers' own parallel attention (none here: every call is gathered), and by
    :meth:`_stock_only` whether it can run a call that only the stock attention expresses.
    :meth:`set_experts` takes a second expert's own parallel config and group; a call trades over
    the group of the expert being called.
    """

    context_parallel = True

    def join(self, transformer, plan: Plan, adapter) -> None:
        """Take ``transformer``'s Ulysses configuration; ValueError naming what runs for any other."""
        joined = _ulysses(transformer, plan, adapter)
        self.degree, self.rank = joined.degree, joined.rank
        self._groups = {transformer: joined}

    def set_experts(self, experts) -> None:
        first = self._groups[self.transformer]
        for expert in experts[1:]:
            joined = _ulysses(expert, self.applied_plan, self.adapter)
            if joined.ranks != first.ranks:
                raise ValueError(
                    f"on this rank, pipe.transformer's Ulysses group is ranks {list(first.ranks)} "
                    f"(ulysses_degree={first.degree}) but pipe.transformer_2's is {list(joined.ranks)} "
                    f"(ulysses_degree={joined.degree}); one plan runs on both experts, each rank the same heads of it, "
                    "so give both the same ulysses_degree and device mesh layout (enable_parallelism(config="
                    "ContextParallelConfig(ulysses_degree=N)) on each, any mesh= of the same ranks in the same order)"
                )
            self._groups[expert] = joined
        super().set_experts(experts)

    def parallel_config_of(self, expert):
        return self._groups[expert].config

    @property
    def group(self) -> dist.ProcessGroup:
        """The process group of the expert being called (each expert's enable_parallelism made its own)."""
        return self._groups[self._expert if self._expert is not None else self.transformer].group

    def own_heads(self, layer: int) -> range:
        """This rank's heads of ``layer`` (in the applied plan's head order)."""
        heads = self.applied_plan.model.layers[layer].heads // self.degree
        return range(self.rank * heads, (self.rank + 1) * heads)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(degree, *tensor.shape): every rank's ``tensor``, in rank order (one collective)."""
        chunks = [torch.empty_like(tensor) for _ in range(self.degree)]
        dist.all_gather(chunks, tensor.contiguous(), group=self.group)
        return torch.stack(chunks)

    def attend_sharded(self, layer: LayerRuntime, call, q, k, v, *, layout: TokenLayout, attn_mask=None,
                       dense_only) -> torch.Tensor:
        """``layer``'s attention of one call on this rank's sequence chunk ``q``, ``k``, ``v`` (B, S / P, H, D).

        ``call(q, k, v, **options)`` is diffusers' attention call (``call()``: as the processor made
        it); ``layout`` is the whole sequence's; ``attn_mask`` the chunk's boolean key mask, if any.
        Returns (B, S / P, H, D), as diffusers' does.
        """
        batch, local, heads, dim = q.shape
        streams = _streams(layout, local, self.degree)
        if dense_only:
            self._stock_only(layer, dense_only)
            return call()
        if self._runs_stock(layer, layout, q, attn_mask is not None):
            return call()
        q, k, v = (self._gather(t, streams) for t in (q, k, v))
        padding = None
        if attn_mask is not None:  # after q, k and v, as diffusers gathers it
            attn_mask = self._gather_mask(attn_mask, streams)
            padding = padding_of(attn_mask, batch, layout.seq_len, False, self)[0]

        def dense():
            # On the tokens in diffusers' gathered order, as its Ulysses attention runs them: a
            # full row's output is then stock context parallelism's bit for bit.
            mask = None if attn_mask is None else _reorder(attn_mask, streams, self.degree, attn_mask.dim() - 1, False)
            theirs = (_reorder(t, streams, self.degree, 1, False) for t in (q, k, v))
            return _reorder(call(*theirs, attn_mask=mask, parallel_config=None), streams, self.degree, 1, True)

        out = layer.attend(q, k, v, layout=layout, key_padding=padding, dense=dense)
        return self._scatter(out, streams, local)

    def _stock_only(self, layer: LayerRuntime, reason: str) -> None:
        """Raise unless a call that only the stock attention expresses (``reason``) may run it (by default,
        calibration's: never, as it cannot score it)."""
        raise NotImplementedError(
            f"{layer.name}: {reason} runs only the stock attention, whose output calibration cannot score under "
            "context parallelism; calibrate on one whole model per process"
        )

    def _runs_stock(self, layer: LayerRuntime, layout: TokenLayout, q, masked: bool) -> bool:
        """Whether this call (``masked``: with a key mask) runs diffusers' own parallel attention untouched."""
        return False

    def _gather(self, t: torch.Tensor, streams) -> torch.Tensor:
        """(B, S / P, H, D) chunks of every head -> (B, S, H / P, D) of this rank's heads, in the whole
        sequence's order. The send layout is diffusers' own."""
        batch, local, heads, dim = t.shape
        send = t.reshape(batch, local, self.degree, heads // self.degree, dim).permute(2, 1, 0, 3, 4).contiguous()
        received = torch.empty_like(send)  # [r]: rank r's chunk of this rank's heads
        dist.all_to_all_single(received, send, group=self.group)
        return _reorder(received.flatten(0, 1).transpose(0, 1), streams, self.degree, 1, True)

    def _gather_mask(self, mask: torch.Tensor, streams) -> torch.Tensor:
        """Every rank's chunk of a key mask (..., S / P), gathered as diffusers does, in the whole
        sequence's order (..., S)."""
        return _reorder(self.all_gather(mask).movedim(0, -2).flatten(-2), streams, self.degree, mask.dim() - 1, True)

    def _scatter(self, out: torch.Tensor, streams, local: int) -> torch.Tensor:
        """The inverse of :meth:`_gather` for the attention output: (B, S, H / P, D) -> (B, S / P, H, D)."""
        batch, _, heads, dim = out.shape
        send = out.new_empty(self.degree, heads, batch, local, dim)  # [r]: rank r's chunk, diffusers' layout
        for offset, length, begin in streams:
            send[:, :, :, offset:offset + length].copy_(
                out[:, begin:begin + length * self.degree].unflatten(1, (self.degree, length)).permute(1, 3, 0, 2, 4))
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.group)
        return received.flatten(0, 1).permute(1, 2, 0, 3).contiguous()


class UlyssesSession(Ulysses, Session):
    """A dynamic session on one Ulysses rank: the rank's heads of the plan, over the whole sequence."""

    def __init__(self, transformer, plan: Plan, adapter, impl: str, cache_budget: int | None = None,
                 static: bool = False, balance_heads: bool = False, num_image_tokens: int | None = None):
        self.join(transformer, plan, adapter)
        if static:
            raise ValueError("static=True does not run under context parallelism yet; apply without it (the dynamic "
                             "session runs under Ulysses)")
        self.placements = None
        run = plan
        if balance_heads:
            try:
                self.placements = place_heads(plan, self.degree, num_image_tokens=num_image_tokens)
            except ValueError as err:
                raise ValueError(
                    f"balance_heads=True weighs each head by its attention cost at the plan's resolution ({err}); "
                    "calibrated plans record it, Plan.uniform(..., num_image_tokens=, text_len=) too"
                ) from None
            run = permute_plan(plan, self.placements)
            _log_placement(self.placements, self.degree)
        self.run_plan = run  # the plan in the placed head order
        super().__init__(transformer, rank_plan(run, self.rank, self.degree), adapter, impl, cache_budget)
        self.applied_plan = plan
        # What a call is refused for is read off the whole plan, not this rank's heads of it, so that
        # every rank refuses alike (one rank raising while the others trade would leave them waiting).
        self.pool_methods, self._grid_methods = refused_without_grid(plan)
        # per layer: whether the plan compresses it at some step (its unsupported calls must fail on every rank)
        self._compressed = [any(not plan.method(step, index, head).exact for step in range(plan.num_steps)
                                for head in range(layer.heads)) for index, layer in enumerate(plan.model.layers)]
        logger.info("Ulysses rank %d of %d runs its 1/%d of every layer's heads", self.rank, self.degree, self.degree)

    _edits = None  # the weights install_layers reordered (an apply that failed may not have)

    def install_layers(self, modules) -> None:
        if self.placements is not None:  # every expert alike: they run the same plan rows
            self._edits = reorder_heads(self.experts, self.applied_plan, self.placements)
            self._weights = _reordered_weights(self.experts, self.placements)

    def uninstall_layers(self, modules) -> None:
        if self._edits is not None:
            restore_heads(self._edits)  # the very parameters reordered, wherever a LoRA has moved them since
            self._edits = None
            changed = _changed_weights(self._weights)
            if changed:
                logger.warning(
                    "ditfastattn.remove(): the weights of %s changed while balance_heads had their heads reordered "
                    "(a LoRA, fuse_qkv_projections?); the weights apply reordered are back, but any made from them "
                    "since (fused projections) hold the reordered heads: unfuse and fuse again", ", ".join(changed[:3]))

    def check_processors(self) -> None:
        super().check_processors()
        changed = [] if self._edits is None else _changed_weights(self._weights)
        if changed:
            raise RuntimeError(
                f"the weights of {', '.join(changed[:3])} changed after ditfastattn.apply(..., balance_heads=True) (a "
                "LoRA loaded, fuse_qkv_projections?): their heads are reordered there, which the new weights do not "
                "follow; call ditfastattn.remove() first, change the model, then apply again"
            )

    def _stock_only(self, layer: LayerRuntime, reason: str) -> None:
        if self._compressed[layer.index]:
            raise NotImplementedError(
                f"{layer.name}: {reason} runs only the stock attention, but the plan compresses this layer; "
                "apply a plan that keeps this layer full, or run it without context parallelism"
            )

    def _runs_stock(self, layer: LayerRuntime, layout: TokenLayout, q, masked: bool) -> bool:
        """Whether this rank's row of ``layer`` at this step is plain full with nothing to keep or capture."""
        layer.geometry = CallGeometry.of(layout.seq_len, None, None, layout, None)  # tile windows are sized by it
        self.check_grid_call(layer)  # before this rank's row is compiled for its heads: on every rank alike
        if masked and self.pool_methods:
            return False  # gathered, so that every rank's row() refuses the plan's pooled keys on a padded call
        batch, local, heads, dim = q.shape
        # the gathered call's shape, dtype and device (the cache budget counts them), without its data
        gathered = q.new_empty(1).expand(batch, local * self.degree, heads // self.degree, dim)
        row = layer._runnable(layer.row(gathered, layout.image_len, route_full=False), gathered)
        return row.all_full and row.capture_modes is None and not row.keep


def _reordered_weights(experts, placements) -> list[tuple[torch.nn.Module, str, tuple]]:
    """(expert, module path, its parameters by name and identity) for every module whose heads a
    placement reorders: each reordered layer's attention, and its block's ``proj_out`` (FLUX's
    single blocks)."""
    weights = []
    for expert in experts:
        for placement in placements:
            if list(placement.permutation) == sorted(placement.permutation):
                continue  # kept in order: nothing a later LoRA could misread
            parent = placement.layer.rpartition(".")[0]
            for path in (placement.layer, f"{parent}.proj_out"):
                module = _submodule(expert, path)
                if module is not None:
                    weights.append((expert, path, _parameters(module)))
    return weights


def _changed_weights(weights) -> list[str]:
    """The modules of :func:`_reordered_weights` whose parameters are no longer the ones recorded."""
    return [path for expert, path, held in weights if _parameters(_submodule(expert, path)) != held]


def _submodule(model, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _parameters(module) -> tuple:
    """``module``'s parameters by name and identity: a LoRA or fused projections add some, a state
    dict loaded with ``assign=True`` replaces them (``.to()`` and model offload keep them)."""
    return () if module is None else tuple((name, id(parameter)) for name, parameter in module.named_parameters())


def _log_placement(placements, degree: int) -> None:
    before = [p.imbalance_before for p in placements]
    after = [p.imbalance_after for p in placements]
    worst = max(placements, key=lambda p: p.imbalance_before)
    logger.info(
        "head placement over %d Ulysses ranks: imbalance (slowest rank / mean, per layer) mean %.3f -> %.3f, "
        "worst %.3f -> %.3f (%s); ditfastattn.placement.place_heads gives every layer's",
        degree, sum(before) / len(before), sum(after) / len(after), worst.imbalance_before, worst.imbalance_after,
        worst.layer,
    )
