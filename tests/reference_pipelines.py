"""The independent reference for loramgr's images: diffusers' own pipelines, built here.

Nothing on the reference side is read from loramgr: the canny map comes from ControlNet's
annotator code (transcribed verbatim below), each scheduler name is mapped to its diffusers
class and options by the table written here (not loramgr's ``SCHEDULERS`` /
``SCHEDULER_OPTIONS``), and :data:`CONTROLNET_DEFAULTS` spells out the defaults of
ControlNet's ``process()`` (gradio_canny2image.py) instead of reading ``GenerationSettings``.
``GenerationSettings`` only carries values here; :func:`documented` fills every field.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from diffusers import (
    DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
    HeunDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler,
)
from PIL import Image

from loramgr.pipeline.settings import GenerationSettings

# loramgr's scheduler names -> diffusers class and config options, from diffusers' scheduler
# docs (A1111 "DPM++ 2M" is DPMSolverMultistepScheduler, "DPM++ 2M Karras" the same with
# use_karras_sigmas=True). Each is made with from_config(the base's scheduler config).
REFERENCE_SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "dpm++_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
}

# ControlNet's gradio_canny2image.py defaults for process() (seed: loramgr's documented 0; DDIM sampling).
CONTROLNET_DEFAULTS = {
    "a_prompt": "best quality, extremely detailed",
    "n_prompt": "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
                "worst quality, low quality",
    "num_samples": 1, "resolution": 512, "steps": 20, "guess_mode": False, "strength": 1.0, "scale": 9.0,
    "seed": 0, "eta": 0.0, "low_threshold": 100, "high_threshold": 200, "img2img_strength": None,
    "scheduler": "ddim", "control_schedule": "controlnet", "preprocessor": "canny",
}


def base_negative_prompt(tokenizer) -> str:
    """The documented default negative prompt on a base (docs/design.md, "Defaults"): ControlNet's, cut after
    its last comma-separated item that keeps it within one 77-token window of the base's ``tokenizer``."""
    items = CONTROLNET_DEFAULTS["n_prompt"].split(", ")
    fitting = [k for k in range(1, len(items) + 1) if len(tokenizer(", ".join(items[:k])).input_ids) <= 77]
    return ", ".join(items[: max(fitting, default=0)])


def documented(**fields) -> GenerationSettings:
    """Settings with every field given: ``fields`` over :data:`CONTROLNET_DEFAULTS` (no loramgr default used)."""
    return GenerationSettings(**{**CONTROLNET_DEFAULTS, **fields})


# --- ControlNet's annotator/util.py and annotator/canny, verbatim (seed 000) -------------

def reference_HWC3(x):  # noqa: N802
    assert x.dtype == np.uint8
    if x.ndim == 2:
        x = x[:, :, None]
    assert x.ndim == 3
    H, W, C = x.shape
    assert C == 1 or C == 3 or C == 4
    if C == 3:
        return x
    if C == 1:
        return np.concatenate([x, x, x], axis=2)
    if C == 4:
        color = x[:, :, 0:3].astype(np.float32)
        alpha = x[:, :, 3:4].astype(np.float32) / 255.0
        y = color * alpha + 255.0 * (1.0 - alpha)
        y = y.clip(0, 255).astype(np.uint8)
        return y


def reference_resize_image(input_image, resolution):
    H, W, C = input_image.shape
    H = float(H)
    W = float(W)
    k = float(resolution) / min(H, W)
    H *= k
    W *= k
    H = int(np.round(H / 64.0)) * 64
    W = int(np.round(W / 64.0)) * 64
    img = cv2.resize(input_image, (W, H), interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)
    return img


def reference_process_preprocessing(input_image, image_resolution, low_threshold, high_threshold):
    img = reference_resize_image(reference_HWC3(input_image), image_resolution)
    detected_map = cv2.Canny(img, low_threshold, high_threshold)
    detected_map = reference_HWC3(detected_map)
    return img, detected_map


# --- diffusers' pipelines ----------------------------------------------------------------

# A1111's schedule types as diffusers options (diffusers' docs: timestep_spacing "linspace" spreads the steps
# evenly over the whole schedule, A1111's "uniform"); only those the tests compare with.
REFERENCE_SCHEDULES = {"automatic": {}, "uniform": {"timestep_spacing": "linspace"}}


def reference_scheduler(name: str, config, schedule: str = "automatic"):
    """A fresh diffusers scheduler for loramgr's scheduler ``name`` and ``schedule``, from the tables above."""
    cls, options = REFERENCE_SCHEDULERS[name]
    return cls.from_config(config, **options, **REFERENCE_SCHEDULES[schedule])


def lora_modules_in(path: Path) -> int:
    """How many modules a kohya-style LoRA file changes (its ``lora_down`` tensors)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(key.endswith("lora_down.weight") for key in f.keys())


def reference_pipeline(folder: Path, loras: list[tuple[Path, float]] = (), controlnet: Path | None = None,
                       scheduler: str | None = None):
    """diffusers' ControlNet pipeline of the diffusers ``folder``, with kohya LoRA files (path, weight)
    loaded by ``load_lora_weights`` + ``set_adapters`` and another ControlNet's folder; ``scheduler``:
    loramgr's name of the sampler whose diffusers twin (:func:`reference_scheduler`) replaces the folder's.

    Each LoRA's modules are counted after loading: diffusers can load nothing silently (REFERENCE.md).
    """
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from peft.tuners.lora import LoraLayer

    pipe = StableDiffusionControlNetPipeline.from_pretrained(folder, safety_checker=None)
    if controlnet is not None:
        pipe.controlnet = ControlNetModel.from_pretrained(controlnet)
    if scheduler is not None:
        pipe.scheduler = reference_scheduler(scheduler, pipe.scheduler.config)
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(str(path), adapter_name=name)
        loaded = sum(isinstance(m, LoraLayer) and name in m.lora_A
                     for model in (pipe.unet, pipe.text_encoder) for m in model.modules())
        assert loaded == lora_modules_in(path), f"diffusers loaded {loaded} modules of {path.name}"
    if loras:
        pipe.set_adapters(names, [weight for _, weight in loras])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(reference, image: np.ndarray | None, settings: GenerationSettings,
                     control_map: np.ndarray | None = None, scheduler=None) -> np.ndarray:
    """The same generation with diffusers' own pipeline: same edge map, prompts, seed, scheduler.

    ``control_map``: a map made before (at the output size), given to diffusers as its
    control image instead of the canny edges of ``image``; ``image`` may then be None
    (text-to-image from the map alone). ``scheduler``: a diffusers scheduler the caller built
    (default: :func:`reference_scheduler` of the settings' names).
    """
    from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline

    if image is not None:
        resized, edges = reference_process_preprocessing(image, settings.resolution, settings.low_threshold,
                                                         settings.high_threshold)
    if control_map is not None:
        edges = control_map
    components = {**reference.components,
                  "scheduler": scheduler or reference_scheduler(settings.scheduler, reference.scheduler.config,
                                                                settings.schedule)}
    kwargs = {
        # process(): prompt + ', ' + a_prompt; an A1111 request has no added prompt
        "prompt": f"{settings.prompt}, {settings.a_prompt}" if settings.a_prompt else settings.prompt,
        "negative_prompt": settings.n_prompt,
        "num_images_per_prompt": settings.num_samples,
        "height": edges.shape[0],
        "width": edges.shape[1],
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


def assert_close_images(ours, theirs: np.ndarray, max_diff: int = 2) -> None:
    """loramgr's images (a list or a stack) within ``max_diff`` uint8 levels of the reference, mean < 0.05.

    The same fp32 math on different kernels (ONNX Runtime vs torch) only moves values across a
    rounding boundary (test_runtime.py measured at most 2 levels); full-range images, so agreement
    means something.
    """
    ours = np.stack(list(ours)).astype(np.int16)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    diff = np.abs(ours - theirs.astype(np.int16))
    assert diff.max() <= max_diff and diff.mean() < 0.05, f"max diff {diff.max()}, mean {diff.mean():.4f}"
    assert ours.std() > 40, "the image is not full range: agreement would mean little"
