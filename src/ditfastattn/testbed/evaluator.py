"""Quality measures on the testbed: caption accuracy (a stand-in for CLIP score), SSIM, PSNR, LPIPS.

Caption accuracy reads images back with :class:`CaptionReader`, a small CNN trained by
``train.py --kind evaluator`` on the same generator as the diffusion models. For each of the nine
grid cells it predicts empty or one of the shapes, the colour and the size; for the whole image
the background colour and kind. A prompt is parsed into the scene it describes, and each image
gets the score

    (described objects read back with the right shape, colour and size in their cell
     + 1 if the background colour and kind are right)
    / (described objects + 1 + objects read in cells the prompt leaves empty)

so missing, wrong and extra objects all cost. :func:`caption_scores` also returns the parts.

SSIM and PSNR (torchmetrics) compare images with reference images, e.g. the uncompressed model's
output for the same prompt and seed; LPIPS is added only when its AlexNet weights are already on
disk (see :mod:`ditfastattn.evaluation`, which computes all three).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .data import (
    BACKGROUND_COLORS,
    BACKGROUND_KINDS,
    COLORS,
    GRID,
    IMAGE_SIZE,
    MAX_OBJECTS,
    SHAPES,
    SIZES,
    Scenes,
    generate_batch,
)


WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CELLS = GRID * GRID
# Logit groups per cell: empty or a shape, colour, size; then the background.
_HEADS = {
    "obj": (CELLS, 1 + len(SHAPES)),
    "color": (CELLS, len(COLORS)),
    "size": (CELLS, len(SIZES)),
    "bg_color": (len(BACKGROUND_COLORS),),
    "bg_kind": (len(BACKGROUND_KINDS),),
}
IGNORE = -100


class CaptionReader(nn.Module):
    """A 64x64 image in [-1, 1] -> logits per cell (empty/shape, colour, size) and for the background."""

    def __init__(self, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 2 * width, 3 * width, 4 * width, 4 * width]
        strides = [1, 2, 1, 2, 2, 2]  # 64 -> 4x4 cells of features
        layers = []
        for cin, cout, stride in zip(chans[:-1], chans[1:], strides):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(chans[-1] * 16, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, sum(int(np.prod(s)) for s in _HEADS.values())),
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = self.head(self.features(images))
        out, start = {}, 0
        for name, shape in _HEADS.items():
            size = int(np.prod(shape))
            out[name] = flat[:, start : start + size].reshape(-1, *shape)
            start += size
        return out


def cell_targets(scenes: Scenes) -> dict[str, torch.Tensor]:
    """Per-cell targets of scenes: obj (N, 9) 0 = empty else 1 + shape; color and size (N, 9) with
    ``IGNORE`` where a cell is empty; bg_color and bg_kind (N,)."""
    n = len(scenes)
    obj = torch.zeros(n, CELLS, dtype=torch.long)
    color = torch.full((n, CELLS), IGNORE, dtype=torch.long)
    size = torch.full((n, CELLS), IGNORE, dtype=torch.long)
    rows = torch.arange(n)
    for k in range(MAX_OBJECTS):
        p = scenes.present[:, k]
        r, c = rows[p], scenes.cell[p, k]
        obj[r, c] = scenes.shape[p, k] + 1
        color[r, c] = scenes.color[p, k]
        size[r, c] = scenes.size[p, k]
    return {"obj": obj, "color": color, "size": size, "bg_color": scenes.bg_color, "bg_kind": scenes.bg_kind}


def reader_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(
        F.cross_entropy(logits[k].reshape(-1, logits[k].shape[-1]).float(), targets[k].reshape(-1), ignore_index=IGNORE)
        for k in _HEADS
    )


@functools.lru_cache(maxsize=4)
def get_evaluator(device: str = "cpu", weights_dir: str | None = None) -> CaptionReader:
    """The trained reader on ``device`` (bundled weights unless ``weights_dir``), loaded once."""
    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    config = json.loads((folder / "evaluator_train_config.json").read_text())
    model = CaptionReader(**config["model_config"])
    model.load_state_dict(load_file(folder / "evaluator.safetensors"))
    return model.float().to(device).eval().requires_grad_(False)


def to_tensor(images) -> torch.Tensor:
    """PIL images, an (N, H, W, 3) array or an (N, 3, H, W) tensor, all in [0, 1] (PIL: 0-255),
    as a float32 tensor (N, 3, H, W) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if isinstance(images, np.ndarray):
        return torch.from_numpy(images).float().permute(0, 3, 1, 2)
    if isinstance(images, PIL.Image.Image):
        images = [images]
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@torch.no_grad()
def read_images(
    images, device: str = "cpu", model: CaptionReader | None = None, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """The reader's predictions (class indices, on the CPU), keyed like :func:`cell_targets`;
    ``model`` defaults to the bundled reader."""
    model = model if model is not None else get_evaluator(device)
    x = to_tensor(images)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    preds: dict[str, list[torch.Tensor]] = {k: [] for k in _HEADS}
    for chunk in x.split(batch_size):
        logits = model(chunk.to(device) * 2 - 1)
        for k in _HEADS:
            preds[k].append(logits[k].argmax(-1).cpu())
    return {k: torch.cat(v) for k, v in preds.items()}


def _as_scenes(prompts_or_attributes) -> Scenes:
    if isinstance(prompts_or_attributes, Scenes):
        return prompts_or_attributes
    if isinstance(prompts_or_attributes, str):
        prompts_or_attributes = [prompts_or_attributes]
    items = list(prompts_or_attributes)
    if items and isinstance(items[0], dict):
        return Scenes.from_dicts(items)
    return Scenes.from_captions(items)


def caption_scores(
    images, prompts_or_attributes, device: str = "cpu", model: CaptionReader | None = None
) -> dict[str, float]:
    """Caption accuracy and its parts for images against their prompts (captions, scene dicts or
    :class:`Scenes`). All values are fractions in [0, 1] except ``extra_objects`` (per image)."""
    scenes = _as_scenes(prompts_or_attributes)
    pred = read_images(images, device, model)
    if pred["obj"].shape[0] != len(scenes):
        raise ValueError(f"{pred['obj'].shape[0]} images but {len(scenes)} prompts")
    target = cell_targets(scenes)
    described = target["obj"] > 0
    shape_ok = (pred["obj"] == target["obj"]) & described
    color_ok = (pred["color"] == target["color"]) & described
    size_ok = (pred["size"] == target["size"]) & described
    object_ok = shape_ok & color_ok & size_ok
    extra = ((pred["obj"] > 0) & ~described).sum(1)
    background_ok = (pred["bg_color"] == target["bg_color"]) & (pred["bg_kind"] == target["bg_kind"])
    n_described = described.sum(1)
    per_image = (object_ok.sum(1) + background_ok) / (n_described + 1 + extra)
    total = n_described.sum().clamp(min=1)
    return {
        "caption_accuracy": per_image.float().mean().item(),
        "object_accuracy": (object_ok.sum() / total).item(),
        "shape_accuracy": (shape_ok.sum() / total).item(),
        "color_accuracy": (color_ok.sum() / total).item(),
        "size_accuracy": (size_ok.sum() / total).item(),
        "presence_accuracy": ((pred["obj"] > 0) == described).float().mean().item(),
        "background_accuracy": background_ok.float().mean().item(),
        "extra_objects": extra.float().mean().item(),
    }


def caption_accuracy(images, prompts_or_attributes, device: str = "cpu", model: CaptionReader | None = None) -> float:
    """Mean per-image caption score in [0, 1] (see the module docstring)."""
    return caption_scores(images, prompts_or_attributes, device, model)["caption_accuracy"]


def generator_accuracy(
    n: int = 2000, seed: int = 12345, device: str = "cpu", model: CaptionReader | None = None
) -> dict[str, float]:
    """Caption scores of the reader on ``n`` fresh generator images (a seed training never draws from)."""
    images, captions, _ = generate_batch(n, seed=seed, device=device)
    return caption_scores(images / 2 + 0.5, captions, device, model)


def image_metrics(images, reference_images) -> dict[str, float]:
    """Mean SSIM, PSNR and, when its weights are on disk, LPIPS of ``images`` against
    ``reference_images`` (any format :func:`to_tensor` takes, in [0, 1]); computed by
    :func:`ditfastattn.evaluation.image_metrics`, which logs why LPIPS is skipped."""
    # Imported here: the harness imports the testbed, not the other way round at import time.
    from ..evaluation import image_metrics as harness_image_metrics

    return harness_image_metrics(to_tensor(images), to_tensor(reference_images))
