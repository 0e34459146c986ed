"""diffusers' own pipelines for several ControlNet units, none, and guidance off: the references of
tests/test_pipeline.py's unit tests, built here from diffusers' classes (MultiControlNetModel,
``control_guidance_start/end``, ``guess_mode``, ``StableDiffusion[Img2Img]Pipeline``), never
through loramgr's pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def diffusers_units_images(reference, controlnets: Sequence[torch.nn.Module], maps: Sequence[np.ndarray], *,
                           prompt: str, negative: str, steps: int, seed: int, scale: float,
                           strengths: Sequence[float], starts: Sequence[float], ends: Sequence[float],
                           guess_mode: bool = False, init: np.ndarray | None = None,
                           img2img_strength: float | None = None) -> np.ndarray:
    """Images of diffusers' ControlNet pipeline with ``controlnets`` (one per map), as uint8 [N, H, W, 3].

    ``reference``: a ``StableDiffusionControlNetPipeline`` whose other components are used;
    no ``controlnets``: ``StableDiffusion[Img2Img]Pipeline`` (no ControlNet at all).
    """
    from diffusers import (DDIMScheduler, MultiControlNetModel, StableDiffusionControlNetImg2ImgPipeline,
                           StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline)

    parts = {k: v for k, v in reference.components.items() if k != "controlnet"}
    parts["scheduler"] = DDIMScheduler.from_config(reference.scheduler.config)
    height, width = (init.shape[:2] if init is not None else maps[0].shape[:2])
    common = {"prompt": prompt, "negative_prompt": negative, "num_inference_steps": steps, "guidance_scale": scale,
              "generator": torch.Generator("cpu").manual_seed(seed), "output_type": "np"}
    if not controlnets:
        pipe = StableDiffusionPipeline(**parts) if init is None else StableDiffusionImg2ImgPipeline(**parts)
        call = {"height": height, "width": width} if init is None else {"image": Image.fromarray(init),
                                                                        "strength": img2img_strength}
    else:
        controlnet = MultiControlNetModel(list(controlnets)) if len(controlnets) > 1 else controlnets[0]
        control = [Image.fromarray(m) for m in maps] if len(controlnets) > 1 else Image.fromarray(maps[0])
        call = {"controlnet_conditioning_scale": list(strengths) if len(controlnets) > 1 else strengths[0],
                "control_guidance_start": list(starts), "control_guidance_end": list(ends), "guess_mode": guess_mode,
                "height": height, "width": width}
        if init is None:
            pipe = StableDiffusionControlNetPipeline(**parts, controlnet=controlnet)
            call["image"] = control
        else:
            pipe = StableDiffusionControlNetImg2ImgPipeline(**parts, controlnet=controlnet)
            call.update(image=Image.fromarray(init), control_image=control, strength=img2img_strength)
    pipe.set_progress_bar_config(disable=True)
    return (pipe(**common, **call).images * 255).round().astype(np.uint8)
