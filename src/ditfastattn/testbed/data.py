"""Procedural captioned shapes: the testbed's training data and its caption grammar.

Each 64x64 RGB image (values in [-1, 1]) holds 1-3 objects, each in its own cell of a 3x3 grid, on a
plain, gradient or striped background. A scene is described by integer attributes (shape, colour,
size and cell per object; background colour and kind) and its caption is a function of them, so a
caption can be parsed back into the attributes it describes (the evaluator relies on that)::

    "a small red circle at the top left and a large blue square at the bottom right on gray stripes"

Objects are listed in reading order of their cells. Every caption fits in 32 MiniLM tokens.
Sampling is deterministic given a seed (a CPU ``torch.Generator`` draws all random numbers, so the
same seed gives the same scenes on every device); rendering is vectorised and runs on any device,
which lets GPU training draw fresh batches every step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

IMAGE_SIZE = 64
MAX_OBJECTS = 3
GRID = 3
SHAPES = ("circle", "square", "triangle", "cross")
# RGB in [0, 1]; chosen far apart so that colour words are unambiguous to the eye and the evaluator.
COLORS = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.72, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "purple": (0.58, 0.18, 0.80),
    "orange": (1.00, 0.55, 0.05),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
BACKGROUND_COLORS = {
    "black": (0.08, 0.08, 0.08),
    "gray": (0.50, 0.50, 0.50),
    "white": (0.92, 0.92, 0.92),
    "brown": (0.45, 0.30, 0.18),
}
BACKGROUND_COLOR_NAMES = tuple(BACKGROUND_COLORS)
BACKGROUND_KINDS = ("plain", "gradient", "striped")

# Half extent in pixels of small and large objects; with the jitter below an object never leaves
# its cell (half a cell is 10.7 px), so cells are an exact readout of position.
_HALF_EXTENT = (5.0, 9.0)
_JITTER = (3.0, 1.0)
_GRADIENT_AMPLITUDE = 0.2
_STRIPE_AMPLITUDE = 0.12
_STRIPE_PERIOD = 8.0


@dataclass
class Scenes:
    """A batch of scene attributes, as integer indices into the vocabularies above.

    Object slots are sorted by cell; absent slots (``present`` False) come last and hold zeros.
    ``offset`` (N, 3, 2) is the sub-cell jitter in pixels (x, y), ``bg_angle`` the direction of a
    gradient or of stripes and ``bg_phase`` the stripes' phase: render-only details that captions
    do not describe (scenes parsed from captions get zeros).
    """

    shape: torch.Tensor  # (N, 3) long
    color: torch.Tensor  # (N, 3) long
    size: torch.Tensor  # (N, 3) long
    cell: torch.Tensor  # (N, 3) long, 0..8 in reading order
    present: torch.Tensor  # (N, 3) bool
    bg_color: torch.Tensor  # (N,) long
    bg_kind: torch.Tensor  # (N,) long
    offset: torch.Tensor  # (N, 3, 2) float
    bg_angle: torch.Tensor  # (N,) float, radians
    bg_phase: torch.Tensor  # (N,) float, radians

    def __len__(self) -> int:
        return self.shape.shape[0]

    def captions(self) -> list[str]:
        return [caption_from_dict(d) for d in self.to_dicts()]

    def to_dicts(self) -> list[dict]:
        """Per-scene dicts in words:
        ``{"objects": [{shape, color, size, position}, ...], "background": {color, kind}}``."""
        out = []
        for i in range(len(self)):
            objects = [
                {
                    "shape": SHAPES[int(self.shape[i, k])],
                    "color": COLOR_NAMES[int(self.color[i, k])],
                    "size": SIZES[int(self.size[i, k])],
                    "position": POSITIONS[int(self.cell[i, k])],
                }
                for k in range(MAX_OBJECTS)
                if self.present[i, k]
            ]
            background = {
                "color": BACKGROUND_COLOR_NAMES[int(self.bg_color[i])],
                "kind": BACKGROUND_KINDS[int(self.bg_kind[i])],
            }
            out.append({"objects": objects, "background": background})
        return out

    @classmethod
    def from_dicts(cls, dicts: list[dict]) -> Scenes:
        n = len(dicts)
        longs = {k: torch.zeros(n, MAX_OBJECTS, dtype=torch.long) for k in ("shape", "color", "size", "cell")}
        present = torch.zeros(n, MAX_OBJECTS, dtype=torch.bool)
        bg_color = torch.zeros(n, dtype=torch.long)
        bg_kind = torch.zeros(n, dtype=torch.long)
        for i, d in enumerate(dicts):
            objects, cells = ordered_objects(d, MAX_OBJECTS)
            for k, o in enumerate(objects):
                longs["shape"][i, k] = SHAPES.index(o["shape"])
                longs["color"][i, k] = COLOR_NAMES.index(o["color"])
                longs["size"][i, k] = SIZES.index(o["size"])
                longs["cell"][i, k] = cells[k]
                present[i, k] = True
            bg_color[i] = BACKGROUND_COLOR_NAMES.index(d["background"]["color"])
            bg_kind[i] = BACKGROUND_KINDS.index(d["background"]["kind"])
        return cls(
            **longs,
            present=present,
            bg_color=bg_color,
            bg_kind=bg_kind,
            offset=torch.zeros(n, MAX_OBJECTS, 2),
            bg_angle=torch.zeros(n),
            bg_phase=torch.zeros(n),
        )

    @classmethod
    def from_captions(cls, captions: list[str]) -> Scenes:
        return cls.from_dicts([parse_caption(c) for c in captions])


def ordered_objects(scene: dict, max_objects: int) -> tuple[list[dict], list[int]]:
    """A scene dict's objects in reading order of their cells, and those cells; ValueError unless
    it holds 1 to ``max_objects`` objects in distinct cells."""
    objects = sorted(scene["objects"], key=lambda o: POSITIONS.index(o["position"]))
    if not 1 <= len(objects) <= max_objects:
        raise ValueError(f"a scene holds 1 to {max_objects} objects, got {len(objects)}")
    cells = [POSITIONS.index(o["position"]) for o in objects]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two objects share a position in {scene}")
    return objects, cells


def caption_from_dict(scene: dict) -> str:
    phrases = [f"a {o['size']} {o['color']} {o['shape']} at the {o['position']}" for o in scene["objects"]]
    objects = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    color, kind = scene["background"]["color"], scene["background"]["kind"]
    # Three wordings, so the longest caption (three objects, two-word positions) fits 32 tokens.
    background = {
        "plain": f"on a {color} background",
        "gradient": f"on a {color} gradient",
        "striped": f"on {color} stripes",
    }
    return f"{objects} {background[kind]}"


def _alternatives(words) -> str:
    # Longest first so that "top left" wins over "top".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_OBJECT_RE = re.compile(
    rf"a ({_alternatives(SIZES)}) ({_alternatives(COLOR_NAMES)}) ({_alternatives(SHAPES)}) "
    rf"at the ({_alternatives(POSITIONS)})"
)
_BG = _alternatives(BACKGROUND_COLOR_NAMES)
_CAPTION_RE = re.compile(
    rf"(?P<objects>.+) on (?:a (?P<plain>{_BG}) background|a (?P<gradient>{_BG}) gradient|(?P<striped>{_BG}) stripes)"
)


def parse_caption(caption: str) -> dict:
    """Inverse of :func:`caption_from_dict`; raises ``ValueError`` on text outside the grammar."""
    text = " ".join(caption.strip().lower().split())
    m = _CAPTION_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"not a testbed caption: {caption!r}")
    parts = re.split(r", | and ", m["objects"])
    objects = []
    for part in parts:
        om = _OBJECT_RE.fullmatch(part)
        if om is None:
            raise ValueError(f"not a testbed object phrase: {part!r} in {caption!r}")
        objects.append(dict(zip(("size", "color", "shape", "position"), om.groups())))
    kind = next(k for k in BACKGROUND_KINDS if m[k] is not None)
    return {"objects": objects, "background": {"color": m[kind], "kind": kind}}


def sample_scenes(n: int, seed: int | None = None, generator: torch.Generator | None = None) -> Scenes:
    """Draw ``n`` random scenes; the same ``seed`` always gives the same scenes."""
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    g = generator
    cells, present = sample_cells(n, MAX_OBJECTS, g)
    shape = torch.randint(len(SHAPES), (n, MAX_OBJECTS), generator=g)
    color = torch.randint(len(COLORS), (n, MAX_OBJECTS), generator=g)
    size = torch.randint(len(SIZES), (n, MAX_OBJECTS), generator=g)
    jitter = torch.tensor(_JITTER)[size][..., None]
    offset = (torch.rand(n, MAX_OBJECTS, 2, generator=g) * 2 - 1) * jitter
    zero = torch.zeros_like(shape)
    return Scenes(
        shape=torch.where(present, shape, zero),
        color=torch.where(present, color, zero),
        size=torch.where(present, size, zero),
        cell=cells,
        present=present,
        bg_color=torch.randint(len(BACKGROUND_COLORS), (n,), generator=g),
        bg_kind=torch.randint(len(BACKGROUND_KINDS), (n,), generator=g),
        offset=offset * present[..., None],
        bg_angle=torch.rand(n, generator=g) * 2 * math.pi,
        bg_phase=torch.rand(n, generator=g) * 2 * math.pi,
    )


def sample_cells(n: int, max_objects: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """1 to ``max_objects`` distinct cells per scene: (cells (N, max_objects) long in reading order,
    0 in absent slots; present (N, max_objects) bool, present slots first)."""
    count = torch.randint(1, max_objects + 1, (n,), generator=generator)
    # Distinct cells: the first `count` entries of a random permutation, then sorted (reading order).
    cells = torch.rand(n, GRID * GRID, generator=generator).argsort(dim=1)[:, :max_objects]
    present = torch.arange(max_objects)[None, :] < count[:, None]
    cells = torch.where(present, cells, GRID * GRID).sort(dim=1).values
    return torch.where(present, cells, 0), present


def _signed_distances(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, negative inside) to each shape, stacked on a new dim 2 in SHAPES order."""
    circle = torch.sqrt(dx * dx + dy * dy) - r
    # Squares a little smaller than the circle's box so both carry similar visual weight.
    square = torch.maximum(dx.abs(), dy.abs()) - 0.8 * r
    # Upward triangle: apex (0, -r), base corners (+-r, 0.8 r); the max of three edge half-planes.
    slope = 1.8
    norm = math.hypot(slope, 1.0)
    triangle = torch.maximum(
        dy - 0.8 * r,
        torch.maximum((slope * dx - (dy + r)) / norm, (-slope * dx - (dy + r)) / norm),
    )
    arm = 0.3 * r
    cross = torch.minimum(
        torch.maximum(dx.abs() - r, dy.abs() - arm),
        torch.maximum(dx.abs() - arm, dy.abs() - r),
    )
    return torch.stack(torch.broadcast_tensors(circle, square, triangle, cross), dim=2)


def render(
    scenes: Scenes, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Render scenes to images (N, 3, 64, 64) in [-1, 1], antialiased, on ``device``."""
    s = {k: v.to(device) for k, v in vars(scenes).items()}
    n = len(scenes)
    coords = torch.arange(IMAGE_SIZE, device=device, dtype=torch.float32) + 0.5
    cell_size = IMAGE_SIZE / GRID

    bg_palette = torch.tensor(list(BACKGROUND_COLORS.values()), device=device)
    base = bg_palette[s["bg_color"]][:, :, None, None]  # (N, 3, 1, 1)
    centred = coords - IMAGE_SIZE / 2
    cos, sin = s["bg_angle"].cos()[:, None, None], s["bg_angle"].sin()[:, None, None]
    along = cos * centred[None, None, :] + sin * centred[None, :, None]  # (N, H, W), pixels
    gradient = _GRADIENT_AMPLITUDE * along / (IMAGE_SIZE / 2)
    stripes = _STRIPE_AMPLITUDE * torch.sin(2 * math.pi * along / _STRIPE_PERIOD + s["bg_phase"][:, None, None])
    kind = s["bg_kind"][:, None, None]
    variation = torch.where(kind == 1, gradient, torch.where(kind == 2, stripes, torch.zeros_like(along)))
    image = (base + variation[:, None]).clamp(0, 1)

    row = torch.div(s["cell"], GRID, rounding_mode="floor")
    col = s["cell"] % GRID
    cx = (col + 0.5) * cell_size + s["offset"][..., 0]
    cy = (row + 0.5) * cell_size + s["offset"][..., 1]
    r = torch.tensor(_HALF_EXTENT, device=device)[s["size"]]
    dx = coords[None, None, None, :] - cx[..., None, None]  # (N, 3, 1, W)
    dy = coords[None, None, :, None] - cy[..., None, None]  # (N, 3, H, 1)
    sdf = _signed_distances(dx, dy, r[..., None, None])  # (N, 3, 4, H, W)
    sdf = sdf.gather(2, s["shape"][:, :, None, None, None].expand(n, MAX_OBJECTS, 1, IMAGE_SIZE, IMAGE_SIZE))
    # One-pixel-wide antialiasing ramp across the boundary.
    alpha = (0.5 - sdf[:, :, 0]).clamp(0, 1) * s["present"][..., None, None]  # (N, 3, H, W)
    palette = torch.tensor(list(COLORS.values()), device=device)
    for k in range(MAX_OBJECTS):
        a = alpha[:, k, None]
        image = image * (1 - a) + palette[s["color"][:, k]][:, :, None, None] * a
    return (image * 2 - 1).to(dtype)


def generate_batch(
    n: int,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, list[str], Scenes]:
    """``n`` fresh (images in [-1, 1], captions, scenes), deterministic by ``seed``."""
    scenes = sample_scenes(n, seed=seed, generator=generator)
    return render(scenes, device=device, dtype=dtype), scenes.captions(), scenes


def sample_captions(n: int, seed: int, sample=None) -> list[str]:
    """``n`` distinct captions drawn from the grammar, deterministic by ``seed``; ``sample`` is the
    scene sampler (this module's :func:`sample_scenes` by default; the video set passes its own)."""
    sample = sample_scenes if sample is None else sample
    captions: list[str] = []
    generator = torch.Generator().manual_seed(seed)
    while len(captions) < n:
        for c in sample(n, generator=generator).captions():
            if c not in captions and len(captions) < n:
                captions.append(c)
    return captions


PROMPT_FILES = {"calibration": "calibration_prompts.txt", "heldout": "heldout_prompts.txt"}


def load_prompts(which: str = "heldout", files: dict[str, str] | None = None) -> list[str]:
    """The bundled prompts: "calibration" (for calibrating plans) or "heldout" (for evaluating them);
    ``files`` names the files of another set (the video set's)."""
    files = PROMPT_FILES if files is None else files
    if which not in files:
        raise ValueError(f"which must be one of {sorted(files)}, got {which!r}")
    path = Path(__file__).resolve().parent / files[which]
    return path.read_text().splitlines()


def write_prompt_files(argv, files: dict[str, str], sample, seeds: tuple[int, int]) -> None:
    """The command line that writes a set's prompt files: calibration prompts drawn with ``seeds[0]``,
    held-out ones with ``seeds[1]``, none of them a calibration prompt."""
    import argparse

    p = argparse.ArgumentParser(description=f"write {' and '.join(files.values())}")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("-n", type=int, default=8, help="prompts per file")
    args = p.parse_args(argv)
    calibration = sample_captions(args.n, seed=seeds[0], sample=sample)
    heldout = [c for c in sample_captions(4 * args.n, seed=seeds[1], sample=sample) if c not in calibration][: args.n]
    for which, prompts in (("calibration", calibration), ("heldout", heldout)):
        path = args.out / files[which]
        path.write_text("\n".join(prompts) + "\n")
        print(f"wrote {len(prompts)} prompts to {path}")


def main(argv=None) -> None:
    """Write the bundled prompt files: ``python -m ditfastattn.testbed.data [--out DIR]``."""
    write_prompt_files(argv, PROMPT_FILES, sample_scenes, (101, 202))


if __name__ == "__main__":
    main()
