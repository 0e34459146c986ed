"""What to generate: the settings of ControlNet's ``process()`` and their validation.

Validation is a function of the settings and the input image only, so a caller can
reject bad input before it loads a model or builds an engine.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import LoramgrError, finite32
from .control import CONTROL_MODES, CONTROL_SCHEDULES, PREPROCESSORS, WINDOW_RULES, ControlUnit
from .inpaint import INPAINT_FILLS, MASK_RULES, Inpaint
from .passes import UPSCALERS, HiresFix, hires_size
from .prompts import CHUNK_TOKENS, SYNTAXES
from .schedulers import SCHEDULERS, SCHEDULES, schedule_error, takes_eta

PROMPT_SYNTAXES = SYNTAXES  # A1111's emphasis, BREAK, chunks and embeddings; or the text as it is
DEFAULT_MAX_PROMPT_TOKENS = 3 * CHUNK_TOKENS  # 225
# The largest output (width * height) generated without asking: every buffer of the pipeline
# grows with it and attention with its square (1536 x 1536; SD1.5 is trained at 512 x 512).
DEFAULT_MAX_PIXELS = 1536 * 1536


@dataclass
class GenerationSettings:
    """One generation request; field names and defaults follow ControlNet's ``process()``.

    ``strength`` scales the ControlNet residuals; ``scale`` is the classifier-free
    guidance scale (at most 1: no guidance, the unconditional half is not computed, as
    diffusers' ``do_classifier_free_guidance``); ``img2img_strength`` (``None`` for
    text-to-image) starts denoising from the noised input image, as diffusers' img2img
    ``strength``. ``preprocessor`` says how the control image becomes the control map
    (:data:`PREPROCESSORS`). ``scheduler`` is the sampler and ``schedule`` where it places its
    steps (:mod:`~loramgr.pipeline.schedulers`; "automatic": the sampler's own).

    ControlNet units: ``units`` lists them (:class:`~loramgr.pipeline.control.ControlUnit`,
    ``()`` for none); ``None`` keeps the one-unit form of ``strength``, ``guess_mode``,
    ``preprocessor`` and the thresholds. ``control_window`` is the rule their ``start`` /
    ``end`` follow. ``width`` / ``height``: the output size when there is no image at all.

    Passes: ``hires`` (:class:`~loramgr.pipeline.passes.HiresFix`) adds an upscale and an
    image-to-image second pass to a text-to-image generation; ``inpaint``
    (:class:`~loramgr.pipeline.inpaint.Inpaint`) says how a mask, given beside the settings as
    images are, is used.

    Prompts: ``prompt_syntax`` ``a1111`` reads emphasis, ``BREAK`` and embeddings and encodes
    75-token chunks (up to ``max_prompt_tokens``); ``clip_skip`` is A1111's
    ``CLIP_stop_at_last_layers`` (1: the last layer).
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
    units: tuple[ControlUnit, ...] | None = None
    control_window: str = "diffusers"
    width: int | None = None
    height: int | None = None
    clip_skip: int = 1
    prompt_syntax: str = "a1111"
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    hires: HiresFix | None = None
    inpaint: Inpaint = Inpaint()

    def control_units(self) -> tuple[ControlUnit, ...]:
        """``units``, or the one unit the one-unit fields describe."""
        if self.units is not None:
            return tuple(self.units)
        return (ControlUnit(None, self.preprocessor, self.strength, mode="control" if self.guess_mode else "balanced",
                            low_threshold=self.low_threshold, high_threshold=self.high_threshold),)

    @property
    def guidance(self) -> bool:
        """Classifier-free guidance: only for ``scale > 1`` (diffusers' rule)."""
        return self.scale > 1


def check_inputs(image: np.ndarray | None, settings: GenerationSettings) -> None:
    """Raise :class:`LoramgrError` naming the first bad argument and its value.

    ``image``: an input image (or a unit's), checked with the output size it gives; ``None``
    checks the settings alone.
    """
    s = settings
    if image is not None:
        check_image(image)
    for name in ("prompt", "a_prompt", "n_prompt"):
        if not isinstance(getattr(s, name), str):
            raise LoramgrError(f"{name} must be a string, got {getattr(s, name)!r}")
    _check_int("num_samples", s.num_samples, 1)
    _check_int("resolution", s.resolution, 64)
    _check_int("max_pixels", s.max_pixels, 64 * 64)
    if image is not None:
        check_output_size(image.shape[0], image.shape[1], s.resolution, s.max_pixels)
    check_inpaint(s.inpaint)
    if s.hires is not None:
        first = output_size(*image.shape[:2], s.resolution) if image is not None else (s.height, s.width)
        check_hires(s, None if None in first else first)
    for name in ("width", "height"):
        value = getattr(s, name)
        if value is not None:
            _check_int(name, value, 64)
            if value % 64:
                raise LoramgrError(f"{name} must be a multiple of 64, got {value}")
    if s.width is not None and s.height is not None and s.width * s.height > s.max_pixels:
        raise LoramgrError(f"width x height = {s.width}x{s.height} ({s.width * s.height / 1e6:.1f} Mpx) is over the "
                           f"limit of {s.max_pixels / 1e6:.1f} Mpx; raise it with --max-pixels")
    _check_int("steps", s.steps, 1)
    _check_int("seed", s.seed, 0, 2**64 - 1)
    _check_int("clip_skip", s.clip_skip, 1, 12)
    _check_int("max_prompt_tokens", s.max_prompt_tokens, 75)
    _check_thresholds("", s.low_threshold, s.high_threshold)
    if not isinstance(s.guess_mode, bool):
        raise LoramgrError(f"guess_mode must be True or False, got {s.guess_mode!r}")
    _check_real("strength", s.strength, minimum=0.0)
    _check_real("scale", s.scale)
    _check_real("eta", s.eta, minimum=0.0)
    _check_choice("scheduler", s.scheduler, SCHEDULERS)
    _check_choice("schedule", s.schedule, SCHEDULES)
    if (why := schedule_error(s.scheduler, s.schedule)) is not None:
        raise LoramgrError(why)
    _check_choice("preprocessor", s.preprocessor, PREPROCESSORS)
    _check_choice("control_schedule", s.control_schedule, CONTROL_SCHEDULES)
    _check_choice("control_window", s.control_window, WINDOW_RULES)
    _check_choice("prompt_syntax", s.prompt_syntax, PROMPT_SYNTAXES)
    if s.units is not None:
        if not isinstance(s.units, (tuple, list)) or not all(isinstance(u, ControlUnit) for u in s.units):
            raise LoramgrError(f"units must be a list of ControlUnit, got {s.units!r:.80}")
        for i, unit in enumerate(s.units):
            check_unit(unit, f"units.{i}")
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


def check_hires(settings: GenerationSettings, first: tuple[int, int] | None) -> None:
    """The hires fix's fields and, given the first pass's (height, width), the second pass's size."""
    hr = settings.hires
    if not isinstance(hr, HiresFix):
        raise LoramgrError(f"hires must be a HiresFix, got {hr!r:.80}")
    if settings.img2img_strength is not None:
        raise LoramgrError("hires works on text-to-image: img2img_strength must be None with a hires fix")
    _check_real("hires.scale", hr.scale)
    if hr.scale <= 0:
        raise LoramgrError(f"hires.scale must be > 0, got {hr.scale}")
    _check_int("hires.resize_x", hr.resize_x, 0)
    _check_int("hires.resize_y", hr.resize_y, 0)
    _check_choice("hires.upscaler", hr.upscaler, UPSCALERS)
    _check_int("hires.steps", hr.steps, 0)
    _check_real("hires.strength", hr.strength)
    if not 0 < hr.strength <= 1:
        raise LoramgrError(f"hires.strength must be in (0, 1], got {hr.strength}")
    steps = hr.steps or settings.steps
    if int(steps * hr.strength) < 1:
        raise LoramgrError(f"hires.strength={hr.strength} with {steps} steps leaves no denoising step; "
                           f"use hires.strength >= {1 / steps:g} or more hires.steps")
    for name in ("prompt", "n_prompt"):
        if getattr(hr, name) is not None and not isinstance(getattr(hr, name), str):
            raise LoramgrError(f"hires.{name} must be a string or None, got {getattr(hr, name)!r}")
    if hr.scheduler is not None:
        _check_choice("hires.scheduler", hr.scheduler, SCHEDULERS)
    if first is None:
        return
    size = hires_size(*first, hr)
    (up_h, up_w), (height, width) = size.upscaled, size.target
    how = (f"resize {hr.resize_x}x{hr.resize_y}" if hr.resize_x or hr.resize_y else f"scale {hr.scale:g}")
    if up_w % 8 or up_h % 8 or width % 64 or height % 64 or min(width, height) < 64:
        raise LoramgrError(
            f"hires: {how} on a {first[1]}x{first[0]} first pass gives a {width}x{height} second pass"
            + (f" (upscaled to {up_w}x{up_h})" if (up_h, up_w) != (height, width) else "")
            + "; the second pass needs both sides multiples of 64 (and the upscale multiples of 8): "
              "choose another scale or give hires.resize_x / resize_y")
    if width * height > settings.max_pixels:
        raise LoramgrError(
            f"hires: {how} on a {first[1]}x{first[0]} first pass gives a {width}x{height} second pass "
            f"({width * height / 1e6:.3g} Mpx), over the limit of {settings.max_pixels / 1e6:.3g} Mpx; "
            "use a smaller scale, or raise the limit with --max-pixels")


def check_mask(mask: np.ndarray | None, image: np.ndarray | None, units: Sequence[ControlUnit],
               settings: GenerationSettings) -> None:
    """An inpainting mask: an image, with the image it masks, not with a hires fix; ``inpaint`` units need one."""
    if mask is None:
        inpainting = [i for i, u in enumerate(units) if u.preprocessor == "inpaint"]
        if inpainting:
            raise LoramgrError(f"ControlNet unit {inpainting[0]} has preprocessor 'inpaint', which needs a mask")
        return
    check_image(mask, "mask")
    if image is None:
        raise LoramgrError("a mask needs the image it masks: give an image")
    if settings.hires is not None:
        raise LoramgrError("hires and a mask do not combine: inpaint first, or make the image with hires and "
                           "inpaint it in a second request")


def check_inpaint(inpaint: Inpaint) -> None:
    """The inpainting options (used only with a mask, checked always: a bad one is a bad request)."""
    if not isinstance(inpaint, Inpaint):
        raise LoramgrError(f"inpaint must be an Inpaint, got {inpaint!r:.80}")
    _check_int("inpaint.blur", inpaint.blur, 0, 256)
    _check_int("inpaint.padding", inpaint.padding, 0)
    for name in ("invert", "full_res"):
        if not isinstance(getattr(inpaint, name), bool):
            raise LoramgrError(f"inpaint.{name} must be True or False, got {getattr(inpaint, name)!r}")
    _check_choice("inpaint.fill", inpaint.fill, INPAINT_FILLS)
    _check_choice("inpaint.rule", inpaint.rule, MASK_RULES)


def check_image(image: object, what: str = "image") -> None:
    """An HxW or HxWxC (C = 1, 3 or 4) uint8 array, not empty."""
    if not (
        isinstance(image, np.ndarray)
        and image.dtype == np.uint8
        and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4)))
        and image.shape[0] > 0
        and image.shape[1] > 0
    ):
        described = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise LoramgrError(f"{what} must be a non-empty HxW or HxWxC (C = 1, 3 or 4) uint8 array, got {described}")


def check_unit(unit: ControlUnit, where: str) -> None:
    """A unit's fields, each named ``where.field`` in the error."""
    if unit.controlnet is not None and (not isinstance(unit.controlnet, str) or not unit.controlnet):
        raise LoramgrError(f"{where}.controlnet must be a ControlNet name, got {unit.controlnet!r}")
    _check_choice(f"{where}.preprocessor", unit.preprocessor, PREPROCESSORS)
    _check_choice(f"{where}.mode", unit.mode, CONTROL_MODES)
    _check_real(f"{where}.strength", unit.strength, minimum=0.0)
    for name in ("start", "end"):
        _check_real(f"{where}.{name}", getattr(unit, name), minimum=0.0)
        if getattr(unit, name) > 1:
            raise LoramgrError(f"{where}.{name} must be in [0, 1] (a fraction of the steps), got {getattr(unit, name)}")
    if unit.start > unit.end:
        raise LoramgrError(f"{where}.start ({unit.start}) must not exceed {where}.end ({unit.end})")
    _check_thresholds(f"{where}.", unit.low_threshold, unit.high_threshold)


def _check_thresholds(prefix: str, low: object, high: object) -> None:
    _check_int(f"{prefix}low_threshold", low, 1, 255)
    _check_int(f"{prefix}high_threshold", high, 1, 255)
    if low > high:
        raise LoramgrError(f"{prefix}low_threshold ({low}) must not exceed {prefix}high_threshold ({high})")


def _check_choice(name: str, value: object, choices) -> None:
    if value not in choices:
        raise LoramgrError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


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
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not finite32(value):
        raise LoramgrError(f"{name} must be a finite number (float32), got {value!r}")
    if minimum is not None and value < minimum:
        raise LoramgrError(f"{name} must be >= {minimum}, got {value!r}")
