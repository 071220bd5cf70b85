"""The one interception point of the dispatch families: diffusers' ``dispatch_attention_fn`` as the
modules of their stock processors call it (or torch's SDPA, for CogVideoX, whose processor calls
``F.scaled_dot_product_attention`` itself).

While a plan is applied to such a model, the name ``dispatch_attention_fn`` in each of those
modules is a wrapper (for an SDPA family, the name ``F`` is ``torch.nn.functional`` with its
``scaled_dot_product_attention`` wrapped), and a forward pre-hook on every attention module the
plan covers names the layer that is running. The wrapper hands that layer's attention to the
runtime (``LayerRuntime.attend``) with the token layout of the current transformer call and the
padding of the mask the processor passes; every other call (layers outside the plan, other models,
other processors of the module) goes to the stock function untouched. The processors themselves
are never replaced, and removing the plan puts the stock name back. The current layer is one slot
for the process: one model runs at a time. Under diffusers' Ulysses context parallelism the call
holds this rank's chunk of the sequence; the session (``ditfastattn.runtime.parallel``) trades it
for its heads over the whole sequence, which the layout here describes.
"""

from __future__ import annotations

import dataclasses
import sys
import weakref

import torch

from .. import ops
from ..model import token_layout

# The parameters of dispatch_attention_fn after (query, key, value), in order (diffusers 0.35-0.42).
_OPTIONS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa", "attention_kwargs")
# Chroma's float 0/1 mask m_q * m_k, added to the scores: +1 between two real tokens.
FLOAT_PAIR_PADDING = ((1.0, 0.0), (0.0, 0.0))


class _Current:
    layer = None


_CURRENT = _Current()
# (processor module name, attribute) -> [stock object, wrapper, plans applied]
_wrapped: dict[tuple[str, str], list] = {}
# The module attribute each kind of family calls attention through.
_ATTRIBUTE = {"dispatch": "dispatch_attention_fn", "sdpa": "F"}


def _wrapper(stock, heads_first: bool = False):
    """``stock`` handing the running plan layer's call to the runtime; q, k, v as (B, S, H, D), or
    (B, H, S, D) with ``heads_first`` (SDPA), which the op takes as (B, S, H, D) views."""

    def attention(query, key, value, *args, **kwargs):
        layer = _CURRENT.layer
        if layer is None:
            return stock(query, key, value, *args, **kwargs)
        _CURRENT.layer = None  # one attention per module call: a further call runs the stock one
        if not heads_first:
            def call(q=query, k=key, v=value, **changed):  # the stock call, or it on other tensors or options
                return stock(q, k, v, **{**dict(zip(_OPTIONS, args)), **kwargs, **changed})

            return _attend(layer, call, query, key, value, args, kwargs)
        out = _attend(layer, lambda: stock(query, key, value, *args, **kwargs).transpose(1, 2),
                      query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), args, kwargs)
        return out.transpose(1, 2)

    attention.__wrapped__ = stock
    return attention


class _Functional:
    """``torch.nn.functional`` as an SDPA family's processor module sees it while a plan is applied:
    ``scaled_dot_product_attention`` wrapped, every other name the real one."""

    def __init__(self, functional):
        self.__wrapped__ = functional
        self.scaled_dot_product_attention = _wrapper(functional.scaled_dot_product_attention, heads_first=True)

    def __getattr__(self, name):
        return getattr(self.__wrapped__, name)


def _wrap(calls: str, stock):
    return _Functional(stock) if calls == "sdpa" else _wrapper(stock)


def intercept(session, modules: list[dict[str, torch.nn.Module]]) -> None:
    """Wrap the stock function for ``session``'s family and hook its layers (``modules``: each
    expert's attention modules by layer name; one dict but for a second expert), the hooks added to
    ``session.handles``.

    ``session.release()`` undoes the wrapping (once); a transformer dropped without ``remove()``
    does so when it is collected.
    """
    adapter = session.adapter
    for key in _targets(adapter):
        module = sys.modules[key[0]]
        entry = _wrapped.get(key)
        if entry is None or getattr(module, key[1]) is not entry[1]:
            stock = getattr(module, key[1])
            entry = _wrapped[key] = [stock, _wrap(adapter.CALLS, stock), 0]
            setattr(module, key[1], entry[1])
        entry[2] += 1
    session.release = weakref.finalize(session.transformer, release, session.adapter)
    for expert_modules in modules:  # into the session's handles as they come: an interrupted apply removes them
        for layer in session.layers:
            module = expert_modules[layer.name]
            session.handles.append(module.register_forward_pre_hook(_enter(layer)))
            session.handles.append(module.register_forward_hook(_leave, always_call=True))


def release(adapter) -> None:
    """Undo one :func:`intercept` of ``adapter``'s family: the last one puts the stock name back
    (unless something else has wrapped it since, which then stays)."""
    for key in _targets(adapter):
        entry = _wrapped.get(key)
        if entry is None:
            continue
        entry[2] -= 1
        if entry[2] <= 0:
            del _wrapped[key]
            module = sys.modules[key[0]]
            if getattr(module, key[1]) is entry[1]:
                setattr(module, key[1], entry[0])


def _targets(adapter) -> list[tuple[str, str]]:
    """(module, attribute) of every name ``adapter``'s processors call attention through."""
    attribute = _ATTRIBUTE[adapter.CALLS]
    return sorted({(cls.__module__, attribute) for cls in adapter.stock_processor_types()})


def _enter(layer):
    def hook(module, args):
        if layer.session.in_call:  # else another model runs the module (Z-Image's controlnet): stock
            _CURRENT.layer = layer

    return hook


def _leave(module, args, output):
    _CURRENT.layer = None


def _attend(layer, dense, query, key, value, args, kwargs):
    """``layer``'s attention through the runtime; ``dense()`` is the stock one as (B, S, H, D) (for
    the dispatch families, ``dense(q, k, v, **options)`` the stock function on other arguments)."""
    options = {**dict(zip(_OPTIONS, args)), **kwargs}
    session = layer.session
    parallel = options.get("parallel_config")
    reason = _unsupported(options, session)
    batch, seq = query.shape[:2]
    if parallel is not None and session.context_parallel:
        seq *= session.degree  # the whole sequence, which the Ulysses session gathers
    layout = token_layout(seq, 0, seq)  # image-only layers (Z-Image's noise refiner, Wan's self-attention)
    segment = session.image_segment
    if layer.spec.text:
        if isinstance(segment, str):
            reason = reason or segment
        elif segment[0] + segment[1] > seq:
            reason = reason or (f"the call's image segment {segment[:2]} does not fit the {seq} tokens this layer "
                                f"sees (an input {session.adapter.MODEL_CLASS} ditfastattn does not know)")
        else:
            layout = token_layout(seq, *segment)
    elif isinstance(segment, str):  # an input the family cannot describe (Z-Image's omni mode) reaches its refiner too
        reason = reason or segment
    elif tuple(segment[:2]) == (0, seq):
        layout = token_layout(seq, *segment)  # with the call's grid
    if parallel is not None and session.context_parallel:
        mask = options.get("attn_mask")
        if mask is not None:  # the rank's chunk of a key mask, gathered by the session; its form is every rank's
            reason = reason or padding_of(mask, batch, query.shape[1], False, session)[1]
        return session.attend_sharded(layer, dense, query, key, value, layout=layout, attn_mask=mask, dense_only=reason)
    padding, mask_reason = _call_padding(options.get("attn_mask"), batch, seq, session)
    padding = _global_only(padding, layout, session)
    return layer.attend(query, key, value, layout=layout, key_padding=padding, dense=dense,
                        dense_only=reason or mask_reason)


def _unsupported(options, session) -> str | None:
    if options.get("parallel_config") is not None and not session.context_parallel:
        return "context parallelism"
    if options.get("dropout_p") or options.get("is_causal") or options.get("enable_gqa"):
        return "dropout, causal or grouped-query attention"
    if options.get("scale") is not None or options.get("attention_kwargs"):
        return "a custom softmax scale or backend arguments"
    return None


def _call_padding(mask, batch: int, seq: int, session) -> tuple[ops.Padding | None, str | None]:
    """:func:`padding_of`, read once per mask per transformer call: most families give every layer
    of a call the same mask tensor (one device op per layer saved), unless it was written in place
    meanwhile. The cache holds the mask weakly: HunyuanVideo 1.5 builds an S x S mask in every layer
    (13 GB at 720p), which a strong reference would keep alive for the rest of the call."""
    if mask is None:
        return None, None
    # A compiled graph reads the mask at every call, as data; a tensor made under torch.inference_mode
    # keeps no version counter that would show an in-place write, so it is read at every layer.
    if torch.compiler.is_compiling() or mask.is_inference():
        return padding_of(mask, batch, seq, session.adapter.PAIR_MASKS, session)
    key = ("padding", id(mask), batch, seq)
    cached = session.call_cache.get(key)
    if cached is not None and cached[0]() is mask and cached[1] == mask._version:
        return cached[2]
    result = padding_of(mask, batch, seq, session.adapter.PAIR_MASKS, session)
    session.call_cache[key] = (weakref.ref(mask), mask._version, result)
    return result


def _global_only(padding: ops.Padding | None, layout, session) -> ops.Padding | None:
    """``padding`` marked ``global_only`` where no token of ``layout``'s image grid is padding (a text
    mask: HunyuanVideo's), so that tile windows skip the image keys' padding checks. One host read per
    mask, image segment and transformer call, only where the session runs tile windows; none under
    torch.compile, CUDA graph capture or for a mask made under ``torch.inference_mode`` (no version
    counter to trust), where ``padding`` stays as it is (correct, slower)."""
    if (padding is None or padding.global_only or layout is None or layout.grid is None or not session.tile_windows
            or padding.bias != ops.KEY_PADDING):  # under a pair table the kernel reads every token's kind anyway
        return padding
    mask = padding.mask
    if torch.compiler.is_compiling() or mask.is_inference() or (mask.is_cuda and torch.cuda.is_current_stream_capturing()):
        return padding
    key = ("global_only", id(mask), mask._version, layout.image_start, layout.image_len)
    cached = session.call_cache.get(key)
    if cached is None or cached[0]() is not mask:
        image = mask[:, layout.image_start : layout.image_start + layout.image_len]
        marked = None if bool(image.any()) else dataclasses.replace(padding, global_only=True)
        cached = session.call_cache[key] = (weakref.ref(mask), marked)
    return padding if cached[1] is None else cached[1]


def padding_of(mask, batch: int, seq: int, pairs: bool, session) -> tuple[ops.Padding | None, str | None]:
    """The :class:`~ditfastattn.ops.Padding` equal to the stock attention under ``mask``, or why
    there is none. Boolean key masks are read as they are; with ``pairs`` (Chroma), a token-pair
    mask m_q & m_k (boolean) or m_q * m_k (floats 0/1, checked once per transformer call) is read
    from its diagonal."""
    if mask is None:
        return None, None
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    fits = mask.dim() == 4 and mask.shape[0] in (1, batch) and mask.shape[1] == 1 and mask.shape[3] == seq
    if fits and mask.shape[2] == 1 and mask.dtype == torch.bool:
        return ops.Padding(~mask[:, 0, 0].expand(batch, seq)), None
    if fits and pairs and mask.shape[2] == seq:
        tokens = mask[:, 0].diagonal(dim1=-2, dim2=-1).expand(batch, seq)
        if mask.dtype == torch.bool:
            return ops.Padding(~tokens, ops.PAIR_PADDING), None
        if mask.is_floating_point() and torch.compiler.is_compiling():
            return None, ("a float token mask inside torch.compile (that it holds only 0 and 1 is read on the host, "
                          "once per call); pass the mask as booleans (m_q & m_k), which compile")
        if mask.is_floating_point() and _binary(tokens, session):
            return ops.Padding(tokens == 0, FLOAT_PAIR_PADDING), None
    forms = "boolean key masks" + (", and token-pair masks of booleans or floats 0/1" if pairs else "")
    return None, f"an attention mask {tuple(mask.shape)} of {mask.dtype} (ditfastattn reads {forms})"


def _binary(tokens: torch.Tensor, session) -> bool:
    """Whether a float token mask holds only 0 and 1: one host read per transformer call (every
    layer of a call builds its mask from the same token mask)."""
    cache = session.call_cache
    if "binary_mask" not in cache:
        cache["binary_mask"] = bool(((tokens == 0) | (tokens == 1)).all())
    return cache["binary_mask"]
