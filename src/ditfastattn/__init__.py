"""ditfastattn: head-wise compressed attention for diffusers MMDiT pipelines (SD3, SD3.5, FLUX.1 and
Kontext, FLUX.2, Chroma, Qwen-Image, Z-Image, HunyuanImage 2.1).

    import ditfastattn
    plan = ditfastattn.Plan.load("plan.json")
    ditfastattn.apply(pipe, plan)
    image = pipe(prompt, num_inference_steps=plan.num_steps).images[0]
    ditfastattn.remove(pipe)
"""

__version__ = "0.1.0"

from . import ops
from .calibration import calibrate
from .search_config import METHOD_SETS, SearchConfig
from .plan import Plan, PlanMismatchError
from .runtime import apply, remove

__all__ = ["Plan", "PlanMismatchError", "SearchConfig", "METHOD_SETS", "apply", "calibrate", "remove", "ops", "__version__"]
