"""Per-head compression methods, named by strings in plans.

=============================  ==============================================================
``full``                       exact attention
``cache``                      skip the head; reuse its output from the last step that computed it
``arrow:<f>``                  arrow attention, image band of total width f x image tokens
``arrow_residual:<f>``         arrow, plus the residual (full - arrow) kept from the head's last
                               ``full`` step
``cfg_share``                  compute the conditional half of a CFG batch only (full attention)
                               and reuse it for the unconditional half
``cfg_share+arrow:<f>``        the same, with arrow attention on the conditional half
=============================  ==============================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from ._geometry import MODE_FULL, MODE_SKIP, density, window_blocks

_NAME = re.compile(r"^(?:(?P<cfg>cfg_share)(?:\+arrow:(?P<cfg_f>[0-9.eE+-]+))?|full|cache|(?P<kind>arrow|arrow_residual):(?P<f>[0-9.eE+-]+))$")


@dataclass(frozen=True)
class Method:
    kind: str  # "full", "cache", "arrow" or "arrow_residual"
    fraction: float | None = None
    cfg_share: bool = False

    @property
    def name(self) -> str:
        base = self.kind if self.fraction is None else f"{self.kind}:{self.fraction:g}"
        if not self.cfg_share:
            return base
        return "cfg_share" if self.kind == "full" else f"cfg_share+{base}"

    @property
    def computes(self) -> bool:
        """Whether the head's output is computed at this step (everything but ``cache``)."""
        return self.kind != "cache"

    def mode(self, num_image_tokens: int) -> int:
        """Integer head mode of the op for the computed part of this method."""
        if self.kind == "cache":
            return MODE_SKIP
        if self.kind == "full":
            return MODE_FULL
        return window_blocks(self.fraction, num_image_tokens)

    def cost(self, num_image_tokens: int, text_len: int) -> float:
        """Share of a full head's attention FLOPs this method computes (CFG sharing halves it)."""
        share = density(self.mode(num_image_tokens), num_image_tokens, text_len)
        return share / 2.0 if self.cfg_share else share


def _fraction(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"unknown method {name!r}: the window fraction must be a number in (0, 1]")
    return value


@lru_cache(maxsize=None)
def parse_method(name: str) -> Method:
    """Parse a method name (see the module docstring); raises ValueError naming the valid forms."""
    match = _NAME.match(name.strip()) if isinstance(name, str) else None
    if match is None:
        raise ValueError(
            f"unknown method {name!r}; valid: 'full', 'cache', 'arrow:<f>', 'arrow_residual:<f>', "
            "'cfg_share', 'cfg_share+arrow:<f>' with 0 < f <= 1"
        )
    if match.group("cfg"):
        if match.group("cfg_f") is None:
            return Method("full", None, cfg_share=True)
        return Method("arrow", _fraction(match.group("cfg_f"), name), cfg_share=True)
    if match.group("kind"):
        return Method(match.group("kind"), _fraction(match.group("f"), name))
    return Method(name.strip())


def canonical(name: str) -> str:
    return parse_method(name).name
