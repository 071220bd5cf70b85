"""Quality harness: images (or videos) with and without plans, compared to full attention from the
same seed.

SSIM and PSNR (torchmetrics) are always computed; for videos per frame, and over time as the
agreement of frame-to-frame changes with the reference's (:func:`video_metrics`). LPIPS and CLIP
score need weights that are not downloaded here: they run only when found locally (images only),
and are otherwise skipped with a logged reason.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ._files import write_atomically
from ._prompts import _same, prompt_kwargs
from .adapters import adapter_for
from .calibration import calibrate
from .search_config import SearchConfig
from .plan import Plan
from .runtime import _transformer_of, applied, apply, remove

logger = logging.getLogger(__name__)

CLIP_MODEL = "openai/clip-vit-large-patch14"


def _lpips_weights() -> tuple[Path | None, str]:
    try:
        import torchvision
    except ImportError:
        return None, "LPIPS skipped: torchvision is not installed"
    url = torchvision.models.AlexNet_Weights.DEFAULT.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not path.exists():
        return None, f"LPIPS skipped: its AlexNet weights are not at {path} (nothing is downloaded; put {url} there)"
    return path, f"LPIPS with AlexNet weights from {path}"


@functools.lru_cache(maxsize=1)
def _lpips():
    path, message = _lpips_weights()
    logger.info(message)
    if path is None:
        return None
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)


@functools.lru_cache(maxsize=1)
def _clip():
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(CLIP_MODEL, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(CLIP_MODEL, local_files_only=True)
    except (ImportError, OSError, ValueError) as err:
        logger.info("CLIP score skipped: %s is not available locally (%s)", CLIP_MODEL, type(err).__name__)
        return None
    return CLIPScore(model_name_or_path=lambda: (model, processor))


def _unit_range(name: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 on the CPU, refused unless floating point in [0, 1]: the metrics take a peak
    of 1, and 0..255 pictures clamped to it would make them meaningless."""
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point in [0, 1], as pipelines give them with output_type='pt'; "
                        f"got {x.dtype}: divide 0..255 pictures by 255")
    x = x.float().cpu()
    if not bool(((x >= 0) & (x <= 1)).all()):
        raise ValueError(f"{name} must be in [0, 1]; they range over [{x.min().item():g}, {x.max().item():g}]: divide "
                         "0..255 pictures by 255, map [-1, 1] ones with x / 2 + 0.5, or clamp them")
    return x


@torch.no_grad()
def image_metrics(images: torch.Tensor, references: torch.Tensor) -> dict[str, float]:
    """Mean SSIM, PSNR (dB, per image then averaged) and, when available, LPIPS; (N, 3, H, W) floating
    point in [0, 1] (TypeError or ValueError otherwise)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    images, references = _unit_range("images", images), _unit_range("references", references)
    if images.shape != references.shape:
        raise ValueError(f"images {tuple(images.shape)} and references {tuple(references.shape)} differ in shape")
    metrics = {
        "ssim": structural_similarity_index_measure(images, references, data_range=1.0).item(),
        "psnr": peak_signal_noise_ratio(images, references, data_range=1.0, dim=(1, 2, 3)).item(),
    }
    lpips = _lpips()
    if lpips is not None:
        metrics["lpips"] = lpips(images, references).item()
    return metrics


def _checked_videos(videos: torch.Tensor, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if videos.shape != references.shape:
        raise ValueError(f"videos {tuple(videos.shape)} and references {tuple(references.shape)} differ in shape")
    if videos.dim() != 5 or videos.shape[2] != 3 or videos.shape[1] < 2:
        raise ValueError(f"videos must be (N, F, 3, H, W) with F >= 2 frames, as video pipelines give them with "
                         f"output_type='pt'; got {tuple(videos.shape)}")
    return _unit_range("videos", videos), _unit_range("references", references)


@torch.no_grad()
def video_scores(videos: torch.Tensor, references: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-video scores of ``videos`` against ``references``, both (N, F, 3, H, W) floating point in
    [0, 1] (TypeError or ValueError otherwise):

    - ``ssim``, ``psnr`` (N, F): each frame against the reference's same frame (PSNR in dB, inf
      where a frame is identical).
    - ``temporal_psnr`` (N,): PSNR in dB of the frame-to-frame changes (frame t+1 - frame t, every
      t) against the reference's, with the pixels' peak 1: how far the video's motion and flicker
      depart from the reference's. A constant error in every frame leaves it inf; errors that
      change from frame to frame lower it.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    videos, references = _checked_videos(videos, references)
    n, frames = videos.shape[:2]
    flat, flat_ref = videos.flatten(0, 1), references.flatten(0, 1)
    ssim = structural_similarity_index_measure(flat, flat_ref, data_range=1.0, reduction="none")
    psnr = peak_signal_noise_ratio(flat, flat_ref, data_range=1.0, dim=(1, 2, 3), reduction="none")
    changes = (videos.diff(dim=1) - references.diff(dim=1)).double()
    temporal = -10 * torch.log10(changes.square().mean(dim=(1, 2, 3, 4)))
    return {"ssim": ssim.view(n, frames), "psnr": psnr.view(n, frames), "temporal_psnr": temporal.float()}


def video_metrics(videos: torch.Tensor, references: torch.Tensor) -> dict[str, float | list[float]]:
    """Means over videos of :func:`video_scores`: ``ssim`` and ``psnr`` over all frames,
    ``temporal_psnr``, and ``ssim_per_frame`` and ``psnr_per_frame`` (one value per frame)."""
    scores = video_scores(videos, references)
    return {
        "ssim": scores["ssim"].mean().item(),
        "psnr": scores["psnr"].mean().item(),
        "temporal_psnr": scores["temporal_psnr"].mean().item(),
        "ssim_per_frame": scores["ssim"].mean(dim=0).tolist(),
        "psnr_per_frame": scores["psnr"].mean(dim=0).tolist(),
    }


def _metrics(outputs: torch.Tensor, references: torch.Tensor) -> dict[str, Any]:
    """Video metrics for videos (N, F, 3, H, W), image metrics for images (N, 3, H, W)."""
    return video_metrics(outputs, references) if references.dim() == 5 else image_metrics(outputs, references)


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: Sequence[str]) -> float | None:
    """CLIP score of images against their prompts, or None when CLIP's weights are not local (or
    the outputs are videos)."""
    metric = _clip() if images.dim() == 4 else None
    if metric is None or not all(isinstance(p, str) for p in prompts):
        return None
    return metric((_unit_range("images", images) * 255).to(torch.uint8), list(prompts)).item()


def require_metrics() -> None:
    """Refuse before any image (not after them all) where the metrics' library is missing."""
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        raise ImportError("evaluation computes SSIM and PSNR with torchmetrics: pip install torchmetrics "
                          "(or ditfastattn[eval])") from None


def _as_list(prompts) -> list:
    """A bare prompt (string or dict of pipeline kwargs) is one prompt."""
    return [prompts] if isinstance(prompts, (str, dict)) else list(prompts)


def generate(pipe, prompts, *, num_inference_steps: int, seed: int = 0, **kwargs) -> tuple[torch.Tensor, float]:
    """Images (N, 3, H, W) in [0, 1] for all prompts in one batch, and seconds per image; from a
    video pipeline (its output's ``frames``), videos (N, F, 3, H, W) and seconds per video."""
    prompts = _as_list(prompts)
    call, _ = prompt_kwargs(prompts)
    for name in set(call) & set(kwargs):  # the same setting given twice: once
        if not _same(call[name], kwargs[name]):
            raise ValueError(f"the prompt dicts set {name}={call[name]!r} but {kwargs[name]!r} is given too: give it once")
        del call[name]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    output = pipe(
        num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed), output_type="pt",
        **call, **kwargs,
    )
    images = output.images if hasattr(output, "images") else output.frames
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return images.float().cpu(), (time.perf_counter() - start) / len(prompts)


def _save(images: torch.Tensor, folder: Path) -> None:
    """One PNG per image; a video's frames side by side in one PNG."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if images.dim() == 5:
        images = torch.cat(images.unbind(1), dim=-1)  # (N, 3, H, F * W)
    for index, image in enumerate(images):
        array = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8")
        write_atomically(folder / f"{index:03d}.png", lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def evaluate(
    pipe,
    prompts: Sequence[str | dict],
    plans: dict[str, Plan],
    *,
    num_inference_steps: int,
    seed: int = 0,
    out_dir: str | Path | None = None,
    extra_metrics=None,
    impl: str = "auto",
    **pipe_kwargs,
) -> dict[str, dict[str, Any]]:
    """Generate ``prompts`` with full attention and under each plan (applied with ``impl``); compare
    to full attention.

    Returns ``{"reference": {...}, name: {...}}`` (the reference is full attention) with sparsity, seconds per image, SSIM, PSNR and
    (when local weights exist) LPIPS and CLIP score. ``extra_metrics(images, prompts)`` may add
    its own numbers (the testbed adds caption accuracy). Images go to ``out_dir/<name>/`` if given.
    A video pipeline's videos get :func:`video_metrics` instead (seconds are per video, each video
    saved as its frames in a row).
    """
    if "reference" in plans:
        raise ValueError("'reference' names the full-attention images; give the plan another name")
    prompts = _as_list(prompts)
    transformer, _ = _transformer_of(pipe)
    if applied(pipe):  # its reference images would not be full attention's
        raise RuntimeError("a ditfastattn plan is applied to this pipeline: call ditfastattn.remove(pipe) first, so "
                           "that the reference images are full attention's")
    require_metrics()
    spec = adapter_for(transformer).describe(transformer)
    for plan in plans.values():  # before the first image, not after the reference run
        plan.check_compatible(spec, num_inference_steps)
    out = Path(out_dir) if out_dir is not None else None
    reference, seconds = generate(pipe, prompts, num_inference_steps=num_inference_steps, seed=seed, **pipe_kwargs)

    def describe(images, seconds, sparsity):
        row = {"sparsity": sparsity, "seconds_per_image": seconds}
        score = clip_score(images, prompts)
        if score is not None:
            row["clip_score"] = score
        if extra_metrics is not None:
            row.update(extra_metrics(images, prompts))
        return row

    results = {"reference": describe(reference, seconds, 0.0)}
    if out is not None:
        _save(reference, out / "reference")
    for name, plan in plans.items():
        apply(pipe, plan, impl=impl)
        try:
            images, seconds = generate(pipe, prompts, num_inference_steps=num_inference_steps, seed=seed, **pipe_kwargs)
        finally:
            remove(pipe)
        results[name] = {**describe(images, seconds, plan.summary()["sparsity"]), **_metrics(images, reference)}
        if out is not None:
            _save(images, out / name)
    return results


def delta_sweep(
    pipe,
    calibration_prompts: Sequence[str | dict],
    prompts: Sequence[str | dict],
    deltas: Sequence[float],
    config: SearchConfig,
    *,
    out_dir: str | Path | None = None,
    extra_metrics=None,
    progress: bool = True,
) -> tuple[dict[str, dict[str, Any]], dict[str, Plan]]:
    """Calibrate one plan per delta on ``calibration_prompts``, then :func:`evaluate` all on ``prompts``.

    Deltas that print alike (``f"{delta:g}"``) would share one plan name: they are refused. With
    ``out_dir`` each plan is saved there (``plan_<name>.json``) as soon as it is calibrated, so an
    interrupted evaluation keeps them. A measured sensitivity is measured once, for the first delta,
    and reused: it does not depend on the delta.
    """
    names = [f"delta={delta:g}" for delta in deltas]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"give one or more distinct deltas; got {list(deltas)}")
    require_metrics()
    configs = [dataclasses.replace(config, delta=delta) for delta in deltas]  # checks every delta first
    plans = {}
    for name, search in zip(names, configs):
        if plans and config.sensitivity in ("measure", "measure+schedule"):
            search = dataclasses.replace(search, sensitivity=next(iter(plans.values())).provenance["search"]["sensitivity"])
        plans[name] = calibrate(pipe, calibration_prompts, search, progress=progress)
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            plans[name].save(Path(out_dir) / f"plan_{name}.json")
    # The images compared run as the calibration did: its pipeline arguments, size, guidance and op.
    kwargs = {**config.pipeline_kwargs, **{name: getattr(config, name) for name in ("height", "width", "guidance_scale")
                                           if getattr(config, name) is not None}}
    results = evaluate(
        pipe, prompts, plans, num_inference_steps=config.num_inference_steps, seed=config.seed,
        out_dir=out_dir, extra_metrics=extra_metrics, impl=config.impl, **kwargs,
    )
    return results, plans

