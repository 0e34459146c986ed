"""The AUTOMATIC1111 web-UI API translated into native requests (docs/a1111.md is the contract).

An A1111 ``txt2img`` / ``img2img`` request becomes one native
:class:`~loramgr.serve.schemas.GenerateRequest` per image (seed, seed + 1, ... as A1111's
``all_seeds``), which then goes through the same :meth:`Service.generate
<loramgr.serve.app.Service.generate>`, engine and scheduler as ``POST /v1/generate``: the same
request gives the same image through either API.

What this module does on top: ``<lora:NAME:WEIGHT>`` tags out of the prompt, A1111 sampler
names to loramgr schedulers, the ControlNet extension's unit (``alwayson_scripts``) to a
control map at the output size (canny at ``processor_res``, or the unit's image as a
precomputed map), fitting images to ``width`` x ``height`` with A1111's resize modes, and
the list of what was accepted but not used. Every refusal is a :class:`CatalogError`
naming the A1111 field.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .a1111_samplers import resolve_sampler
from .catalog import CatalogError
from .codec import decode_image, encode_png
from .config import ServeConfig
from .schemas import GenerateRequest, LoraSpec

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]

CONTROL_MODULES = ("none", "canny")
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
UNIT_RESIZE_MODES = {"just resize": "resize", "crop and resize": "crop", "resize and fill": "fill",
                     "inner fit (scale to fit)": "crop", "outer fit (shrink to fit)": "fill",
                     "envelope (outer fit)": "fill", "scale to fit (inner fit)": "crop"}
UNIT_RESIZE_BY_INDEX = ("resize", "crop", "fill")
IMG2IMG_RESIZE_MODES = ("resize", "crop", "fill", "resize")  # 3: "Just resize (latent upscale)"
BASE_CONTROLNET = "canny"  # the base's own ControlNet, as `control` of the native API
LORA_TAG = re.compile(r"<(lora|lyco):([^>]*)>")


class A1111Request(BaseModel):
    """Fields loramgr reads from a txt2img request; anything else is accepted and listed as ignored."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field("", max_length=10_000)
    negative_prompt: str = Field("", max_length=10_000)
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = 50
    cfg_scale: FiniteFloat = 7.0
    width: int = 512
    height: int = 512
    eta: FiniteFloat | None = None
    override_settings: dict[str, Any] | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    enable_hr: bool = False
    subseed_strength: FiniteFloat = 0.0


class Img2ImgRequest(A1111Request):
    init_images: list[str] = Field(min_length=1, max_length=1)
    denoising_strength: FiniteFloat = 0.75
    resize_mode: int = Field(0, ge=0, le=3)
    mask: str | None = None
    include_init_images: bool = False


class ControlNetUnit(BaseModel):
    """One unit of the ControlNet extension's ``args``, with its API defaults."""

    model_config = ConfigDict(extra="allow")

    enabled: bool = True
    image: str | dict | None = None
    input_image: str | None = None
    module: str = "none"
    model: str = "None"
    weight: FiniteFloat = Field(1.0, ge=0)
    resize_mode: str | int = "Crop and Resize"
    processor_res: int = -1
    threshold_a: FiniteFloat = -1
    threshold_b: FiniteFloat = -1
    guidance_start: FiniteFloat = 0.0
    guidance_end: FiniteFloat = 1.0
    control_mode: str | int = "Balanced"
    pixel_perfect: bool = False


UNIT_USED = set(ControlNetUnit.model_fields) | {"mask", "low_vram", "hr_option"}


class A1111Response(BaseModel):
    images: list[str] = Field(description="base64 PNG: the images, then the control map when a unit was enabled")
    parameters: dict = Field(description="the request as received (init_images left out unless include_init_images)")
    info: str = Field(description="a JSON string: seed, all_seeds, prompt, sampler_name, ... and `loramgr`")


@dataclass
class Plan:
    """An A1111 request as native requests (one per image) and what its response reports."""

    requests: list[GenerateRequest]
    seeds: list[int]
    sampler_name: str
    schedule: str
    control: dict | None
    ignored: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# -- prompt ------------------------------------------------------------------------------------

def parse_lora_tags(prompt: str, field_: str = "prompt") -> tuple[str, list[tuple[str, float | None]]]:
    """``<lora:NAME[:WEIGHT]>`` tags out of ``prompt`` (removed as A1111 removes them) and the LoRAs they name.

    ``<lyco:...>`` (the LyCORIS extension's tag) is read the same way. Raises
    :class:`CatalogError` for an empty name, a non-numeric weight, or per-part weights.
    """
    loras: list[tuple[str, float | None]] = []
    for match in LORA_TAG.finditer(prompt):
        tag = match.group(0)
        name, *rest = match.group(2).split(":")
        if not name.strip():
            raise CatalogError(422, field_, f"{tag}: no LoRA name (write <lora:NAME:WEIGHT>)")
        if len(rest) > 1:
            raise CatalogError(422, field_, f"{tag}: separate text-encoder / UNet weights are not supported; "
                                            "give one weight (<lora:NAME:WEIGHT>)")
        weight = None
        if rest and rest[0].strip():
            try:
                weight = float(rest[0])
            except ValueError:
                raise CatalogError(422, field_, f"{tag}: weight {rest[0]!r} is not a number") from None
            if not np.isfinite(weight):
                raise CatalogError(422, field_, f"{tag}: weight must be a finite number, got {rest[0]!r}")
        loras.append((name.strip(), weight))
    return LORA_TAG.sub("", prompt), loras


# -- images ------------------------------------------------------------------------------------

def fit(image: np.ndarray, width: int, height: int, mode: str, fill: str = "edge") -> np.ndarray:
    """``image`` (HxWx3 uint8) brought to ``height`` x ``width`` with an A1111 resize mode.

    ``resize`` stretches; ``crop`` scales to cover and crops the centre; ``fill`` scales to
    fit and pads, with the edge pixels repeated (img2img) or, ``fill="median"``, the
    median border colour (the ControlNet extension's "Resize and Fill"). A map of only 0
    and 255 (canny edges) stays binary.
    """
    import cv2

    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    binary = bool(np.isin(image, (0, 255)).all())

    def resized(size_w: int, size_h: int) -> np.ndarray:
        enlarge = size_w * size_h > w * h
        out = cv2.resize(image, (size_w, size_h), interpolation=cv2.INTER_LANCZOS4 if enlarge else cv2.INTER_AREA)
        return np.where(out > 127, 255, 0).astype(np.uint8) if binary else out

    if mode == "resize":
        return resized(width, height)
    k = max(width / w, height / h) if mode == "crop" else min(width / w, height / h)
    out = resized(max(1, round(w * k)), max(1, round(h * k)))
    if mode == "crop":
        top, left = (out.shape[0] - height) // 2, (out.shape[1] - width) // 2
        return np.ascontiguousarray(out[top:top + height, left:left + width])
    top, left = (height - out.shape[0]) // 2, (width - out.shape[1]) // 2
    bottom, right = height - out.shape[0] - top, width - out.shape[1] - left
    if fill == "median":
        border = np.concatenate([out[0], out[-1], out[:, 0], out[:, -1]])
        colour = [int(c) for c in np.median(border, axis=0)]
        return cv2.copyMakeBorder(out, top, bottom, left, right, cv2.BORDER_CONSTANT, value=colour)
    return cv2.copyMakeBorder(out, top, bottom, left, right, cv2.BORDER_REPLICATE)


def rgb(image: np.ndarray) -> np.ndarray:
    """HxWx3, alpha over white: what the pipeline makes of any input (``HWC3``)."""
    from ..pipeline.canny import HWC3

    return HWC3(image)


# -- ControlNet --------------------------------------------------------------------------------

def find_unit(scripts: dict[str, Any], ignored: list[str]) -> tuple[str, ControlNetUnit] | None:
    """The one enabled ControlNet unit of ``alwayson_scripts`` (key matched case-insensitively), or None."""
    unit = None
    for key, value in scripts.items():
        path = f"alwayson_scripts.{key}"
        if key.lower() != "controlnet":
            raise CatalogError(422, path, f"script {key!r} is not available on this server (it has: ControlNet)")
        args = value.get("args") if isinstance(value, dict) else None
        if not isinstance(args, list):
            raise CatalogError(422, f"{path}.args", "must be a list of ControlNet units ({\"args\": [unit, ...]})")
        for i, raw in enumerate(args):
            if not isinstance(raw, dict):
                raise CatalogError(422, f"{path}.args.{i}", f"a ControlNet unit must be an object, got {raw!r:.60}")
            try:
                parsed = ControlNetUnit.model_validate(raw)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise CatalogError(422, f"{path}.args.{i}.{where}", first["msg"]) from None
            if not parsed.enabled:
                continue
            if unit is not None:
                raise CatalogError(422, f"{path}.args.{i}", "more than one enabled ControlNet unit; this server "
                                                            "fuses one ControlNet with the base per generation")
            unit = (f"{path}.args.{i}", parsed)
            ignored += [f"{path}.args.{i}.{k}" for k in raw if k not in UNIT_USED]
    return unit


def control_mode(unit: ControlNetUnit, path: str) -> bool:
    """Guess mode for the unit's ``control_mode`` ("ControlNet is more important" is ControlNet's guess mode)."""
    mode = unit.control_mode
    if isinstance(mode, int):
        if not 0 <= mode < len(CONTROL_MODES):
            raise CatalogError(422, f"{path}.control_mode", f"{mode} is not 0, 1 or 2")
        mode = CONTROL_MODES[mode]
    matched = next((m for m in CONTROL_MODES if m.lower() == str(mode).strip().lower()), None)
    if matched is None:
        raise CatalogError(422, f"{path}.control_mode", f"unknown control mode {mode!r}; choose one of "
                                                        f"{', '.join(CONTROL_MODES)} (or 0, 1, 2)")
    if matched == CONTROL_MODES[1]:
        raise CatalogError(422, f"{path}.control_mode", "'My prompt is more important' (soft weights on both "
                                                        "guidance halves) is not supported; use 'Balanced' or "
                                                        "'ControlNet is more important' (ControlNet's guess mode)")
    return matched == CONTROL_MODES[2]


def unit_resize_mode(unit: ControlNetUnit, path: str) -> str:
    mode = unit.resize_mode
    if isinstance(mode, int):
        if not 0 <= mode < len(UNIT_RESIZE_BY_INDEX):
            raise CatalogError(422, f"{path}.resize_mode", f"{mode} is not 0, 1 or 2")
        return UNIT_RESIZE_BY_INDEX[mode]
    found = UNIT_RESIZE_MODES.get(mode.strip().lower())
    if found is None:
        raise CatalogError(422, f"{path}.resize_mode", f"unknown resize mode {mode!r}; choose Just Resize, "
                                                       "Crop and Resize or Resize and Fill (or 0, 1, 2)")
    return found


def control_map(unit: ControlNetUnit, path: str, image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The unit's control map at ``height`` x ``width``: canny at ``processor_res``, or the image itself."""
    from ..pipeline.canny import detect_edges

    module = unit.module.strip().lower()
    if module not in CONTROL_MODULES:
        raise CatalogError(422, f"{path}.module", f"unknown module {unit.module!r}; choose one of "
                                                  f"{', '.join(CONTROL_MODULES)} (none: the image is the map)")
    mode = unit_resize_mode(unit, path)
    if module == "none":
        return fit(image, width, height, mode, fill="median")
    low = 100 if unit.threshold_a < 0 else round(unit.threshold_a)
    high = 200 if unit.threshold_b < 0 else round(unit.threshold_b)
    for name, value in (("threshold_a", low), ("threshold_b", high)):
        if not 1 <= value <= 255:
            raise CatalogError(422, f"{path}.{name}", f"canny threshold must be in [1, 255], got {value}")
    if low > high:
        raise CatalogError(422, f"{path}.threshold_a", f"threshold_a ({low}) must not exceed threshold_b ({high})")
    res = 512 if unit.processor_res < 0 else unit.processor_res
    if unit.pixel_perfect:  # the extension's estimate: the image's short side scaled as the resize mode scales it
        h, w = image.shape[:2]
        res = round(min(h, w) * (min if mode == "fill" else max)(width / w, height / h))
    if not 64 <= res <= 4096:
        raise CatalogError(422, f"{path}.processor_res", f"must be in [64, 4096], got {res}")
    return fit(detect_edges(image, res, low, high)[1], width, height, mode, fill="median")


# -- the request -------------------------------------------------------------------------------

def plan(request: A1111Request, config: ServeConfig, *, img2img: bool) -> Plan:
    """Check and translate ``request``; raises :class:`CatalogError` naming the A1111 field."""
    ignored = sorted(request.model_extra or {})
    warnings: list[str] = []
    if request.enable_hr:
        raise CatalogError(422, "enable_hr", "hires fix is not supported; send enable_hr=false and the final size")
    if request.script_name not in (None, "", "None"):
        raise CatalogError(422, "script_name", f"script {request.script_name!r} is not available on this server")
    if request.subseed_strength:
        warnings.append(f"subseed_strength={request.subseed_strength} ignored (no variation seeds)")
    if request.override_settings:
        warnings.append(f"override_settings ignored: {', '.join(sorted(request.override_settings))}")
    for name in ("width", "height"):
        value = getattr(request, name)
        if value < 64 or value % 64:
            raise CatalogError(422, name, f"must be a multiple of 64 and at least 64, got {value} "
                                          "(the pipeline works in 64-pixel blocks)")
    total = request.batch_size * request.n_iter
    if total > config.max_num_samples:
        field_ = "batch_size" if request.batch_size > config.max_num_samples else "n_iter"
        raise CatalogError(422, field_, f"batch_size x n_iter = {total} images exceeds this server's limit of "
                                        f"{config.max_num_samples} (--max-num-samples)")
    sampler = resolve_sampler(request.sampler_name or request.sampler_index, request.scheduler, request.steps)
    warnings += sampler.warnings
    eta = 0.0
    if sampler.scheduler == "ddim":
        eta = 0.0 if request.eta is None else request.eta
    elif request.eta is not None and not (sampler.eta_one and request.eta == 1.0):
        warnings.append(f"eta={request.eta} ignored: it applies to DDIM only here (the ancestral and SDE "
                        "samplers always use eta 1, as diffusers' schedulers do)")
    prompt, loras = parse_lora_tags(request.prompt)
    negative, negative_loras = parse_lora_tags(request.negative_prompt, "negative_prompt")
    if negative_loras:
        warnings.append("LoRA tags in negative_prompt removed and not applied (put them in prompt)")
    width, height = request.width, request.height
    limits = (config.max_image_bytes, config.max_image_pixels)

    init = None
    if img2img:
        if request.mask:
            raise CatalogError(422, "mask", "inpainting is not supported; send img2img without a mask")
        init = fit(rgb(decode_image(request.init_images[0], "init_images.0", *limits)), width, height,
                   IMG2IMG_RESIZE_MODES[request.resize_mode])

    control, guess_mode, strength, model = None, False, 0.0, BASE_CONTROLNET
    found = find_unit(request.alwayson_scripts, ignored)
    if found is None:  # no unit: the ControlNet runs at weight 0 on an empty map (no effect)
        the_map = np.zeros((height, width, 3), np.uint8)
    else:
        path, unit = found
        if (unit.guidance_start, unit.guidance_end) != (0.0, 1.0):
            raise CatalogError(422, f"{path}.guidance_start", "only the full range (guidance_start 0, guidance_end "
                                                              f"1) is supported, got {unit.guidance_start}-"
                                                              f"{unit.guidance_end}")
        guess_mode = control_mode(unit, path)
        model = resolve_model(unit.model)
        source = unit.image if not isinstance(unit.image, dict) else unit.image.get("image")
        field_ = f"{path}.image"
        if not source and unit.input_image:
            source, field_ = unit.input_image, f"{path}.input_image"
        if source:
            image = rgb(decode_image(source, field_, *limits))
        elif init is not None:  # img2img: a unit without an image takes the init image, as A1111
            image = init
        else:
            raise CatalogError(422, field_, "required: the unit's image (base64 PNG/JPEG)")
        the_map = control_map(unit, path, image, width, height)
        strength = unit.weight
        control = {"model": model, "module": unit.module.strip().lower(), "weight": unit.weight,
                   "control_mode": CONTROL_MODES[2] if guess_mode else CONTROL_MODES[0], "unit": path}

    seed = random.randrange(2**32 - 1) if request.seed == -1 else request.seed
    seeds = [seed + i for i in range(total)]
    common = {
        "prompt": prompt, "a_prompt": "", "n_prompt": negative, "image": None if init is None else encode_png(init),
        "control_map": encode_png(the_map), "loras": [LoraSpec(name=n, weight=w) for n, w in loras],
        "control": model, "steps": request.steps, "scale": request.cfg_scale, "scheduler": sampler.scheduler,
        "schedule": sampler.native_schedule,
        "resolution": min(width, height), "num_samples": 1, "guess_mode": guess_mode, "strength": strength,
        "control_schedule": "controlnet", "eta": eta,
        "img2img_strength": request.denoising_strength if img2img else None,
    }
    requests = []
    for s in seeds:
        try:
            requests.append(GenerateRequest(**common, seed=s))
        except ValidationError as exc:
            first = exc.errors()[0]
            native = str(first["loc"][0]) if first["loc"] else "body"
            raise CatalogError(422, a1111_field(native, request), first["msg"]) from None
    return Plan(requests, seeds, sampler.sampler_name, sampler.schedule, control, ignored, warnings)


def resolve_model(model: str) -> str:
    """The native ``control`` for a unit's ``model``: a workspace ControlNet name, else the base's own.

    A1111 model names carry a hash suffix (``name [1a2b3c4d]``); it is dropped. "None"
    (the clients' default) and "canny" mean the base's own ControlNet.
    """
    name = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", model.strip())
    return BASE_CONTROLNET if name.lower() in ("", "none", BASE_CONTROLNET) else name


def a1111_field(native: str | None, request: A1111Request, unit_path: str | None = None) -> str | None:
    """The A1111 field behind a native field named in an error (``loras.0.name`` -> ``prompt``)."""
    if native is None:
        return None
    head = native.split(".")[0]
    mapping = {"loras": "prompt", "scale": "cfg_scale", "img2img_strength": "denoising_strength",
               "scheduler": "sampler_name", "schedule": "scheduler", "n_prompt": "negative_prompt",
               "num_samples": "batch_size",
               "resolution": "width" if request.width <= request.height else "height",
               "image": "init_images.0", "control": f"{unit_path}.model" if unit_path else "alwayson_scripts",
               "control_map": f"{unit_path}.image" if unit_path else "alwayson_scripts",
               "strength": f"{unit_path}.weight" if unit_path else "alwayson_scripts"}
    return mapping.get(head, native)
