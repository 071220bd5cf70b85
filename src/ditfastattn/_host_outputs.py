"""Calibration's previous-step layer outputs parked in host memory between denoising steps."""

from __future__ import annotations

import functools
from collections import deque

import torch

# The smallest piece an output is split into, as a share of it: the waste of the last piece's rounding.
_LAST_PIECE_SHARE = 64
# Whether pieces were pinned since the blocks were last given back (torch's pinned cache is the process's).
_pinned = False


def host_spans(numel: int) -> list[tuple[int, int]]:
    """(start, stop) element spans of the pieces an output of ``numel`` elements is parked in.

    Torch's pinned allocator rounds every block up to a power of two bytes, so one block per output
    would pin up to twice its size (a 792 MiB output at FLUX 2048² x 8 prompts took 1 GiB). Pieces
    of a power of two elements each (elements are a power of two bytes), largest first, until what
    is left is at most 1/64 of the output: that last piece's rounding is all that is wasted.
    """
    spans, start = [], 0
    while start < numel:
        rest = numel - start
        size = rest if rest <= numel // _LAST_PIECE_SHARE else 1 << (rest.bit_length() - 1)
        spans.append((start, start + size))
        start += size
    return spans


def pinned_used() -> None:
    """Say that pinned blocks were taken (for :func:`release_pinned` to give back)."""
    global _pinned
    _pinned = True


def release_pinned() -> None:
    """Give the pinned blocks that parked outputs took back to the system, once nothing reuses them:
    torch's allocator keeps them cached, locked in the process, until it ends (44 GiB after a
    search at FLUX 2048² x 8 prompts). Torch before ``torch.accelerator.empty_host_cache`` (2.11,
    for one) has only the private ``torch._C._host_emptyCache``; where neither exists they stay cached."""
    global _pinned
    if not _pinned:
        return
    _pinned = False
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    empty = empty or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def releasing_pinned(function):
    """``function``, after which (returning or raising) the pinned blocks its passes reused go back."""
    @functools.wraps(function)
    def released(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        finally:
            release_pinned()

    return released


class HostOutputs:
    """Layer outputs parked in host memory between denoising steps (pinned, async on CUDA).

    The host queues layers faster than the GPU runs them, so copies out are bounded: each
    output stays referenced until its copy is done, and at most ``IN_FLIGHT`` are pending.
    """

    IN_FLIGHT = 2

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # key -> (shape, dtype, [(start, stop, host piece)]) over the output's flattened elements
        self.host: dict[tuple[int, int], tuple[torch.Size, torch.dtype, list]] = {}
        self.loading: dict[tuple[int, int], tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        self.storing: deque[tuple[torch.Tensor, torch.cuda.Event]] = deque()

    def store(self, key: tuple[int, int], tensor: torch.Tensor) -> None:
        flat = tensor.reshape(-1)
        held = self.host.get(key)
        if held is None or held[0] != tensor.shape or held[1] != tensor.dtype:
            if self.stream is not None:
                pinned_used()
            pieces = [(start, stop, torch.empty(stop - start, dtype=tensor.dtype, pin_memory=self.stream is not None))
                      for start, stop in host_spans(flat.numel())]
            held = self.host[key] = (tensor.shape, tensor.dtype, pieces)
        if self.stream is None:
            for start, stop, piece in held[2]:
                piece.copy_(flat[start:stop])
            return
        self.stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self.stream):
            for start, stop, piece in held[2]:
                piece.copy_(flat[start:stop], non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        self.storing.append((flat, done))
        while len(self.storing) > self.IN_FLIGHT:
            self.storing.popleft()[1].synchronize()

    def prefetch(self, key: tuple[int, int], device: torch.device) -> None:
        if key in self.loading or key not in self.host:
            return
        shape, dtype, pieces = self.host[key]
        out = torch.empty(shape, dtype=dtype, device=device)
        flat = out.view(-1)
        event = None
        if self.stream is None:
            for start, stop, piece in pieces:
                flat[start:stop].copy_(piece)
        else:
            # `out` may reuse memory that queued compute still reads: the copy waits for it.
            self.stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self.stream):
                for start, stop, piece in pieces:
                    flat[start:stop].copy_(piece, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
        self.loading[key] = (out, event)

    def drop(self, call: int | None = None) -> None:
        """Forget one call slot's outputs (all with None) once nothing will read them, so that a
        search's later passes do not hold this one's too (a pass at FLUX 2048² x 8 prompts parks 44
        GiB). The pinned blocks go back to torch's host cache, where the next pass reuses them."""
        for held in (self.host, self.loading):
            for key in [key for key in held if call is None or key[1] == call]:
                del held[key]
        while self.storing:
            self.storing.popleft()[1].synchronize()

    def take(self, key: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        self.prefetch(key, device)
        if key not in self.loading:
            return None
        out, event = self.loading.pop(key)
        if event is not None:
            torch.cuda.current_stream(device).wait_event(event)
        return out
