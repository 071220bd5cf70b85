"""Text states computed once where the text encoder is, for training where it cannot go.

The GPU machine takes the working tree and at most 64 MiB in all, and the bundled weights leave no
room for all-MiniLM-L6-v2 (45 MB even in fp16). So a file written here holds the encoder's states
of a fixed pool of scenes (drawn from the testbed's generator by ``--seed``), of the empty prompt
and of the bundled calibration and held-out prompts; ``train.py --text-states FILE`` trains on
that pool (each step a random batch of its scenes, new noise) instead of fresh scenes, and draws
its sample grid with the file's held-out states. Only the real tokens are stored, as int8 with one
scale per token (error at most 1/254 of the token's largest value), about 7.7 KB a caption::

    python -m ditfastattn.testbed.training.text_states --kind video --count 3072 --out states.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import data, video_data
from ..models import VIDEO_FRAME_SIZES, is_video
from ..text import TEXT_DIM, TEXT_TOKENS, get_text_encoder

FORMAT = "ditfastattn.testbed.text_states"


def source(kind: str):
    """The data module of a testbed kind: its scenes, captions and bundled prompts."""
    return video_data if is_video(kind) else data


def build(kind: str, count: int, seed: int) -> dict:
    """The file's contents: the pool's captions (``count`` scenes drawn with ``seed``), then "" and the
    bundled calibration and held-out prompts, with their states quantised token by token."""
    module = source(kind)
    pool = module.sample_scenes(count, seed=seed).captions()
    extra = [""] + module.load_prompts("calibration") + module.load_prompts("heldout")
    captions = pool + [c for c in dict.fromkeys(extra) if c not in pool]
    encoder = get_text_encoder("cpu")
    lengths, tokens, scales = [], [], []
    for start in range(0, len(captions), 256):
        states, _ = encoder(captions[start : start + 256])
        for row in states:
            real = row[row.ne(0).any(dim=-1)]  # padding rows are exactly zero (see ..text)
            scale = real.abs().amax(dim=-1).clamp(min=1e-12) / 127
            lengths.append(len(real))
            tokens.append(torch.round(real / scale[:, None]).to(torch.int8))
            scales.append(scale)
    return {
        "type": FORMAT,
        "version": 1,
        "kind": kind,
        "seed": seed,
        "count": count,
        "captions": captions,
        "lengths": torch.tensor(lengths, dtype=torch.int16),
        "tokens": torch.cat(tokens),
        "scales": torch.cat(scales),
    }


class TextStates:
    """A file from :func:`build`, on ``device``: called with captions it returns (states (N, 32, 384),
    pooled (N, 384)) as the text encoder does; :meth:`scenes` gives the pool it was built for."""

    def __init__(self, path: str | Path, kind: str, device: torch.device | str = "cpu"):
        table = torch.load(path, map_location="cpu")
        if not isinstance(table, dict) or table.get("type") != FORMAT:
            raise ValueError(f"{path} is not a text-states file; write one with "
                             "`python -m ditfastattn.testbed.training.text_states`")
        if source(table["kind"]) is not source(kind):  # the video kinds share their captions
            raise ValueError(f"{path} holds {table['kind']} captions; this run trains {kind}: write one with --kind {kind}")
        self.kind, self.seed, self.count = kind, table["seed"], table["count"]
        self.captions = table["captions"]
        self.index = {caption: i for i, caption in enumerate(self.captions)}
        lengths = table["lengths"].long()
        states = torch.zeros(len(lengths), TEXT_TOKENS, TEXT_DIM)
        real = torch.arange(TEXT_TOKENS)[None, :] < lengths[:, None]
        states[real] = table["tokens"].float() * table["scales"].float()[:, None]
        self.states = states.to(device)
        # The encoder's pooled state: the mean of the real tokens.
        self.pooled = (states.sum(dim=1) / lengths[:, None]).to(device)

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [c for c in captions if c not in self.index]
        if missing:
            raise KeyError(f"no precomputed text states for {missing[:3]} ({len(missing)} captions); "
                           "rebuild the file with them")
        rows = torch.tensor([self.index[c] for c in captions], device=self.states.device)
        return self.states[rows], self.pooled[rows]

    def scenes(self):
        """The pool's scenes, drawn again from the file's seed; refused if the generator's captions
        changed since the file was written."""
        scenes = source(self.kind).sample_scenes(self.count, seed=self.seed)
        if scenes.captions() != self.captions[: self.count]:
            raise ValueError("the testbed's generator no longer draws the scenes this text-states file was built "
                             "for; rebuild it")
        return scenes

    def draw(self, pool, size: int, generator: torch.Generator) -> tuple[object, list[str]]:
        """``size`` scenes drawn at random from ``pool`` (:meth:`scenes`), and their captions."""
        rows = torch.randint(self.count, (size,), generator=generator)
        scenes = type(pool)(**{name: value[rows] for name, value in vars(pool).items()})
        return scenes, [self.captions[i] for i in rows.tolist()]

    def prompt_arguments(self, prompt: str) -> dict[str, torch.Tensor]:
        """A testbed pipeline's embedding arguments for ``prompt``, with "" as the negative prompt."""
        states, pooled = self([prompt, ""])
        return {"prompt_embeds": states[:1], "pooled_prompt_embeds": pooled[:1],
                "negative_prompt_embeds": states[1:], "negative_pooled_prompt_embeds": pooled[1:]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("sd3", "flux", *VIDEO_FRAME_SIZES), required=True)
    p.add_argument("--count", type=int, default=3072, help="scenes in the training pool")
    p.add_argument("--seed", type=int, default=0, help="seed the pool's scenes are drawn with")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.count < 1:
        p.error(f"--count must be at least 1; got {args.count}")
    table = build(args.kind, args.count, args.seed)
    torch.save(table, args.out)
    print(f"wrote {len(table['captions'])} captions ({args.count} pool scenes) to {args.out}, "
          f"{args.out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
