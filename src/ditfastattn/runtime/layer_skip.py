"""diffusers' attention-score skip (``LayerSkipConfig(skip_attention_scores=True)``), which the
perturbed-attention and skip-layer guiders put on chosen layers for their perturbed call: there the
attention is the identity on the values, done by a torch function mode that answers
``F.scaled_dot_product_attention`` with ``value``. ditfastattn's op is not that function, so a call
under the mode runs the stock attention (the dynamic runtime) or is refused (static mode)."""

from __future__ import annotations

import torch

try:
    from diffusers.hooks.layer_skip import AttentionScoreSkipFunctionMode
except ImportError:  # a diffusers without layer skip has nothing to detect
    AttentionScoreSkipFunctionMode = None


def attention_scores_skipped() -> bool:
    """Whether this attention call runs under diffusers' attention-score skip."""
    if AttentionScoreSkipFunctionMode is None or not torch._C._is_torch_function_mode_enabled():
        return False
    return any(isinstance(mode, AttentionScoreSkipFunctionMode) for mode in torch.overrides._get_current_function_mode_stack())
