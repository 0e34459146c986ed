"""Sampler and noise-schedule names, and how the denoising loop calls the scheduler.

Samplers are diffusers' own classes, created with ``from_config`` from the base's
``scheduler_config.json`` exactly as ``Scheduler.from_config(pipe.scheduler.config, **options)``
swaps them in diffusers. A *schedule* (A1111's "schedule type") is a second set of config
options that places the steps: Karras / exponential / beta sigmas or a timestep spacing.
The tables hold class names and options, not classes, so reading the choices does not
import diffusers. docs/a1111.md maps A1111's samplers and schedules onto these.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# name -> diffusers class. The first eight are the original names (kept in this order: error
# messages list them first); "dpm++_karras" is kept as dpm++ with the karras schedule.
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
    "plms": "PNDMScheduler",
    "dpm2": "KDPM2DiscreteScheduler",
    "dpm2_a": "KDPM2AncestralDiscreteScheduler",
    "dpm++_2s": "DPMSolverSinglestepScheduler",
    "dpm++_sde": "DPMSolverSDEScheduler",
    "dpm++_2m_sde": "DPMSolverMultistepScheduler",
    "dpm++_2m_sde_heun": "DPMSolverMultistepScheduler",
    "dpm++_3m_sde": "DPMSolverMultistepScheduler",
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
}

# Config overrides of a sampler name (the rest is the base's config and diffusers' defaults).
# "plms" is PNDM without its Runge-Kutta warm-up: the PLMS sampler of CompVis and A1111.
# "dpm++_2s" is DPM-Solver++(2S): singlestep, second order.
SCHEDULER_OPTIONS = {
    "dpm++_karras": {"use_karras_sigmas": True},
    "plms": {"skip_prk_steps": True},
    "dpm++_2s": {"solver_order": 2, "algorithm_type": "dpmsolver++"},
    "dpm++_2m_sde": {"algorithm_type": "sde-dpmsolver++"},
    "dpm++_2m_sde_heun": {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
    "dpm++_3m_sde": {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
}

# Schedule name -> (options the sampler class must take, options applied where it takes them).
# "automatic" keeps the sampler's own placement. The names are A1111's (sd_schedulers.py); the
# ones with no diffusers option (kl_optimal, align_your_steps) are not here. Karras,
# exponential and beta sigmas span the full trained range whatever the base config's
# spacing says, hence their "linspace" where the class reads the spacing.
SCHEDULES: dict[str, tuple[dict, dict]] = {
    "automatic": ({}, {}),
    "uniform": ({"timestep_spacing": "linspace"}, {}),
    "karras": ({"use_karras_sigmas": True}, {"timestep_spacing": "linspace"}),
    "exponential": ({"use_exponential_sigmas": True}, {"timestep_spacing": "linspace"}),
    "polyexponential": ({"use_exponential_sigmas": True}, {"timestep_spacing": "linspace"}),  # A1111's rho 1
    "sgm_uniform": ({"timestep_spacing": "trailing"}, {}),
    "simple": ({"timestep_spacing": "trailing"}, {}),
    "normal": ({"timestep_spacing": "linspace"}, {}),
    "ddim": ({"timestep_spacing": "leading"}, {}),
    "beta": ({"use_beta_sigmas": True}, {"timestep_spacing": "linspace"}),
}
_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
# Config keys a class takes but its set_timesteps never reads (LCM and TCD pick their own steps).
_UNREAD = {"LCMScheduler": {"timestep_spacing"}, "TCDScheduler": {"timestep_spacing"}}


def scheduler_class(name: str) -> type:
    """The diffusers class behind a scheduler name of :data:`SCHEDULERS`."""
    import diffusers

    return getattr(diffusers, SCHEDULERS[name])


def _init_parameters(name: str) -> set[str]:
    """The config keys the class of ``name`` takes and uses."""
    return set(inspect.signature(scheduler_class(name).__init__).parameters) - _UNREAD.get(SCHEDULERS[name], set())


def schedule_error(name: str, schedule: str) -> str | None:
    """Why sampler ``name`` cannot take ``schedule`` (both known names), or None when it can."""
    required, _ = SCHEDULES[schedule]
    missing = sorted(set(required) - _init_parameters(name))
    if missing:
        usable = [s for s in SCHEDULES if not set(SCHEDULES[s][0]) - _init_parameters(name)]
        return (f"schedule {schedule!r} needs {', '.join(missing)}, which scheduler {name!r} "
                f"({SCHEDULERS[name]}) does not take; it takes: {', '.join(usable)}")
    own = [flag for flag in _SIGMA_FLAGS if SCHEDULER_OPTIONS.get(name, {}).get(flag)]
    if own and required and not any(required.get(flag) for flag in own):
        return (f"schedule {schedule!r} conflicts with scheduler {name!r}, which sets {own[0]}; "
                f"use scheduler 'dpm++' with schedule {schedule!r}")
    return None


def scheduler_options(name: str, schedule: str = "automatic", seed: int | None = None) -> dict:
    """The ``from_config`` overrides of a sampler, a schedule and (for the SDE sampler) the seed.

    ``DPMSolverSDEScheduler`` draws its Brownian noise from ``noise_sampler_seed``: it is set
    to the request's seed, so the same request gives the same bytes.
    """
    takes = _init_parameters(name)
    required, where_taken = SCHEDULES[schedule]
    options = {**SCHEDULER_OPTIONS.get(name, {}), **{k: v for k, v in where_taken.items() if k in takes},
               **required}
    if "noise_sampler_seed" in takes and seed is not None:
        options["noise_sampler_seed"] = seed
    return options


def make_scheduler(name: str, config: dict, schedule: str = "automatic", seed: int | None = None):
    """A fresh scheduler, so state from one generation never leaks into the next."""
    return scheduler_class(name).from_config(config, **scheduler_options(name, schedule, seed))


def takes_eta(name: str) -> bool:
    """Whether the scheduler's ``step`` uses ``eta`` (DDIM's stochasticity, TCD's gamma)."""
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
