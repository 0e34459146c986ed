"""The JSON contract of the native API: pydantic models for every request and response.

Field names are the contract (docs/serving.md): extend, never rename. Every generation
field a request omits takes ``loramgr run``'s default: that of
:class:`~loramgr.pipeline.settings.GenerationSettings`, or for ``resolution`` and
``n_prompt`` the base's (:mod:`loramgr.defaults`, filled in by the engine), so the same
request gives the same image as the same ``loramgr run`` command. Range checks that depend on the
server's configured limits (resolution, steps, num_samples) are done by the engine,
which names the field in its 4xx answer.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..pipeline.control import CONTROL_MODES, PREPROCESSORS, WINDOW_RULES, ControlUnit
from ..pipeline.inpaint import INPAINT_FILLS, MASK_RULES, Inpaint
from ..pipeline.passes import UPSCALERS, HiresFix
from ..pipeline.settings import CONTROL_SCHEDULES, PROMPT_SYNTAXES, GenerationSettings


def defaults_of(cls: type) -> dict:
    """The field defaults of dataclass ``cls`` (fields without one left out): read, never copied."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


# The defaults of `loramgr run` that are the same on every base.
RUN_DEFAULTS = defaults_of(GenerationSettings)

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="adapter name in the workspace (adapters/NAME.lora)", max_length=100)
    weight: FiniteFloat | None = Field(None, description="strength; omitted: the adapter's default weight")


UNIT_DEFAULTS = defaults_of(ControlUnit)


class ControlSpec(BaseModel):
    """One ControlNet unit of ``controls``: which ControlNet, its image or map, how strong, when."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("canny", description="`canny`: the base's own ControlNet; else a converted ControlNet",
                      max_length=100)
    image: str | None = Field(None, description="base64 image the map is made from (default: the request's image)")
    control_map: str | None = Field(None, description="base64 precomputed map, used as it is (preprocessor none)")
    preprocessor: Literal[PREPROCESSORS] | None = Field(  # type: ignore[valid-type]
        None, description="how the image becomes the map; default `canny`, or `none` with a control_map")
    strength: FiniteFloat = UNIT_DEFAULTS["strength"]
    start: FiniteFloat = Field(UNIT_DEFAULTS["start"], description="fraction of the steps where the unit starts")
    end: FiniteFloat = Field(UNIT_DEFAULTS["end"], description="fraction of the steps where it stops")
    mode: Literal[CONTROL_MODES] = Field(  # type: ignore[valid-type]
        UNIT_DEFAULTS["mode"], description="balanced | prompt (soft weights) | control (soft weights, "
                                           "conditional half only: diffusers' guess mode)")
    low_threshold: int = UNIT_DEFAULTS["low_threshold"]
    high_threshold: int = UNIT_DEFAULTS["high_threshold"]


HIRES_DEFAULTS = defaults_of(HiresFix)
INPAINT_DEFAULTS = defaults_of(Inpaint)


class HiresSpec(BaseModel):
    """``hires``: after the first pass, upscale and run an image-to-image second pass (A1111's hires fix)."""

    model_config = ConfigDict(extra="forbid")

    scale: FiniteFloat = Field(HIRES_DEFAULTS["scale"], description="upscale factor, when resize_x/y are 0")
    resize_x: int = Field(HIRES_DEFAULTS["resize_x"], description="target width (0: from scale or resize_y)")
    resize_y: int = Field(HIRES_DEFAULTS["resize_y"], description="target height; both given: upscale to cover, "
                                                                  "then crop the latents")
    upscaler: Literal[UPSCALERS] = Field(  # type: ignore[valid-type]
        HIRES_DEFAULTS["upscaler"], description="`Latent ...`: interpolate the latents; `Lanczos`, `Nearest`, "
                                                "`None`: resize the decoded pixels")
    steps: int = Field(HIRES_DEFAULTS["steps"], description="the second pass's schedule (0: `steps`)")
    strength: FiniteFloat = Field(HIRES_DEFAULTS["strength"], description="img2img strength of the second pass: "
                                                                          "its last int(steps * strength) steps run")
    prompt: str | None = Field(HIRES_DEFAULTS["prompt"], max_length=10_000, description="null: the prompt")
    n_prompt: str | None = Field(HIRES_DEFAULTS["n_prompt"], max_length=10_000, description="null: n_prompt")
    scheduler: str | None = Field(HIRES_DEFAULTS["scheduler"], description="null: scheduler")


class InpaintSpec(BaseModel):
    """``inpaint``: how ``mask`` is used (docs/serving.md)."""

    model_config = ConfigDict(extra="forbid")

    blur: int = Field(INPAINT_DEFAULTS["blur"], description="Gaussian blur of the mask, pixels (A1111's mask_blur)")
    invert: bool = Field(INPAINT_DEFAULTS["invert"], description="inpaint where the mask is black")
    fill: Literal[INPAINT_FILLS] = Field(  # type: ignore[valid-type]
        INPAINT_DEFAULTS["fill"], description="what the masked area starts from (A1111's inpainting_fill 0..3)")
    full_res: bool = Field(INPAINT_DEFAULTS["full_res"], description="generate the masked region's box at the "
                                                                     "output size and paste it back")
    padding: int = Field(INPAINT_DEFAULTS["padding"], description="pixels around the region with full_res")
    rule: Literal[MASK_RULES] = Field(  # type: ignore[valid-type]
        INPAINT_DEFAULTS["rule"], description="diffusers: the inpaint pipelines' mask rules; a1111: A1111's")


class GenerateRequest(BaseModel):
    """``POST /v1/generate``: one generation with its adapters and ControlNet units."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="required, as `loramgr run --prompt`", max_length=10_000)
    a_prompt: str = Field(RUN_DEFAULTS["a_prompt"], max_length=10_000)
    n_prompt: str | None = Field(None, max_length=10_000, description="omitted: the base's default (`loramgr run`'s: "
                                 "ControlNet's, up to what fits the base's tokenizer in 77 tokens; GET /v1/config)")
    image: str | None = Field(None, description="base64 PNG/JPEG (a data: URL is accepted); the canny input")
    control_map: str | None = Field(
        None, description="base64 PNG/JPEG of a precomputed control map: replaces the canny edges of `image`")
    loras: list[LoraSpec] = Field(default_factory=list, max_length=16)
    control: str = Field("canny", description="`canny`: the base's own ControlNet; else a converted ControlNet",
                         max_length=100)
    controls: list[ControlSpec] | None = Field(
        None, description="ControlNet units (`[]`: none); when given, `control`, `control_map`, `strength`, "
                          "`guess_mode` and the thresholds are not used", max_length=16)
    width: int | None = Field(None, description="output width without any image (multiple of 64)")
    height: int | None = Field(None, description="output height without any image (multiple of 64)")
    clip_skip: int = RUN_DEFAULTS["clip_skip"]
    prompt_syntax: Literal[PROMPT_SYNTAXES] = RUN_DEFAULTS["prompt_syntax"]  # type: ignore[valid-type]
    steps: int = RUN_DEFAULTS["steps"]
    scale: FiniteFloat = RUN_DEFAULTS["scale"]
    seed: int = RUN_DEFAULTS["seed"]
    scheduler: str = RUN_DEFAULTS["scheduler"]
    schedule: str = Field(RUN_DEFAULTS["schedule"], description="where the scheduler places its steps: "
                          "`automatic` (its own), `karras`, `exponential`, `uniform`, ... (docs/serving.md)")
    resolution: int | None = Field(None, description="omitted: the base's native size, as `loramgr run` "
                                                      "(tiny 128, sd15 512; GET /v1/config)")
    num_samples: int = RUN_DEFAULTS["num_samples"]
    guess_mode: bool = RUN_DEFAULTS["guess_mode"]
    control_schedule: Literal[CONTROL_SCHEDULES] = RUN_DEFAULTS["control_schedule"]  # type: ignore[valid-type]
    control_window: Literal[WINDOW_RULES] = Field(  # type: ignore[valid-type]
        RUN_DEFAULTS["control_window"], description="how `controls[].start/end` pick steps: diffusers' rule or "
                                                    "A1111's (docs/serving.md)")
    strength: FiniteFloat = RUN_DEFAULTS["strength"]
    img2img_strength: FiniteFloat | None = RUN_DEFAULTS["img2img_strength"]
    hires: HiresSpec | None = Field(None, description="a hires fix: upscale and a second pass (text-to-image only)")
    mask: str | None = Field(None, description="base64 PNG/JPEG, white where `image` is inpainted")
    inpaint: InpaintSpec = Field(default_factory=InpaintSpec, description="how the mask is used")
    eta: FiniteFloat = RUN_DEFAULTS["eta"]
    low_threshold: int = RUN_DEFAULTS["low_threshold"]
    high_threshold: int = RUN_DEFAULTS["high_threshold"]


class AppliedAdapter(BaseModel):
    name: str
    kind: str
    weight: float
    sha256: str = Field(description="sha256 of the .lora file that was applied")
    source_sha256: str = Field("", description="sha256 of the file it was converted from")


class Timings(BaseModel):
    """Seconds."""

    queue_wait: float
    swap: float
    encode: float
    prepare_control: float
    prepare_latents: float
    denoise: float
    decode: float
    total: float


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="base64 PNG, num_samples of them")
    control_map: str | None = Field(description="base64 PNG of the first unit's control map (null: no unit)")
    control_maps: list[str] = Field(description="base64 PNG of every unit's control map, in unit order")
    adapters: list[AppliedAdapter]
    control: str = Field(description="the first unit's ControlNet (`none` without units)")
    controls: list[str] = Field(description="every unit's ControlNet, in unit order")
    seed: int
    base: str
    backend: str
    width: int
    height: int
    swapped: bool = Field(description="whether the adapters had to change for this request")
    timings: Timings
    settings: dict = Field(description="every generation setting used, defaults filled in")
    replica: str | None = Field(None, description="`loramgr serve --ray`: the replica that generated (docs/ray.md)")
    set_id: str | None = Field(None, description="`loramgr serve --ray`: the multiplexed id it was routed by")


EMBEDDINGS_DOC = ("textual-inversion embeddings by trigger word: the adapter's own name for kind 'embedding', "
                  "the ones a LoRA bundles (used in prompts while it is applied)")


class EmbeddingInfo(BaseModel):
    vectors: int
    dim: int
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None


class AdapterInfo(BaseModel):
    name: str
    kind: str
    rank: list[int]
    trigger_words: list[str]
    default_weight: float
    base: str = Field(description="the base it was converted for")
    fits: bool = Field(description="whether it fits the base this server serves")
    sha256: str
    size_bytes: int
    format: str = ""
    embeddings: dict[str, EmbeddingInfo] = Field(default_factory=dict, description=EMBEDDINGS_DOC)


class AdapterProblem(BaseModel):
    name: str
    reason: str = Field(description="why the file cannot be listed (damaged metadata, unreadable)")


class AdapterList(BaseModel):
    base: str
    adapters: list[AdapterInfo]
    problems: list[AdapterProblem] = Field(default_factory=list,
                                           description="adapters that cannot be read: named, not listed")


class UploadResponse(BaseModel):
    name: str
    kind: str
    format: str
    base: str
    rank: list[int]
    trigger_words: list[str]
    keys_used: int
    keys_total: int
    unknown_keys: list[str]
    size_bytes: int
    sha256: str
    replaced: bool
    embeddings: dict[str, EmbeddingInfo] = Field(default_factory=dict, description=EMBEDDINGS_DOC)


class ServerInfo(BaseModel):
    base: str
    backend: str
    scheduling: str
    defaults: dict = Field(description="the generation defaults (those of `loramgr run`)")
    limits: dict
    schedulers: list[str]
    schedules: list[str]
    control_schedules: list[str]


class ErrorBody(BaseModel):
    error: str = Field(description="one line: what is wrong")
    field: str | None = Field(None, description="the request field at fault, dotted (loras.0.weight)")
    reason: str = ""
