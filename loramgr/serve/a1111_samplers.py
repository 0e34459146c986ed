"""A1111's samplers and schedule types as loramgr schedulers and schedules (docs/a1111.md).

Names, aliases and each sampler's own schedule are those of A1111 1.9+
(``modules/sd_samplers_kdiffusion.py``, ``sd_samplers_timesteps.py``, ``sd_samplers_lcm.py``,
``sd_schedulers.py``); a name is read as ``get_sampler_and_scheduler`` reads it, so the
pre-1.9 names with a schedule suffix ("DPM++ 2M Karras") still work. Every schedule type
A1111 accepts is accepted: where diffusers places the steps elsewhere than A1111 would,
the response's ``info`` says so in a warning, naming what was used instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..pipeline.schedulers import schedule_error
from .catalog import CatalogError


@dataclass(frozen=True)
class Sampler:
    """One A1111 sampler: the loramgr scheduler that runs it and how A1111 schedules it.

    ``automatic``: the schedule A1111's "Automatic" means for this sampler (its
    ``options["scheduler"]``, else k-diffusion's ``get_sigmas``: uniform). ``timesteps``:
    A1111 runs it on its own timesteps and ignores the schedule type. ``eta_one``: A1111's
    k-diffusion function takes eta (default 1, full noise), which diffusers' scheduler always
    uses. ``note``: how the diffusers sampler differs from A1111's, a warning in ``info``.
    """

    scheduler: str
    aliases: tuple[str, ...]
    automatic: str
    timesteps: bool = False
    eta_one: bool = False
    note: str = ""


_DISCARD = "A1111 drops the next-to-last sigma (discard_next_to_last_sigma); diffusers keeps it"

SAMPLERS: dict[str, Sampler] = {
    "DPM++ 2M": Sampler("dpm++", ("k_dpmpp_2m",), "karras"),
    "DPM++ SDE": Sampler("dpm++_sde", ("k_dpmpp_sde",), "karras", eta_one=True),
    "DPM++ 2M SDE": Sampler("dpm++_2m_sde", ("k_dpmpp_2m_sde",), "exponential", eta_one=True),
    "DPM++ 2M SDE Heun": Sampler("dpm++_2m_sde_heun", ("k_dpmpp_2m_sde_heun",), "exponential", eta_one=True),
    "DPM++ 2S a": Sampler("dpm++_2s", ("k_dpmpp_2s_a",), "karras", eta_one=True,
                          note="DPM++ 2S a runs as diffusers' DPM-Solver++(2S), which adds no ancestral noise"),
    "DPM++ 3M SDE": Sampler("dpm++_3m_sde", ("k_dpmpp_3m_sde",), "exponential", eta_one=True,
                            note="DPM++ 3M SDE runs as diffusers' third-order SDE DPM-Solver++, whose update is "
                                 f"its own, not k-diffusion's; {_DISCARD}"),
    "Euler a": Sampler("euler_a", ("k_euler_a", "k_euler_ancestral"), "uniform", eta_one=True),
    "Euler": Sampler("euler", ("k_euler",), "uniform"),
    "LMS": Sampler("lms", ("k_lms",), "uniform"),
    "Heun": Sampler("heun", ("k_heun",), "uniform"),
    "DPM2": Sampler("dpm2", ("k_dpm_2",), "karras", note=f"DPM2: {_DISCARD}"),
    "DPM2 a": Sampler("dpm2_a", ("k_dpm_2_a",), "karras", eta_one=True, note=f"DPM2 a: {_DISCARD}"),
    "DDIM": Sampler("ddim", ("ddim",), "ddim", timesteps=True),
    "PLMS": Sampler("plms", ("plms",), "ddim", timesteps=True),
    "UniPC": Sampler("unipc", ("unipc",), "uniform", timesteps=True,
                     note="UniPC runs diffusers' defaults (bh2, order 2); A1111's are bh1, order 3"),
    "LCM": Sampler("lcm", ("lcm",), "automatic",
                   note="LCM takes diffusers' LCMScheduler steps (every k-th of the 50 original timesteps); "
                        "A1111 spaces the steps evenly over them"),
}
# A1111 samplers with no diffusers equivalent: a 422 that says so.
REFUSED = {
    "DPM fast": "DPM-Solver with adaptive order over a fixed step count (k-diffusion's sample_dpm_fast)",
    "DPM adaptive": "DPM-Solver with adaptive step size (k-diffusion's sample_dpm_adaptive)",
    "Restart": "the Restart sampler (A1111's sd_samplers_extra.restart_sampler)",
    "DDIM CFG++": "DDIM with CFG++ guidance (A1111's sd_samplers_timesteps_impl.ddim_cfgpp)",
}
# Pre-1.9 aliases that name a sampler and a schedule ("DPM++ 2M Karras" was k_dpmpp_2m_ka).
LEGACY_ALIASES = {
    "k_lms_ka": ("LMS", "karras"), "k_dpm_2_ka": ("DPM2", "karras"), "k_dpm_2_a_ka": ("DPM2 a", "karras"),
    "k_dpmpp_2s_a_ka": ("DPM++ 2S a", "karras"), "k_dpmpp_2m_ka": ("DPM++ 2M", "karras"),
    "k_dpmpp_sde_ka": ("DPM++ SDE", "karras"), "k_dpmpp_2m_sde_ka": ("DPM++ 2M SDE", "karras"),
    "k_dpmpp_2m_sde_heun_ka": ("DPM++ 2M SDE Heun", "karras"),
    "k_dpmpp_2m_sde_heun_exp": ("DPM++ 2M SDE Heun", "exponential"),
    "k_dpmpp_3m_sde_ka": ("DPM++ 3M SDE", "karras"), "k_dpmpp_3m_sde_exp": ("DPM++ 3M SDE", "exponential"),
}

# Samplers whose diffusers class is a port of k-diffusion's: their "linspace" spacing is
# k-diffusion's t = linspace(999, 0, steps), A1111's uniform / normal schedule.
_K_PORTS = frozenset({"euler", "euler_a", "lms", "heun", "dpm2", "dpm2_a", "dpm++_sde"})


@dataclass(frozen=True)
class Schedule:
    """One A1111 schedule type and the loramgr schedule that places the steps as it does.

    ``schedule`` None: diffusers has no equivalent. ``exact_on``: the loramgr schedulers on
    which diffusers' steps fall on A1111's sigmas (None: every one that takes the schedule),
    with ``when_steps_divide_1000`` only for such step counts; elsewhere ``note`` says what
    differs. ``aliases``, ``default_rho`` and ``need_inner_model`` are A1111's, for its
    ``/sdapi/v1/schedulers``.
    """

    label: str
    schedule: str | None
    aliases: tuple[str, ...] = ()
    default_rho: float = -1
    need_inner_model: bool = False
    exact_on: frozenset[str] | None = None
    when_steps_divide_1000: bool = False
    note: str = ""


_UNIFORM_NOTE = "diffusers' DPM-Solver and UniPC space timesteps evenly but end at t = 1000 / steps, not at t = 0"
SCHEDULES: dict[str, Schedule] = {
    "automatic": Schedule("Automatic", "automatic"),
    "uniform": Schedule("Uniform", "uniform", need_inner_model=True, exact_on=_K_PORTS, note=_UNIFORM_NOTE),
    "karras": Schedule("Karras", "karras", default_rho=7.0),
    "exponential": Schedule("Exponential", "exponential"),
    "polyexponential": Schedule("Polyexponential", "polyexponential", default_rho=1.0),
    "sgm_uniform": Schedule("SGM Uniform", "sgm_uniform", ("SGMUniform",), need_inner_model=True,
                            exact_on=frozenset(), note="diffusers' 'trailing' spacing rounds A1111's "
                                                       "timesteps linspace(999, 0, steps + 1) to integers"),
    "kl_optimal": Schedule("KL Optimal", None),
    "align_your_steps": Schedule("Align Your Steps", None),
    "simple": Schedule("Simple", "simple", need_inner_model=True, when_steps_divide_1000=True,
                       note="diffusers' 'trailing' spacing rounds where A1111 truncates: the same steps when "
                            "steps divides 1000"),
    "normal": Schedule("Normal", "normal", need_inner_model=True, exact_on=_K_PORTS, note=_UNIFORM_NOTE),
    "ddim": Schedule("DDIM", "ddim", need_inner_model=True, exact_on=_K_PORTS, when_steps_divide_1000=True,
                     note="diffusers' 'leading' spacing: the same steps on Euler-style samplers when steps "
                          "divides 1000"),
    "beta": Schedule("Beta", "beta", need_inner_model=True),  # A1111's default alpha = beta = 0.6, as diffusers'
}


@dataclass
class SamplerChoice:
    """What an A1111 ``sampler_name`` + ``scheduler`` runs as, and what ``info`` reports."""

    sampler_name: str  # A1111's name
    schedule: str  # A1111's schedule type, "automatic" resolved to the sampler's own
    scheduler: str  # the loramgr scheduler
    native_schedule: str  # the loramgr schedule
    eta_one: bool
    warnings: list[str] = field(default_factory=list)


def is_exact(schedule: str, scheduler: str, steps: int) -> bool:
    """Whether diffusers places ``scheduler``'s ``steps`` steps at A1111's sigmas for ``schedule``."""
    entry = SCHEDULES[schedule]
    on = entry.exact_on is None or scheduler in entry.exact_on
    return on and (not entry.when_steps_divide_1000 or (steps > 0 and 1000 % steps == 0))


def find_schedule(name: str) -> str | None:
    """A1111's schedule name for a name, label or alias (case-insensitive), or None."""
    wanted = name.strip().lower()
    return next((key for key, s in SCHEDULES.items()
                 if wanted in (key, s.label.lower(), *(a.lower() for a in s.aliases))), None)


def _find_sampler(name: str) -> tuple[str, str | None] | None:
    """(A1111 sampler, schedule or None) for a name or alias, a legacy alias, or None."""
    wanted = name.strip().lower()
    if wanted in LEGACY_ALIASES:
        return LEGACY_ALIASES[wanted]
    for canonical, sampler in SAMPLERS.items():
        if wanted in (canonical.lower(), *sampler.aliases):
            return canonical, None
    return None


def resolve_sampler(name: str | None, schedule: str | None, steps: int = 20) -> SamplerChoice:
    """The loramgr scheduler and schedule for a request's ``sampler_name`` and ``scheduler``.

    As A1111's ``get_sampler_and_scheduler``, a name that ends in a schedule type ("DPM++ 2M
    Karras", "Euler SGM Uniform") names both. Raises :class:`CatalogError` for a sampler
    diffusers has not or a name A1111 does not know.
    """
    wanted = (name or "Euler").strip()
    requested = None if schedule is None or not schedule.strip() else schedule
    if requested is not None and find_schedule(requested) is None:
        choices = ", ".join(SCHEDULES)
        raise CatalogError(422, "scheduler", f"unknown scheduler {requested!r}; choose one of {choices}")
    found = _find_sampler(wanted)
    if found is None:  # A1111's backward compatibility: a schedule type as the name's suffix
        for key, entry in SCHEDULES.items():
            suffix = next((o for o in (entry.label, key, *entry.aliases) if wanted.lower().endswith(" " + o.lower())),
                          None)
            if suffix is not None and (found := _find_sampler(wanted[: -len(suffix) - 1])) is not None:
                found = (found[0], key)
                break
    if found is None:
        refused = next((r for r in REFUSED if r.lower() == wanted.lower()), None)
        if refused is not None:
            raise CatalogError(422, "sampler_name", f"sampler {refused!r} ({REFUSED[refused]}) has no diffusers "
                                                    f"equivalent; choose one of {', '.join(SAMPLERS)}")
        raise CatalogError(422, "sampler_name", f"unknown sampler {wanted!r}; choose one of {', '.join(SAMPLERS)}")
    canonical, from_name = found
    sampler = SAMPLERS[canonical]
    chosen = from_name or (find_schedule(requested) if requested else "automatic")
    warnings = [sampler.note] if sampler.note else []
    if sampler.timesteps:
        if chosen != "automatic":
            warnings.append(f"scheduler {SCHEDULES[chosen].label!r} ignored: A1111 runs {canonical} on its own "
                            "timesteps")
        return SamplerChoice(canonical, "automatic", sampler.scheduler, SCHEDULES[sampler.automatic].schedule,
                             sampler.eta_one, warnings)
    if chosen == "automatic":
        chosen = sampler.automatic
    native = SCHEDULES[chosen].schedule
    if native is None or schedule_error(sampler.scheduler, native) is not None:
        used = sampler.automatic if schedule_error(sampler.scheduler, SCHEDULES[sampler.automatic].schedule) is None \
            else "automatic"
        why = "diffusers has no equivalent" if native is None else f"diffusers' {canonical} cannot take it"
        warnings.append(f"scheduler {SCHEDULES[chosen].label!r} not available ({why}); used "
                        f"{SCHEDULES[used].label!r} instead")
        native = SCHEDULES[used].schedule
    elif chosen != "automatic" and not is_exact(chosen, sampler.scheduler, steps):
        warnings.append(f"scheduler {SCHEDULES[chosen].label!r} approximated by diffusers' {native!r} schedule: "
                        f"{SCHEDULES[chosen].note}")
    return SamplerChoice(canonical, chosen, sampler.scheduler, native, sampler.eta_one, warnings)
