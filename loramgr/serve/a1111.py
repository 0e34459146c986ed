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

import json
import random
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..adapters import BASE_CONTROLNET
from ..pipeline.inpaint import INPAINT_FILLS, Inpaint, prepare_mask
from ..pipeline.passes import UPSCALERS
from ..pipeline.settings import DEFAULT_MAX_PIXELS, output_size
from .a1111_samplers import SCHEDULES, resolve_sampler
from .catalog import CatalogError
from .codec import decode_image, encode_png
from .config import MAX_JSON_DEPTH, ServeConfig
from .schemas import ControlSpec, GenerateRequest, HiresSpec, InpaintSpec, LoraSpec

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]

CONTROL_MODULES = ("none", "canny", "inpaint", "inpaint_global_harmonious", "inpaint_only")
# The ControlNet extension's inpaint modules: with an img2img mask, "inpaint_only" acts as "inpaint" (the
# extension switches it, "A1111 inpaint and ControlNet inpaint duplicated"); the map is the image, masked at -1.
INPAINT_MODULES = CONTROL_MODULES[2:]
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
NATIVE_MODES = ("balanced", "prompt", "control")  # the same, as the native API's ``controls[].mode``
UNIT_RESIZE_MODES = {"just resize": "resize", "crop and resize": "crop", "resize and fill": "fill",
                     "inner fit (scale to fit)": "crop", "outer fit (shrink to fit)": "fill",
                     "envelope (outer fit)": "fill", "scale to fit (inner fit)": "crop"}
UNIT_RESIZE_BY_INDEX = ("resize", "crop", "fill")
IMG2IMG_RESIZE_MODES = ("resize", "crop", "fill", "resize")  # 3: "Just resize (latent upscale)"
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
    subseed_strength: FiniteFloat = 0.0
    denoising_strength: FiniteFloat = 0.75
    enable_hr: bool = False
    hr_scale: FiniteFloat = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = Field(0, ge=0)
    hr_resize_x: int = Field(0, ge=0)
    hr_resize_y: int = Field(0, ge=0)
    hr_prompt: str = Field("", max_length=10_000)
    hr_negative_prompt: str = Field("", max_length=10_000)
    hr_sampler_name: str | None = None


class Img2ImgRequest(A1111Request):
    init_images: list[str] = Field(min_length=1, max_length=1)
    resize_mode: int = Field(0, ge=0, le=3)
    mask: str | None = None
    mask_blur: int = Field(4, ge=0, le=256)
    inpainting_fill: int = Field(0, ge=0, le=3)
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = Field(0, ge=0)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
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
    controls: list[dict]  # each enabled unit: model, module, weight, control_mode, window, its A1111 path
    ignored: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # A1111's extra_generation_params of hires / inpainting


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

    size_h, size_w = scaled_size(h, w, width, height, mode)
    out = resized(size_w, size_h)
    if mode == "resize":
        return out
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


def scaled_size(h: int, w: int, width: int, height: int, mode: str) -> tuple[int, int]:
    """(height, width) :func:`fit` scales an ``h`` x ``w`` image to before it crops or pads."""
    if mode == "resize":
        return height, width
    k = max(width / w, height / h) if mode == "crop" else min(width / w, height / h)
    return max(1, round(h * k)), max(1, round(w * k))


def check_size(size: tuple[int, int], max_pixels: int, field_: str, what: str) -> None:
    """A 422 naming ``field_`` when an image made on the way (``what``) would exceed ``max_pixels``.

    Checked before the array exists: a 4x8192 PNG is 295 bytes, its canny map at 512 a gigabyte.
    """
    if size[0] * size[1] > max_pixels:
        raise CatalogError(422, field_, f"{what} would be {size[1]}x{size[0]} pixels, over the limit of "
                                        f"{max_pixels:,}: use a less elongated image")


def rgb(image: np.ndarray) -> np.ndarray:
    """HxWx3, alpha over white: what the pipeline makes of any input (``HWC3``)."""
    from ..pipeline.canny import HWC3

    return HWC3(image)


# -- ControlNet --------------------------------------------------------------------------------

def find_units(scripts: dict[str, Any], ignored: list[str], limit: int) -> list[tuple[str, ControlNetUnit]]:
    """The enabled ControlNet units of ``alwayson_scripts`` (key matched case-insensitively), at most ``limit``."""
    units = []
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
                where = first["loc"][0]  # a unit's fields are flat; a union adds its member's name after
                raise CatalogError(422, f"{path}.args.{i}.{where}", first["msg"]) from None
            if not parsed.enabled:
                continue
            if len(units) == limit:
                raise CatalogError(422, f"{path}.args.{i}", f"more than {limit} enabled ControlNet units; this "
                                                            "server's limit is --max-controlnets")
            units.append((f"{path}.args.{i}", parsed))
            ignored += [f"{path}.args.{i}.{k}" for k in raw if k not in UNIT_USED]
    return units


def nested_deeper(value: Any, limit: int) -> bool:
    """Whether parsed JSON ``value`` nests lists / objects deeper than ``limit`` (a loop: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return False


def control_mode(unit: ControlNetUnit, path: str) -> str:
    """The native mode of the unit's ``control_mode`` (``balanced``, ``prompt``, ``control``)."""
    mode = unit.control_mode
    if isinstance(mode, int):
        if not 0 <= mode < len(CONTROL_MODES):
            raise CatalogError(422, f"{path}.control_mode", f"{mode} is not 0, 1 or 2")
        mode = CONTROL_MODES[mode]
    matched = next((m for m in CONTROL_MODES if m.lower() == str(mode).strip().lower()), None)
    if matched is None:
        raise CatalogError(422, f"{path}.control_mode", f"unknown control mode {mode!r}; choose one of "
                                                        f"{', '.join(CONTROL_MODES)} (or 0, 1, 2)")
    return NATIVE_MODES[CONTROL_MODES.index(matched)]


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


def control_map(unit: ControlNetUnit, path: str, image: np.ndarray, width: int, height: int,
                max_pixels: int) -> np.ndarray:
    """The unit's control map at ``height`` x ``width``: canny at ``processor_res``, or the image itself.

    Every intermediate image is checked against ``max_pixels`` before it is made.
    """
    from ..pipeline.canny import detect_edges

    module = unit.module.strip().lower()
    if module not in CONTROL_MODULES:
        raise CatalogError(422, f"{path}.module", f"unknown module {unit.module!r}; choose one of "
                                                  f"{', '.join(CONTROL_MODULES)} (none: the image is the map)")
    mode = unit_resize_mode(unit, path)
    if module == "none" or module in INPAINT_MODULES:
        check_size(scaled_size(*image.shape[:2], width, height, mode), max_pixels, f"{path}.image",
                   f"the image scaled to {width}x{height} ({unit.resize_mode})")
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
    edges = output_size(*image.shape[:2], res)
    check_size(edges, max_pixels, f"{path}.processor_res", f"the canny map at processor_res {res}")
    check_size(scaled_size(*edges, width, height, mode), max_pixels, f"{path}.image",
               f"the canny map scaled to {width}x{height} ({unit.resize_mode})")
    return fit(detect_edges(image, res, low, high)[1], width, height, mode, fill="median")


# -- the request -------------------------------------------------------------------------------

def plan(request: A1111Request, config: ServeConfig, *, img2img: bool) -> Plan:
    """Check and translate ``request``; raises :class:`CatalogError` naming the A1111 field."""
    ignored = sorted(request.model_extra or {})
    for name, value in [("override_settings", request.override_settings),
                        ("alwayson_scripts", request.alwayson_scripts), *(request.model_extra or {}).items()]:
        if nested_deeper(value, MAX_JSON_DEPTH):  # would run, then fail to be echoed in `parameters`
            raise CatalogError(422, name, f"nested deeper than {MAX_JSON_DEPTH} levels")
    warnings: list[str] = []
    if request.script_name not in (None, "", "None"):
        raise CatalogError(422, "script_name", f"script {request.script_name!r} is not available on this server")
    if request.subseed_strength:
        warnings.append(f"subseed_strength={request.subseed_strength} ignored (no variation seeds)")
    overrides = dict(request.override_settings or {})
    clip_skip = overrides.pop("CLIP_stop_at_last_layers", 1)
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= 12:
        raise CatalogError(422, "override_settings.CLIP_stop_at_last_layers",
                           f"must be an integer from 1 to 12 (A1111's CLIP skip), got {clip_skip!r}")
    if overrides:
        warnings.append(f"override_settings ignored: {', '.join(sorted(overrides))}")
    for name in ("width", "height"):
        value = getattr(request, name)
        if value < 64 or value % 64:
            raise CatalogError(422, name, f"must be a multiple of 64 and at least 64, got {value} "
                                          "(the pipeline works in 64-pixel blocks)")
    short = "width" if request.width <= request.height else "height"
    if min(request.width, request.height) > config.max_resolution:  # before any map of that size exists
        raise CatalogError(422, short, f"{short}={getattr(request, short)} exceeds this server's limit of "
                                       f"{config.max_resolution} (--max-resolution) for the shorter side")
    if request.width * request.height > DEFAULT_MAX_PIXELS:
        raise CatalogError(422, "height" if short == "width" else "width",
                           f"{request.width}x{request.height} exceeds the limit of {DEFAULT_MAX_PIXELS:,} pixels")
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
    extra: dict[str, Any] = {}
    hires = hires_spec(request, loras, warnings, extra) if request.enable_hr and not img2img else None

    init, mask, inpaint = None, None, InpaintSpec()
    map_size = (width, height)  # the size unit maps are made at: the output's, or with full_res the input's
    if img2img:
        decoded = rgb(decode_image(request.init_images[0], "init_images.0", *limits, exif_orientation=True))
        mode = IMG2IMG_RESIZE_MODES[request.resize_mode]
        check_size(scaled_size(*decoded.shape[:2], width, height, mode), config.max_image_pixels, "init_images.0",
                   f"the image scaled to {width}x{height}")
        init = fit(decoded, width, height, mode)
        if request.mask:
            init, mask, inpaint = inpainting(request, decoded, init, decode_image(request.mask, "mask", *limits),
                                             extra)
            map_size = (init.shape[1], init.shape[0])

    controls, specs = [], []
    for path, unit in find_units(request.alwayson_scripts, ignored, config.max_controlnets):
        mode = control_mode(unit, path)
        model = resolve_model(unit.model)
        source = unit.image if not isinstance(unit.image, dict) else unit.image.get("image")
        field_ = f"{path}.image"
        if source is not None and not isinstance(source, str):
            raise CatalogError(422, field_, 'must be a base64 PNG/JPEG string, or {"image": base64}')
        if not source and unit.input_image:
            source, field_ = unit.input_image, f"{path}.input_image"
        if source:
            image = rgb(decode_image(source, field_, *limits, exif_orientation=True))
        elif init is not None:  # img2img: a unit without an image takes the init image, as A1111
            image = init
        else:
            raise CatalogError(422, field_, "required: the unit's image (base64 PNG, JPEG, WebP, ...)")
        the_map = control_map(unit, path, image, *map_size, config.max_image_pixels)
        inpaint_unit = unit.module.strip().lower() in INPAINT_MODULES
        if inpaint_unit and mask is None:
            raise CatalogError(422, f"{path}.module", f"module {unit.module!r} needs img2img with a mask")
        specs.append(ControlSpec(name=model, control_map=encode_png(the_map), strength=unit.weight,
                                 start=unit.guidance_start, end=unit.guidance_end, mode=mode,
                                 preprocessor="inpaint" if inpaint_unit else None))
        controls.append({"model": model, "module": unit.module.strip().lower(), "weight": unit.weight,
                         "control_mode": CONTROL_MODES[NATIVE_MODES.index(mode)],
                         "guidance_start": unit.guidance_start, "guidance_end": unit.guidance_end, "unit": path})

    seed = random.randrange(2**32 - 1) if request.seed == -1 else request.seed
    seeds = [seed + i for i in range(total)]
    common = {
        "prompt": prompt, "a_prompt": "", "n_prompt": negative, "image": None if init is None else encode_png(init),
        "controls": specs, "loras": [LoraSpec(name=n, weight=w) for n, w in loras],
        "steps": request.steps, "scale": request.cfg_scale, "scheduler": sampler.scheduler,
        "schedule": sampler.native_schedule,
        "resolution": min(width, height), "width": width, "height": height, "num_samples": 1,
        "control_schedule": "controlnet", "control_window": "a1111", "eta": eta, "clip_skip": clip_skip,
        "img2img_strength": request.denoising_strength if img2img else None, "hires": hires,
        "mask": None if mask is None else encode_png(mask), "inpaint": inpaint,
    }
    requests = []
    for s in seeds:
        try:
            requests.append(GenerateRequest(**common, seed=s))
        except ValidationError as exc:
            first = exc.errors()[0]
            native = str(first["loc"][0]) if first["loc"] else "body"
            raise CatalogError(422, a1111_field(native, request), first["msg"]) from None
    return Plan(requests, seeds, sampler.sampler_name, sampler.schedule, controls, ignored, warnings, extra)


def hires_spec(request: A1111Request, loras: list, warnings: list[str], extra: dict[str, Any]) -> HiresSpec:
    """The native ``hires`` of ``enable_hr`` and the ``hr_*`` fields.

    A1111 samples exactly ``N = hr_second_pass_steps or steps`` steps of a schedule of
    ``int(N / min(denoising_strength, 0.999))`` (``sd_samplers_common.setup_img2img_steps`` with
    its steps given); the native second pass runs the last ``int(steps * strength)`` of its
    schedule, so that schedule with ``strength = (N + 0.5) / schedule`` runs N.
    """
    wanted = request.hr_upscaler or "Latent"  # A1111's latent_upscale_default_mode
    upscaler = next((u for u in UPSCALERS if u.lower() == wanted.strip().lower()), None)
    if upscaler is None:
        raise CatalogError(422, "hr_upscaler", f"unknown upscaler {wanted!r}; choose one of {', '.join(UPSCALERS)}")
    if not 0 < request.denoising_strength <= 1:
        raise CatalogError(422, "denoising_strength", f"must be in (0, 1] with enable_hr, "
                                                      f"got {request.denoising_strength}")
    steps = request.hr_second_pass_steps or request.steps
    schedule = max(1, int(steps / min(request.denoising_strength, 0.999)))
    prompt, hr_loras = parse_lora_tags(request.hr_prompt, "hr_prompt")
    negative, _ = parse_lora_tags(request.hr_negative_prompt, "hr_negative_prompt")
    if request.hr_prompt and hr_loras != loras:
        warnings.append("LoRA tags of hr_prompt are not applied on their own: the prompt's LoRAs act in both passes")
    scheduler = None
    if request.hr_sampler_name and request.hr_sampler_name != "Use same sampler":
        scheduler = resolve_sampler(request.hr_sampler_name, request.scheduler, steps).scheduler
    extra.update({"Denoising strength": request.denoising_strength, "Hires upscaler": upscaler,
                  **({"Hires resize": f"{request.hr_resize_x}x{request.hr_resize_y}"}
                     if request.hr_resize_x or request.hr_resize_y else {"Hires upscale": request.hr_scale}),
                  **({"Hires steps": request.hr_second_pass_steps} if request.hr_second_pass_steps else {})})
    return HiresSpec(scale=request.hr_scale, resize_x=request.hr_resize_x, resize_y=request.hr_resize_y,
                     upscaler=upscaler, steps=schedule, strength=min(1.0, (steps + 0.5) / schedule),
                     prompt=prompt if request.hr_prompt else None,
                     n_prompt=negative if request.hr_negative_prompt else None, scheduler=scheduler)


def inpainting(request: Img2ImgRequest, decoded: np.ndarray, fitted: np.ndarray, mask: np.ndarray,
               extra: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, InpaintSpec]:
    """The image, mask and native ``inpaint`` of an img2img request with a mask (A1111's rules).

    The mask is made binary, inverted and blurred at its own size first, as A1111 does before
    any resize. ``inpaint_full_res``: the whole input image and the mask at its size (the
    pipeline crops the region and fits it to ``width`` x ``height``); else both fitted to
    ``width`` x ``height`` with ``resize_mode``.
    """
    processed = prepare_mask(mask, Inpaint(blur=request.mask_blur, invert=bool(request.inpainting_mask_invert)))
    fill = INPAINT_FILLS[request.inpainting_fill]
    extra.update({"Mask blur": request.mask_blur, "Masked content": fill.replace("_", " "),
                  **({"Mask mode": "Inpaint not masked"} if request.inpainting_mask_invert else {}),
                  **({"Inpaint area": "Only masked", "Masked area padding": request.inpaint_full_res_padding}
                     if request.inpaint_full_res else {})})
    if request.inpaint_full_res:
        height, width = decoded.shape[:2]
        return decoded, fit(processed, width, height, "resize"), InpaintSpec(
            fill=fill, full_res=True, padding=request.inpaint_full_res_padding, rule="a1111")
    fitted_mask = fit(processed, request.width, request.height, IMG2IMG_RESIZE_MODES[request.resize_mode])
    return fitted, fitted_mask, InpaintSpec(fill=fill, rule="a1111")


def resolve_model(model: str) -> str:
    """The native ``control`` for a unit's ``model``: a workspace ControlNet name, else the base's own.

    A1111 model names carry a hash suffix (``name [1a2b3c4d]``); it is dropped. "None"
    (the clients' default) and "canny" mean the base's own ControlNet.
    """
    name = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", model.strip())
    return BASE_CONTROLNET if name.lower() in ("", "none", BASE_CONTROLNET) else name


UNIT_FIELDS = {"name": "model", "control_map": "image", "image": "image", "strength": "weight",
               "start": "guidance_start", "end": "guidance_end", "mode": "control_mode"}


def a1111_field(native: str | None, request: A1111Request, unit_paths: list[str] = ()) -> str | None:
    """The A1111 field behind a native field named in an error (``loras.0.name`` -> ``prompt``,
    ``controls.1.strength`` -> the second enabled unit's ``weight``)."""
    if native is None:
        return None
    parts = native.split(".")
    if parts[0] == "controls" and len(parts) >= 2 and parts[1].isdigit() and int(parts[1]) < len(unit_paths):
        path = unit_paths[int(parts[1])]
        return f"{path}.{UNIT_FIELDS.get(parts[2], parts[2])}" if len(parts) > 2 else path
    mapping = {"loras": "prompt", "scale": "cfg_scale", "img2img_strength": "denoising_strength",
               "scheduler": "sampler_name", "schedule": "scheduler", "n_prompt": "negative_prompt",
               "num_samples": "batch_size",
               "resolution": "width" if request.width <= request.height else "height",
               "image": "init_images.0", "controls": "alwayson_scripts", "hires": "hr_scale",
               "inpaint": "mask"}
    return mapping.get(parts[0], native)


# -- the response ------------------------------------------------------------------------------

# The fields of A1111's request models (modules/api/models.py: StableDiffusionProcessingTxt2Img /
# Img2Img's parameters plus the API's own) with their defaults: `parameters` is A1111's
# `vars(request)`, so every field is there, sent or not.
_COMMON_DEFAULTS: dict[str, Any] = {
    "prompt": "", "negative_prompt": "", "styles": None, "seed": -1, "subseed": -1, "subseed_strength": 0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": None, "scheduler": None, "batch_size": 1,
    "n_iter": 1, "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": None, "tiling": None,
    "do_not_save_samples": False, "do_not_save_grid": False, "eta": None, "denoising_strength": 0.75,
    "s_min_uncond": None, "s_churn": None, "s_tmax": None, "s_tmin": None, "s_noise": None,
    "override_settings": None, "override_settings_restore_afterwards": True, "refiner_checkpoint": None,
    "refiner_switch_at": None, "disable_extra_networks": False, "firstpass_image": None, "comments": None,
    "force_task_id": None, "sampler_index": "Euler", "script_name": None, "script_args": [], "send_images": True,
    "save_images": False, "alwayson_scripts": {}, "infotext": None,
}
TXT2IMG_DEFAULTS: dict[str, Any] = {
    **_COMMON_DEFAULTS, "enable_hr": False, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2.0,
    "hr_upscaler": None, "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None,
    "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "", "hr_negative_prompt": "",
}
IMG2IMG_DEFAULTS: dict[str, Any] = {
    **_COMMON_DEFAULTS, "init_images": None, "resize_mode": 0, "image_cfg_scale": None, "mask": None,
    "mask_blur_x": 4, "mask_blur_y": 4, "mask_blur": None, "mask_round": True, "inpainting_fill": 0,
    "inpaint_full_res": True, "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0,
    "initial_noise_multiplier": None, "latent_mask": None, "include_init_images": False,
}


def echo_parameters(request: A1111Request, *, img2img: bool) -> dict:
    """``parameters`` as A1111 answers it: every field of its request model, the sent values over the defaults.

    Fields A1111 does not know are kept too (they are listed in ``info.loramgr.ignored_fields``);
    ``init_images`` and ``mask`` are null unless ``include_init_images``, as in A1111.
    """
    parameters = {**(IMG2IMG_DEFAULTS if img2img else TXT2IMG_DEFAULTS), **request.model_dump(exclude_unset=True)}
    if img2img and not parameters["include_init_images"]:
        parameters["init_images"] = parameters["mask"] = None
    return parameters


def _styles(request: A1111Request) -> list[str]:
    """The request's ``styles`` (names A1111 reports back; this server has no prompt styles to apply)."""
    styles = (request.model_extra or {}).get("styles")
    return [s for s in styles if isinstance(s, str)] if isinstance(styles, list) else []


def _quote(value: Any) -> str:
    """A value of an infotext: JSON-quoted when it holds a comma, colon or newline (A1111's ``quote``)."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


@dataclass(frozen=True)
class Served:
    """What ``info`` says about the server: the base's name, its 10-character hash, the loramgr version."""

    model_name: str
    model_hash: str
    version: str


def response_info(request: A1111Request, the_plan: Plan, results: list[dict], served: Served, *, img2img: bool,
                  started: datetime, interrupted: bool) -> dict:
    """``info`` as A1111's ``Processed.js()`` builds it (every key, A1111's types), plus ``scheduler``,
    ``n_iter``, ``eta`` and ``loramgr`` (what was applied, timings, ignored fields, warnings).

    Values are what was done: ``restore_faces`` is false, ``sd_vae_name`` null (the base's own
    VAE), seed resizing and variation seeds are not applied (-1, strength 0).
    """
    n = len(results)
    first = results[0]
    seeds = the_plan.seeds[:n]
    width, height = first["width"], first["height"]
    denoising = request.denoising_strength if img2img or request.enable_hr else None
    hashes = ", ".join(f"{a['name']}: {a['sha256'][:12]}" for a in first["adapters"] if a["kind"] == "lora")
    extra = {**the_plan.extra, **({"Lora hashes": hashes} if hashes else {})}
    if first["settings"]["clip_skip"] > 1:
        extra["Clip skip"] = first["settings"]["clip_skip"]
    params = {"Steps": request.steps, "Sampler": the_plan.sampler_name, "Schedule type": SCHEDULES[the_plan.schedule].label,
              "CFG scale": request.cfg_scale, "Seed": None, "Size": f"{width}x{height}",
              "Model hash": served.model_hash, "Model": served.model_name, "Denoising strength": denoising, **extra,
              "Version": served.version}
    negative = f"\nNegative prompt: {request.negative_prompt}" if request.negative_prompt else ""

    def infotext(seed: int) -> str:
        values = {**params, "Seed": seed}
        return f"{request.prompt}{negative}\n" + ", ".join(f"{k}: {_quote(v)}" for k, v in values.items()
                                                          if v is not None)

    return {
        "prompt": request.prompt, "all_prompts": [request.prompt] * n,
        "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * n,
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0.0,
        "width": width, "height": height, "sampler_name": the_plan.sampler_name, "cfg_scale": request.cfg_scale,
        "steps": request.steps, "batch_size": request.batch_size, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": served.model_name, "sd_model_hash": served.model_hash,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": denoising, "extra_generation_params": extra, "index_of_first_image": 0,
        "infotexts": [infotext(s) for s in seeds], "styles": _styles(request),
        "job_timestamp": started.strftime("%Y%m%d%H%M%S"), "clip_skip": first["settings"]["clip_skip"],
        "is_using_inpainting_conditioning": False, "version": served.version,
        "scheduler": the_plan.schedule, "n_iter": request.n_iter, "eta": first["settings"]["eta"],
        "loramgr": {
            "base": first["base"], "backend": first["backend"], "adapters": first["adapters"],
            "controls": the_plan.controls, "seeds": seeds, "swapped": [r["swapped"] for r in results],
            "timings": [r["timings"] for r in results], "ignored_fields": the_plan.ignored,
            "warnings": the_plan.warnings, "interrupted": interrupted,
        },
    }
