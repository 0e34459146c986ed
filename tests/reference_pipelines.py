"""diffusers' own ControlNet pipelines as the reference for loramgr's pipeline (shared by tests)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from loramgr.pipeline.canny import detect_edges
from loramgr.pipeline.schedulers import SCHEDULER_OPTIONS, scheduler_class
from loramgr.pipeline.settings import GenerationSettings


def diffusers_images(reference, image: np.ndarray, settings: GenerationSettings,
                     control_map: np.ndarray | None = None) -> np.ndarray:
    """The same generation with diffusers' own pipeline: same edge map, prompts, seed, scheduler.

    ``control_map``: a map made before (at the output size), given to diffusers as its
    control image instead of the canny edges of ``image``.
    """
    from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline

    resized, edges = detect_edges(image, settings.resolution, settings.low_threshold, settings.high_threshold)
    if control_map is not None:
        edges = control_map
    components = {
        **reference.components,
        "scheduler": scheduler_class(settings.scheduler).from_config(
            reference.scheduler.config, **SCHEDULER_OPTIONS.get(settings.scheduler, {})),
    }
    kwargs = {
        "prompt": f"{settings.prompt}, {settings.a_prompt}" if settings.a_prompt else settings.prompt,
        "negative_prompt": settings.n_prompt,
        "num_images_per_prompt": settings.num_samples,
        "height": resized.shape[0],
        "width": resized.shape[1],
        "num_inference_steps": settings.steps,
        "guidance_scale": settings.scale,
        "guess_mode": settings.guess_mode,
        "controlnet_conditioning_scale": settings.strength,
        "eta": settings.eta,
        "generator": torch.Generator("cpu").manual_seed(settings.seed),
        "output_type": "pil",
    }
    if settings.img2img_strength is None:
        cls = StableDiffusionControlNetPipeline
        kwargs["image"] = Image.fromarray(edges)
    else:
        cls = StableDiffusionControlNetImg2ImgPipeline
        kwargs.update(image=Image.fromarray(resized), control_image=Image.fromarray(edges),
                      strength=settings.img2img_strength)
    diffusers_pipe = cls(**components, requires_safety_checker=False)
    diffusers_pipe.set_progress_bar_config(disable=True)
    return np.stack([np.asarray(im) for im in diffusers_pipe(**kwargs).images])
