"""Samplers and schedules: every native and A1111 name against diffusers' own pipeline, A1111's
schedule formulas against the sigmas diffusers places, and how A1111 names are read.

The references build each diffusers scheduler here, by hand (class and options written out),
never through loramgr's tables: a wrong name -> class or option mapping fails a test.

Parity tolerance: max |pixel difference| <= 2 uint8 levels. Both sides run the same float32
modules on the same inputs and draw the same random numbers (the SDE samplers too: the
generator, or the Brownian tree seeded with the request's seed), so only summation order
differs; at guidance scale 1 diffusers runs the UNet on the conditional half only, where
loramgr computes ``uncond + 1 * (cond - uncond)`` (measured: at most 1 level).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, DPMSolverSDEScheduler,
                       DPMSolverSinglestepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler,
                       LCMScheduler, LMSDiscreteScheduler, PNDMScheduler, TCDScheduler, UniPCMultistepScheduler)
from scipy import stats

from loramgr.cli import _parser, _settings
from loramgr.errors import LoramgrError
from loramgr.pipeline.schedulers import SCHEDULERS, SCHEDULES, make_scheduler, schedule_error
from loramgr.pipeline.settings import GenerationSettings
from loramgr.serve.a1111_samplers import REFUSED, SAMPLERS
from loramgr.serve.a1111_samplers import SCHEDULES as A1111_SCHEDULES
from loramgr.serve.a1111_samplers import find_schedule, is_exact, resolve_sampler
from loramgr.serve.catalog import CatalogError
from reference_pipelines import diffusers_images as reference_images

MAX_PIXEL_DIFF = 2
FAST = {"resolution": 64, "steps": 4, "a_prompt": "", "n_prompt": "lowres, bad anatomy"}


def by_hand(cls, **options):
    """A reference scheduler factory: ``cls.from_config(config, **options)``; ``seeded``: the SDE's seed."""
    def make(config: dict, seed: int):
        extra = {"noise_sampler_seed": seed} if cls is DPMSolverSDEScheduler else {}
        return cls.from_config(config, **options, **extra)
    return make


LINSPACE = {"timestep_spacing": "linspace"}
SDE = {"algorithm_type": "sde-dpmsolver++"}
KARRAS = {"use_karras_sigmas": True, **LINSPACE}
EXPONENTIAL = {"use_exponential_sigmas": True, **LINSPACE}

NATIVE = {
    "ddim": by_hand(DDIMScheduler),
    "pndm": by_hand(PNDMScheduler),
    "lms": by_hand(LMSDiscreteScheduler),
    "euler": by_hand(EulerDiscreteScheduler),
    "euler_a": by_hand(EulerAncestralDiscreteScheduler),
    "heun": by_hand(HeunDiscreteScheduler),
    "dpm++": by_hand(DPMSolverMultistepScheduler),
    "unipc": by_hand(UniPCMultistepScheduler),
    "dpm++_karras": by_hand(DPMSolverMultistepScheduler, use_karras_sigmas=True),
    "plms": by_hand(PNDMScheduler, skip_prk_steps=True),
    "dpm2": by_hand(KDPM2DiscreteScheduler),
    "dpm2_a": by_hand(KDPM2AncestralDiscreteScheduler),
    "dpm++_2s": by_hand(DPMSolverSinglestepScheduler, solver_order=2),
    "dpm++_sde": by_hand(DPMSolverSDEScheduler),
    "dpm++_2m_sde": by_hand(DPMSolverMultistepScheduler, **SDE),
    "dpm++_2m_sde_heun": by_hand(DPMSolverMultistepScheduler, **SDE, solver_type="heun"),
    "dpm++_3m_sde": by_hand(DPMSolverMultistepScheduler, **SDE, solver_order=3),
    "lcm": by_hand(LCMScheduler),
    "tcd": by_hand(TCDScheduler),
}

# (sampler_name, scheduler) of an A1111 request -> the diffusers scheduler A1111's sampler is.
A1111 = {
    ("DPM++ 2M", None): by_hand(DPMSolverMultistepScheduler, **KARRAS),  # A1111 1.9+: Automatic is Karras
    ("DPM++ SDE", None): by_hand(DPMSolverSDEScheduler, **KARRAS),
    ("DPM++ 2M SDE", None): by_hand(DPMSolverMultistepScheduler, **SDE, **EXPONENTIAL),
    ("DPM++ 2M SDE Heun", None): by_hand(DPMSolverMultistepScheduler, **SDE, solver_type="heun", **EXPONENTIAL),
    ("DPM++ 2S a", None): by_hand(DPMSolverSinglestepScheduler, solver_order=2, use_karras_sigmas=True),
    ("DPM++ 3M SDE", None): by_hand(DPMSolverMultistepScheduler, **SDE, solver_order=3, **EXPONENTIAL),
    ("Euler a", None): by_hand(EulerAncestralDiscreteScheduler, **LINSPACE),
    ("Euler", None): by_hand(EulerDiscreteScheduler, **LINSPACE),
    ("LMS", None): by_hand(LMSDiscreteScheduler, **LINSPACE),
    ("Heun", None): by_hand(HeunDiscreteScheduler, **LINSPACE),
    ("DPM2", None): by_hand(KDPM2DiscreteScheduler, **KARRAS),
    ("DPM2 a", None): by_hand(KDPM2AncestralDiscreteScheduler, **KARRAS),
    ("DDIM", None): by_hand(DDIMScheduler, timestep_spacing="leading"),
    ("PLMS", None): by_hand(PNDMScheduler, skip_prk_steps=True, timestep_spacing="leading"),
    ("UniPC", None): by_hand(UniPCMultistepScheduler, **LINSPACE),
    ("LCM", None): by_hand(LCMScheduler),
    # schedule types, pre-1.9 names, fallbacks
    ("DPM++ 2M Karras", None): by_hand(DPMSolverMultistepScheduler, **KARRAS),
    ("k_dpmpp_2m_sde_heun_exp", None): by_hand(DPMSolverMultistepScheduler, **SDE, solver_type="heun", **EXPONENTIAL),
    ("DPM++ 2M", "Exponential"): by_hand(DPMSolverMultistepScheduler, **EXPONENTIAL),
    ("Euler", "karras"): by_hand(EulerDiscreteScheduler, **KARRAS),
    ("Euler", "sgm_uniform"): by_hand(EulerDiscreteScheduler, timestep_spacing="trailing"),
    ("LMS", "polyexponential"): by_hand(LMSDiscreteScheduler, **EXPONENTIAL),
    ("Heun", "beta"): by_hand(HeunDiscreteScheduler, use_beta_sigmas=True, **LINSPACE),
    ("DPM++ 2M", "simple"): by_hand(DPMSolverMultistepScheduler, timestep_spacing="trailing"),
    ("Euler a", "ddim"): by_hand(EulerAncestralDiscreteScheduler, timestep_spacing="leading"),
    ("Euler a", "karras"): by_hand(EulerAncestralDiscreteScheduler, **LINSPACE),  # no Karras sigmas: Automatic
    ("DPM++ 2M", "kl_optimal"): by_hand(DPMSolverMultistepScheduler, **KARRAS),  # no equivalent: Automatic
    ("DDIM", "karras"): by_hand(DDIMScheduler, timestep_spacing="leading"),  # A1111 ignores it for DDIM
}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    yy, xx = np.mgrid[0:80, 0:64].astype(np.float32)
    picture = np.stack([255 * xx / 64, 255 * yy / 80, 128 + 100 * np.sin(xx / 5) * np.cos(yy / 7)], axis=-1)
    picture[(yy - 40) ** 2 + (xx - 24) ** 2 < 300] = (250, 30, 30)
    return picture.clip(0, 255).astype(np.uint8)


def diffusers_images(reference, image: np.ndarray, settings: GenerationSettings, make) -> np.ndarray:
    """The same generation through diffusers' own pipeline, with the scheduler ``make`` builds."""
    return reference_images(reference, image, settings, scheduler=make(reference.scheduler.config, settings.seed))


def assert_same_images(ours: list[np.ndarray], theirs: np.ndarray) -> None:
    ours = np.stack(ours).astype(np.int16)
    assert ours.shape == theirs.shape
    diff = np.abs(ours - theirs.astype(np.int16))
    assert diff.max() <= MAX_PIXEL_DIFF, f"max diff {diff.max()}, mean {diff.mean():.4f}"
    assert ours.std() > 20  # an image with content, so agreement means something


def test_every_native_name_has_a_reference():
    assert set(NATIVE) == set(SCHEDULERS)


# DPM++ 3M SDE reaches its third order from the third step and drops it for the last two (< 15 steps).
STEPS = {"dpm++_3m_sde": 6}


@pytest.mark.parametrize("name", list(NATIVE))
def test_native_sampler_matches_diffusers(pipe, reference, image, name):
    settings = GenerationSettings(prompt="a bird", scheduler=name, seed=3, **{**FAST, "steps": STEPS.get(name, 4)})
    assert_same_images(pipe(image, settings).images, diffusers_images(reference, image, settings, NATIVE[name]))


@pytest.mark.parametrize(("name", "overrides"), [
    pytest.param("dpm++_2m_sde", {"scale": 1.0, "num_samples": 2}, id="dpm++_2m_sde-cfg1-batch"),
    pytest.param("lcm", {"scale": 1.0}, id="lcm-cfg1"),
    pytest.param("tcd", {"scale": 1.0, "eta": 0.3}, id="tcd-cfg1-gamma"),
    pytest.param("dpm++_sde", {"img2img_strength": 0.6}, id="dpm++_sde-img2img"),
    pytest.param("lcm", {"img2img_strength": 0.6}, id="lcm-img2img"),
])
def test_native_sampler_variants_match_diffusers(pipe, reference, image, name, overrides):
    settings = GenerationSettings(prompt="a bird", scheduler=name, seed=5, **{**FAST, **overrides})
    assert_same_images(pipe(image, settings).images, diffusers_images(reference, image, settings, NATIVE[name]))


def _public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _same_scheduler(a, b) -> bool:
    return type(a) is type(b) and _public(a.config) == _public(b.config)


@pytest.mark.parametrize(("sampler_name", "scheduler"), list(A1111), ids=str)
def test_a1111_sampler_is_the_reference_scheduler(tiny_folder, sampler_name, scheduler):
    """Every A1111 name resolves to the scheduler written out for it: same class, same config, same steps."""
    config = base_config(tiny_folder)
    choice = resolve_sampler(sampler_name, scheduler, 20)
    ours = make_scheduler(choice.scheduler, config, choice.native_schedule, seed=9)
    theirs = A1111[sampler_name, scheduler](config, 9)
    assert _same_scheduler(ours, theirs), (type(ours).__name__, _public(ours.config), _public(theirs.config))
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    assert torch.equal(ours.timesteps, theirs.timesteps)


# One A1111 entry per schedule option and sampler family run end to end (the rest are the same
# scheduler configs, checked above, on the same pipeline).
A1111_RUNS = [("DPM++ 2M", None), ("DPM++ SDE", None), ("DPM++ 2M SDE", None), ("DPM++ 2S a", None),
              ("Euler", None), ("DPM2 a", None), ("Euler", "sgm_uniform"), ("Heun", "beta")]


@pytest.mark.parametrize(("sampler_name", "scheduler"), A1111_RUNS, ids=str)
def test_a1111_sampler_matches_diffusers(pipe, reference, image, sampler_name, scheduler):
    choice = resolve_sampler(sampler_name, scheduler, FAST["steps"])
    settings = GenerationSettings(prompt="a bird", scheduler=choice.scheduler, schedule=choice.native_schedule,
                                  seed=4, scale=7.0, **{**FAST, "steps": STEPS.get(choice.scheduler, 4)})
    expected = diffusers_images(reference, image, settings, A1111[sampler_name, scheduler])
    assert_same_images(pipe(image, settings).images, expected)


def test_every_a1111_sampler_is_tested():
    assert set(SAMPLERS) <= {name for name, _ in A1111}


@pytest.mark.parametrize("name", ["dpm++_sde", "dpm++_2m_sde"])  # the Brownian tree; the generator
def test_sde_noise_comes_from_the_seed(pipe, image, name):
    """Same request, same bytes (the Brownian tree or generator is seeded from the request)."""
    settings = GenerationSettings(prompt="a bird", scheduler=name, seed=11, **FAST)
    assert pipe(image, settings).images[0].tobytes() == pipe(image, settings).images[0].tobytes()


def test_sde_noise_is_not_only_the_start_noise(tiny_folder):
    """DPM++ SDE's Brownian noise follows the seed: two seeds differ from the same start latents on."""
    config = base_config(tiny_folder)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    outputs = []
    for seed in (1, 1, 2):
        scheduler = make_scheduler("dpm++_sde", config, seed=seed)
        scheduler.set_timesteps(3)
        sample = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            sample = scheduler.step(0.1 * sample, t, sample).prev_sample
        outputs.append(sample)
    assert torch.equal(outputs[0], outputs[1]) and not torch.allclose(outputs[0], outputs[2])


# --- A1111's schedules (sd_schedulers.py, k-diffusion) against the sigmas diffusers places -------

class A1111Sigmas:
    """A1111's schedule types for a base's betas, transcribed from sd_schedulers.py and
    k-diffusion's ``DiscreteSchedule`` (log-sigma interpolation between trained timesteps)."""

    def __init__(self, config: dict):
        betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, 1000,
                               dtype=torch.float32) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.min, self.max = self.sigmas[0].item(), self.sigmas[-1].item()

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.sigmas[low].log() + w * self.sigmas[high].log()).exp()

    def __call__(self, name: str, n: int) -> torch.Tensor:
        zero = torch.zeros(1)
        if name in ("uniform", "normal"):
            return torch.cat([self.t_to_sigma(torch.linspace(999, 0, n)), zero])
        if name == "karras":
            ramp, rho = torch.linspace(0, 1, n), 7.0
            lo, hi = self.min ** (1 / rho), self.max ** (1 / rho)
            return torch.cat([(hi + ramp * (lo - hi)) ** rho, zero])
        if name in ("exponential", "polyexponential"):  # polyexponential at its default rho 1
            return torch.cat([torch.linspace(np.log(self.max), np.log(self.min), n).exp(), zero])
        if name == "sgm_uniform":
            return torch.cat([self.t_to_sigma(torch.linspace(999, 0, n + 1)[:-1]), zero])
        if name == "simple":
            return torch.tensor([float(self.sigmas[-(1 + int(x * 1000 / n))]) for x in range(n)] + [0.0])
        if name == "ddim":
            return torch.tensor([float(self.sigmas[x]) for x in range(1, 1000, max(1000 // n, 1))][::-1] + [0.0])
        if name == "beta":
            ppf = [stats.beta.ppf(x, 0.6, 0.6) for x in 1 - np.linspace(0, 1, n)]
            return torch.tensor([self.min + x * (self.max - self.min) for x in ppf] + [0.0], dtype=torch.float32)
        raise KeyError(name)


def base_config(folder) -> dict:
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())


def step_sigmas(scheduler) -> torch.Tensor:
    """The sigmas the steps go through (Heun / DPM2 / SDE list each twice, DPM2 pads zeros)."""
    return torch.unique_consecutive(scheduler.sigmas.float())


SIGMA_SAMPLERS = [n for n in SCHEDULERS if hasattr(make_scheduler(n, {}), "sigmas")]


@pytest.mark.parametrize("scheduler", SIGMA_SAMPLERS)
def test_exact_schedules_are_a1111s(tiny_folder, scheduler):
    """Where the table says exact, diffusers' steps are A1111's sigmas (1e-4); elsewhere they are not."""
    config = base_config(tiny_folder)
    a1111 = A1111Sigmas(config)
    checked = 0
    for name, entry in A1111_SCHEDULES.items():
        if entry.schedule in (None, "automatic") or schedule_error(scheduler, entry.schedule) is not None:
            continue
        for steps in (4, 20, 30):
            made = make_scheduler(scheduler, config, entry.schedule)
            made.set_timesteps(steps)
            ours, theirs = step_sigmas(made), a1111(name, steps)
            same = ours.shape == theirs.shape and bool(((ours - theirs).abs() <= 1e-4 * theirs).all())
            assert same == is_exact(name, scheduler, steps), (name, steps, ours, theirs)
            checked += 1
    assert checked >= 3


def test_schedules_of_the_table():
    assert set(SCHEDULES) <= set(A1111_SCHEDULES)  # every native schedule is an A1111 schedule type
    assert {s.schedule for s in A1111_SCHEDULES.values()} - {None} <= set(SCHEDULES)
    assert [k for k, s in A1111_SCHEDULES.items() if s.schedule is None] == ["kl_optimal", "align_your_steps"]


# --- reading A1111 names ------------------------------------------------------------------------

A1111_SCHEDULE_NAMES = ["automatic", "uniform", "karras", "exponential", "polyexponential", "sgm_uniform",
                        "kl_optimal", "align_your_steps", "simple", "normal", "ddim", "beta"]


@pytest.mark.parametrize("schedule", A1111_SCHEDULE_NAMES + ["Karras", "SGM Uniform", "SGMUniform", "KL Optimal"])
def test_every_a1111_schedule_name_is_accepted_with_every_sampler(schedule):
    assert find_schedule(schedule) is not None
    for sampler in SAMPLERS:
        choice = resolve_sampler(sampler, schedule, 20)
        settings = GenerationSettings(prompt="x", scheduler=choice.scheduler, schedule=choice.native_schedule)
        assert schedule_error(settings.scheduler, settings.schedule) is None


@pytest.mark.parametrize(("name", "schedule", "expected", "warning"), [
    ("k_euler_a", None, ("Euler a", "uniform", "euler_a", "uniform"), None),
    ("dpm++ 2m", None, ("DPM++ 2M", "karras", "dpm++", "karras"), None),
    ("DPM++ 2M Karras", None, ("DPM++ 2M", "karras", "dpm++", "karras"), None),
    ("DPM++ 2M Karras", "exponential", ("DPM++ 2M", "karras", "dpm++", "karras"), None),  # the name wins, as A1111
    ("k_dpmpp_2m_ka", None, ("DPM++ 2M", "karras", "dpm++", "karras"), None),
    ("Euler SGM Uniform", None, ("Euler", "sgm_uniform", "euler", "sgm_uniform"), "approximated"),
    (None, "normal", ("Euler", "normal", "euler", "normal"), None),  # sd-backend-client's default
    ("DPM++ 2M", "normal", ("DPM++ 2M", "normal", "dpm++", "normal"), "t = 1000 / steps"),
    ("DPM++ 2M", "align_your_steps", ("DPM++ 2M", "align_your_steps", "dpm++", "karras"), "used 'Karras' instead"),
    ("Euler a", "karras", ("Euler a", "karras", "euler_a", "uniform"), "used 'Uniform' instead"),
    ("DDIM", "Karras", ("DDIM", "automatic", "ddim", "ddim"), "ignored"),
    ("DPM2", "simple", ("DPM2", "simple", "dpm2", "simple"), None),  # 1000 % 20 == 0: the same steps
    ("DPM++ 2S a", "sgm_uniform", ("DPM++ 2S a", "sgm_uniform", "dpm++_2s", "karras"), "cannot take it"),
])
def test_resolve_sampler(name, schedule, expected, warning):
    choice = resolve_sampler(name, schedule, 20)
    assert (choice.sampler_name, choice.schedule, choice.scheduler, choice.native_schedule) == expected
    notes = [w for w in choice.warnings if w != SAMPLERS[choice.sampler_name].note]
    assert (warning is None and not notes) or (warning is not None and any(warning in w for w in notes)), notes


def test_sampler_notes_are_warnings():
    assert any("ancestral" in w for w in resolve_sampler("DPM++ 2S a", None, 20).warnings)
    assert resolve_sampler("Euler", None, 20).warnings == []


@pytest.mark.parametrize(("name", "schedule", "field", "fragment"), [
    ("Warp 9", None, "sampler_name", "unknown sampler 'Warp 9'; choose one of DPM++ 2M, "),
    ("DPM adaptive", None, "sampler_name", "no diffusers equivalent"),
    ("ddim cfg++", None, "sampler_name", "'DDIM CFG++'"),
    ("Euler", "warp", "scheduler", "choose one of automatic, uniform, karras"),
])
def test_refusals_name_the_field(name, schedule, field, fragment):
    with pytest.raises(CatalogError) as info:
        resolve_sampler(name, schedule, 20)
    assert info.value.field == field and fragment in info.value.reason
    assert name not in REFUSED or REFUSED[name] in info.value.reason


# --- native settings ------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "fragments"), [
    ({"schedule": "kl_optimal"}, ("unknown schedule 'kl_optimal'", "automatic, uniform, karras")),
    ({"scheduler": "euler_a", "schedule": "karras"}, ("schedule 'karras'", "use_karras_sigmas", "takes: automatic")),
    ({"scheduler": "lcm", "schedule": "uniform"}, ("schedule 'uniform'", "'lcm'", "takes: automatic")),
    ({"scheduler": "dpm++_karras", "schedule": "beta"}, ("conflicts", "scheduler 'dpm++' with schedule 'beta'")),
])
def test_bad_schedule_names_the_setting(pipe, image, overrides, fragments):
    with pytest.raises(LoramgrError) as info:
        pipe(image, GenerationSettings(prompt="a bird", **{**FAST, **overrides}))
    for fragment in fragments:
        assert fragment in str(info.value)


def test_run_options(capsys):
    from loramgr.defaults import BaseDefaults

    settings = _settings(_parser().parse_args(["run", "--image", "x.png", "--prompt", "a bird",
                                               "--scheduler", "dpm++_sde", "--schedule", "karras"]),
                         BaseDefaults(resolution=128, n_prompt="lowres"))
    assert (settings.scheduler, settings.schedule) == ("dpm++_sde", "karras")
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["run", "--image", "x.png", "--prompt", "x", "--schedule", "align_your_steps"])
    assert exit_.value.code == 2 and "--schedule: invalid choice: 'align_your_steps'" in capsys.readouterr().err
