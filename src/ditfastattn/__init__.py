"""ditfastattn: head-wise compressed attention for diffusers MMDiT pipelines (SD3, SD3.5, FLUX.1)."""

__version__ = "0.1.0"
