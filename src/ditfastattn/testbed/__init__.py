"""A bundled, trained MMDiT testbed: two small pixel-space models built from diffusers' own classes
(an SD3-style ``SD3Transformer2DModel`` and a FLUX-style ``FluxTransformer2DModel``), trained on
procedural captioned shapes, with an evaluator that reads captions back from images.

    from ditfastattn.testbed import load_pipeline, load_prompts, caption_accuracy, image_metrics

    pipe = load_pipeline("sd3")  # or "flux"
    prompts = load_prompts("heldout")
    images = pipe(prompts, num_inference_steps=20, output_type="pt").images
    caption_accuracy(images, prompts)

Modules: :mod:`.data` (dataset and caption grammar), :mod:`.text` (all-MiniLM-L6-v2 encoder),
:mod:`.models`, :mod:`.pipeline`, :mod:`.evaluator`; :mod:`.training` (``python -m
ditfastattn.testbed.training.train``, in a source checkout only: the wheel ships the weights).

The video testbed: :mod:`.video_data` (captioned clips of moving, appearing and colour-changing
shapes) and :class:`VideoTestbedPipeline` (a ``HunyuanVideoTransformer3DModel``, sampled as
``HunyuanVideoPipeline`` samples), loaded with ``load_pipeline("video")`` (8 frames of 48x48) or
``load_pipeline("video-large")`` (8 frames of 96x96: a band block a strip of the frame, as at real
video sizes); ``ditfastattn.evaluation.video_metrics`` compares clips per frame and over time.
"""

from .data import Scenes, generate_batch, load_prompts, parse_caption, sample_scenes
from .evaluator import caption_accuracy, caption_scores, image_metrics
from .pipeline import FluxTestbedPipeline, SD3TestbedPipeline, VideoTestbedPipeline, load_pipeline

__all__ = [
    "FluxTestbedPipeline",
    "SD3TestbedPipeline",
    "Scenes",
    "VideoTestbedPipeline",
    "caption_accuracy",
    "caption_scores",
    "generate_batch",
    "image_metrics",
    "load_pipeline",
    "load_prompts",
    "parse_caption",
    "sample_scenes",
]
