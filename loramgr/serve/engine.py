"""The service's one door into the runtime: a base kept open, adapters swapped per request.

This is the only module of :mod:`loramgr.serve` that touches the runtime layer: it
keeps one :class:`~loramgr.runtime.Generator` (the object ``loramgr run`` generates
through), so the same request gives the same image as the CLI.

Two halves:

* :meth:`Engine.prepare` runs in the request's thread: it turns a
  :class:`~loramgr.serve.schemas.GenerateRequest` into a :class:`Job` (decoded images,
  the adapter set loaded and checked against the base, :class:`GenerationSettings`
  checked with the same :func:`check_inputs` as ``loramgr run``). Every problem becomes a
  :class:`CatalogError` naming the field; nothing has touched the runner yet.
* :meth:`Engine.run` runs on the scheduler's single worker thread: swap (if the set
  differs from the runner's) and generate. If a swap fails half-way the runner is
  re-opened on the plain base, so the next request sees exactly its own adapters; a
  failure of the generation itself (or a cancelled one) never re-creates the runner.
  Numbers that would fail only in the runtime (a weight finite in float64 but not in
  float32, a guidance scale of 1e308) are refused by :meth:`Engine.prepare`, with the
  ranges of :mod:`.config`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..adapters import BASE_CONTROLNET, AdapterSet, is_controlnet, touched_names
from ..backends.options import OrtOptions
from ..bases import OpenBase
from ..defaults import base_defaults
from ..errors import LoramgrError
from ..pipeline.control import ControlUnit
from ..pipeline.inpaint import Inpaint
from ..pipeline.passes import HiresFix, hires_size
from ..pipeline.schedulers import SCHEDULERS, scheduler_class
from ..pipeline.settings import GenerationSettings, check_inputs, check_mask, output_size
from ..runtime import Generator
from ..workspace import Workspace
from .catalog import AdapterCatalog, CatalogError
from .codec import decode_image
from .config import MAX_ETA, MAX_LORA_WEIGHT, MAX_SCALE, MAX_STRENGTH, ServeConfig
from .scheduler import Cancelled
from .schemas import GenerateRequest

logger = logging.getLogger("loramgr.serve")

# The generation settings a request carries (the server's own limits stand for max_pixels;
# the preprocessor follows from the request: a control_map is used as it is).
SETTING_FIELDS = tuple(f for f in GenerationSettings.__dataclass_fields__ if f in GenerateRequest.model_fields)
_FIELD_RE = re.compile(r"\b(" + "|".join(sorted(SETTING_FIELDS, key=len, reverse=True)) + r")\b")


def field_of(message: str) -> str | None:
    """The first generation setting a :func:`check_inputs` message names (they start with it)."""
    found = _FIELD_RE.search(message)
    return found.group(1) if found else None


@dataclass
class Job:
    """A checked request, ready for the worker: no further validation can fail on input."""

    settings: GenerationSettings
    image: np.ndarray | None
    control_images: list[np.ndarray | None]  # one per unit (None: the unit uses ``image``)
    adapter_set: AdapterSet
    applied: list[dict]
    controls: list[str]  # each unit's ControlNet
    key: tuple = field(default_factory=tuple)  # identical keys need no swap between them
    cancel: threading.Event = field(default_factory=threading.Event)  # set: stop at the next step
    steps: tuple[int, int] = (0, 0)  # (completed, total) denoising steps, while it runs
    mask: np.ndarray | None = None  # inpaint ``image`` where it is white


@dataclass
class Generation:
    images: list[np.ndarray]
    control_maps: list[np.ndarray]
    settings: GenerationSettings
    swapped: bool
    reopened: bool
    timings: dict[str, float]


class Engine:
    """One base, one runner, one pipeline for the life of the process."""

    def __init__(self, workspace: Workspace, config: ServeConfig):
        self.workspace = workspace
        self.config = config
        self.opened = OpenBase.resolve(workspace, config.base)
        self.base = self.opened.name
        self.manifest = self.opened.manifest
        self.defaults = base_defaults(self.opened)  # `loramgr run`'s for this base: omitted fields take them
        self.catalog = AdapterCatalog(workspace, self.manifest)
        self.generator: Generator | None = None
        self._key: tuple = ()
        self._lock = threading.Lock()  # the worker holds it; tests and recovery too
        self.swaps = 0
        self.swap_seconds = 0.0
        self.reopens = 0  # session re-creations after start-up (swap outside the swappable set, recovery)
        self.startup: dict = {}
        self.progress: Callable[[int, int], None] | None = None  # after each denoising step

    # -- life ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.generator is not None

    @property
    def runner(self):
        return None if self.generator is None else self.generator.runner

    def _ort_options(self) -> OrtOptions:
        return OrtOptions(optimization=self.config.ort_optimization, hot_swap=self.config.hot_swap,
                          fuse_attention=self.config.fuse_attention)

    def initial_swappable(self) -> tuple[dict[str, set[str]], list[str], list[str], int]:
        """Every workspace adapter that fits this base, while its buffers fit ``swap_budget_mb``.

        Returns (graph -> initializer names, adapters included, adapters left out, bytes).
        Adapters are taken in name order; one that would pass the budget is left out (it
        still works: its first use re-creates the sessions and it stays swappable after).
        """
        budget = self.config.swap_budget_mb * 1024 * 1024
        swappable: dict[str, set[str]] = {}
        included, excluded = [], []
        for name in self.catalog.names():
            try:
                if not self.catalog.fits(name):
                    continue
                touched = self.catalog.touched(name)
            except (CatalogError, OSError, ValueError):
                continue
            union = touched_names(swappable, touched)
            if self.catalog.buffer_bytes(union) <= budget:
                swappable, included = union, [*included, name]
            else:
                excluded.append(name)
        return swappable, included, excluded, self.catalog.buffer_bytes(swappable)

    def start(self) -> None:
        """Open the runner on the plain base with the initial swappable set."""
        start = time.perf_counter()
        swappable, included, excluded, nbytes = self.initial_swappable()
        self._open(swappable)
        for name in SCHEDULERS:  # imported now, not by a request: a first import holds the GIL, /healthz waits
            scheduler_class(name)
        self.startup = {"open_s": time.perf_counter() - start, "swappable_adapters": included,
                        "not_swappable_at_start": excluded, "swappable_bytes": nbytes,
                        "swappable_weights": sum(len(n) for n in swappable.values())}
        logger.info("runner open on %s (%s) in %.2f s; %d adapters swappable (%.1f MiB of buffers)%s",
                    self.base, self.config.backend, self.startup["open_s"], len(included), nbytes / 2**20,
                    f"; over the budget: {', '.join(excluded)}" if excluded else "")

    def _open(self, swappable: dict[str, set[str]]) -> None:
        self.generator = Generator.open(self.workspace, self.opened, self.config.backend, self._ort_options(),
                                        swappable=swappable)
        self._key = ()

    def close(self) -> None:
        with self._lock:
            if self.generator is not None:
                self.generator.close()
            self.generator = None

    def swappable(self) -> dict[str, set[str]]:
        return {} if self.runner is None else self.runner.swappable()

    # -- request -> job (request thread) ------------------------------------------------------

    def prepare(self, request: GenerateRequest) -> Job:
        """Check everything about ``request`` that can be checked without the runner."""
        c = self.config
        fields_ = {k: getattr(request, k) for k in SETTING_FIELDS}
        fields_["max_prompt_tokens"] = c.max_prompt_tokens
        for name, limit, flag in (("resolution", c.max_resolution, "--max-resolution"),
                                  ("steps", c.max_steps, "--max-steps"),
                                  ("num_samples", c.max_num_samples, "--max-num-samples")):
            value = getattr(request, name)
            value = getattr(self.defaults, name) if value is None else value
            if value > limit:
                raise CatalogError(422, name, f"{name}={value} exceeds this server's limit of {limit} ({flag})")
        for name, low, high in (("scale", 0.0, MAX_SCALE), ("strength", 0.0, MAX_STRENGTH), ("eta", 0.0, MAX_ETA)):
            check_range(getattr(request, name), name, low, high)
        limits = (c.max_image_bytes, c.max_image_pixels)
        image = None if request.image is None else decode_image(request.image, "image", *limits)
        mask = None if request.mask is None else decode_image(request.mask, "mask", *limits)
        fields_["hires"] = None if request.hires is None else HiresFix(**request.hires.model_dump())
        fields_["inpaint"] = Inpaint(**request.inpaint.model_dump())
        if request.controls is None:  # the one-unit form
            control_map = None if request.control_map is None else decode_image(request.control_map, "control_map",
                                                                                 *limits)
            if image is None and control_map is None:
                raise CatalogError(422, "image", "required: give image (base64 PNG/JPEG) or control_map")
            settings = self.defaults.settings(**fields_, preprocessor="canny" if control_map is None else "none")
            control_images, controls = [control_map], [request.control]
        else:
            settings, control_images = self._units(request, image, fields_)
            controls = [spec.name for spec in request.controls]
        if image is None and request.img2img_strength is not None:
            raise CatalogError(422, "img2img_strength", "img2img needs an image, not only control maps")
        try:
            given = [i for i in (image, *control_images) if i is not None]
            for each in given or [None]:
                check_inputs(each, settings)
        except LoramgrError as exc:
            message = str(exc).replace("units.", "controls.")  # the request's name for the units
            unit_field = re.match(r"controls\.\d+\.\w+", message)
            raise CatalogError(422, unit_field.group(0) if unit_field else field_of(message), message) from None
        try:
            check_mask(mask, image, settings.control_units(), settings)
        except LoramgrError as exc:
            raise CatalogError(422, "mask", str(exc)) from None
        if settings.hires is not None:
            self._check_hires(settings, given[0] if given else None)
        adapter_set, applied, key = self.adapter_set(request, controls)
        return Job(settings, image, control_images, adapter_set, applied, controls, key, mask=mask)

    def _check_hires(self, settings: GenerationSettings, first: np.ndarray | None) -> None:
        """The second pass within ``--max-resolution`` (short side) and ``--max-steps`` (its schedule).

        ``first``: the first image given (the request's, else a unit's), which sets the first pass's size.
        """
        c, hires = self.config, settings.hires
        if (hires.steps or settings.steps) > c.max_steps:
            raise CatalogError(422, "hires", f"hires.steps={hires.steps or settings.steps} exceeds this server's "
                                             f"limit of {c.max_steps} (--max-steps)")
        size = (output_size(*first.shape[:2], settings.resolution) if first is not None
                else (settings.height, settings.width))
        height, width = hires_size(*size, hires).target
        if min(height, width) > c.max_resolution:
            raise CatalogError(422, "hires", f"the second pass of {width}x{height} has a shorter side over "
                                             f"this server's limit of {c.max_resolution} (--max-resolution)")

    def _units(self, request: GenerateRequest, image: np.ndarray | None, fields_: dict
               ) -> tuple[GenerationSettings, list[np.ndarray | None]]:
        """The settings and images of ``controls`` (several units, or none)."""
        c = self.config
        if len(request.controls) > c.max_controlnets:
            raise CatalogError(422, "controls", f"{len(request.controls)} ControlNet units exceed this server's "
                                                f"limit of {c.max_controlnets} (--max-controlnets)")
        units, images = [], []
        for i, spec in enumerate(request.controls):
            check_range(spec.strength, f"controls.{i}.strength", 0.0, MAX_STRENGTH)
            if spec.image is not None and spec.control_map is not None:
                raise CatalogError(422, f"controls.{i}.control_map", "give image or control_map, not both")
            source, what = (spec.control_map, "control_map") if spec.control_map is not None else (spec.image, "image")
            pixels = None if source is None else decode_image(source, f"controls.{i}.{what}", c.max_image_bytes,
                                                              c.max_image_pixels)
            if pixels is None and image is None:
                raise CatalogError(422, f"controls.{i}.image", "required: the unit's image or control_map, "
                                                                "or the request's image")
            preprocessor = spec.preprocessor or ("none" if spec.control_map is not None else "canny")
            units.append(ControlUnit(spec.name, preprocessor, spec.strength, spec.start, spec.end, spec.mode,
                                     spec.low_threshold, spec.high_threshold))
            images.append(pixels)
        if image is None and not any(i is not None for i in images) and (request.width is None or request.height is None):
            raise CatalogError(422, "image", "required without ControlNet units: an image, or width and height")
        try:
            return self.defaults.settings(**fields_, units=tuple(units)), images
        except TypeError as exc:  # pragma: no cover - the schema and the dataclass agree
            raise CatalogError(422, "controls", str(exc)) from None

    def adapter_set(self, request: GenerateRequest, controls: list[str] | None = None
                    ) -> tuple[AdapterSet, list[dict], tuple]:
        """The request's adapters, loaded and checked against the base (ControlNets first, as ``loramgr run``).

        ``controls``: the ControlNet of each unit (default: the one-unit ``control``).
        """
        controls = [request.control] if controls is None else controls
        chosen, fields_ = [], []
        for name in dict.fromkeys(controls):
            if name == BASE_CONTROLNET:
                continue
            field_ = "control" if request.controls is None else f"controls.{controls.index(name)}.name"
            adapter, sha = self.catalog.load(name, field_)
            if not is_controlnet(adapter):
                raise CatalogError(422, field_, f"{name!r} is a {adapter.kind} adapter, not a ControlNet; "
                                                "pass LoRAs in loras")
            chosen.append((adapter, 1.0, sha))
            fields_.append(field_)
        for i, spec in enumerate(request.loras):
            field_ = f"loras.{i}.name"
            adapter, sha = self.catalog.load(spec.name, field_)
            if adapter.kind != "lora":
                hint = "pass a ControlNet as control" if adapter.kind == "controlnet" else "not a LoRA"
                raise CatalogError(422, field_, f"{spec.name!r} is a {adapter.kind} adapter: {hint}")
            try:
                weight = adapter.default_weight if spec.weight is None else float(spec.weight)
            except LoramgrError as exc:  # a damaged default weight in the file
                raise CatalogError(422, f"loras.{i}.weight", str(exc).replace(str(adapter.path), spec.name)) from None
            check_range(weight, f"loras.{i}.weight", -MAX_LORA_WEIGHT, MAX_LORA_WEIGHT,
                        "" if spec.weight is not None else f" ({spec.name!r}'s default weight)")
            chosen.append((adapter, weight, sha))
            fields_.append(field_)
        for (adapter, _, _), field_ in zip(chosen, fields_):
            try:
                adapter.check_base(self.manifest)
            except LoramgrError as exc:
                raise CatalogError(422, field_, str(exc).replace(str(adapter.path), adapter.name)) from None
        base_controlnet = BASE_CONTROLNET in controls
        try:
            adapter_set = AdapterSet(tuple((a, w) for a, w, _ in chosen), base_controlnet=base_controlnet)
        except LoramgrError as exc:
            raise CatalogError(422, "loras", str(exc)) from None
        applied = [{"name": a.name, "kind": a.kind, "weight": w, "sha256": sha,
                    "source_sha256": a.metadata.get("loramgr.source_sha256", "")} for a, w, sha in chosen]
        key = (*((a.kind, a.name, w, sha) for a, w, sha in chosen), ("base_controlnet", base_controlnet))
        return adapter_set, applied, key

    # -- job -> images (worker thread) --------------------------------------------------------

    @property
    def current_key(self) -> tuple:
        return self._key

    def run(self, job: Job) -> Generation:
        """Swap to the job's adapters if needed, then generate. One call at a time.

        The swap is the runner's own work: if it raises, the weights may be half written and
        the runner is re-opened. The generation is the request's: if it raises (or is
        cancelled), the runner keeps the job's set, which is recorded, and is not re-created.
        """
        with self._lock:
            if self.generator is None:
                raise RuntimeError("the runner is not open")
            swapped = job.key != self._key
            # an equal key is the set the runner holds: hand that one over, so no swap happens
            adapter_set = job.adapter_set if swapped else self.runner.adapter_set
            reopened = swapped and self._needs_reopen(adapter_set)
            swap_s = 0.0
            if swapped:
                swappable = self.swappable()
                try:
                    swap_s = self.runner.set_adapters(adapter_set)
                except BaseException:
                    self._recover(swappable)
                    raise
                self._swapped(job.key, swap_s, reopened)
            one_unit = job.settings.units is None
            made = self.generator.generate(
                adapter_set, job.settings, job.image, control_image=job.control_images[0] if one_unit else None,
                control_images=None if one_unit else job.control_images, progress=self._step_hook(job),
                mask=job.mask)
        timings = {"swap": swap_s, **made.result.timings}
        return Generation(made.images, made.control_maps, replace(job.settings), swapped, reopened, timings)

    def _step_hook(self, job: Job) -> Callable[[int, int], None]:
        """After each denoising step: record it, stop if the job was cancelled, then the engine's ``progress``."""
        def step(completed: int, total: int) -> None:
            job.steps = (completed, total)
            if job.cancel.is_set():
                raise Cancelled()
            if self.progress is not None:
                self.progress(completed, total)
        return step

    def _swapped(self, key: tuple, seconds: float, reopened: bool) -> None:
        """Record that the runner now holds the set of ``key`` (what the next request compares with)."""
        self._key = key
        self.swaps += 1
        self.swap_seconds += seconds
        self.reopens += reopened

    def _needs_reopen(self, adapter_set: AdapterSet) -> bool:
        """Whether this swap re-creates sessions: a weight the old or the new set touches is not swappable.

        ONNX Runtime without hot swap has no swappable weights; TensorRT can refit every one.
        """
        have = self.runner.swappable()
        needed = touched_names(adapter_set, self.runner.adapter_set)
        return not all(names <= have.get(graph, set()) for graph, names in needed.items())

    def _recover(self, swappable: dict[str, set[str]]) -> None:
        """After a failed swap: new sessions on the plain base, same swappable set (counted as a re-open)."""
        logger.error("swap failed; re-opening the runner on the plain base")
        try:
            if self.generator is not None:
                self.generator.close()
        except Exception:  # noqa: BLE001 - the runner is being replaced anyway
            pass
        self.generator = None
        self.reopens += 1
        self._open(swappable)

    def settings_dict(self, settings: GenerationSettings) -> dict:
        return asdict(settings)


def check_range(value: float, field_: str, low: float, high: float, what: str = "") -> None:
    """A 422 naming ``field_`` unless ``low <= value <= high`` (the ranges are within float32)."""
    if not low <= value <= high:
        raise CatalogError(422, field_, f"must be a finite number in [{low:g}, {high:g}], got {value:g}{what} "
                                        "(docs/serving.md, Hostile input)")
