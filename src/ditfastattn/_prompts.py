"""Calibration prompts as one batched pipeline call: strings, or dicts of pipeline keyword arguments."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Sequence

import numpy as np
import torch

from ._content import feed

# The pipeline arguments that take one text per prompt (diffusers' prompt, prompt_2, negative_prompt_3, ...).
_TEXT_ARGUMENT = re.compile(r"(negative_)?prompt(_\d+)?")


def prompt_kwargs(prompts: str | dict | Sequence[str | dict]) -> tuple[dict[str, Any], str]:
    """Pipeline keyword arguments for one batched run, and a hash that identifies the prompts.

    A bare string or dict is one prompt. In dicts, tensors are concatenated along the batch, texts
    (``prompt``, ``negative_prompt``, ...) become one list, and any other value must be the same in
    every dict (a setting of the whole batch).
    """
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of strings or of dicts of pipeline kwargs; got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    digest = hashlib.sha256()
    if all(isinstance(p, str) for p in prompts):
        digest.update(json.dumps(prompts).encode())
        return {"prompt": prompts}, digest.hexdigest()
    if not all(isinstance(p, dict) for p in prompts):
        kinds = sorted({type(p).__name__ for p in prompts})
        raise TypeError(f"prompts must be all strings or all dicts of pipeline keyword arguments; got {kinds}")
    keys = set(prompts[0])
    if any(set(p) != keys for p in prompts):
        raise ValueError("every prompt dict must have the same keys")
    merged: dict[str, Any] = {}
    for key in sorted(keys):
        values = [p[key] for p in prompts]
        if torch.is_tensor(values[0]):
            shapes = {tuple(v.shape[1:]) for v in values if torch.is_tensor(v)}
            if len(shapes) > 1 or not all(torch.is_tensor(v) and v.dim() for v in values):
                raise ValueError(
                    f"the prompt dicts' {key!r} must be tensors of one shape after the batch dimension, as one batch "
                    f"takes them; got {sorted(shapes)}: pad them to one length (encode_prompt's max_sequence_length "
                    "does) or calibrate on prompt strings"
                )
            merged[key] = torch.cat(values, dim=0)
        elif _TEXT_ARGUMENT.fullmatch(key) and all(isinstance(v, str) for v in values):
            merged[key] = values  # one text per prompt, as a list of prompt strings gives
        elif all(_same(v, values[0]) for v in values[1:]):
            merged[key] = values[0]
        else:
            raise ValueError(
                f"the prompt dicts differ in {key!r}, which the batch can take only once: give a per-prompt value as a "
                "tensor with a batch dimension (as prompt_embeds), or give a setting of the whole batch once, in "
                "SearchConfig.pipeline_kwargs"
            )
        feed(digest, key)
        feed(digest, merged[key])
    return merged, digest.hexdigest()


def _same(a, b) -> bool:
    """Whether two pipeline argument values are equal: tensors and arrays whole, containers item by item."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype
                and bool(torch.equal(a.detach().cpu(), b.detach().cpu())))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    equal = a == b
    # numpy scalars answer with numpy's bool; an elementwise answer is not a value the batch can share
    return bool(equal) if isinstance(equal, (bool, np.bool_)) else False
