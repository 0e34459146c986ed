"""Hires fix: a first pass at the requested size, an upscale, and an image-to-image second pass.

A1111's rules (``modules/processing.py`` ``StableDiffusionProcessingTxt2Img``): the target
size comes from ``scale`` or from ``resize_x`` / ``resize_y`` (one of them: the other from the
aspect ratio; both: the image is upscaled to cover them and the latents are cropped to them);
a ``Latent ...`` upscaler interpolates the latents (``torch.nn.functional.interpolate`` with
A1111's mode and antialias), an image upscaler decodes, resizes the pixels
(``modules/images.py`` ``resize_image`` with ``Upscaler.upscale``) and encodes again. The
second pass is diffusers' img2img with ``strength`` on a schedule of ``steps`` (0: the first
pass's), from the upscaled latents, with its own prompts when given. docs/a1111.md has how
A1111's ``hr_second_pass_steps`` maps onto this.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

VAE_SCALE_FACTOR = 8  # image size / latent size (A1111's opt_f)

# A1111's shared.latent_upscale_modes: name -> (torch interpolate mode, antialias)
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# A1111's built-in image upscalers (modules/upscaler.py): "None" is a plain Lanczos resize.
IMAGE_UPSCALERS = {"None": None, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
UPSCALERS = (*LATENT_UPSCALERS, *IMAGE_UPSCALERS)


@dataclass(frozen=True)
class HiresFix:
    """The second pass of a text-to-image generation (A1111's ``enable_hr`` with its ``hr_*`` fields).

    ``scale`` is used when ``resize_x`` and ``resize_y`` are both 0. ``steps``: the second
    pass's schedule (0: the first pass's ``steps``), of which the last
    ``int(steps * strength)`` run, as diffusers' img2img. ``prompt`` / ``n_prompt`` / ``scheduler``:
    ``None`` keeps the first pass's.
    """

    scale: float = 2.0
    resize_x: int = 0
    resize_y: int = 0
    upscaler: str = "Latent"
    steps: int = 0
    strength: float = 0.7
    prompt: str | None = None
    n_prompt: str | None = None
    scheduler: str | None = None

    @property
    def latent(self) -> bool:
        """Whether the upscale interpolates latents (else it resizes decoded pixels)."""
        return self.upscaler in LATENT_UPSCALERS


@dataclass(frozen=True)
class HiresSize:
    """Sizes of a hires fix: what the upscale makes and what the second pass generates (height, width).

    ``crop``: latent rows and columns cut from (top, bottom, left, right) of the upscaled
    latents when both ``resize_x`` and ``resize_y`` are given (A1111's ``truncate_x/y``).
    """

    upscaled: tuple[int, int]
    crop: tuple[int, int, int, int]
    target: tuple[int, int]


def hires_size(height: int, width: int, hires: HiresFix) -> HiresSize:
    """A1111's ``calculate_target_resolution`` for a first pass of ``height`` x ``width``."""
    rx, ry = hires.resize_x, hires.resize_y
    if rx == 0 and ry == 0:
        up_w, up_h = int(width * hires.scale), int(height * hires.scale)
        target = (up_h, up_w)
    elif ry == 0:
        up_w, up_h = rx, rx * height // width
        target = (up_h, up_w)
    elif rx == 0:
        up_w, up_h = ry * width // height, ry
        target = (up_h, up_w)
    else:
        if width / height < rx / ry:
            up_w, up_h = rx, rx * height // width
        else:
            up_w, up_h = ry * width // height, ry
        target = (ry, rx)
    truncate_x = (up_w - target[1]) // VAE_SCALE_FACTOR
    truncate_y = (up_h - target[0]) // VAE_SCALE_FACTOR
    crop = (truncate_y // 2, (truncate_y + 1) // 2, truncate_x // 2, (truncate_x + 1) // 2)
    return HiresSize((up_h, up_w), crop, target)


def second_pass(settings, size: HiresSize):
    """The :class:`~loramgr.pipeline.settings.GenerationSettings` of the second pass: image-to-image at the
    target size with the hires fix's steps, strength and (when given) prompts and scheduler."""
    hr = settings.hires
    height, width = size.target
    return replace(settings, **hires_prompts(settings), scheduler=hr.scheduler or settings.scheduler,
                   steps=hr.steps or settings.steps, img2img_strength=hr.strength, width=width, height=height,
                   resolution=min(width, height), hires=None)


def hires_prompts(settings) -> dict[str, str]:
    """The second pass's ``prompt`` and ``n_prompt``: the hires fix's, else the first pass's."""
    hr = settings.hires
    return {"prompt": settings.prompt if hr.prompt is None else hr.prompt,
            "n_prompt": settings.n_prompt if hr.n_prompt is None else hr.n_prompt}


def upscale_latents(latents: torch.Tensor, size: HiresSize, upscaler: str) -> torch.Tensor:
    """``[N, 4, h, w]`` interpolated to the upscaled size / 8 with A1111's mode, then cropped."""
    mode, antialias = LATENT_UPSCALERS[upscaler]
    up_h, up_w = size.upscaled
    out = torch.nn.functional.interpolate(latents, size=(up_h // VAE_SCALE_FACTOR, up_w // VAE_SCALE_FACTOR),
                                          mode=mode, antialias=antialias)
    return crop_latents(out, size)


def crop_latents(latents: torch.Tensor, size: HiresSize) -> torch.Tensor:
    """A1111's ``samples[:, :, ty//2 : h - (ty+1)//2, tx//2 : w - (tx+1)//2]``."""
    top, bottom, left, right = size.crop
    return latents[:, :, top:latents.shape[2] - bottom, left:latents.shape[3] - right]


def upscale_image(image: np.ndarray, size: HiresSize, upscaler: str) -> np.ndarray:
    """One HxWx3 uint8 image brought to the upscaled size: A1111's ``resize_image(0, ...)`` with an upscaler.

    Written out because A1111's own steps decide the pixels: the upscaler enlarges by
    ``max(W / w, H / h)`` (``Upscaler.upscale``: its ``do_upscale`` once, then a Lanczos resize
    to the multiple of 8 below), then a Lanczos resize to the exact size when that differs.
    """
    up_h, up_w = size.upscaled
    im = Image.fromarray(image)
    resample = IMAGE_UPSCALERS[upscaler]
    scale = max(up_w / im.width, up_h / im.height)
    if resample is not None and scale > 1.0:
        dest_w, dest_h = int((im.width * scale) // 8 * 8), int((im.height * scale) // 8 * 8)
        for _ in range(3):
            shape = im.size
            im = im.resize((int(im.width * scale), int(im.height * scale)), resample=resample)
            if shape == im.size or (im.width >= dest_w and im.height >= dest_h):
                break
        if im.size != (dest_w, dest_h):
            im = im.resize((dest_w, dest_h), resample=Image.Resampling.LANCZOS)
    if im.size != (up_w, up_h):
        im = im.resize((up_w, up_h), resample=Image.Resampling.LANCZOS)
    return np.asarray(im)
