"""The JSON contract of the native API: pydantic models for every request and response.

Field names are the contract (docs/serving.md): extend, never rename. Every generation
field a request omits takes the default of :class:`~loramgr.pipeline.settings.GenerationSettings`,
which is also where ``loramgr run`` takes its defaults from, so the same request gives
the same image as the same ``loramgr run`` command. Range checks that depend on the
server's configured limits (resolution, steps, num_samples) are done by the engine,
which names the field in its 4xx answer.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..pipeline.settings import CONTROL_SCHEDULES, GenerationSettings

# The defaults of `loramgr run`: read from the dataclass, never copied.
RUN_DEFAULTS = {f.name: f.default for f in fields(GenerationSettings) if f.default is not MISSING}

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="adapter name in the workspace (adapters/NAME.lora)", max_length=100)
    weight: FiniteFloat | None = Field(None, description="strength; omitted: the adapter's default weight")


class GenerateRequest(BaseModel):
    """``POST /v1/generate``: one canny ControlNet generation with its adapters."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="required, as `loramgr run --prompt`", max_length=10_000)
    a_prompt: str = Field(RUN_DEFAULTS["a_prompt"], max_length=10_000)
    n_prompt: str = Field(RUN_DEFAULTS["n_prompt"], max_length=10_000)
    image: str | None = Field(None, description="base64 PNG/JPEG (a data: URL is accepted); the canny input")
    control_map: str | None = Field(
        None, description="base64 PNG/JPEG of a precomputed control map: replaces the canny edges of `image`")
    loras: list[LoraSpec] = Field(default_factory=list, max_length=16)
    control: str = Field("canny", description="`canny`: the base's own ControlNet; else a converted ControlNet",
                         max_length=100)
    steps: int = RUN_DEFAULTS["steps"]
    scale: FiniteFloat = RUN_DEFAULTS["scale"]
    seed: int = RUN_DEFAULTS["seed"]
    scheduler: str = RUN_DEFAULTS["scheduler"]
    schedule: str = Field(RUN_DEFAULTS["schedule"], description="where the scheduler places its steps: "
                          "`automatic` (its own), `karras`, `exponential`, `uniform`, ... (docs/serving.md)")
    resolution: int = RUN_DEFAULTS["resolution"]
    num_samples: int = RUN_DEFAULTS["num_samples"]
    guess_mode: bool = RUN_DEFAULTS["guess_mode"]
    control_schedule: Literal[CONTROL_SCHEDULES] = RUN_DEFAULTS["control_schedule"]  # type: ignore[valid-type]
    strength: FiniteFloat = RUN_DEFAULTS["strength"]
    img2img_strength: FiniteFloat | None = RUN_DEFAULTS["img2img_strength"]
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
    control_map: str = Field(description="base64 PNG of the control (edge) map the ControlNet saw")
    adapters: list[AppliedAdapter]
    control: str
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


class AdapterList(BaseModel):
    base: str
    adapters: list[AdapterInfo]


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
