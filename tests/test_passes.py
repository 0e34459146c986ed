"""Hires fix and inpainting (issue 22, items 3-5): the pipeline against diffusers, A1111's rules, the APIs.

References: the hires fix against a chain of diffusers pipelines (text-to-image, the same
upscale done here, image-to-image; tests/reference_passes.py); native inpainting against
diffusers' ``StableDiffusion[ControlNet]InpaintPipeline`` on the regular 4-channel UNet followed
by diffusers' ``apply_overlay``; A1111's mask rules against transcriptions of A1111's code
(``modules/processing.py``, ``modules/masking.py``) written here. Parity tolerance as
tests/test_pipeline.py: <= 1 uint8 level over the torch runner, <= 2 over ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import json
import os

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps

from loramgr.errors import LoramgrError
from loramgr.pipeline.canny import detect_edges
from loramgr.pipeline.control import ControlUnit
from loramgr.pipeline.inpaint import Inpaint, crop_region, fill, latent_mask, overlay_mask, prepare_mask
from loramgr.pipeline.passes import HiresFix, hires_size, upscale_image
from loramgr.pipeline.settings import GenerationSettings
from reference_passes import apply_overlay, diffusers_hires, diffusers_inpaint, make_inpaint_condition
from test_pipeline import _recording, assert_same_images, image, synthetic_image  # noqa: F401 (image: a fixture)
from serve_support import decode, free_port, reaped, start_server

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
    pytest.mark.filterwarnings("ignore:You have passed 2 text prompts:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Passing `image` as torch tensor with value range in \\[-1,1\\]"),
]

INPAINT_CN = "control_v11p_sd15_inpaint"
COMMON = {"prompt": "a bird", "a_prompt": "", "n_prompt": "blurry", "seed": 3}


# --- the hires fix: sizes and upscalers ---------------------------------------------------------

@pytest.mark.parametrize(("first", "hires", "upscaled", "crop", "target"), [
    ((512, 512), HiresFix(scale=2.0), (1024, 1024), (0, 0, 0, 0), (1024, 1024)),
    ((512, 768), HiresFix(scale=1.5), (768, 1152), (0, 0, 0, 0), (768, 1152)),
    ((512, 768), HiresFix(resize_x=1024), (682, 1024), (0, 0, 0, 0), (682, 1024)),  # x * h // w
    ((512, 768), HiresFix(resize_y=1024), (1024, 1536), (0, 0, 0, 0), (1024, 1536)),
    # both: upscale to cover (768 / 512 > 1024 / 1024: by height), then 64 latent columns cropped, 32 a side
    ((512, 768), HiresFix(resize_x=1024, resize_y=1024), (1024, 1536), (0, 0, 32, 32), (1024, 1024)),
    ((64, 128), HiresFix(resize_x=128, resize_y=128), (128, 256), (0, 0, 8, 8), (128, 128)),
    ((768, 512), HiresFix(resize_x=1000, resize_y=1000), (1500, 1000), (31, 31, 0, 0), (1000, 1000)),
])
def test_hires_size_is_a1111s(first, hires, upscaled, crop, target):
    """A1111's calculate_target_resolution and the hr pass's latent crop, worked by hand (height, width)."""
    size = hires_size(*first, hires)
    assert (size.upscaled, size.crop, size.target) == (upscaled, crop, target)


def test_upscale_image_follows_a1111s_upscaler_steps():
    """Upscaler.upscale (once by the scale, then Lanczos to the multiple of 8 below) then resize_image's Lanczos."""
    pixels = synthetic_image(60, 60)
    size = hires_size(60, 60, HiresFix(resize_x=100, resize_y=100))
    for name, resample in (("Lanczos", Image.Resampling.LANCZOS), ("Nearest", Image.Resampling.NEAREST)):
        im = Image.fromarray(pixels).resize((100, 100), resample)  # int(60 * 100 / 60)
        im = im.resize((96, 96), Image.Resampling.LANCZOS).resize((100, 100), Image.Resampling.LANCZOS)
        np.testing.assert_array_equal(upscale_image(pixels, size, name), np.asarray(im))
    plain = Image.fromarray(pixels).resize((100, 100), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(upscale_image(pixels, size, "None"), np.asarray(plain))


# --- the hires fix against diffusers' pipelines ------------------------------------------------

def _latent(mode: str, antialias: bool = False, crop: int = 0):
    def upscale(latents: torch.Tensor) -> torch.Tensor:
        h, w = latents.shape[2] * 2, latents.shape[3] * 2
        if crop:  # resize 128x128 from 64x128: cover at 128x256 (latents 16x32), 8 latent columns off each side
            h, w = 16, 32
        out = torch.nn.functional.interpolate(latents, size=(h, w), mode=mode, antialias=antialias)
        return out[:, :, :, crop:out.shape[3] - crop]
    return upscale


def _pixels(resample):
    return lambda images: [im.resize((im.width * 2, im.height * 2), resample) for im in images]


HIRES_CASES = {
    # id: (hires, units?, first size (h, w), the test's own upscale, latent?)
    "latent-canny-hr-prompt": (HiresFix(upscaler="Latent", steps=4, strength=0.6, prompt="a cat, detailed",
                                        n_prompt="ugly"), True, (64, 64), _latent("bilinear"), True),
    "latent-antialiased-resize-x": (HiresFix(upscaler="Latent (antialiased)", resize_x=128, strength=0.5), False,
                                    (64, 64), _latent("bilinear", True), True),
    "latent-bicubic-antialiased": (HiresFix(upscaler="Latent (bicubic antialiased)", strength=0.75), False,
                                   (64, 64), _latent("bicubic", True), True),
    "latent-nearest-exact": (HiresFix(upscaler="Latent (nearest-exact)", strength=0.5), False, (64, 64),
                             _latent("nearest-exact"), True),
    "latent-nearest-crop": (HiresFix(upscaler="Latent (nearest)", resize_x=128, resize_y=128, strength=0.5), False,
                            (64, 128), _latent("nearest", crop=8), True),
    "lanczos-canny-euler-a": (HiresFix(upscaler="Lanczos", steps=5, strength=0.5, scheduler="euler_a"), True,
                              (64, 64), _pixels(Image.Resampling.LANCZOS), False),
    "nearest": (HiresFix(upscaler="Nearest", strength=0.5), False, (64, 64), _pixels(Image.Resampling.NEAREST), False),
}


@pytest.mark.parametrize("case", HIRES_CASES.values(), ids=HIRES_CASES.keys())
def test_hires_matches_a_diffusers_chain(pipe, reference, image, case):
    """First pass, the same upscale, img2img second pass with a generator seeded anew: the same pixels."""
    hires, with_unit, first_size, upscale, latent = case
    settings = GenerationSettings(**COMMON, steps=3, resolution=64, num_samples=2, hires=hires,
                                  units=None if with_unit else (), width=first_size[1], height=first_size[0])
    made = pipe(image if with_unit else None, settings)
    target = hires_size(*first_size, hires).target
    assert made.images[0].shape == (*target, 3) and len(made.timesteps) == 3 + int((hires.steps or 3) *
                                                                                   hires.strength)
    second_map = detect_edges(image, min(target), 100, 200)[1] if with_unit else None
    theirs = diffusers_hires(reference, first_map=made.edge_map, second_map=second_map, prompt="a bird",
                             negative="blurry", hr_prompt=hires.prompt or "a bird", hr_negative=hires.n_prompt or "blurry",
                             steps=3, hr_steps=hires.steps or 3, seed=3, scale=9.0, strength=hires.strength,
                             num_samples=2, upscale=upscale, latent=latent, hr_scheduler=hires.scheduler,
                             size=first_size)
    assert_same_images(made.images, theirs)


def test_hires_second_pass_changes_the_image(pipe):
    """The second pass matters: upscaling the first pass alone is far from the hires result."""
    settings = GenerationSettings(**COMMON, steps=3, units=(), width=64, height=64)
    first = pipe(None, settings).images[0]
    made = pipe(None, dataclasses.replace(settings, hires=HiresFix(upscaler="Lanczos", strength=0.6))).images[0]
    upscaled = np.asarray(Image.fromarray(first).resize((128, 128), Image.Resampling.LANCZOS))
    assert np.abs(made.astype(int) - upscaled).mean() > 5


@pytest.mark.parametrize(("hires", "fragments"), [
    (HiresFix(scale=3.0), ("hires: scale 3 on a 64x64 first pass gives a 192x192 second pass (0.0369 Mpx)",
                           "limit of 0.0164 Mpx", "--max-pixels")),
    (HiresFix(scale=1.3), ("hires: scale 1.3 on a 64x64 first pass gives a 83x83 second pass", "multiples of 64")),
    (HiresFix(resize_x=128, resize_y=100), ("resize 128x100", "128x100 second pass (upscaled to 128x128)",)),
    (HiresFix(upscaler="ESRGAN_4x"), ("unknown hires.upscaler 'ESRGAN_4x'", "Latent (nearest-exact), None, Lanczos")),
    (HiresFix(strength=0.01, steps=20), ("hires.strength=0.01 with 20 steps leaves no denoising step",)),
])
def test_bad_hires_is_refused_before_any_work(pipe, hires, fragments):
    """Item 5: a second pass over --max-pixels (or of a size the UNet cannot take) is refused up front."""
    recorder, recording = _recording(pipe)
    settings = GenerationSettings(**COMMON, steps=3, units=(), width=64, height=64, hires=hires,
                                  max_pixels=128 * 128)
    with pytest.raises(LoramgrError) as info:
        recording(None, settings)
    assert all(f in str(info.value) for f in fragments), str(info.value)
    assert recorder.unet == [] and recorder.controlnet == [] and recorder.released == []


def test_hires_needs_text_to_image_and_no_mask(pipe, image):
    settings = GenerationSettings(**COMMON, steps=3, resolution=64, hires=HiresFix())
    with pytest.raises(LoramgrError, match="hires works on text-to-image: img2img_strength must be None"):
        pipe(image, dataclasses.replace(settings, img2img_strength=0.5))
    with pytest.raises(LoramgrError, match="hires and a mask do not combine"):
        pipe(image, settings, mask=np.full((96, 80), 255, np.uint8))


# --- inpainting against diffusers' inpaint pipelines (the native "diffusers" rule) --------------

@pytest.fixture(scope="module")
def square() -> np.ndarray:
    return synthetic_image(64, 64)


@pytest.fixture(scope="module")
def block() -> np.ndarray:
    """A binary mask whose edges cut through latent cells (not on the 8-pixel grid)."""
    mask = np.zeros((64, 64), np.uint8)
    mask[13:41, 21:50] = 255
    return mask


def assert_kept_outside(images: list[np.ndarray], original: np.ndarray, mask: np.ndarray) -> None:
    """Every pixel where the mask is 0 is the original's, exactly; the masked area was repainted."""
    out = np.stack(images)
    np.testing.assert_array_equal(out[:, mask == 0], np.broadcast_to(original[mask == 0], out[:, mask == 0].shape))
    assert np.abs(out[:, mask == 255].astype(int) - original[mask == 255]).mean() > 10


@pytest.mark.parametrize(("scheduler", "strength", "num_samples"), [("ddim", None, 2), ("euler_a", 0.75, 1)],
                         ids=["ddim-full-strength-batch", "euler-a-img2img"])
def test_inpaint_matches_diffusers_inpaint_pipeline(pipe, reference, square, block, scheduler, strength, num_samples):
    """No ControlNet: StableDiffusionInpaintPipeline on the 4-channel UNet (its per-step latent blend and its
    random draws, the masked image's VAE sample included), then its apply_overlay; outside the mask exact."""
    settings = GenerationSettings(**COMMON, steps=5, resolution=64, units=(), num_samples=num_samples,
                                  scheduler=scheduler, img2img_strength=strength)
    made = pipe(square, settings, mask=block)
    theirs = diffusers_inpaint(reference, square, block, prompt="a bird", negative="blurry", steps=5, seed=3,
                               scale=9.0, strength=strength or 1.0, num_samples=num_samples, scheduler=scheduler)
    assert_same_images(made.images, apply_overlay(reference, block, square, theirs))
    assert_kept_outside(made.images, square, block)


def test_inpaint_with_a_canny_unit_matches_diffusers(pipe, reference, square, block):
    """StableDiffusionControlNetInpaintPipeline with the canny map of the image."""
    settings = GenerationSettings(**COMMON, steps=5, resolution=64)
    made = pipe(square, settings, mask=block)
    np.testing.assert_array_equal(made.edge_map, detect_edges(square, 64, 100, 200)[1])
    theirs = diffusers_inpaint(reference, square, block, prompt="a bird", negative="blurry", steps=5, seed=3,
                               scale=9.0, strength=1.0, num_samples=1, controlnets=[reference.controlnet],
                               control_images=[made.edge_map])
    assert_same_images(made.images, apply_overlay(reference, block, square, theirs))


def test_inpaint_preprocessor_matches_make_inpaint_condition(pipe, reference, square, block):
    """An 'inpaint' unit (control_v11p_sd15_inpaint's input): the image with -1 at masked pixels, as
    diffusers' make_inpaint_condition gives StableDiffusionControlNetInpaintPipeline."""
    recorder, recording = _recording(pipe)
    unit = ControlUnit(preprocessor="inpaint", strength=0.8)
    made = recording(square, GenerationSettings(**COMMON, steps=5, resolution=64, units=(unit,)), mask=block)
    cond = recorder.controlnet[0]["cond"][0]
    torch.testing.assert_close(cond, make_inpaint_condition(square, block)[0], rtol=0, atol=0)
    assert (made.control_maps[0][block == 255] == 0).all()  # what is shown: black where masked
    theirs = diffusers_inpaint(reference, square, block, prompt="a bird", negative="blurry", steps=5, seed=3,
                               scale=9.0, strength=1.0, num_samples=1, controlnets=[reference.controlnet],
                               control_images=[make_inpaint_condition(square, block)], strengths=[0.8])
    assert_same_images(made.images, apply_overlay(reference, block, square, theirs))
    with pytest.raises(LoramgrError, match="preprocessor 'inpaint', which needs a mask"):
        pipe(square, GenerationSettings(**COMMON, steps=1, resolution=64, units=(unit,)))


def test_full_res_matches_diffusers_padding_mask_crop(pipe, reference):
    """inpaint.full_res: the mask's box (plus padding, widened to the output's aspect) generated at the
    output size and pasted back into the whole image: diffusers' padding_mask_crop."""
    original = synthetic_image(96, 80, seed=2)
    mask = np.zeros((96, 80), np.uint8)
    mask[50:70, 10:30] = 255
    settings = GenerationSettings(**COMMON, steps=5, resolution=64, units=(), inpaint=Inpaint(full_res=True,
                                                                                             padding=6))
    made = pipe(original, settings, mask=mask)
    theirs = diffusers_inpaint(reference, original, mask, prompt="a bird", negative="blurry", steps=5, seed=3,
                               scale=9.0, strength=1.0, num_samples=1, padding_mask_crop=6, size=(64, 64))
    assert made.images[0].shape == original.shape  # the whole input comes back
    assert_same_images(made.images, np.stack([np.asarray(t) for t in theirs]))
    assert_kept_outside(made.images, original, mask)


# --- A1111's rules, transcribed from A1111's code (modules/processing.py, modules/masking.py) ---

def a1111_image_mask(mask: Image.Image, invert: bool, blur: int) -> np.ndarray:
    """StableDiffusionProcessingImg2Img.init: create_binary_mask, invert, the x then y Gaussian blur."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        mask = mask.split()[-1].convert("L").point(lambda x: 255 if x > 128 else 0)
    else:
        mask = mask.convert("L")
    if invert:
        mask = ImageOps.invert(mask)
    import cv2
    for ksize in ((2 * int(2.5 * blur + 0.5) + 1, 1), (1, 2 * int(2.5 * blur + 0.5) + 1)) if blur > 0 else ():
        mask = Image.fromarray(cv2.GaussianBlur(np.array(mask), ksize, blur))
    return np.array(mask)


def a1111_latmask(mask: np.ndarray) -> np.ndarray:
    latmask = Image.fromarray(mask).convert("RGB").resize((mask.shape[1] // 8, mask.shape[0] // 8))
    latmask = np.moveaxis(np.array(latmask, dtype=np.float32), 2, 0) / 255
    return np.around(latmask[0])


def a1111_crop_region(mask: np.ndarray, pad: int, processing_width: int, processing_height: int):
    """masking.get_crop_region then masking.expand_crop_region, loop for loop."""
    h, w = mask.shape
    crop_left = next((i for i in range(w) if not (mask[:, i] == 0).all()), w)
    crop_right = next((w - 1 - i for i in reversed(range(w)) if not (mask[:, i] == 0).all()), w)
    crop_top = next((i for i in range(h) if not (mask[i] == 0).all()), h)
    crop_bottom = next((h - 1 - i for i in reversed(range(h)) if not (mask[i] == 0).all()), h)
    x1, y1 = int(max(crop_left - pad, 0)), int(max(crop_top - pad, 0))
    x2, y2 = int(min(w - crop_right + pad, w)), int(min(h - crop_bottom + pad, h))
    ratio_crop_region, ratio_processing = (x2 - x1) / (y2 - y1), processing_width / processing_height
    if ratio_crop_region > ratio_processing:
        desired_height_diff = int((x2 - x1) / ratio_processing - (y2 - y1))
        y1 -= desired_height_diff // 2
        y2 += desired_height_diff - desired_height_diff // 2
        if y2 >= h:
            diff = y2 - h
            y2 -= diff
            y1 -= diff
        if y1 < 0:
            y2 -= y1
            y1 -= y1
        if y2 >= h:
            y2 = h
    else:
        desired_width_diff = int((y2 - y1) * ratio_processing - (x2 - x1))
        x1 -= desired_width_diff // 2
        x2 += desired_width_diff - desired_width_diff // 2
        if x2 >= w:
            diff = x2 - w
            x2 -= diff
            x1 -= diff
        if x1 < 0:
            x2 -= x1
            x1 -= x1
        if x2 >= w:
            x2 = w
    return x1, y1, x2, y2


def a1111_fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    image_mod = Image.new("RGBA", (image.width, image.height))
    image_masked = Image.new("RGBa", (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    image_masked = image_masked.convert("RGBa")
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def random_masks(seed: int = 0):
    """Blobs of several shapes and sizes, grey and binary, RGB and RGBA with alpha."""
    rng = np.random.default_rng(seed)
    for k in range(6):
        h, w = rng.integers(40, 120, 2)
        mask = np.zeros((h, w), np.uint8)
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        mask[y:y + rng.integers(2, h - y), x:x + rng.integers(2, w - x)] = 255 if k % 2 else rng.integers(1, 255)
        yield mask


@pytest.mark.parametrize("blur", [0, 1, 4])
@pytest.mark.parametrize("invert", [False, True])
def test_mask_preparation_is_a1111s(blur, invert):
    for mask in random_masks():
        rgba = np.dstack([np.full((*mask.shape, 3), 90, np.uint8), mask])  # a transparent-background RGBA mask
        for given, pil in ((mask, Image.fromarray(mask)), (np.dstack([mask] * 3), Image.fromarray(mask).convert("RGB")),
                           (rgba, Image.fromarray(rgba))):
            expected = a1111_image_mask(pil, invert, blur)
            np.testing.assert_array_equal(prepare_mask(given, Inpaint(blur=blur, invert=invert)), expected)
    opaque = np.dstack([np.full((8, 8, 3), 200, np.uint8), np.full((8, 8), 255, np.uint8)])
    assert (prepare_mask(opaque, Inpaint()) == 200).all()  # alpha all 255: the grey of the colour, as A1111


def test_latent_mask_and_overlay_rules():
    """a1111: the mask resized (bicubic) to the latents and rounded, pasted back doubled; diffusers: binarized
    at 0.5 then nearest, pasted back as it is."""
    for mask in random_masks(1):
        mask = prepare_mask(mask[: mask.shape[0] // 8 * 8, : mask.shape[1] // 8 * 8], Inpaint(blur=3))
        np.testing.assert_array_equal(latent_mask(mask, "a1111")[0, 0].numpy(), a1111_latmask(mask))
        nearest = (mask.astype(np.float32) / 255 >= 0.5)[::8, ::8]  # torch's nearest takes pixel 8 i
        np.testing.assert_array_equal(latent_mask(mask, "diffusers")[0, 0].numpy(), nearest.astype(np.float32))
        np.testing.assert_array_equal(overlay_mask(mask, "a1111", False), np.minimum(mask.astype(int) * 2, 255))
        assert overlay_mask(mask, "a1111", True) is mask and overlay_mask(mask, "diffusers", False) is mask


def test_crop_region_is_a1111s():
    region = np.zeros((512, 512), np.uint8)
    region[100:132, 200:328] = 255  # a 128x32 region for a 512x512 output: widened to 128x128
    assert crop_region(region, 0, 512, 512) == (200, 52, 328, 180)
    for pad in (0, 5, 32):
        for mask in random_masks(2):
            for width, height in ((64, 64), (128, 64), (64, 192)):
                assert crop_region(mask, pad, width, height) == a1111_crop_region(mask, pad, width, height)
    assert crop_region(np.zeros((16, 16), np.uint8), 4, 64, 64) is None  # nothing masked: nothing to crop


def test_fill_is_a1111s(square, block):
    np.testing.assert_array_equal(fill(square, block), np.asarray(a1111_fill(Image.fromarray(square),
                                                                             Image.fromarray(block))))


def test_a1111_fill_starts_from_the_filled_image(pipe, reference, square, block):
    """fill: the masked pixels painted over before encoding: diffusers' pipeline on the filled image, the
    original pasted back."""
    settings = GenerationSettings(**COMMON, steps=5, resolution=64, units=(), img2img_strength=0.75,
                                  inpaint=Inpaint(fill="fill"))
    made = pipe(square, settings, mask=block)
    filled = np.asarray(a1111_fill(Image.fromarray(square), Image.fromarray(block)))
    theirs = diffusers_inpaint(reference, filled, block, prompt="a bird", negative="blurry", steps=5, seed=3,
                               scale=9.0, strength=0.75, num_samples=1)
    assert_same_images(made.images, apply_overlay(reference, block, square, theirs))


@pytest.mark.parametrize("fill_mode", ["latent_noise", "latent_nothing"])
def test_latent_fills_are_a1111s(pipe, square, block, fill_mode):
    """A1111's init_latent: masked latents replaced by the noise (2) or zeros (3) before the img2img noising."""
    recorder, recording = _recording(pipe)
    settings = GenerationSettings(**COMMON, steps=4, resolution=64, units=(), img2img_strength=0.5,
                                  inpaint=Inpaint(fill=fill_mode, rule="a1111"))
    recording(square, settings, mask=block)
    generator = torch.Generator().manual_seed(3)
    torch.randn((1, 4, 8, 8), generator=generator)  # the image's VAE sample
    noise = torch.randn((1, 4, 8, 8), generator=generator)
    from loramgr.pipeline.schedulers import make_scheduler

    scheduler = make_scheduler("ddim", pipe.scheduler_config)
    first_t = pipe.prepare_timesteps(scheduler, settings)[:1]
    inside = torch.from_numpy(a1111_latmask(block)).bool().expand(1, 4, 8, 8)
    masked_start = torch.zeros(1, 4, 8, 8) if fill_mode == "latent_nothing" else noise
    expected = scheduler.add_noise(masked_start, noise, first_t)
    sample = recorder.unet[0]["sample"][1:]  # the conditional half of the first step
    torch.testing.assert_close(sample[inside], expected[inside], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sample[~inside], expected[~inside], atol=1e-2)  # outside: the image's latents


def test_a1111_paste_back_blends_with_the_doubled_mask(pipe, square):
    """A blurred mask pasted back as A1111 does (the init image's alpha 255 - min(2 m, 255)): exact where the
    mask is 0, the weighted mean of init and generated pixels where it is grey."""
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 20:44] = 255
    recorder, recording = _recording(pipe)
    raw = []
    decode = recording.decode_latents
    recording.decode_latents = lambda latents: raw.extend(decode(latents)) or list(raw)
    settings = GenerationSettings(**COMMON, steps=4, resolution=64, units=(), img2img_strength=0.75,
                                  inpaint=Inpaint(blur=4, rule="a1111"))
    made = recording(square, settings, mask=mask)
    soft = prepare_mask(mask, Inpaint(blur=4)).astype(np.float64)
    alpha = np.minimum(2 * soft, 255)[..., None] / 255  # the generated image's weight
    expected = raw[0] * alpha + square * (1 - alpha)
    error = np.abs(made.images[0] - expected)  # PIL composites in premultiplied 8-bit steps: 2 levels at most
    assert error.max() <= 2 and error.mean() < 0.3, (error.max(), error.mean())
    keep = alpha[..., 0] == 0
    assert keep.sum() > 1000 and (made.images[0][keep] == square[keep]).all()
    assert ((alpha[..., 0] > 0) & (alpha[..., 0] < 1)).sum() > 200  # the blur made a soft edge


# --- the converted control_v11p_sd15_inpaint on ONNX Runtime, the CLI and the HTTP APIs ------------

@pytest.fixture(scope="module")
def inpaint_controlnet(tiny_workspace, tmp_path_factory):
    """A diffusers ControlNet folder named as the inpaint model (random weights of the tiny architecture)."""
    from loramgr.manifest import Manifest
    from loramgr.samples import write_controlnet

    manifest = Manifest.load(tiny_workspace.base_dir("tiny"))
    return write_controlnet(tmp_path_factory.mktemp("cn") / INPAINT_CN, manifest.configs["controlnet"], seed=21)


@pytest.fixture(scope="module")
def ws(tiny_workspace, inpaint_controlnet, tmp_path_factory, square, block):
    """A workspace with the tiny base and the inpaint ControlNet converted; in.png and mask.png beside."""
    from loramgr.convert import convert_adapter
    from loramgr.workspace import Workspace

    home = tmp_path_factory.mktemp("passes_ws")
    (home / "base_models").mkdir()
    os.symlink(tiny_workspace.base_dir("tiny"), home / "base_models" / "tiny")
    workspace = Workspace.resolve(home)
    assert convert_adapter(workspace, inpaint_controlnet, base="tiny", name=INPAINT_CN).kind == "controlnet"
    Image.fromarray(square).save(home / "in.png")
    Image.fromarray(block).save(home / "mask.png")
    return workspace


def test_converted_inpaint_controlnet_on_onnxruntime_matches_diffusers(ws, inpaint_controlnet, reference, square,
                                                                        block):
    """control_v11p_sd15_inpaint converted and run with the 'inpaint' preprocessor (-1 at masked pixels through
    the exported graph) against diffusers' ControlNetInpaint pipeline with make_inpaint_condition."""
    from diffusers import ControlNetModel

    from loramgr.runtime import AdapterChoice, Generator

    settings = GenerationSettings(**COMMON, steps=4, resolution=64, units=(ControlUnit(INPAINT_CN, "inpaint"),))
    with Generator.open(ws, "tiny", "ort-cpu") as generator:
        made = generator.generate(AdapterChoice(), settings, square, mask=block)
        plain = generator.generate(AdapterChoice(controls=()), dataclasses.replace(settings, units=()), square,
                                   mask=block)
    theirs = diffusers_inpaint(reference, square, block, prompt="a bird", negative="blurry", steps=4, seed=3,
                               scale=9.0, strength=1.0, num_samples=1,
                               controlnets=[ControlNetModel.from_pretrained(inpaint_controlnet)],
                               control_images=[make_inpaint_condition(square, block)])
    diff = np.abs(np.stack(made.images).astype(int) - apply_overlay(reference, block, square, theirs))
    assert diff.max() <= 2 and diff.mean() < 0.05, f"max diff {diff.max()}, mean {diff.mean():.4f}"
    assert_kept_outside(made.images, square, block)
    assert np.abs(made.images[0].astype(int) - plain.images[0]).mean() > 1  # the ControlNet acted


def _run(ws, out, *args: str) -> int:
    from loramgr.cli import main

    return main(["--home", str(ws.home), "run", "--prompt", "a bird", "--a-prompt", "", "--n-prompt", "blurry",
                 "--resolution", "64", "--steps", "3", "--seed", "3", "--out", str(out), "--name", "t", "--json",
                 *args])


def test_cli_mask_and_hires(ws, tmp_path, square, block, capsys):
    """loramgr run --mask (with the inpaint ControlNet) and --hires-scale: files, sizes, pixels kept."""
    assert _run(ws, tmp_path / "inpaint", "--image", str(ws.home / "in.png"), "--mask", str(ws.home / "mask.png"),
                "--unit", f"{INPAINT_CN},preprocessor=inpaint", "--inpaint-fill", "latent_nothing",
                "--img2img-strength", "0.8") == 0
    painted = np.asarray(Image.open(tmp_path / "inpaint" / "t-0.png"))
    assert_kept_outside([painted], square, block)
    sidecar = json.loads((tmp_path / "inpaint" / "t.json").read_text())
    assert sidecar["metadata"]["mask"] == str(ws.home / "mask.png")
    assert sidecar["settings"]["inpaint"]["fill"] == "latent_nothing"
    assert _run(ws, tmp_path / "hires", "--unit", "none", "--width", "64", "--height", "128", "--hires-size", "128x0",
                "--hires-upscaler", "Latent (antialiased)", "--hires-prompt", "a cat") == 0
    assert np.asarray(Image.open(tmp_path / "hires" / "t-0.png")).shape == (256, 128, 3)
    sidecar = json.loads((tmp_path / "hires" / "t.json").read_text())
    assert sidecar["settings"]["hires"]["prompt"] == "a cat" and len(sidecar["timesteps"]) == 3 + 2
    capsys.readouterr()


@pytest.mark.parametrize(("args", "message"), [
    (("--hires-scale", "3", "--max-pixels", "16384"), "192x192 second pass"),
    (("--hires-size", "1024", "--max-pixels", "16384"), "--hires-size '1024': write WxH"),
    (("--hires-scale", "2", "--mask", "MASK", "--image", "IMAGE"), "hires and a mask do not combine"),
    (("--mask", "MASK"), "a mask needs the image it masks"),
])
def test_cli_refuses_bad_passes_with_exit_2(ws, tmp_path, capsys, args, message):
    args = [str(ws.home / "mask.png") if a == "MASK" else str(ws.home / "in.png") if a == "IMAGE" else a
            for a in args]
    assert _run(ws, tmp_path / "out", "--unit", "none", "--width", "64", "--height", "64", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.fixture(scope="module")
def url(ws):
    port = free_port()
    with reaped(start_server(ws, port, "--max-resolution", "256")):
        yield f"http://127.0.0.1:{port}"


def _b64(pixels: np.ndarray) -> str:
    from loramgr.serve.codec import encode_png

    return encode_png(pixels)


def _post(url: str, route: str, payload: dict) -> httpx.Response:
    return httpx.post(f"{url}{route}", json=payload, timeout=300)


A1111_FAST = {"prompt": "a house", "negative_prompt": "", "seed": 5, "steps": 3, "width": 64, "height": 64,
              "cfg_scale": 7.0}
NATIVE_FAST = {"prompt": "a house", "a_prompt": "", "n_prompt": "", "seed": 5, "steps": 3, "scale": 7.0,
               "resolution": 64, "width": 64, "height": 64, "controls": [], "control_window": "a1111"}


def test_a1111_hires_equals_the_native_request(url):
    """enable_hr + hr_* become the native `hires`; hr_second_pass_steps 3 at denoising 0.6: a schedule of 5
    whose last 3 run (strength (3 + 0.5) / 5)."""
    r = _post(url, "/sdapi/v1/txt2img", {**A1111_FAST, "sampler_name": "Euler a", "enable_hr": True, "hr_scale": 2,
                                         "hr_upscaler": "latent (bicubic)", "hr_second_pass_steps": 3,
                                         "denoising_strength": 0.6, "hr_prompt": "a red house"})
    assert r.status_code == 200, r.text
    native = _post(url, "/v1/generate", {**NATIVE_FAST, "scheduler": "euler_a", "schedule": "uniform", "hires": {
        "scale": 2, "upscaler": "Latent (bicubic)", "steps": 5, "strength": 0.7, "prompt": "a red house"}})
    assert native.status_code == 200, native.text
    got = decode(r.json()["images"][0])
    assert got.shape == (128, 128, 3)
    np.testing.assert_array_equal(got, decode(native.json()["images"][0]))
    info = json.loads(r.json()["info"])
    assert info["extra_generation_params"] == {"Denoising strength": 0.6, "Hires upscaler": "Latent (bicubic)",
                                               "Hires upscale": 2.0, "Hires steps": 3}
    assert "Hires upscale: 2.0, Hires steps: 3" in info["infotexts"][0] and info["denoising_strength"] == 0.6


def test_a1111_hires_steps_rule(pipe):
    """A1111 samples exactly hr_second_pass_steps (or steps) in the second pass, from a schedule of
    int(N / min(denoising_strength, 0.999)) (setup_img2img_steps with its steps given)."""
    from loramgr.pipeline.passes import second_pass
    from loramgr.pipeline.schedulers import make_scheduler
    from loramgr.serve.a1111 import A1111Request, plan
    from loramgr.serve.config import ServeConfig

    for n in (0, 1, 3, 7, 20, 29):
        for d in (0.05, 0.2, 0.35, 0.6, 0.7, 0.75, 0.999, 1.0):
            request = A1111Request(prompt="x", steps=20, enable_hr=True, hr_second_pass_steps=n, denoising_strength=d)
            hires = HiresFix(**plan(request, ServeConfig(), img2img=False).requests[0].hires.model_dump())
            second = second_pass(GenerationSettings(prompt="x", steps=20, hires=hires), hires_size(64, 64, hires))
            assert second.steps == int((n or 20) / min(d, 0.999))
            assert len(pipe.prepare_timesteps(make_scheduler("ddim", pipe.scheduler_config), second)) == (n or 20)


def test_a1111_inpaint_equals_the_native_request(url, square, block):
    """img2img with a mask (blur 0, original, whole picture): A1111's rules as native `inpaint` fields; every
    pixel outside the mask is the init image's."""
    r = _post(url, "/sdapi/v1/img2img", {**A1111_FAST, "init_images": [_b64(square)], "mask": _b64(block),
                                         "mask_blur": 0, "inpainting_fill": 1, "inpaint_full_res": False,
                                         "denoising_strength": 0.75, "sampler_name": "DDIM"})
    assert r.status_code == 200, r.text
    got = decode(r.json()["images"][0])
    assert_kept_outside([got], square, block)
    native = _post(url, "/v1/generate", {**NATIVE_FAST, "scheduler": "ddim", "image": _b64(square),
                                         "mask": _b64(block), "img2img_strength": 0.75,
                                         "inpaint": {"rule": "a1111", "fill": "original"}})
    np.testing.assert_array_equal(got, decode(native.json()["images"][0]))
    assert json.loads(r.json()["info"])["extra_generation_params"] == {"Mask blur": 0, "Masked content": "original"}


def test_a1111_inpaint_defaults_only_masked_with_blur(url, block):
    """A1111's API defaults: mask_blur 4, fill, inpaint_full_res (the region at width x height, pasted back into
    the whole 96x80 input); pixels the blurred mask does not reach are kept."""
    original = synthetic_image(96, 80, seed=4)
    mask = np.zeros((96, 80), np.uint8)
    mask[40:60, 30:50] = 255
    r = _post(url, "/sdapi/v1/img2img", {**A1111_FAST, "init_images": [_b64(original)], "mask": _b64(mask)})
    assert r.status_code == 200, r.text
    got = decode(r.json()["images"][0])
    assert got.shape == original.shape
    reached = prepare_mask(mask, Inpaint(blur=4)) > 0
    np.testing.assert_array_equal(got[~reached], original[~reached])
    assert np.abs(got[mask == 255].astype(int) - original[mask == 255]).mean() > 10
    params = json.loads(r.json()["info"])["extra_generation_params"]
    assert params["Inpaint area"] == "Only masked" and params["Masked content"] == "fill"


def test_a1111_controlnet_inpaint_unit(url, square, block):
    """The extension's inpaint_only on img2img with a mask: the converted inpaint ControlNet sees the init image
    with the masked pixels at -1; the map it returns is black there."""
    payload = {**A1111_FAST, "init_images": [_b64(square)], "mask": _b64(block), "mask_blur": 0,
               "inpaint_full_res": False, "sampler_name": "DDIM", "denoising_strength": 1.0}
    unit = {"module": "inpaint_only", "model": f"{INPAINT_CN} [0123abcd]", "weight": 1.0}
    r = _post(url, "/sdapi/v1/img2img", {**payload, "alwayson_scripts": {"ControlNet": {"args": [unit]}}})
    assert r.status_code == 200, r.text
    got, shown = decode(r.json()["images"][0]), decode(r.json()["images"][1])
    assert_kept_outside([got], square, block)
    assert (shown[block == 255] == 0).all() and (shown[block == 0] == square[block == 0]).all()
    plain = decode(_post(url, "/sdapi/v1/img2img", payload).json()["images"][0])
    assert np.abs(got.astype(int) - plain).mean() > 1


@pytest.mark.parametrize(("route", "fields", "field", "fragment"), [
    ("/sdapi/v1/txt2img", {"enable_hr": True, "hr_upscaler": "ESRGAN_4x"}, "hr_upscaler", "unknown upscaler"),
    ("/sdapi/v1/txt2img", {"enable_hr": True, "hr_scale": 5}, "hr_scale", "limit of 256 (--max-resolution)"),
    ("/sdapi/v1/txt2img", {"enable_hr": True, "hr_scale": 1.3}, "hr_scale", "multiples of 64"),
    ("/sdapi/v1/txt2img", {"enable_hr": True, "denoising_strength": 0}, "denoising_strength", "(0, 1]"),
    ("/sdapi/v1/txt2img", {"alwayson_scripts": {"controlnet": {"args": [{"module": "inpaint", "image": "IMAGE"}]}}},
     "alwayson_scripts.controlnet.args.0.module", "needs img2img with a mask"),
    ("/sdapi/v1/img2img", {"init_images": ["IMAGE"], "mask": "!!"}, "mask", "base64"),
    ("/v1/generate", {**NATIVE_FAST, "hires": {"scale": 5}}, "hires", "(--max-resolution)"),
    ("/v1/generate", {**NATIVE_FAST, "mask": "IMAGE"}, "mask", "a mask needs the image it masks"),
    ("/v1/generate", {**NATIVE_FAST, "image": "IMAGE", "mask": "IMAGE", "inpaint": {"fill": "lama"}}, "inpaint.fill",
     "latent_nothing"),
])
def test_bad_passes_are_a_4xx_naming_the_field(url, square, route, fields, field, fragment):
    """Item 5 over HTTP: refused before any work, one line naming the field; the server keeps serving."""
    payload = {**(A1111_FAST if route.startswith("/sdapi") else {}), **fields}
    payload = json.loads(json.dumps(payload).replace('"IMAGE"', json.dumps(_b64(square))))
    r = _post(url, route, payload)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and fragment in r.json()["error"], r.text
    assert not r.json()["error"].startswith(f"{field}: {field}:"), r.text  # the field named once
    assert httpx.get(f"{url}/sdapi/v1/progress").status_code == 200
