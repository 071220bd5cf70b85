"""The token layout and padding of one layer call, in the forms the op and the sessions take."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from .. import ops
from ..model import TokenLayout


@dataclass(frozen=True, eq=False)
class CallGeometry:
    """The token layout and padding of one layer call, in the forms the op and sessions take.

    ``op`` holds the op's keyword arguments (the layout itself when it has several global segments,
    padding or a grid). ``text_start`` and ``text_len`` are the original (text_start, text_len)
    form that ``Session.row`` and ``Session.after`` receive: exact when ``simple`` (one global
    segment at the start or the end, no padding; a grid may come with it); otherwise ``text_len``
    counts every global token and ``text_start`` is 0, so ``q.shape[1] - text_len`` is still the
    image token count.
    """

    layout: TokenLayout
    padding: ops.Padding | None
    op: dict
    text_start: int
    text_len: int

    @property
    def simple(self) -> bool:
        return self.padding is None and self.layout.text_range() is not None

    @classmethod
    def of(cls, seq: int, text_start, text_len, layout: TokenLayout | None, key_padding) -> "CallGeometry":
        if layout is None:
            return _text_geometry(seq, text_start, text_len)
        padding = key_padding if key_padding is None or isinstance(key_padding, ops.Padding) else ops.Padding(key_padding)
        legacy = layout.text_range()
        if legacy is not None and padding is None:
            return _text_geometry(seq, *legacy) if layout.grid is None else _gridded_geometry(layout)
        return cls(layout, padding, {"segments": layout, "key_padding": padding}, 0 if legacy is None else legacy[0],
                   layout.num_global)

    def rows(self, batch: slice) -> dict:
        """The op's keyword arguments for the batch elements ``batch``."""
        if self.padding is None:
            return self.op
        return {**self.op, "key_padding": dataclasses.replace(self.padding, mask=self.padding.mask[batch])}


@functools.lru_cache(maxsize=256)
def _text_geometry(seq: int, text_start: int, text_len: int) -> CallGeometry:
    layout = TokenLayout.from_text(seq, text_start, text_len)
    return CallGeometry(layout, None, {"text_start": text_start, "text_len": text_len}, text_start, text_len)


@functools.lru_cache(maxsize=256)
def _gridded_geometry(layout: TokenLayout) -> CallGeometry:
    """A layout of one global segment at the start or the end, with a grid: the op takes the layout
    itself, so that tile heads see the grid."""
    return CallGeometry(layout, None, {"segments": layout}, *layout.text_range())
