"""Denoising steps against the plan's: the scheduler's step count at every ``set_timesteps``, and
what is said when a generation runs more or fewer steps than the plan has."""

from __future__ import annotations

import functools
import logging

import torch

from ..plan import PlanMismatchError

logger = logging.getLogger("ditfastattn.runtime")


def too_many_steps(planned: int, who: str) -> PlanMismatchError:
    return PlanMismatchError(
        f"{who} ran more than the plan's {planned} denoising steps; "
        f"pass num_inference_steps={planned} or calibrate a plan for your step count"
    )


def warn_short_generation(ran: int, planned: int) -> None:
    logger.warning(
        "the last generation stopped after %d of the plan's %d denoising steps, so it ran the plan's rows "
        "for other steps (harmless for a warm-up or an interrupted run); pass num_inference_steps=%d, and apply "
        "the plan to the pipeline rather than its transformer to have the step count checked before denoising",
        ran, planned, planned,
    )


def warn_unhooked_tie(dtype: torch.dtype) -> None:
    logger.warning(
        "the transformer got the same %s timestep twice in a row; with no scheduler to follow (the plan was applied "
        "to the transformer alone) that counts as a second call of one step (classifier-free guidance as a second "
        "call), but in %s two neighbouring steps can round to one timestep, which would then run the wrong plan "
        "rows: apply the plan to the pipeline (ditfastattn.apply(pipe, plan)), whose scheduler tells the steps apart",
        dtype, dtype,
    )


def steps_of(scheduler) -> int:
    """The denoising steps of ``scheduler``'s timesteps: one per timestep, which tells them apart."""
    timesteps = scheduler.timesteps
    values = timesteps.tolist() if torch.is_tensor(timesteps) else list(timesteps)
    if len(set(values)) != len(values):
        raise ValueError(
            f"{type(scheduler).__name__} has a timestep twice in its schedule (a second-order scheduler, or sigmas "
            "or timesteps given with a value repeated), but ditfastattn tells denoising steps apart by their "
            "timestep: give a schedule of distinct values to a first-order scheduler (such as "
            "FlowMatchEulerDiscreteScheduler), or ditfastattn.remove()"
        )
    return len(values)


class SchedulerHook:
    """Tells the session the step count at every ``set_timesteps`` of one scheduler instance, and
    each ``step`` it takes (a denoising step done: the timesteps the pipeline passes the transformer
    in bfloat16 can round two steps to one value).

    Wraps whatever ``set_timesteps`` and ``step`` the instance has (a user's own instance-level
    patches included) and puts exactly those back on :meth:`undo`.
    """

    _ABSENT = object()

    def __init__(self, scheduler, session):
        self.scheduler = scheduler
        self.active = True
        self.before: dict[str, object] = {}
        self.wrappers: dict[str, object] = {}
        self._wrap("set_timesteps", lambda: session.scheduler_set(steps_of(scheduler)))
        if callable(getattr(scheduler, "step", None)):
            self._wrap("step", session.scheduler_stepped)
        self.wrappers["set_timesteps"].ditfastattn_session = session  # remove(pipe) finds it after pipe.transformer was replaced

    def _wrap(self, name: str, after) -> None:
        self.before[name] = vars(self.scheduler).get(name, self._ABSENT)
        original = getattr(self.scheduler, name)
        hook = self

        # functools.wraps keeps the signature, which pipelines inspect (retrieve_timesteps).
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            if hook.active:  # a patch wrapped around this one may outlive remove()
                after()
            return result

        wrapper.ditfastattn_hook = hook
        self.wrappers[name] = wrapper
        setattr(self.scheduler, name, wrapper)

    def undo(self) -> None:
        self.active = False
        for name, wrapper in self.wrappers.items():
            if vars(self.scheduler).get(name) is not wrapper:
                continue  # patched again since apply: that patch stays (it calls this one, now inactive)
            before = self.before[name]
            # Another plan's hook removed while this one wrapped it (pipelines sharing the scheduler): past it too.
            while (inner := getattr(before, "ditfastattn_hook", None)) is not None and not inner.active:
                before = inner.before[name]
            if before is self._ABSENT:
                delattr(self.scheduler, name)
            else:
                setattr(self.scheduler, name, before)
