"""What to generate: the settings of ControlNet's ``process()`` and their validation.

Validation is a function of the settings and the input image only, so a caller can
reject bad input before it loads a model or builds an engine.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ..errors import LoramgrError
from .schedulers import SCHEDULERS, SCHEDULES, schedule_error, takes_eta

# "controlnet": guess-mode scales strength * 0.825 ** (12 - i), as ControlNet's process();
# "diffusers": strength * logspace(-1, 0, 13), as diffusers' ControlNetModel (for parity).
CONTROL_SCHEDULES = ("controlnet", "diffusers")
# What turns the control image into the map the ControlNet sees: "canny" runs ControlNet's
# canny annotator on it; "none" takes it as a map made before (depth, pose, hed, scribble, ...).
PREPROCESSORS = ("canny", "none")
# The largest output (width * height) generated without asking: every buffer of the pipeline
# grows with it and attention with its square (1536 x 1536; SD1.5 is trained at 512 x 512).
DEFAULT_MAX_PIXELS = 1536 * 1536


@dataclass
class GenerationSettings:
    """One generation request; field names and defaults follow ControlNet's ``process()``.

    ``strength`` scales the ControlNet residuals; ``scale`` is the classifier-free
    guidance scale; ``img2img_strength`` (``None`` for text-to-image) starts denoising
    from the noised input image, as diffusers' img2img ``strength``. ``preprocessor``
    says how the control image becomes the control map (:data:`PREPROCESSORS`).
    ``scheduler`` is the sampler and ``schedule`` where it places its steps
    (:mod:`~loramgr.pipeline.schedulers`; "automatic": the sampler's own).
    """

    prompt: str
    a_prompt: str = "best quality, extremely detailed"
    n_prompt: str = (
        "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, "
        "cropped, worst quality, low quality"
    )
    num_samples: int = 1
    resolution: int = 512
    steps: int = 20
    guess_mode: bool = False
    strength: float = 1.0
    scale: float = 9.0
    seed: int = 0
    eta: float = 0.0
    low_threshold: int = 100
    high_threshold: int = 200
    img2img_strength: float | None = None
    scheduler: str = "ddim"
    schedule: str = "automatic"
    control_schedule: str = "controlnet"
    preprocessor: str = "canny"
    max_pixels: int = DEFAULT_MAX_PIXELS  # refuse larger outputs (width * height) before anything is allocated


def check_inputs(image: np.ndarray, settings: GenerationSettings) -> None:
    """Raise :class:`LoramgrError` naming the first bad argument and its value."""
    s = settings
    if not (
        isinstance(image, np.ndarray)
        and image.dtype == np.uint8
        and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4)))
        and image.shape[0] > 0
        and image.shape[1] > 0
    ):
        described = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise LoramgrError(f"image must be a non-empty HxW or HxWxC (C = 1, 3 or 4) uint8 array, got {described}")
    for name in ("prompt", "a_prompt", "n_prompt"):
        if not isinstance(getattr(s, name), str):
            raise LoramgrError(f"{name} must be a string, got {getattr(s, name)!r}")
    _check_int("num_samples", s.num_samples, 1)
    _check_int("resolution", s.resolution, 64)
    _check_int("max_pixels", s.max_pixels, 64 * 64)
    check_output_size(image.shape[0], image.shape[1], s.resolution, s.max_pixels)
    _check_int("steps", s.steps, 1)
    _check_int("seed", s.seed, 0, 2**64 - 1)
    _check_int("low_threshold", s.low_threshold, 1, 255)
    _check_int("high_threshold", s.high_threshold, 1, 255)
    if s.low_threshold > s.high_threshold:
        raise LoramgrError(
            f"low_threshold ({s.low_threshold}) must not exceed high_threshold ({s.high_threshold})"
        )
    if not isinstance(s.guess_mode, bool):
        raise LoramgrError(f"guess_mode must be True or False, got {s.guess_mode!r}")
    _check_real("strength", s.strength, minimum=0.0)
    _check_real("scale", s.scale)
    _check_real("eta", s.eta, minimum=0.0)
    if s.scheduler not in SCHEDULERS:
        raise LoramgrError(f"unknown scheduler {s.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if s.schedule not in SCHEDULES:
        raise LoramgrError(f"unknown schedule {s.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if (why := schedule_error(s.scheduler, s.schedule)) is not None:
        raise LoramgrError(why)
    if s.preprocessor not in PREPROCESSORS:
        raise LoramgrError(f"unknown preprocessor {s.preprocessor!r}; choose one of {', '.join(PREPROCESSORS)}")
    if s.control_schedule not in CONTROL_SCHEDULES:
        raise LoramgrError(
            f"unknown control_schedule {s.control_schedule!r}; choose one of {', '.join(CONTROL_SCHEDULES)}"
        )
    if s.eta != 0 and not takes_eta(s.scheduler):
        raise LoramgrError(
            f"eta={s.eta} has no effect with scheduler {s.scheduler!r}; use eta=0 or a scheduler that takes eta (ddim)"
        )
    if s.img2img_strength is not None:
        _check_real("img2img_strength", s.img2img_strength)
        if not 0 < s.img2img_strength <= 1:
            raise LoramgrError(f"img2img_strength must be in (0, 1] or None, got {s.img2img_strength}")
        if int(s.steps * s.img2img_strength) < 1:
            raise LoramgrError(
                f"img2img_strength={s.img2img_strength} with steps={s.steps} leaves no denoising step; "
                f"use img2img_strength >= {1 / s.steps:g} or more steps"
            )


def full_prompt(settings: GenerationSettings) -> str:
    """``prompt, a_prompt`` as ControlNet's ``process()`` joins them; an empty ``a_prompt`` adds nothing.

    A1111 clients send no added prompt: their text must reach the encoder exactly as written.
    """
    return f"{settings.prompt}, {settings.a_prompt}" if settings.a_prompt else settings.prompt


def output_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """The generated (height, width): short side ``resolution``, both rounded to 64, as ``resize_image``."""
    k = float(resolution) / min(height, width)
    return int(np.round(height * k / 64.0)) * 64, int(np.round(width * k / 64.0)) * 64


def check_output_size(height: int, width: int, resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                      override: str | None = "--max-pixels") -> None:
    """Refuse an output over ``max_pixels`` (a huge resolution or an extreme aspect ratio) before allocating it."""
    out_h, out_w = output_size(height, width, resolution)
    if out_h * out_w > max_pixels:
        raise LoramgrError(
            f"resolution {resolution} on a {width}x{height} image gives a {out_w}x{out_h} output "
            f"({out_h * out_w / 1e6:.1f} Mpx), over the limit of {max_pixels / 1e6:.1f} Mpx: use a smaller "
            f"resolution or a less elongated image" + (f", or raise the limit with {override}" if override else "")
        )


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    in_range = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if not in_range or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise LoramgrError(f"{name} must be an integer {bounds}, got {value!r}")


def _check_real(name: str, value: object, minimum: float | None = None) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise LoramgrError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise LoramgrError(f"{name} must be >= {minimum}, got {value!r}")
