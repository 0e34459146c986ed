"""Inpainting with a regular (4-channel) UNet: the mask, the region, the fill and the paste back.

The denoising side (:mod:`loramgr.pipeline.controlnet`) follows diffusers'
``StableDiffusion[ControlNet]InpaintPipeline`` for 4-channel UNets: after every step the
latents outside the mask are replaced by the image's latents noised to the next timestep (the
clean ones after the last step). This module prepares what that needs, by one of two rules
(:data:`MASK_RULES`, docs/a1111.md):

* ``diffusers``: the mask binarized at 0.5 and shrunk to the latents with nearest
  interpolation (``VaeImageProcessor(do_binarize=True)``, ``prepare_mask_latents``); the original
  pixels pasted back outside the mask with diffusers' ``apply_overlay``.
* ``a1111``: A1111's ``StableDiffusionProcessingImg2Img.init``: the latent mask is the mask
  resized (bicubic) to the latents and rounded; the paste back uses the mask doubled
  (``mask_for_overlay``), or the mask itself with ``full_res``.

Common to both: an RGBA mask with transparency is its alpha (A1111's ``create_binary_mask``),
``invert`` and ``blur`` (a Gaussian of the mask image, A1111's ``mask_blur``) come first,
``fill`` says what the masked area starts from (A1111's ``inpainting_fill``), and
``full_res`` generates the masked region's box (plus ``padding``, widened to the output's
aspect ratio) at the output size and pastes it back into the whole image (A1111's
``inpaint_full_res``, diffusers' ``padding_mask_crop``).

Image operations are PIL's, in the order and with the filters both references use, so
pixels agree with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from .canny import HWC3

MASK_RULES = ("diffusers", "a1111")
# A1111's inpainting_fill 0..3: blurred surrounding colours, the original, latent noise, zero latents.
INPAINT_FILLS = ("fill", "original", "latent_noise", "latent_nothing")


@dataclass(frozen=True)
class Inpaint:
    """How the mask that travels beside the settings is used (no mask: this is not read)."""

    blur: int = 0
    invert: bool = False
    fill: str = "original"
    full_res: bool = False
    padding: int = 32
    rule: str = "diffusers"


@dataclass
class InpaintArea:
    """What is inpainted, at the output size, and what the result is pasted back onto.

    ``image`` / ``mask``: the input image and the mask (HxW uint8, 255 = inpaint) at the output
    size: the whole image resized, or (``region``) the region's box fitted to it.
    ``original`` / ``overlay``: the image the generated pixels are pasted onto and the mask
    they are pasted with (the whole input with ``region``).
    """

    image: np.ndarray
    mask: np.ndarray
    original: np.ndarray
    overlay: np.ndarray
    rule: str
    region: tuple[int, int, int, int] | None = None

    def source(self, source: np.ndarray) -> np.ndarray:
        """A ControlNet unit's image brought into the area: stretched to the input's size, cropped to the
        region and fitted to the output size (the ControlNet extension's ``inpaint_full_res`` crop)."""
        if self.region is None:
            return source
        source = HWC3(source)
        height, width = self.original.shape[:2]
        if source.shape[:2] != (height, width):
            source = _resize(source, width, height)
        return _crop_fit(source, self.region, self.image.shape[1], self.image.shape[0])

    def latent_mask(self) -> torch.Tensor:
        return latent_mask(self.mask, self.rule)

    def paste(self, generated: np.ndarray) -> np.ndarray:
        return paste_back(generated, self.original, self.overlay, self.region)


def inpaint_area(image: np.ndarray, resized: np.ndarray, mask: np.ndarray, inpaint: Inpaint,
                 size: tuple[int, int]) -> InpaintArea:
    """The :class:`InpaintArea` of ``image`` (any size) under ``mask``.

    ``resized``: ``image`` at the output size (what is inpainted without ``full_res``);
    ``size``: the (height, width) the region is generated at with ``full_res``. A mask of
    another size than the image is first stretched to it; an empty mask has no region.
    """
    image = HWC3(image)
    processed = prepare_mask(mask, inpaint)
    height, width = image.shape[:2]
    if processed.shape != (height, width):
        processed = _resize(processed, width, height)
    region = crop_region(processed, inpaint.padding, size[1], size[0]) if inpaint.full_res else None
    if region is None:
        out_h, out_w = resized.shape[:2]
        small = processed if processed.shape == (out_h, out_w) else _resize(processed, out_w, out_h)
        return InpaintArea(resized, small, resized, overlay_mask(small, inpaint.rule, False), inpaint.rule)
    return InpaintArea(_crop_fit(image, region, size[1], size[0]), _crop_fit(processed, region, size[1], size[0]),
                       image, overlay_mask(processed, inpaint.rule, True), inpaint.rule, region)


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Stretched to ``width`` x ``height`` with the interpolation ControlNet's ``resize_image`` picks."""
    enlarge = width * height > image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LANCZOS4 if enlarge else cv2.INTER_AREA)


def _crop_fit(image: np.ndarray, region: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    x1, y1, x2, y2 = region
    return resize_fill(np.ascontiguousarray(image[y1:y2, x1:x2]), width, height)


def prepare_mask(mask: np.ndarray, inpaint: Inpaint) -> np.ndarray:
    """HxW uint8, 255 = inpaint: the alpha or grey of ``mask``, inverted and blurred as A1111 does.

    An RGBA mask whose alpha is not all 255 is its alpha thresholded above 128; any other
    mask is its grey value (PIL's ``L``). The blur is A1111's two 1-D Gaussians of sigma
    ``blur`` and width ``2 * int(2.5 * blur + 0.5) + 1``.
    """
    if mask.ndim == 3 and mask.shape[2] == 4 and mask[..., 3].min() != 255:
        grey = np.where(mask[..., 3] > 128, 255, 0).astype(np.uint8)
    else:
        grey = np.asarray(Image.fromarray(mask.squeeze(2) if mask.ndim == 3 and mask.shape[2] == 1 else mask)
                          .convert("L"))
    if inpaint.invert:
        grey = 255 - grey
    if inpaint.blur > 0:
        size = 2 * int(2.5 * inpaint.blur + 0.5) + 1
        grey = cv2.GaussianBlur(grey, (size, 1), inpaint.blur)
        grey = cv2.GaussianBlur(grey, (1, size), inpaint.blur)
    return np.ascontiguousarray(grey)


def crop_region(mask: np.ndarray, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """(x1, y1, x2, y2): the box of the mask's non-zero pixels plus ``padding``, widened to ``width / height``.

    A1111's ``get_crop_region`` + ``expand_crop_region`` (diffusers' ``get_crop_region`` is
    the same); ``None`` for an empty mask (A1111's ``get_crop_region_v2``: nothing to crop to).
    """
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if rows.size == 0:
        return None
    image_h, image_w = mask.shape
    x1, y1 = max(int(cols[0]) - padding, 0), max(int(rows[0]) - padding, 0)
    x2, y2 = min(int(cols[-1]) + 1 + padding, image_w), min(int(rows[-1]) + 1 + padding, image_h)
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _widen(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), image_h)
    else:
        x1, x2 = _widen(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), image_w)
    return x1, y1, x2, y2


def _widen(lo: int, hi: int, diff: int, limit: int) -> tuple[int, int]:
    lo -= diff // 2
    hi += diff - diff // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def resize_fill(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """A1111's ``resize_image`` mode 2 / diffusers' ``resize_mode="fill"``: fit with Lanczos, edges stretched."""
    im = Image.fromarray(image)
    ratio, src_ratio = width / height, im.width / im.height
    src_w = width if ratio < src_ratio else im.width * height // im.height
    src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = im.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    out = Image.new(im.mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio and (fill := height // 2 - src_h // 2) > 0:
        out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)), box=(0, fill + src_h))
    elif ratio > src_ratio and (fill := width // 2 - src_w // 2) > 0:
        out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)), box=(fill + src_w, 0))
    return np.asarray(out)


def resize_crop(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """A1111's ``resize_image`` mode 1 / diffusers' ``resize_mode="crop"``: cover with Lanczos, centre kept."""
    im = Image.fromarray(image)
    ratio, src_ratio = width / height, im.width / im.height
    src_w = width if ratio > src_ratio else im.width * height // im.height
    src_h = height if ratio <= src_ratio else im.height * width // im.width
    resized = im.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    out = Image.new(im.mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return np.asarray(out)


def latent_mask(mask: np.ndarray, rule: str) -> torch.Tensor:
    """``[1, 1, H/8, W/8]`` float32, 1 where the latents are denoised, 0 where the image's are kept."""
    height, width = mask.shape[0] // 8, mask.shape[1] // 8
    if rule == "a1111":  # Image.resize's default filter (bicubic), then np.around
        small = np.asarray(Image.fromarray(mask).convert("RGB").resize((width, height)), dtype=np.float32)[..., 0]
        return torch.from_numpy(np.around(small / 255))[None, None]
    binary = torch.from_numpy((mask.astype(np.float32) / 255.0 >= 0.5).astype(np.float32))[None, None]
    return torch.nn.functional.interpolate(binary, size=(height, width))


def overlay_mask(mask: np.ndarray, rule: str, full_res: bool) -> np.ndarray:
    """The mask the generated pixels are pasted back with: A1111 doubles it outside ``full_res``."""
    if rule == "a1111" and not full_res:
        return np.clip(mask.astype(np.float32) * 2, 0, 255).astype(np.uint8)
    return mask


def fill(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A1111's ``masking.fill``: the masked area painted with ever less blurred copies of what surrounds it."""
    im = Image.fromarray(image)
    out = Image.new("RGBA", im.size)
    masked = Image.new("RGBa", im.size)
    masked.paste(im.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(Image.fromarray(mask)))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return np.asarray(out.convert("RGB"))


def paste_back(generated: np.ndarray, original: np.ndarray, mask: np.ndarray,
               region: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The original's pixels over ``generated`` where ``mask`` is 0, blended where it is grey.

    ``region``: ``generated`` is the region's box at the output size; it is first brought
    back (A1111's ``uncrop``: resize mode "crop and resize") into an image of the original's
    size. A1111's ``apply_overlay`` and diffusers' ``apply_overlay``, which are the same.
    """
    original_im = Image.fromarray(original)
    masked = Image.new("RGBa", original_im.size)
    masked.paste(original_im.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(Image.fromarray(mask)))
    if region is None:
        image = Image.fromarray(generated).convert("RGBA")
    else:
        x1, y1, x2, y2 = region
        image = Image.new("RGBA", original_im.size)
        image.paste(Image.fromarray(resize_crop(generated, x2 - x1, y2 - y1)), (x1, y1))
    image.alpha_composite(masked.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def control_tensor(image: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """An ``inpaint`` unit's control image: ``[1, 3, H, W]`` in [0, 1] with -1 where the mask is over 0.5.

    The ControlNet extension's inpaint protocol (``hint = c * (1 - m) - m``, ``m = mask > 0.5``)
    and diffusers' ``make_inpaint_condition`` (control_v11p_sd15_inpaint).
    """
    masked = torch.from_numpy(mask.astype(np.float32) / 255.0 > 0.5).to(image.device)
    return torch.where(masked[None, None], torch.tensor(-1.0, dtype=image.dtype, device=image.device), image)
