"""SD3 / SD3.5 (``SD3Transformer2DModel``): image tokens first, text after; SDPA in (B, H, S, D).

Joint layers are ``transformer_blocks.{i}.attn`` (the last one is ``context_pre_only``); SD3.5
dual-attention blocks add ``transformer_blocks.{i}.attn2``, image-only self-attention (no text).
The image tokens are the latent's patches in raster order: a grid of rows x cols, so tile windows
can run on them (:func:`image_segment`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0

from ..model import LayerSpec, ModelSpec, token_layout
from .base import Segment

FAMILY = "sd3"
MODEL_CLASS = "SD3Transformer2DModel"
# Pipelines run classifier-free guidance as one batch [unconditional; conditional].
CFG_IN_BATCH = True
CFG = "one batch [unconditional; conditional]"


def matches(transformer) -> bool:
    return isinstance(transformer, SD3Transformer2DModel)


def describe(transformer) -> ModelSpec:
    layers = []
    for index, block in enumerate(transformer.transformer_blocks):
        for attr, has_text in (("attn", True), ("attn2", False)):
            module = getattr(block, attr, None)
            if module is not None:
                head_dim = module.inner_dim // module.heads
                layers.append(LayerSpec(f"transformer_blocks.{index}.{attr}", module.heads, head_dim, has_text))
    return ModelSpec(FAMILY, type(transformer).__name__, tuple(layers))


def image_segment(transformer, arguments) -> Segment:
    """The image tokens of one call, first in the joint sequence: the patches of the latent
    (B, C, H, W) in raster order, as its patch embedding cuts them."""
    height, width = arguments["hidden_states"].shape[-2:]
    patch = transformer.config.patch_size
    grid = (1, height // patch, width // patch)
    return 0, grid[1] * grid[2], grid


def stock_processor_types() -> tuple[type, ...]:
    return (JointAttnProcessor2_0,)


def make_processor(layer, original):
    return SD3HeadwiseProcessor(layer, original)


class SD3HeadwiseProcessor:
    """``JointAttnProcessor2_0`` with the attention itself delegated to the ditfastattn runtime."""

    def __init__(self, layer, original):
        self.layer = layer
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch = hidden_states.shape[0]
        image_len = hidden_states.shape[1]

        def heads(x):
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_len = 0
        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            context_q = heads(attn.add_q_proj(encoder_hidden_states))
            context_k = heads(attn.add_k_proj(encoder_hidden_states))
            context_v = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                context_q = attn.norm_added_q(context_q)
            if attn.norm_added_k is not None:
                context_k = attn.norm_added_k(context_k)
            query = torch.cat([query, context_q], dim=2)
            key = torch.cat([key, context_k], dim=2)
            value = torch.cat([value, context_v], dim=2)

        def dense():
            return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False).transpose(1, 2)

        # The op takes (B, S, H, D) views of the very tensors stock SDPA sees.
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        segment = self.layer.session.image_segment  # this transformer call's, with the image grid
        if isinstance(segment, str) or tuple(segment[:2]) != (0, image_len):
            out = self.layer.attend(q, k, v, text_start=image_len, text_len=text_len, dense=dense)
        else:
            layout = token_layout(image_len + text_len, 0, image_len, segment[2])
            out = self.layer.attend(q, k, v, layout=layout, dense=dense)
        hidden_states = out.reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :image_len], hidden_states[:, image_len:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states

