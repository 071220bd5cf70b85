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


def steps_of(scheduler) -> int:
    """The denoising steps of ``scheduler``'s timesteps: one per timestep, which tells them apart."""
    timesteps = scheduler.timesteps
    values = timesteps.tolist() if torch.is_tensor(timesteps) else list(timesteps)
    if len(set(values)) != len(values):
        raise ValueError(
            f"{type(scheduler).__name__} evaluates the model twice at some timesteps (a second-order scheduler), but "
            "ditfastattn tells denoising steps apart by their timestep, so a plan runs with first-order schedulers "
            "only: use one such as FlowMatchEulerDiscreteScheduler, or ditfastattn.remove()"
        )
    return len(values)


class SchedulerHook:
    """Tells the session the step count at every ``set_timesteps`` of one scheduler instance.

    Wraps whatever ``set_timesteps`` the instance has (a user's own instance-level patch
    included) and puts exactly that back on :meth:`undo`.
    """

    _ABSENT = object()

    def __init__(self, scheduler, session):
        self.scheduler = scheduler
        self.before = vars(scheduler).get("set_timesteps", self._ABSENT)
        original = scheduler.set_timesteps
        hook = self

        # functools.wraps keeps the signature, which pipelines inspect (retrieve_timesteps).
        @functools.wraps(original)
        def set_timesteps(*args, **kwargs):
            result = original(*args, **kwargs)
            if hook.active:  # a patch wrapped around this one may outlive remove()
                session.scheduler_set(steps_of(scheduler))
            return result

        self.active = True
        set_timesteps.ditfastattn_session = session  # remove(pipe) finds it after pipe.transformer was replaced
        self.wrapper = set_timesteps
        scheduler.set_timesteps = set_timesteps

    def undo(self) -> None:
        self.active = False
        if vars(self.scheduler).get("set_timesteps") is not self.wrapper:
            return  # patched again since apply: that patch stays (it calls this one, now inactive)
        if self.before is self._ABSENT:
            del self.scheduler.set_timesteps
        else:
            self.scheduler.set_timesteps = self.before
