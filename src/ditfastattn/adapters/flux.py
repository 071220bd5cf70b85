"""FLUX.1 (``FluxTransformer2DModel``): text tokens first, then image tokens; (B, S, H, D) layout.

Double-stream layers ``transformer_blocks.{i}.attn`` receive the text as
``encoder_hidden_states``; single-stream layers ``single_transformer_blocks.{i}.attn`` get text and
image already joined, so their text length comes from the transformer call (``layer.text_len()``).
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from ..model import LayerSpec, ModelSpec

FAMILY = "flux"
MODEL_CLASS = "FluxTransformer2DModel"
# True CFG runs the negative prompt as a separate transformer call, never inside the batch.
CFG_IN_BATCH = False


def matches(transformer) -> bool:
    return isinstance(transformer, FluxTransformer2DModel)


def describe(transformer) -> ModelSpec:
    layers = []
    for prefix in ("transformer_blocks", "single_transformer_blocks"):
        for index, block in enumerate(getattr(transformer, prefix)):
            attn = block.attn
            layers.append(LayerSpec(f"{prefix}.{index}.attn", attn.heads, attn.head_dim, True))
    return ModelSpec(FAMILY, type(transformer).__name__, tuple(layers))


def stock_processor_types() -> tuple[type, ...]:
    return (FluxAttnProcessor,)


def make_processor(layer, original):
    processor = FluxHeadwiseProcessor(layer, original)
    # Keep diffusers' attention-backend and parallel settings (set_attention_backend writes these).
    processor._attention_backend = getattr(original, "_attention_backend", None)
    processor._parallel_config = getattr(original, "_parallel_config", None)
    return processor


class FluxHeadwiseProcessor:
    """``FluxAttnProcessor`` with the attention itself delegated to the ditfastattn runtime."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer, original):
        self.layer = layer
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value, context_q, context_k, context_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            context_q = attn.norm_added_q(context_q.unflatten(-1, (-1, attn.head_dim)))
            context_k = attn.norm_added_k(context_k.unflatten(-1, (-1, attn.head_dim)))
            context_v = context_v.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([context_q, query], dim=1)
            key = torch.cat([context_k, key], dim=1)
            value = torch.cat([context_v, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        def dense():
            return dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )

        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.layer.text_len()
        out = self.layer.attend(
            query, key, value, text_start=0, text_len=text_len, dense=dense,
            dense_only=attention_mask is not None or self._parallel_config is not None,
        )
        hidden_states = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_len, hidden_states.shape[1] - text_len], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())
