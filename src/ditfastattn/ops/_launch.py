"""Repeat launches of a Triton or Gluon kernel without the JIT's per-call dispatch.

On every launch Triton's JIT binds and specialises each argument, builds and hashes a cache key and
checks the kernel's globals: about 50 us of host time for the 30-odd arguments of the head-wise
kernels (measured on an H100 host, ``benchmarks/host_time.py``), more than the GPU needs for a
sparse layer at 1K. Eager denoising launches one such kernel per layer with arguments that are
functions of a few shapes, strides, alignments and flags, so the caller names those as a key: the
first launch under a key goes through the JIT (which compiles, or finds, the specialised kernel),
later ones call the compiled kernel with the same launch hooks the JIT would pass.
"""

from __future__ import annotations

import contextlib

import torch
from triton import knobs
from triton.runtime import driver


class DirectLaunches:
    """Launches of one ``@triton.jit`` / ``@gluon.jit`` function, by caller-chosen key."""

    def __init__(self, fn):
        self._fn = fn
        self._entries: dict = {}

    def __call__(self, key, grid: tuple, args: tuple, constexprs: dict, options: dict) -> None:
        """``fn[grid](*args, **constexprs, **options)`` on the current device and stream.

        ``key`` must fix everything the JIT specialises on for these arguments: the value of every
        integer argument, the dtype and 16-byte alignment of every pointer, each tensor
        descriptor's dtype, block shape and layout, and ``grid``, ``constexprs`` and ``options``.
        ``args`` are the leading parameters, ``constexprs`` the rest by name.
        """
        device = driver.active.get_current_device()
        entry = self._entries.get((device, key))
        if entry is None:
            kernel = self._fn[grid](*args, **constexprs, **options)
            if kernel is None:  # a JIT cache hook declined to compile: leave every launch to the JIT
                return
            if hasattr(kernel, "result"):  # a future under asynchronous compilation
                kernel = kernel.result()
            tail = tuple(constexprs[name] for name in self._fn.arg_names[len(args):])
            self._entries[(device, key)] = (kernel, tail, (*grid, 1, 1)[:3])
            return
        kernel, tail, grid3 = entry
        stream = driver.active.get_current_stream(device)
        full = (*args, *tail)
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        hooked = _active(enter) or _active(leave)
        metadata = kernel.launch_metadata(grid3, stream, *full) if hooked else None
        kernel.run(*grid3, stream, kernel.function, kernel.packed_metadata, metadata,
                   enter if hooked else None, leave if hooked else None, *full)

    def __len__(self) -> int:
        return len(self._entries)


def launch_key(q, k, v, out, head_modes, image_start: int, image_len: int, return_lse: bool, *flags) -> tuple:
    """What a head-wise kernel's integer arguments, descriptors and specialisation derive from, plus
    the caller's own ``flags`` (configuration, path, padding)."""
    return (q.device.index, q.dtype, q.shape, q.stride(), k.stride(), v.stride(), out.stride(), head_modes.stride(0),
            q.data_ptr() % 16, k.data_ptr() % 16, v.data_ptr() % 16, out.data_ptr() % 16, head_modes.data_ptr() % 16,
            image_start, image_len, return_lse, *flags)


def _active(hook) -> bool:
    """A launch hook with something to call: a non-empty chain (Triton 3.6) or a callable (earlier)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def rebased(template, base):
    """``template`` (a host tensor descriptor) over ``base``, without re-running its checks.

    The caller's key covers what those checks read of the base (dtype, 16-byte alignment); the
    shape, strides and block are the template's, checked when it was built.
    """
    descriptor = object.__new__(type(template))
    descriptor.__dict__.update(template.__dict__, base=base)
    return descriptor


def on_device(device_index: int):
    """The device's context only when it is not current already (entering one costs host time)."""
    if device_index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device_index)
