"""Procedural captioned videos: the video testbed's training data and its caption grammar.

Each video is ``FRAMES`` RGB frames of ``FRAME_SIZE`` x ``FRAME_SIZE`` pixels (values in [-1, 1]),
or of ``size`` x ``size`` where :func:`render` is asked for another size (the same clip, scaled)
holding 1-2 objects on a plain background. An object starts in one cell of a 3x3 grid and may
move (left, right, up or down, slowly or quickly), appear at frame ``EVENT_FRAME``, or turn
another colour there. A scene is integer attributes and its caption is a function of them, so a
caption parses back into the scene it describes::

    "a small red circle at the top left moving right quickly and a large blue square appearing at
     the bottom on gray"

Words shared with the image set (shapes, colours, sizes, positions, background colours) come from
:mod:`.data`. Objects are listed in reading order of their start cells; every caption fits the 32
MiniLM tokens of :mod:`.text`. Sampling is deterministic given a seed (a CPU ``torch.Generator``
draws every random number); rendering is vectorised over videos, objects and frames and runs on
any device, so training draws fresh batches on the GPU every step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from . import data
from .data import (
    BACKGROUND_COLOR_NAMES,
    BACKGROUND_COLORS,
    COLOR_NAMES,
    COLORS,
    GRID,
    POSITIONS,
    SHAPES,
    SIZES,
    _alternatives,
    _signed_distances,
    ordered_objects,
    sample_cells,
)

FRAMES = 8
FRAME_SIZE = 48
MAX_OBJECTS = 2
# Frame at which "appearing" objects appear and "turning" objects take their new colour.
EVENT_FRAME = FRAMES // 2
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slowly", "quickly")
EVENTS = ("none", "appears", "turns")

# Unit steps (x, y) of the directions, scaled by the speed's pixels per frame.
_STEPS = ((-1.0, 0.0), (1.0, 0.0), (0.0, -1.0), (0.0, 1.0))
# Pixels per frame: over the 7 frame gaps a quick object travels about one cell (16 px). A moving
# object never starts on the edge it moves towards, so its centre stays in the frame.
_SPEED_PX = (1.25, 2.5)
_HALF_EXTENT = (4.0, 6.5)  # small, large
_JITTER = (2.0, 1.0)
# Event draws: none, appears, turns.
_EVENT_WEIGHTS = (0.5, 0.25, 0.25)


@dataclass
class VideoScenes:
    """A batch of video scene attributes, as integer indices into the vocabularies above.

    Object slots are sorted by start cell; absent slots (``present`` False) come last and hold
    zeros. ``motion`` is 0 for a still object, else 1 + an index into ``DIRECTIONS``; ``speed``
    indexes ``SPEEDS`` (0 when still); ``event`` indexes ``EVENTS``; ``new_color`` is the colour
    from ``EVENT_FRAME`` on of a turning object (its ``color`` otherwise). ``offset`` (N, 2, 2) is
    the start's sub-cell jitter in pixels (x, y), which captions do not describe (zeros when parsed).
    """

    shape: torch.Tensor  # (N, 2) long
    color: torch.Tensor  # (N, 2) long
    new_color: torch.Tensor  # (N, 2) long
    size: torch.Tensor  # (N, 2) long
    cell: torch.Tensor  # (N, 2) long, start cell 0..8 in reading order
    motion: torch.Tensor  # (N, 2) long
    speed: torch.Tensor  # (N, 2) long
    event: torch.Tensor  # (N, 2) long
    present: torch.Tensor  # (N, 2) bool
    bg_color: torch.Tensor  # (N,) long
    offset: torch.Tensor  # (N, 2, 2) float

    def __len__(self) -> int:
        return self.shape.shape[0]

    def captions(self) -> list[str]:
        return [caption_from_dict(d) for d in self.to_dicts()]

    def to_dicts(self) -> list[dict]:
        """Per-scene dicts in words: ``{"objects": [{shape, color, size, position, motion, speed,
        event, new_color}, ...], "background": color}``; ``motion`` and ``speed`` are None for a
        still object, ``new_color`` None unless it turns."""
        out = []
        for i in range(len(self)):
            objects = []
            for k in range(MAX_OBJECTS):
                if not self.present[i, k]:
                    continue
                motion, event = int(self.motion[i, k]), EVENTS[int(self.event[i, k])]
                objects.append(
                    {
                        "shape": SHAPES[int(self.shape[i, k])],
                        "color": COLOR_NAMES[int(self.color[i, k])],
                        "size": SIZES[int(self.size[i, k])],
                        "position": POSITIONS[int(self.cell[i, k])],
                        "motion": DIRECTIONS[motion - 1] if motion else None,
                        "speed": SPEEDS[int(self.speed[i, k])] if motion else None,
                        "event": event,
                        "new_color": COLOR_NAMES[int(self.new_color[i, k])] if event == "turns" else None,
                    }
                )
            out.append({"objects": objects, "background": BACKGROUND_COLOR_NAMES[int(self.bg_color[i])]})
        return out

    @classmethod
    def from_dicts(cls, dicts: list[dict]) -> VideoScenes:
        n = len(dicts)
        names = ("shape", "color", "new_color", "size", "cell", "motion", "speed", "event")
        longs = {k: torch.zeros(n, MAX_OBJECTS, dtype=torch.long) for k in names}
        present = torch.zeros(n, MAX_OBJECTS, dtype=torch.bool)
        bg_color = torch.zeros(n, dtype=torch.long)
        for i, d in enumerate(dicts):
            objects, cells = ordered_objects(d, MAX_OBJECTS)
            for k, o in enumerate(objects):
                color = COLOR_NAMES.index(o["color"])
                longs["shape"][i, k] = SHAPES.index(o["shape"])
                longs["color"][i, k] = color
                longs["new_color"][i, k] = COLOR_NAMES.index(o["new_color"]) if o["event"] == "turns" else color
                longs["size"][i, k] = SIZES.index(o["size"])
                longs["cell"][i, k] = cells[k]
                longs["motion"][i, k] = 0 if o["motion"] is None else 1 + DIRECTIONS.index(o["motion"])
                longs["speed"][i, k] = 0 if o["motion"] is None else SPEEDS.index(o["speed"])
                longs["event"][i, k] = EVENTS.index(o["event"])
                present[i, k] = True
            bg_color[i] = BACKGROUND_COLOR_NAMES.index(d["background"])
        return cls(**longs, present=present, bg_color=bg_color, offset=torch.zeros(n, MAX_OBJECTS, 2))

    @classmethod
    def from_captions(cls, captions: list[str]) -> VideoScenes:
        return cls.from_dicts([parse_caption(c) for c in captions])


def _object_phrase(o: dict) -> str:
    appearing = " appearing" if o["event"] == "appears" else ""
    moving = f" moving {o['motion']} {o['speed']}" if o["motion"] is not None else ""
    turning = f" turning {o['new_color']}" if o["event"] == "turns" else ""
    return f"a {o['size']} {o['color']} {o['shape']}{appearing} at the {o['position']}{moving}{turning}"


def caption_from_dict(scene: dict) -> str:
    objects = " and ".join(_object_phrase(o) for o in scene["objects"])
    # "on gray", not "on a gray background": the longest caption then fits the 32 text tokens.
    return f"{objects} on {scene['background']}"


_COLOR = _alternatives(COLOR_NAMES)
_OBJECT_RE = re.compile(
    rf"a (?P<size>{_alternatives(SIZES)}) (?P<color>{_COLOR}) (?P<shape>{_alternatives(SHAPES)})"
    rf"(?P<appearing> appearing)? at the (?P<position>{_alternatives(POSITIONS)})"
    rf"(?: moving (?P<motion>{_alternatives(DIRECTIONS)}) (?P<speed>{_alternatives(SPEEDS)}))?"
    rf"(?: turning (?P<new_color>{_COLOR}))?"
)
_CAPTION_RE = re.compile(rf"(?P<objects>.+) on (?P<background>{_alternatives(BACKGROUND_COLOR_NAMES)})")


def parse_caption(caption: str) -> dict:
    """Inverse of :func:`caption_from_dict`; raises ``ValueError`` on text outside the grammar."""
    text = " ".join(caption.strip().lower().split())
    m = _CAPTION_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"not a video testbed caption: {caption!r}")
    objects = []
    for part in m["objects"].split(" and "):
        om = _OBJECT_RE.fullmatch(part)
        if om is None:
            raise ValueError(f"not a video testbed object phrase: {part!r} in {caption!r}")
        if om["appearing"] and om["new_color"]:
            raise ValueError(f"an object either appears or turns another colour, not both: {part!r}")
        if om["new_color"] == om["color"]:
            raise ValueError(f"a turning object takes another colour: {part!r}")
        event = "appears" if om["appearing"] else "turns" if om["new_color"] else "none"
        fields = ("size", "color", "shape", "position", "motion", "speed", "new_color")
        objects.append({**{k: om[k] for k in fields}, "event": event})
    # Key order as to_dicts writes it, so that parsed and sampled scenes compare equal.
    order = ("shape", "color", "size", "position", "motion", "speed", "event", "new_color")
    return {"objects": [{k: o[k] for k in order} for o in objects], "background": m["background"]}


def _allowed_motions(cells: torch.Tensor) -> torch.Tensor:
    """(..., 5) bool: still, then each direction that does not start on the edge it moves towards."""
    row = torch.div(cells, GRID, rounding_mode="floor")
    col = cells % GRID
    still = torch.ones_like(cells, dtype=torch.bool)
    return torch.stack([still, col > 0, col < GRID - 1, row > 0, row < GRID - 1], dim=-1)


def sample_scenes(n: int, seed: int | None = None, generator: torch.Generator | None = None) -> VideoScenes:
    """Draw ``n`` random video scenes; the same ``seed`` always gives the same scenes."""
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    g = generator
    cells, present = sample_cells(n, MAX_OBJECTS, g)  # start cells
    shape = torch.randint(len(SHAPES), (n, MAX_OBJECTS), generator=g)
    color = torch.randint(len(COLORS), (n, MAX_OBJECTS), generator=g)
    # Another colour: a nonzero shift around the palette.
    new_color = (color + torch.randint(1, len(COLORS), (n, MAX_OBJECTS), generator=g)) % len(COLORS)
    size = torch.randint(len(SIZES), (n, MAX_OBJECTS), generator=g)
    # Uniform over the motions allowed from the start cell.
    scores = torch.rand(n, MAX_OBJECTS, 1 + len(DIRECTIONS), generator=g)
    motion = scores.masked_fill(~_allowed_motions(cells), -1.0).argmax(dim=-1)
    speed = torch.randint(len(SPEEDS), (n, MAX_OBJECTS), generator=g) * (motion > 0)
    event = torch.multinomial(torch.tensor(_EVENT_WEIGHTS), n * MAX_OBJECTS, replacement=True, generator=g)
    event = event.view(n, MAX_OBJECTS)
    new_color = torch.where(event == EVENTS.index("turns"), new_color, color)
    jitter = torch.tensor(_JITTER)[size][..., None]
    offset = (torch.rand(n, MAX_OBJECTS, 2, generator=g) * 2 - 1) * jitter
    bg_color = torch.randint(len(BACKGROUND_COLORS), (n,), generator=g)
    zero = torch.zeros_like(shape)
    keep = {k: torch.where(present, v, zero) for k, v in dict(
        shape=shape, color=color, new_color=new_color, size=size, motion=motion, speed=speed, event=event).items()}
    return VideoScenes(**keep, cell=cells, present=present, bg_color=bg_color, offset=offset * present[..., None])


def object_centres(
    scenes: VideoScenes, device: torch.device | str | None = None, size: int = FRAME_SIZE
) -> torch.Tensor:
    """(N, 2, FRAMES, 2) centre (x, y) in pixels of every object slot at every frame of ``size``-pixel
    frames (offsets and speeds are in pixels of ``FRAME_SIZE`` frames and scale with the frame)."""
    scale = size / FRAME_SIZE
    cell_size = size / GRID
    cell, offset = scenes.cell.to(device), scenes.offset.to(device) * scale
    row = torch.div(cell, GRID, rounding_mode="floor")
    start = torch.stack([(cell % GRID + 0.5) * cell_size, (row + 0.5) * cell_size], dim=-1) + offset
    steps = torch.tensor(((0.0, 0.0),) + _STEPS, device=device)[scenes.motion.to(device)]  # (N, 2, 2)
    velocity = steps * (torch.tensor(_SPEED_PX, device=device) * scale)[scenes.speed.to(device)][..., None]
    frames = torch.arange(FRAMES, device=device, dtype=torch.float32)
    return start[:, :, None, :] + velocity[:, :, None, :] * frames[None, None, :, None]


def render(
    scenes: VideoScenes,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    size: int = FRAME_SIZE,
) -> torch.Tensor:
    """Render scenes to videos (N, 3, FRAMES, size, size) in [-1, 1], antialiased, on ``device``: the
    (batch, channels, frames, height, width) layout of video latents. Another ``size`` than
    ``FRAME_SIZE`` scales the whole clip: cells, objects, jitter and speeds."""
    if size < 1:
        raise ValueError(f"a frame must be at least 1 pixel wide; got size={size}")
    s = {k: v.to(device) for k, v in vars(scenes).items()}
    n = len(scenes)
    coords = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    bg_palette = torch.tensor(list(BACKGROUND_COLORS.values()), device=device)
    video = bg_palette[s["bg_color"]][:, :, None, None, None].expand(n, 3, FRAMES, size, size)

    centres = object_centres(scenes, device, size)  # (N, 2, F, 2)
    dx = coords[None, None, None, None, :] - centres[..., 0, None, None]  # (N, 2, F, 1, W)
    dy = coords[None, None, None, :, None] - centres[..., 1, None, None]  # (N, 2, F, H, 1)
    r = (torch.tensor(_HALF_EXTENT, device=device) * (size / FRAME_SIZE))[s["size"]][..., None, None, None]
    sdf = _signed_distances(dx, dy, r)  # (N, 2, 4, F, H, W)
    index = s["shape"][:, :, None, None, None, None].expand(n, MAX_OBJECTS, 1, FRAMES, size, size)
    sdf = sdf.gather(2, index)[:, :, 0]  # (N, 2, F, H, W)
    frames = torch.arange(FRAMES, device=device)
    after = frames >= EVENT_FRAME  # (F,)
    visible = s["present"][..., None] & ((s["event"] != EVENTS.index("appears"))[..., None] | after)  # (N, 2, F)
    alpha = (0.5 - sdf).clamp(0, 1) * visible[..., None, None]
    palette = torch.tensor(list(COLORS.values()), device=device)
    color = torch.where(after, s["new_color"][..., None], s["color"][..., None])  # (N, 2, F)
    for k in range(MAX_OBJECTS):
        a = alpha[:, k, None]  # (N, 1, F, H, W)
        video = video * (1 - a) + palette[color[:, k]].permute(0, 2, 1)[..., None, None] * a
    return (video * 2 - 1).to(dtype)


def generate_batch(
    n: int,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, list[str], VideoScenes]:
    """``n`` fresh (videos in [-1, 1], captions, scenes), deterministic by ``seed``."""
    scenes = sample_scenes(n, seed=seed, generator=generator)
    return render(scenes, device=device, dtype=dtype), scenes.captions(), scenes


def sample_captions(n: int, seed: int) -> list[str]:
    """``n`` distinct captions drawn from the grammar, deterministic by ``seed``."""
    return data.sample_captions(n, seed, sample=sample_scenes)


PROMPT_FILES = {"calibration": "video_calibration_prompts.txt", "heldout": "video_heldout_prompts.txt"}


def load_prompts(which: str = "heldout") -> list[str]:
    """The bundled video prompts: "calibration" (for calibrating plans) or "heldout" (for evaluating them)."""
    return data.load_prompts(which, PROMPT_FILES)


def main(argv=None) -> None:
    """Write the bundled video prompt files: ``python -m ditfastattn.testbed.video_data [--out DIR]``."""
    data.write_prompt_files(argv, PROMPT_FILES, sample_scenes, (303, 404))


if __name__ == "__main__":
    main()
