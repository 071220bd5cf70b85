"""Pictures of plans: a steps x layers heatmap coloured by the share of heads per method family."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ._files import write_atomically
from .methods import KINDS, parse_method
from .plan import Plan

logger = logging.getLogger(__name__)


def kind_shares(plan: Plan) -> dict[str, np.ndarray]:
    """(steps, layers) share of heads of each method kind."""
    shares = {kind: np.zeros((plan.num_steps, len(plan.layer_names))) for kind in KINDS}
    for step, rows in enumerate(plan.methods):
        for layer, heads in enumerate(rows):
            for method in heads:
                shares[parse_method(method).kind][step, layer] += 1.0 / len(heads)
    return shares


def picture_formats() -> list[str]:
    """The extensions pictures can be written in: matplotlib's, but PGF, which needs a LaTeX install."""
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(set(FigureCanvasBase.get_supported_filetypes()) - {"pgf"})


def _format(path: str | Path) -> str:
    """The picture format ``path``'s extension names; without one, matplotlib's default (PNG), as
    ``savefig`` takes it. The temporary file's name must not be left to name it (see write_atomically)."""
    import matplotlib

    extension = Path(path).suffix[1:].lower()
    formats = picture_formats()
    if extension and extension not in formats:
        raise ValueError(f"cannot write {path}: matplotlib writes no .{extension} pictures; end the name in one of "
                         f"{', '.join('.' + name for name in sorted(formats))} (or in none, for PNG)")
    return extension or matplotlib.rcParams["savefig.format"]


def _save(fig, path: str | Path, dpi: int) -> Path:
    """Write ``fig`` atomically, in the format that ``path`` names (:func:`_format`)."""
    return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=_format(path)))


def plot_plan(
    plan: Plan,
    path: str | Path,
    title: str | None = None,
    *,
    num_image_tokens: int | None = None,
    text_len: int | None = None,
    grid: tuple[int, int, int] | None = None,
    tile: tuple[int, int, int] | None = None,
) -> Path:
    """Write a picture (format from the extension, PNG without one): the heatmap, and the attention
    sparsity per step when the geometry is known (the plan's, or the arguments, as :meth:`Plan.summary`
    takes them)."""
    _format(path)  # a name matplotlib cannot write is refused before the drawing
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    shares = kind_shares(plan)
    # A cell mixes the kinds' colours by their share of its heads.
    image = sum(shares[kind][..., None] * np.array(KINDS[kind].colour) for kind in KINDS)
    try:
        summary = plan.summary(num_image_tokens, text_len, grid=grid, tile=tile)
    except ValueError as err:
        logger.info("the plan picture has no sparsity curve: %s", err)
        summary = None
    rows = 2 if summary else 1
    fig, axes = plt.subplots(
        rows, 1, figsize=(max(6.0, 0.16 * len(plan.layer_names) + 2), 3.2 + 2.2 * rows + 0.05 * plan.num_steps),
        squeeze=False, gridspec_kw={"height_ratios": [3, 1][:rows]},
    )
    heat = axes[0, 0]
    heat.imshow(image.clip(0, 1), aspect="auto", interpolation="nearest")
    heat.xaxis.set_major_locator(MaxNLocator(integer=True))
    heat.yaxis.set_major_locator(MaxNLocator(integer=True))
    heat.set_xlabel("attention layer (execution order)")
    heat.set_ylabel("denoising step")
    used = [kind for kind in KINDS if shares[kind].any()]
    heat.legend(
        handles=[Patch(color=KINDS[kind].colour, label=kind) for kind in used],
        loc="upper center", bbox_to_anchor=(0.5, 1.18), ncol=len(used), frameon=False, fontsize=8,
    )
    switches = plan.provenance.get("expert_switch_steps", [])
    for step in switches:  # Wan 2.2 A14B: the rows below run on the second expert
        heat.axhline(step - 0.5, color="black", linewidth=1.5)
        heat.text(len(plan.layer_names) - 0.5, step - 0.5, "transformer_2 from here", fontsize=7, ha="right", va="top",
                  bbox=dict(facecolor="white", alpha=0.8, linewidth=0))
    headline = title or f"{plan.model.model_class}: {plan.num_steps} steps x {len(plan.layer_names)} layers"
    if summary:
        headline += f" | attention sparsity {summary['sparsity']:.1%}"
        curve = axes[1, 0]
        curve.plot(range(plan.num_steps), summary["sparsity_per_step"], marker=".", color="black")
        curve.set_xlim(-0.5, plan.num_steps - 0.5)
        curve.set_ylim(min(0.0, *summary["sparsity_per_step"]), 1)  # a step keeping residuals removes less than 0
        curve.set_xlabel("denoising step")
        curve.set_ylabel("sparsity")
        curve.grid(alpha=0.3)
        for step in switches:
            curve.axvline(step - 0.5, color="grey", linewidth=1)
    fig.suptitle(headline, fontsize=10, y=0.995)
    fig.tight_layout()
    try:
        return _save(fig, path, 120)
    finally:
        plt.close(fig)


def plot_comparison(reference, compressed, captions, path: str | Path, title: str = "") -> Path:
    """Side-by-side grid: uncompressed row, compressed row, and their absolute difference (x4).

    ``reference`` and ``compressed`` are (N, 3, H, W) tensors in [0, 1].
    """
    _format(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import textwrap

    count = reference.shape[0]
    fig, axes = plt.subplots(3, count, figsize=(2.1 * count, 7.2), squeeze=False)
    rows = [("full attention", reference), ("ditfastattn", compressed), ("|difference| x 4", (reference - compressed).abs() * 4)]
    for row, (label, images) in enumerate(rows):
        for column in range(count):
            axis = axes[row, column]
            axis.imshow(images[column].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(label, fontsize=9)
            if row == 0:
                axis.set_title("\n".join(textwrap.wrap(captions[column], 28)), fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        return _save(fig, path, 110)
    finally:
        plt.close(fig)
