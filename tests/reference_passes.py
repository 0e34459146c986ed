"""diffusers' own pipelines as the references of tests/test_passes.py: the hires fix as a chain of
diffusers pipelines (text-to-image, the upscale done here, image-to-image), and diffusers'
inpaint pipelines with a regular 4-channel UNet, built from diffusers' classes, never through
loramgr's pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from loramgr.pipeline.schedulers import SCHEDULER_OPTIONS, scheduler_class


def _parts(reference, scheduler: str) -> dict:
    parts = {k: v for k, v in reference.components.items() if k != "controlnet"}
    parts["scheduler"] = scheduler_class(scheduler).from_config(reference.scheduler.config,
                                                                **SCHEDULER_OPTIONS.get(scheduler, {}))
    return parts


def _call(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(**kwargs).images


def diffusers_hires(reference, *, first_map: np.ndarray | None, second_map: np.ndarray | None, prompt: str,
                    negative: str, hr_prompt: str, hr_negative: str, steps: int, hr_steps: int, seed: int,
                    scale: float, strength: float, num_samples: int, upscale, latent: bool,
                    scheduler: str = "ddim", hr_scheduler: str | None = None, size: tuple[int, int] = (64, 64),
                    ) -> np.ndarray:
    """The hires fix as diffusers pipelines, [N, H, W, 3] uint8.

    The first pass (``StableDiffusion[ControlNet]Pipeline`` with ``first_map``, or none) gives
    latents (``latent``) or PIL images; ``upscale`` turns them into the second pass's input
    (latents ``[N, 4, h, w]`` or a list of PIL images); the second pass is
    ``StableDiffusion[ControlNet]Img2ImgPipeline`` with ``second_map``, a generator seeded anew.
    """
    from diffusers import (StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline,
                           StableDiffusionImg2ImgPipeline, StableDiffusionPipeline)

    controlnet = reference.controlnet
    common = {"negative_prompt": negative, "guidance_scale": scale, "num_images_per_prompt": num_samples}
    first_cls = StableDiffusionPipeline if first_map is None else StableDiffusionControlNetPipeline
    first_parts = _parts(reference, scheduler) | ({} if first_map is None else {"controlnet": controlnet})
    first_call = {} if first_map is None else {"image": Image.fromarray(first_map)}
    first = _call(first_cls(**first_parts), prompt=prompt, **common, **first_call, height=size[0], width=size[1],
                  num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
                  output_type="latent" if latent else "pil")
    second_cls = StableDiffusionImg2ImgPipeline if second_map is None else StableDiffusionControlNetImg2ImgPipeline
    second_parts = (_parts(reference, hr_scheduler or scheduler)
                    | ({} if second_map is None else {"controlnet": controlnet}))
    second_call = {} if second_map is None else {"control_image": Image.fromarray(second_map),
                                                 "controlnet_conditioning_scale": 1.0}
    images = _call(second_cls(**second_parts), prompt=hr_prompt, **{**common, "negative_prompt": hr_negative},
                   image=upscale(first), **second_call, strength=strength, num_inference_steps=hr_steps,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return (images * 255).round().astype(np.uint8)


def diffusers_inpaint(reference, image: np.ndarray, mask: np.ndarray, *, prompt: str, negative: str, steps: int,
                      seed: int, scale: float, strength: float, num_samples: int, scheduler: str = "ddim",
                      control_images: Sequence[np.ndarray | torch.Tensor] = (), controlnets: Sequence = (),
                      strengths: Sequence[float] = (),
                      padding_mask_crop: int | None = None, size: tuple[int, int] | None = None) -> list[Image.Image]:
    """diffusers' ``StableDiffusion[ControlNet]InpaintPipeline`` on the base's regular UNet: PIL images.

    ``control_images``: one per ControlNet of ``controlnets`` (a PIL-able map, or a tensor such
    as ``make_inpaint_condition``'s), at ``strengths`` (default 1). ``padding_mask_crop``: diffusers'
    crop to the masked region.
    """
    from diffusers import (MultiControlNetModel, StableDiffusionControlNetInpaintPipeline,
                           StableDiffusionInpaintPipeline)

    height, width = size or image.shape[:2]
    call = {"prompt": prompt, "negative_prompt": negative, "image": Image.fromarray(image),
            "mask_image": Image.fromarray(mask), "num_inference_steps": steps, "guidance_scale": scale,
            "strength": strength, "num_images_per_prompt": num_samples, "height": height, "width": width,
            "generator": torch.Generator("cpu").manual_seed(seed), "padding_mask_crop": padding_mask_crop}
    if not controlnets:
        return _call(StableDiffusionInpaintPipeline(**_parts(reference, scheduler)), **call)
    controls = [c if isinstance(c, torch.Tensor) else Image.fromarray(c) for c in control_images]
    controlnet = controlnets[0] if len(controlnets) == 1 else MultiControlNetModel(list(controlnets))
    pipe = StableDiffusionControlNetInpaintPipeline(**_parts(reference, scheduler), controlnet=controlnet)
    scales = list(strengths) or [1.0] * len(controls)
    return _call(pipe, **call, control_image=controls[0] if len(controls) == 1 else controls,
                 controlnet_conditioning_scale=scales[0] if len(controls) == 1 else scales)


def make_inpaint_condition(image: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """diffusers' documented control image of control_v11p_sd15_inpaint: [0, 1], -1 where the mask is over 0.5."""
    pixels = image.astype(np.float32) / 255.0
    pixels[mask.astype(np.float32) / 255.0 > 0.5] = -1.0
    return torch.from_numpy(np.expand_dims(pixels, 0).transpose(0, 3, 1, 2))


def apply_overlay(reference, mask: np.ndarray, original: np.ndarray, images: Sequence[Image.Image]) -> np.ndarray:
    """diffusers' ``VaeImageProcessor.apply_overlay`` of each image over ``original`` with ``mask``: [N, H, W, 3]."""
    return np.stack([np.asarray(reference.image_processor.apply_overlay(
        Image.fromarray(mask), Image.fromarray(original), image)) for image in images])
