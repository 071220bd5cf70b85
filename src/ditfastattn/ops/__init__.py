"""Head-wise attention op: every head of one launch runs its own mode (full, skip, arrow band, tile
window, pooled keys).

The public entry point validates and dispatches; the implementations live in ``_reference`` (pure
PyTorch, the oracle, any device), ``_triton`` (fused GPU kernel) and ``_gluon`` (warp-specialised
Hopper kernel, head dims 64 and 128). None imports another (``_launch`` is the launch helper the
two GPU kernels share, ``_item_order`` the Gluon kernel's order of video query tiles). Every
implementation takes the token layout as its image segment ``(image_start, image_len)``, global
tokens elsewhere, and optional key :class:`Padding`. Tile
windows need the image's grid: the reference indexes it directly; for the GPU kernels the
dispatcher puts the key padding flags in tile order (``_tile_order``, the one place that
reorders), and keys and values too for the Triton kernel (the Gluon kernel reads them in place:
``TILES_IN_PLACE``), and launches the kernel twice, once for the tile heads and once for the others. The per-head
Pool heads run in the reference; under the GPU kernels those whose factor divides
the grid's rows and cols run in the plain launch, their image keys and values read from a buffer of
patch means the dispatcher builds (``_pool_means``, a Triton kernel); the others on PyTorch's SDPA
(``_pooled``), the kernel launched with them skipped. The per-head
statistics calibration scores candidates with (:func:`head_squared_errors`, :func:`head_variances`)
dispatch the same way, in ``_stats``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
from dataclasses import dataclass

import torch

# The geometry a mode computes (density, window_blocks, TileGrid) is public for benchmarks and
# tools that count FLOPs; _geometry is its one home.
from .._geometry import (
    IMAGE_BLOCK, MAX_POOL_FACTOR, MODE_FULL, MODE_SKIP, POOL_FLAG, POOL_SLOT_SHIFT, TILE_BITS, TILE_FLAG, TileGrid,
    density, is_pool_mode, is_tile_mode, pool_factor, pool_mode, tile_mode, window_blocks,
)
from ..model import TokenLayout
from ._host_copy import device_tensor
from ._stats import head_squared_errors, head_variances

__all__ = [
    "headwise_attention", "IMPLEMENTATIONS", "IMAGE_BLOCK", "KEY_PADDING", "MODE_FULL", "MODE_SKIP", "PAIR_PADDING",
    "Padding", "TileGrid", "TokenLayout", "check_mode_values", "density", "gluon_available", "head_squared_errors",
    "head_variances", "impl_unsupported", "mode_tensor", "pool_mode", "tile_mode", "triton_available", "window_blocks",
]

logger = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "reference", "triton", "gluon")
_TRITON_DTYPES = (torch.float16, torch.bfloat16)
_TRITON_HEAD_DIMS = (32, 64, 128)
_auto_notes: set[str] = set()

# Additive score biases indexed [query is padding][key is padding] (see Padding).
KEY_PADDING = ((0.0, -math.inf), (0.0, -math.inf))
PAIR_PADDING = ((0.0, -math.inf), (-math.inf, -math.inf))


@dataclass(frozen=True, eq=False)
class Padding:
    """Which tokens of each batch element are padding, and how padding enters the scores.

    ``mask`` is ``(B, S)`` bool, True at padding tokens. ``bias[query is padding][key is padding]``
    is added to the scaled scores (natural-log units; ``-inf`` never attends), as torch's SDPA adds
    a float mask. A row whose every visible key is at ``-inf`` outputs 0 and log-sum-exp ``-inf``,
    as SDPA gives a fully masked row.

    - :data:`KEY_PADDING` (default): padded keys are never attended; every query, padded ones too,
      attends to the rest. A key mask ``(B, 1, 1, S)``: Qwen-Image, Z-Image, HunyuanImage 2.1.
    - :data:`PAIR_PADDING`: padded queries attend to nothing either (output 0). A boolean mask
      ``m_q & m_k``, as Chroma's blocks build from a boolean token mask.
    - ``((1, 0), (0, 0))``: the float mask ``m_q * m_k`` of 0/1 that diffusers 0.42's Chroma
      pipeline passes (SDPA adds it: +1 between two real tokens, nothing masked).

    ``global_only``: the caller has checked that no token of the image segment is padding (only
    global tokens, such as a text's tail, are), so the Gluon kernel's tile launch checks padding on
    the global key tiles alone. Left False, every key tile is checked; set it True only as the
    runtime does, from a read of the mask: an image token padded under it would be attended.
    """

    mask: torch.Tensor
    bias: tuple = KEY_PADDING
    global_only: bool = False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> str | None:
    """None when the Triton kernel can run here, otherwise the reason it cannot."""
    try:
        from . import _triton  # noqa: F401
    except ImportError as err:  # triton missing
        return f"triton cannot be imported ({err})"
    except AttributeError as err:  # a triton older than the APIs the kernel uses (triton.knobs: 3.4)
        return f"this triton lacks an API the kernel uses ({err}); install triton >= 3.4"
    return None


def _triton_reason(device: torch.device, dtype: torch.dtype, head_dim: int | None) -> str | None:
    if device.type != "cuda" and not _interpreting():
        return f"tensors are on {device.type}; the Triton kernel needs CUDA (or TRITON_INTERPRET=1)"
    if dtype not in _TRITON_DTYPES:
        return f"dtype {dtype} is not supported by the Triton kernel (use float16 or bfloat16)"
    if head_dim is not None and head_dim not in _TRITON_HEAD_DIMS:
        return f"head dim {head_dim} is not supported by the Triton kernel (supported: {_TRITON_HEAD_DIMS})"
    return triton_available()


def _triton_unsupported(q: torch.Tensor) -> str | None:
    return _triton_reason(q.device, q.dtype, q.shape[-1])


# The kernel passes its partitions to gl.warp_specialize as (function, args) pairs, the form Gluon
# took in Triton 3.6; 3.5 imports fine and fails at compile time.
_GLUON_MIN_TRITON = (3, 6)


@functools.cache
def gluon_available() -> str | None:
    """None when the Gluon kernel can be built here (on any device), otherwise the reason it cannot."""
    try:
        import triton

        from . import _gluon  # noqa: F401
    except ImportError as err:  # triton missing, or without Gluon's Hopper API
        return f"triton.experimental.gluon (Hopper) cannot be imported ({err})"
    version = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", triton.__version__).groups())
    if version < _GLUON_MIN_TRITON:
        return (f"the Gluon kernel needs triton >= {'.'.join(map(str, _GLUON_MIN_TRITON))} (its Gluon API); "
                f"triton {triton.__version__} is installed")
    return None


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _gluon_reason(device: torch.device, dtype: torch.dtype, head_dim: int | None) -> str | None:
    if device.type != "cuda":
        return f"tensors are on {device.type}; the Gluon kernel needs a CUDA GPU of compute capability 9.0 (Hopper)"
    capability = _capability(device.index if device.index is not None else torch.cuda.current_device())
    if capability != (9, 0):
        return f"the Gluon kernel needs compute capability 9.0 (Hopper: wgmma, setmaxnreg); this GPU has {capability}"
    if dtype not in _TRITON_DTYPES:
        return f"dtype {dtype} is not supported by the Gluon kernel (use float16 or bfloat16)"
    reason = gluon_available()
    if reason is not None:
        return reason
    from . import _gluon

    if head_dim is not None and head_dim not in _gluon.HEAD_DIMS:
        return (f"head dim {head_dim} is not supported by the Gluon kernel (only {_gluon.HEAD_DIMS}; "
                "impl='triton' covers 32/64/128)")
    return None


def impl_unsupported(impl: str, device, dtype: torch.dtype, head_dims=None) -> str | None:
    """Why an explicitly chosen ``impl`` cannot run on ``device`` in ``dtype`` (at ``head_dims``, when
    given), or None. For checks before long work; the Gluon kernel's stride needs are per call."""
    device = torch.device(device)
    reason = {"triton": _triton_reason, "gluon": _gluon_reason}.get(impl)
    if reason is None:
        return None
    dims = sorted(set(head_dims)) if head_dims else [None]
    return next(filter(None, (reason(device, dtype, dim) for dim in dims)), None)


def _gluon_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    reason = _gluon_reason(q.device, q.dtype, q.shape[-1])
    if reason is not None:
        return reason
    from . import _gluon

    for name, t in (("q", q), ("k", k), ("v", v)):
        if _gluon.view_coeffs(t) is None:
            return (f"{name} has strides {tuple(t.stride())} that allow no 2-D TMA view (the Gluon kernel needs "
                    "a unit head-dim stride, 16-byte aligned rows, and batch/head strides that are whole rows "
                    "or fit in one row; impl='triton' takes any strides)")
    return None


def _note_once(message: str, chosen: str = "the reference") -> None:
    if message not in _auto_notes:
        _auto_notes.add(message)
        logger.info("impl='auto' uses %s: %s", chosen, message)


def _gluon_layout_reason(padding: Padding | None, tiles: TileGrid | None = None) -> str | None:
    """Why the Gluon kernel cannot take this padding or (tile heads running) tile grid, or None; asked
    only where the kernel imports."""
    from . import _gluon

    if padding is not None and _gluon.pair_table(padding.bias) is None:
        return (f"the Gluon kernel does not take the padding bias {padding.bias}, under which a query attends to "
                "padded keys only (impl='triton' takes any)")
    if tiles is not None and any(n >= limit for n, limit in zip(tiles.counts, _gluon.TILE_COUNT_LIMITS)):
        return (f"the Gluon kernel takes at most {[n - 1 for n in _gluon.TILE_COUNT_LIMITS]} tiles along frames, "
                f"rows and cols; the grid {tiles.grid} in tiles of {tiles.tile} has {tiles.counts} "
                "(impl='triton' takes any)")
    return None


_MODE_VALUES = ("-2 (skip), -1 (full), 0 <= w < 2**29 (an arrow of half-width w blocks), ops.pool_mode(p) "
                f"(pooled keys, p in [2, {MAX_POOL_FACTOR}]) or ops.tile_mode(wt, wh, ww) (a tile window)")
# (tensor version, host values) of a GPU head-mode tensor when last read, so that a reused tensor
# costs one host read (a wait for the GPU's queued work), not one per call.
_VALUES = "_ditfastattn_values"


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter: read at every call
        return None


def _valid_mode(mode: int) -> bool:
    if is_pool_mode(mode):  # bit 29 set (below the tile flag): the low bits must be a factor pool_mode gives
        return 2 <= pool_factor(mode) <= MAX_POOL_FACTOR
    return MODE_SKIP <= mode < TILE_FLAG + (1 << 3 * TILE_BITS)


def check_mode_values(values) -> None:
    """Raise ValueError unless every head mode (host ints) is -2 (skip), -1 (full), an arrow half-width
    ``0 <= w < 2**29``, a :func:`pool_mode` or a :func:`tile_mode`."""
    bad = sorted({int(m) for m in values if not _valid_mode(int(m))})
    if bad:
        raise ValueError(f"head_modes values must be {_MODE_VALUES}; got {bad}")


def mode_tensor(values, device) -> torch.Tensor:
    """An int32 head-mode tensor made from host values, checked here so that the op never reads a GPU
    one back (a CPU one it reads at every call, which costs no wait)."""
    values = tuple(int(m) for m in values)
    check_mode_values(values)
    with torch.inference_mode(False):  # a normal tensor, whose version counter marks it read
        modes = device_tensor(values, torch.int32, device)
    setattr(modes, _VALUES, (modes._version, values))
    return modes


def _mode_values(head_modes: torch.Tensor) -> tuple[int, ...] | None:
    """The head modes on the host, checked; None where no host read is possible (tracing, CUDA
    graph capture), where the kernels skip out-of-range modes."""
    if torch.compiler.is_compiling() or (head_modes.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    # A CPU tensor is read at every call (no wait to save): writes that keep its version, through
    # .numpy() or .data, are seen too.
    version = None if head_modes.device.type == "cpu" else _version(head_modes)
    known = getattr(head_modes, _VALUES, None)
    if version is not None and known is not None and known[0] == version:
        return known[1]
    values = tuple(head_modes.tolist())
    check_mode_values(values)
    if version is not None:
        setattr(head_modes, _VALUES, (version, values))
    return values


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@functools.lru_cache(maxsize=1024)
def _text_layout(seq: int, text_start: int, text_len: int) -> TokenLayout:
    return TokenLayout.from_text(seq, text_start, text_len)


def _layout(seq: int, text_start, text_len, segments, grid, tile) -> TokenLayout:
    layout = _segments_layout(seq, text_start, text_len, segments)
    if grid is None and tile is None:
        return layout
    if layout.grid is not None:
        raise ValueError("give the grid once: grid= (and tile=), or a segments TokenLayout that has one, not both")
    if grid is None:
        raise ValueError("tile= needs the image grid: pass grid=(frames, rows, cols) too")
    return TokenLayout(layout.seq_len, layout.image_start, layout.image_len, grid, tile)


def _segments_layout(seq: int, text_start, text_len, segments) -> TokenLayout:
    if segments is not None:
        if text_start is not None or text_len is not None:
            raise ValueError("give the token layout once: text_start= and text_len=, or segments=, not both")
        if isinstance(segments, TokenLayout):
            if segments.seq_len != seq:
                raise ValueError(f"the layout is for {segments.seq_len} tokens; q has {seq}")
            return segments
        return TokenLayout.from_segments(seq, segments)
    if text_start is None or text_len is None:
        raise TypeError("give the token layout: text_start= and text_len= (one text segment at the start or the "
                        "end), or segments=[(start, length), ...] (the global segments)")
    if not (_is_int(text_start) and _is_int(text_len)):
        raise TypeError(f"text_start and text_len must be ints; got {text_start!r}, {text_len!r}")
    return _text_layout(seq, text_start, text_len)


def _padding(key_padding, batch: int, seq: int, device) -> Padding | None:
    if key_padding is None:
        return None
    padding = key_padding if isinstance(key_padding, Padding) else Padding(key_padding)
    mask = padding.mask
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (batch, seq):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"key_padding must be a bool tensor (batch, seq) = ({batch}, {seq}), True at padding; got {got}")
    if mask.device != device:
        raise ValueError(f"key_padding must be on q's device {device}; got {mask.device}")
    if not isinstance(padding.global_only, bool):
        raise TypeError(f"Padding.global_only must be True or False; got {padding.global_only!r}")
    bias = padding.bias
    try:
        ok = len(bias) == 2 and all(len(row) == 2 for row in bias)
        values = [float(x) for row in bias for x in row] if ok else []
    except (TypeError, ValueError):
        ok = False
    # The scores add up in float32: a bias past its range would be inf there, and inf - inf NaN.
    largest = torch.finfo(torch.float32).max
    if not ok or any(math.isnan(x) or x > largest for x in values):
        raise ValueError(f"padding bias must be 2 x 2 numbers (no NaN, nothing above float32's largest {largest:.3e}, "
                         f"-inf never attends), [query padded][key padded]; got {bias!r}")
    values = [-math.inf if x < -largest else x for x in values]  # what float32 rounds them to
    table = ((values[0], values[1]), (values[2], values[3]))  # hashable floats: the kernels key on it
    same = type(bias) is tuple and all(type(row) is tuple for row in bias) and bias == table
    return padding if same else dataclasses.replace(padding, bias=table)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (one shape and dtype) share memory: exact where their strides agree
    and nest (the views of one fused qkv projection interleave without sharing an element), else
    whether their spans meet."""
    if a.numel() == 0:
        return False
    size, offset = a.element_size(), a.data_ptr() - b.data_ptr()

    def extent(t):
        return size * (1 + sum(stride * (n - 1) for stride, n in zip(t.stride(), t.shape)))

    if not -extent(a) < offset < extent(b):
        return False
    # (stride, largest index) of the dims that move in memory, the largest stride first.
    dims = sorted(((stride, n - 1) for stride, n in zip(a.stride(), a.shape) if n > 1 and stride > 0), reverse=True)
    spans = [sum(stride * last for stride, last in dims[i:]) for i in range(len(dims) + 1)]
    nested = all(stride > spans[i + 1] for i, (stride, _) in enumerate(dims))
    if offset % size or a.stride() != b.stride() or not nested:
        return True

    def reaches(gap: int, i: int) -> bool:
        """Whether ``gap`` is a sum of ``c * stride`` over dims ``i`` on, each ``|c|`` at most the dim's
        largest index."""
        if i == len(dims):
            return gap == 0
        stride, last = dims[i]
        # |gap - c * stride| <= spans[i + 1]: at most two c, as each stride exceeds the smaller dims' span.
        low, high = max(-last, -((spans[i + 1] - gap) // stride)), min(last, (gap + spans[i + 1]) // stride)
        return any(reaches(gap - c * stride, i + 1) for c in range(low, high + 1))

    return reaches(offset // size, 0)


def _check(q, k, v, head_modes, text_start=None, text_len=None, out=None, *, scale=None, check_values=True,
           segments=None, key_padding=None, grid=None, tile=None):
    """The one input check of every implementation; ``check_values`` reads ``head_modes`` on the host.

    Returns the call's :class:`TokenLayout`, :class:`Padding` (or None) and the head modes on the
    host (None when not read).
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("head_modes", head_modes)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be (batch, seq, heads, head_dim); got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"q, k, v must share one floating dtype (fp16, bf16, fp32, fp64); got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == head_modes.device):
        raise ValueError(
            f"q, k, v and head_modes must be on one device; got {q.device}, {k.device}, {v.device}, {head_modes.device}"
        )
    batch, seq, heads, head_dim = q.shape
    if head_dim < 1:
        raise ValueError(f"q, k, v need a head dim of at least 1; got shape {tuple(q.shape)}")
    if head_modes.dtype != torch.int32 or head_modes.shape != (heads,):
        raise ValueError(f"head_modes must be int32 of shape ({heads},); got {head_modes.dtype} {tuple(head_modes.shape)}")
    layout = _layout(seq, text_start, text_len, segments, grid, tile)
    padding = _padding(key_padding, batch, seq, q.device)
    if scale is not None and not (
        isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0
    ):
        raise ValueError(f"scale must be a finite number > 0 (or None for 1 / sqrt(head_dim)); got {scale!r}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor or None; got {type(out).__name__}")
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(
                f"out must match q: {tuple(q.shape)} {q.dtype} on {q.device}; "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}"
            )
        if not torch.compiler.is_compiling():  # traced tensors have no memory
            # As torch refuses an output with internal overlap: an expanded out would take every
            # batch element's or head's result in one place.
            expanded = [d for d, (n, stride) in enumerate(zip(out.shape, out.stride())) if n > 1 and stride == 0]
            if expanded:
                raise ValueError(f"out's dims {expanded} have stride 0 (an expanded tensor), so its elements share "
                                 "memory: pass a tensor with memory of its own for every element (or out=None)")
            # The kernels write out's rows while other programs still read k and v, and q's other rows.
            shared = [name for name, t in (("k", k), ("v", v)) if _overlap(out, t)]
            if _overlap(out, q) and not (out.data_ptr() == q.data_ptr() and out.stride() == q.stride()):
                shared.insert(0, "q")
            if shared:
                raise ValueError(f"out shares memory with {' and '.join(shared)}, which the op reads while it writes "
                                 "out: pass a separate tensor as out (or q itself)")
    values = _mode_values(head_modes) if check_values else None
    if values is not None and layout.grid is None and any(is_tile_mode(m) for m in values):
        raise ValueError(
            f"heads {[h for h, m in enumerate(values) if is_tile_mode(m)]} run tile windows, which need the image "
            "grid: pass grid=(frames, rows, cols) (and tile= for another tile shape than the default), or "
            "segments=TokenLayout(..., grid=...)"
        )
    pool_groups = () if values is None else _pool_split(values, None)[0]  # cached: no loop over heads per call
    if pool_groups and (layout.grid is None or padding is not None):
        pooled = [h for _, heads in pool_groups for h in heads]
        if layout.grid is None:
            raise ValueError(f"heads {pooled} run pooled keys, which need the image grid: pass grid=(frames, rows, "
                             "cols) or segments=TokenLayout(..., grid=...)")
        raise ValueError(f"heads {pooled} run pooled keys, which take no key padding (a patch mean would mix padded "
                         "keys in): use arrow or tile windows where the call pads its tokens")
    return layout, padding, values


def headwise_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_modes: torch.Tensor,
    *,
    text_start: int | None = None,
    text_len: int | None = None,
    segments=None,
    key_padding=None,
    out: torch.Tensor | None = None,
    scale: float | None = None,
    impl: str = "auto",
    return_lse: bool = False,
    grid=None,
    tile=None,
    global_rows: bool = True,
):
    """Joint attention of global (text, reference-image) and image tokens, each head in its own mode.

    Args:
        q, k, v: ``(B, S, H, D)`` tensors (strided views are fine), one dtype and device.
        head_modes: int32 ``(H,)`` on q's device: ``-1`` full, ``-2`` skip, ``0 <= w < 2**29`` arrow
            whose image queries in block ``i`` see image key blocks ``|i - j| <= w`` and all global
            keys; global queries see every key. Image blocks are ``IMAGE_BLOCK`` (128) tokens counted
            from the first image token. :func:`tile_mode` ``(wt, wh, ww)`` is a tile window (needs
            ``grid``): image queries in tile ``(a, b, c)`` see the image keys of the tiles within
            ``wt``, ``wh``, ``ww`` tiles along frames, rows and cols, and all global keys.
            :func:`pool_mode` ``(p)`` is pooled keys (needs ``grid``, takes no ``key_padding``):
            image queries see all global keys, the image keys and values averaged over each whole
            ``p x p`` patch of a frame (each mean weighted ``p * p``), and the image tokens of the
            partial patches at the grid's edges; global queries see every key. Under the GPU impls
            pool heads whose ``p`` divides the grid's rows and cols run in the fused kernel; the
            others on PyTorch's SDPA (cuDNN first; flash attention when the log-sum-exp is asked
            for). Either way they need host-readable modes: not under tracing or CUDA graph capture.
            Other values raise ValueError (values from ``2**29`` up are pool and tile modes: make
            them with those functions). Checking them reads a CPU tensor at every call, a GPU
            tensor once per tensor version (a read waits for the GPU): change a GPU tensor's modes
            with tensor ops (``m[0] = 3``, ``m.copy_(...)``), which count a version, or pass a new
            tensor; a write through ``.data`` goes unseen. None is read for tensors from
            :func:`mode_tensor` on a GPU, under tracing or CUDA graph capture (where the kernels
            skip out-of-range modes, and tile heads without a grid).
        text_start, text_len: the one global (text) segment ``[text_start, text_start + text_len)``,
            at the start (FLUX) or the end (SD3) of the sequence. ``text_len`` may be 0.
        segments: instead of ``text_start``/``text_len``, every global segment as ``(start, length)``
            pairs (or a :class:`TokenLayout`); the tokens they leave must be one image segment, e.g.
            FLUX.1 Kontext's ``[(0, 512), (4608, 4096)]``: text, image, reference image.
        key_padding: ``(B, S)`` bool, True at padding tokens, which no query attends (a key mask); or
            a :class:`Padding` for boolean and float masks between queries and keys.
        grid, tile: the image segment as ``(frames, rows, cols)`` latent patches in raster order, and
            the tile shape of tile windows (``t * h * w == 128``; by default of 2 x 8 x 8 (video
            only), 1 x 8 x 16 and 1 x 16 x 8 the first that leaves the fewest pad slots); a
            :class:`TokenLayout` given as ``segments`` may carry both. Tiles at the grid's far edges
            may be partial.
        out: ``(B, S, H, D)`` output written in place; skip heads leave their slice untouched, so
            plans with skip heads need it. Allocated when omitted. It may be ``q`` itself, but share
            no other memory with ``q``, ``k`` or ``v`` (ValueError).
        scale: softmax scale (finite, > 0), ``1 / sqrt(D)`` by default.
        impl: ``"reference"``, ``"triton"``, ``"gluon"`` (Hopper only: sm_90, head dim 64 or 128,
            fp16/bf16, q/k/v strides that allow a TMA view, global segments on either side of the
            image, tile windows, padding under any bias table but one where a query kind attends to
            padded keys only), or ``"auto"``
            (on CUDA the Gluon kernel where it supports the call, else Triton where it does, else
            the reference, logged once; the reference on the CPU). An explicit impl never falls
            back. ``"triton"`` runs on the CPU only under ``TRITON_INTERPRET=1``.
        return_lse: also return the float32 log-sum-exp ``(B, H, S)`` of every computed row
            (``-inf`` for skip heads and fully masked rows), for merging partial results.
        global_rows: False leaves the global-query rows of arrow, tile and pool heads unwritten: they
            attend to every key, so they are full attention's rows, which a caller holding the
            full output need not compute again (calibration scores candidates on the image rows).
            Full heads write every row. Not with ``return_lse``.

    Returns:
        ``out``, or ``(out, lse)`` when ``return_lse``.
    """
    return _attention(q, k, v, head_modes, text_start, text_len, out, scale, impl, return_lse, check_values=True,
                      segments=segments, key_padding=key_padding, grid=grid, tile=tile, global_rows=global_rows)


def _attention(q, k, v, head_modes, text_start, text_len, out, scale, impl, return_lse, *, check_values: bool,
               segments=None, key_padding=None, grid=None, tile=None, global_rows=True, pool_slots=None,
               tile_heads=True):
    # pool_slots (the custom op, without host values): ``(((p, heads), ...), slot heads)``, the fused
    # pool heads that ``head_modes`` names by their slots, as _pool_split would give them; tile_heads
    # False: no head is a tile window (the grid is the pool heads').
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}; got {impl!r}")
    if not isinstance(global_rows, bool):
        raise TypeError(f"global_rows must be True or False; got {global_rows!r}")
    if return_lse and not global_rows:
        raise ValueError("return_lse needs every row computed: pass global_rows=True")
    layout, padding, values = _check(q, k, v, head_modes, text_start, text_len, out, scale=scale,
                                     check_values=check_values, segments=segments, key_padding=key_padding,
                                     grid=grid, tile=tile)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if out is None:
        # A host sync without host values, only on this convenience path: the runtime always passes `out`.
        has_skip = bool((head_modes == MODE_SKIP).any()) if values is None else MODE_SKIP in values
        if has_skip:
            raise ValueError("head_modes contains skip heads (-2): pass `out`, whose skipped slices are kept")
        out = torch.empty_like(q)
    # Whether tile heads may run: on a gridded layout, unless the host values show none.
    tiled = layout.grid is not None and (tile_heads if values is None else any(is_tile_mode(m) for m in values))
    tile_grid = layout.tile_grid() if tiled else None

    if impl == "auto":
        # The interpreter is for testing the kernel, never an automatic choice on the CPU.
        if q.device.type != "cuda":
            impl = "reference"
        else:
            gluon_reason = _gluon_unsupported(q, k, v)
            padding_reason = None if gluon_reason is not None else _gluon_layout_reason(padding, tile_grid)
            if gluon_reason is None and padding_reason is None:
                # Measured on an H100 (docs/history/KERNEL_NOTES.md): faster than the Triton kernel on
                # every head-dim-128 plan, dense 1.12-1.22x, sparse 1.04-1.20x.
                impl = "gluon"
            else:
                reason = _triton_unsupported(q)
                impl = "triton" if reason is None else "reference"
                if reason is not None:
                    _note_once(reason)
                elif gluon_reason is None:
                    _note_once(padding_reason, "the Triton kernel")
    elif impl == "triton":
        reason = _triton_unsupported(q)
        if reason is not None:
            raise RuntimeError(f"impl='triton' cannot run: {reason}. Use impl='reference' or impl='auto'.")
    elif impl == "gluon":
        reason = _gluon_unsupported(q, k, v) or _gluon_layout_reason(padding, tile_grid)
        if reason is not None:
            raise RuntimeError(f"impl='gluon' cannot run: {reason}. Use impl='triton', impl='reference' or impl='auto'.")

    segment = (layout.image_start, layout.image_len)
    if impl == "reference":
        from . import _reference

        pool = (head_modes >= POOL_FLAG) & (head_modes < TILE_FLAG)
        if pool_slots is not None:  # the reference reads plain pool modes
            head_modes = torch.where(pool, POOL_FLAG | (head_modes & ((1 << POOL_SLOT_SHIFT) - 1)), head_modes)
        elif values is None:
            # The custom op without pool slots: no patch means are made, and the kernels run such a
            # head as full attention (under the call's padding too); so does the oracle.
            head_modes = torch.where(pool, MODE_FULL, head_modes)
        out, lse = _reference.attention(q, k, v, head_modes, *segment, out, scale, return_lse, padding,
                                        layout.tile_grid(), global_rows=global_rows)
    else:
        if impl == "gluon":
            from . import _gluon as kernel
        else:
            from . import _triton as kernel
        pooled, kernel_values, kernel_idle, fused = (((), values, False, ()) if values is None
                                                     else _pool_split(values, layout.grid))
        if pooled or fused:  # the kernel skips SDPA's heads and names its own by their buffer slots
            values = kernel_values
            head_modes, slot_heads = _kernel_modes(head_modes, values, fused)
        elif pool_slots is not None:
            fused, slot_heads = pool_slots
        means = None
        if fused:
            from ._pool_means import kernel_means

            # Static mode's slots hold every head that pools at some step: make those its modes name now.
            means = kernel_means(k, v, fused, slot_heads, layout.image_start, layout.tile_grid(),
                                 head_modes if pool_slots is not None else None)
        lse = None
        if not (pooled and kernel_idle) or return_lse:
            out, lse = _launches(kernel, q, k, v, head_modes, layout, out, scale, return_lse, padding, values, tiled,
                                 global_rows, means)
        if pooled:
            from . import _pooled

            if return_lse and lse is None:
                lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), -math.inf, dtype=torch.float32, device=q.device)
            for mode, heads in pooled:
                _pooled.attention(q, k, v, heads, pool_factor(mode), layout.image_start, layout.tile_grid(), out, scale,
                                  lse, global_rows=global_rows)
    return (out, lse) if return_lse else out


# A plan's rows are distinct per layer and step (FLUX, 50 steps: 57 x 50): room for all of them.
@functools.lru_cache(maxsize=8192)
def _pool_split(values: tuple[int, ...], fusable: tuple[int, int, int] | None):
    """Where pool heads run, once per host modes (a plan has few distinct rows: no loop over heads
    per call): ``((pool mode, its heads), ...)`` on SDPA; the kernel's modes, with those heads
    skipped and the fused ones named by their slot in the patch-mean buffer
    (``POOL_FLAG | slot << POOL_SLOT_SHIFT | p``); whether the kernel's modes are all skip; and
    ``((p, its heads), ...)`` fused, in slot order. A head is fused where ``fusable``, the call's grid
    (None: none fused), has rows and cols that ``p`` divides (no loose tokens)."""
    groups = {}
    for head, mode in enumerate(values):
        if is_pool_mode(mode):
            groups.setdefault(mode, []).append(head)

    def whole(factor):
        return fusable is not None and fusable[1] % factor == 0 and fusable[2] % factor == 0

    fused = tuple((pool_factor(mode), tuple(heads)) for mode, heads in groups.items() if whole(pool_factor(mode)))
    sdpa = tuple((mode, tuple(heads)) for mode, heads in groups.items() if not whole(pool_factor(mode)))
    kernel_values = [MODE_SKIP if is_pool_mode(m) else m for m in values]
    slot = 0
    for factor, heads in fused:
        for head in heads:
            kernel_values[head] = POOL_FLAG | slot << POOL_SLOT_SHIFT | factor
            slot += 1
    kernel_values = tuple(kernel_values)
    idle = all(m == MODE_SKIP for m in kernel_values)
    return sdpa, kernel_values, idle, fused


# (tensor version, kernel modes, mode tensor, slot heads) of a head-mode tensor, when last made.
_KERNEL_MODES = "_ditfastattn_kernel_modes"


def _kernel_modes(head_modes: torch.Tensor, values: tuple[int, ...], fused) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``values`` (the kernel's modes, from :func:`_pool_split`) as a mode tensor, and the head of
    each slot of the fused pool heads ``fused`` as an int32 tensor (None without), made once per
    version of ``head_modes`` and kernel modes (which heads fuse depends on the call's grid): a copy
    from the host's pageable memory at every call would wait for the GPU to reach it."""
    version = _version(head_modes)
    known = getattr(head_modes, _KERNEL_MODES, None)
    if version is not None and known is not None and known[:2] == (version, values):
        return known[2], known[3]
    # From checked values: its slot-named pool modes are the kernels' own, which check_mode_values refuses from users.
    modes = device_tensor(values, torch.int32, head_modes.device)
    slot_heads = None
    if fused:
        slot_heads = device_tensor([h for _, heads in fused for h in heads], torch.int32, head_modes.device)
    if version is not None:
        setattr(head_modes, _KERNEL_MODES, (version, values, modes, slot_heads))
    return modes, slot_heads


def _launches(kernel, q, k, v, head_modes, layout, out, scale, return_lse, padding, values, tiled, global_rows,
              means=None):
    """A GPU kernel's launches (``kernel``: the Triton or the Gluon module, the same interface): the
    tile heads over keys and values in tile order, the other heads (and the skip heads'
    log-sum-exps, the fused pool heads over ``means``) over the call's own; a launch the host
    values show empty is left out."""
    segment = (layout.image_start, layout.image_len)
    lse = None
    plain = values is None or any(not is_tile_mode(m) and (m != MODE_SKIP or return_lse) for m in values)
    if plain or not tiled:
        fused = {} if means is None else {"pooled": means}
        out, lse = kernel.attention(q, k, v, head_modes, *segment, out, scale, return_lse, padding,
                                    global_rows=global_rows, **fused)
    if tiled:
        from ._tile_order import tiled_keys

        keys = tiled_keys(k, v, None if padding is None else padding.mask, layout, gather=not kernel.TILES_IN_PLACE)
        order = {"modes": values} if kernel.ORDERS_TILES else {}
        out, lse = kernel.attention(q, k, v, head_modes, *segment, out, scale, return_lse, padding, tiled=keys,
                                    lse=lse, global_rows=global_rows, **order)
    return out, lse


@torch.library.custom_op("ditfastattn::headwise_attention_", mutates_args=("out",))
def headwise_attention_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_modes: torch.Tensor,
    text_start: int,
    text_len: int,
    out: torch.Tensor,
    scale: float,
    impl: str,
    grid: list[int] | None = None,
    tile: list[int] | None = None,
    segments: list[int] | None = None,
    key_padding: torch.Tensor | None = None,
    padding_bias: list[float] | None = None,
    pool_groups: list[int] | None = None,
    pool_heads: torch.Tensor | None = None,
    tile_heads: bool = True,
) -> None:
    """:func:`headwise_attention` into ``out``, as a torch custom op: opaque to torch.compile.

    It does not read ``head_modes`` back (no host sync inside a compiled step): static mode checks
    its mode tables when it builds them, and the kernels skip out-of-range modes. ``grid`` and
    ``tile`` (3 ints each) let tile heads run; pass them only where some head may be a tile window,
    as with them the Triton kernel gathers the keys into tile order at every call. ``segments``
    (start, length, start, length, ...: every global segment) replaces ``text_start`` and
    ``text_len``, which must then be 0. ``key_padding`` is the ``(B, S)`` bool padding mask and
    ``padding_bias`` its 2 x 2 bias table flattened (default :data:`KEY_PADDING`); see :class:`Padding`.
    ``pool_groups`` (p, count, its heads..., p, count, ...) and ``pool_heads`` (int32, the head of each
    slot on q's device) are the pool heads the kernels run, which ``head_modes`` names by their slots
    (``POOL_FLAG | slot << POOL_SLOT_SHIFT | p``, slots in the groups' order); every ``p`` must divide
    the grid's rows and cols; a plain pool mode (no slot) gets no patch means and runs as full
    attention. ``tile_heads=False`` says no head is a tile window (the grid is for pool heads),
    which spares the tiled launch.
    """
    if segments is not None and (text_start or text_len):
        raise ValueError("give the token layout once: text_start and text_len, or segments (with 0, 0)")
    if padding_bias is not None and key_padding is None:
        raise ValueError("padding_bias needs key_padding")
    layout = _op_layout(q.shape[1], text_start, text_len, *(None if t is None else tuple(t) for t in (grid, tile, segments)))
    padding = None
    if key_padding is not None:
        if padding_bias is not None and len(padding_bias) != 4:
            raise ValueError(f"padding_bias must be 4 numbers, [query padded][key padded] flattened; got {padding_bias!r}")
        bias = KEY_PADDING if padding_bias is None else (tuple(padding_bias[:2]), tuple(padding_bias[2:]))
        padding = Padding(key_padding, bias)
    if (pool_groups is None) != (pool_heads is None):
        raise ValueError("pool_groups and pool_heads come together")
    if pool_groups is not None and key_padding is not None:
        raise ValueError("pooled keys take no key padding (a patch mean would mix padded keys in)")
    pool_slots = None
    if pool_groups is not None:
        fused = _pool_groups(tuple(pool_groups), layout.grid)
        if pool_heads.dtype != torch.int32 or pool_heads.shape != (sum(len(h) for _, h in fused),):
            raise ValueError(f"pool_heads must be int32, one head per slot of pool_groups; got {pool_heads.dtype} "
                             f"{tuple(pool_heads.shape)}")
        pool_slots = (fused, pool_heads)
    _attention(q, k, v, head_modes, None, None, out, scale, impl, False, check_values=False, segments=layout,
               key_padding=padding, pool_slots=pool_slots, tile_heads=tile_heads)


@functools.lru_cache(maxsize=256)
def _pool_groups(flat: tuple[int, ...], grid: tuple[int, int, int] | None) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """The custom op's ``pool_groups`` as ``((p, heads), ...)``, checked once per plan layer."""
    groups, at = [], 0
    while at < len(flat):
        factor, count = flat[at:at + 2]
        heads = flat[at + 2:at + 2 + count]
        if len(heads) != count or count < 1:
            raise ValueError(f"pool_groups must be p, count and count heads per group; got {list(flat)}")
        if grid is None or grid[1] % factor or grid[2] % factor:
            raise ValueError(f"pool_groups: p = {factor} must divide the grid's rows and cols; got grid {grid}")
        groups.append((factor, tuple(heads)))
        at += 2 + count
    return tuple(groups)


@functools.lru_cache(maxsize=256)
def _op_layout(seq: int, text_start: int, text_len: int, grid: tuple | None, tile: tuple | None,
               segments: tuple | None) -> TokenLayout:
    # Built (and checked) once per shape: the custom op gets plain ints at every call.
    if segments is None:
        return _layout(seq, text_start, text_len, None, grid, tile)
    if len(segments) % 2:
        raise ValueError(f"segments must be (start, length) pairs flattened; got {len(segments)} ints")
    pairs = [tuple(segments[i:i + 2]) for i in range(0, len(segments), 2)]
    return _layout(seq, None, None, pairs, grid, tile)


@headwise_attention_.register_fake
def _headwise_attention_fake(q, k, v, head_modes, text_start, text_len, out, scale, impl, grid=None, tile=None,
                             segments=None, key_padding=None, padding_bias=None, pool_groups=None, pool_heads=None,
                             tile_heads=True) -> None:
    return None
