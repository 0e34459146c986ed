"""Scheduler names and how the denoising loop calls them.

Schedulers are diffusers' own classes, created with ``from_config`` from the base's
``scheduler_config.json`` exactly as ``Scheduler.from_config(pipe.scheduler.config)``
swaps them in diffusers. The table holds class names, not classes, so reading the
choices does not import diffusers.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "dpm++_karras": "DPMSolverMultistepScheduler",
}

# Config overrides of a name: "dpm++_karras" is A1111's "DPM++ 2M Karras" (Karras sigmas).
SCHEDULER_OPTIONS = {"dpm++_karras": {"use_karras_sigmas": True}}


def scheduler_class(name: str) -> type:
    """The diffusers class behind a scheduler name of :data:`SCHEDULERS`."""
    import diffusers

    return getattr(diffusers, SCHEDULERS[name])


def make_scheduler(name: str, config: dict):
    """A fresh scheduler, so state from one generation never leaks into the next."""
    return scheduler_class(name).from_config(config, **SCHEDULER_OPTIONS.get(name, {}))


def takes_eta(name: str) -> bool:
    """Whether the scheduler's ``step`` uses ``eta`` (DDIM's stochasticity)."""
    return "eta" in inspect.signature(scheduler_class(name).step).parameters


def step_kwargs(scheduler, generator: torch.Generator, eta: float) -> dict:
    """The keyword arguments diffusers' ``prepare_extra_step_kwargs`` passes to ``step``."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs
