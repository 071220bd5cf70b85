"""Digests of values by their content, for telling whether two processes (or two runs) got the same."""

from __future__ import annotations

import hashlib
import re

import torch


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def feed(digest, value) -> None:
    """Feed ``value`` to ``digest`` by content (a tensor's, array's or image's bytes, not its repr, which
    elides the middle of large tensors and names an image's address)."""
    if torch.is_tensor(value):
        digest.update(value.detach().float().cpu().numpy().tobytes())
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            feed(digest, item)
    elif isinstance(value, dict):
        for key in sorted(value, key=repr):
            feed(digest, key)
            feed(digest, value[key])
    elif hasattr(value, "tobytes") and callable(value.tobytes):  # numpy arrays, PIL images
        digest.update(repr(getattr(value, "shape", getattr(value, "size", None))).encode())
        digest.update(value.tobytes())
    else:  # without the addresses objects name in their repr (a callback's), which differ run to run
        digest.update(_ADDRESS.sub("", repr(value)).encode())


def content_digest(value) -> str:
    """The sha256 of ``value``'s content, as :func:`feed` reads it."""
    digest = hashlib.sha256()
    feed(digest, value)
    return digest.hexdigest()
