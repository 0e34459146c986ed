"""The A1111 routes (``/sdapi/v1/...``, ``/controlnet/...``) over :class:`~loramgr.serve.app.Service`.

Generation goes through :func:`loramgr.serve.a1111.plan` (A1111 request -> native requests)
and then :meth:`Service.generate`, one image at a time; the lists and options read the
engine's base and catalog. :class:`Progress` watches the denoising steps through the
engine's ``progress`` hook: ``/sdapi/v1/progress`` reads it and ``/sdapi/v1/interrupt``
stops the running generation at its next step. docs/a1111.md is the contract.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import datetime
from typing import Any

import numpy as np
from fastapi import APIRouter, Body
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from .. import __version__
from ..errors import LoramgrError
from ..pipeline.settings import output_size
from .a1111 import (BASE_CONTROLNET, CONTROL_MODULES, A1111Request, A1111Response, ControlNetUnit, Img2ImgRequest,
                    Served, a1111_field, control_map, echo_parameters, plan, response_info, rgb)
from .a1111_samplers import SAMPLERS, SCHEDULES
from .catalog import CatalogError
from .codec import decode_image, encode_png
from .config import is_loopback
from .engine import field_of
from .schemas import ErrorBody

ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 409, 413, 422, 503)}
CONTROLNET_API_VERSION = 2  # what the ControlNet extension's /controlnet/version answers
# The scripts the ControlNet extension lists. "controlnet m2m" (its selectable batch script, not
# offered: script_name is a 422) is how webuiapi knows the extension is there; only then does it
# send an empty unit list with a call without units, instead of the units of its previous call
# (webuiapi keeps them in a shared default argument).
SCRIPTS = ("controlnet", "controlnet m2m")


class Interrupted(CatalogError):
    """The running generation was stopped by ``POST /sdapi/v1/interrupt`` (HTTP 409)."""

    def __init__(self):
        super().__init__(409, None, "generation interrupted (POST /sdapi/v1/interrupt)")


class Progress:
    """Step / total of the generation running now, fed by the engine after every denoising step.

    A generation is told apart from the next by the scheduler's count of finished jobs,
    which does not change while one runs; an interrupt names that count, so it can never
    stop a later generation.
    """

    def __init__(self, service):
        self.service = service
        self._lock = threading.Lock()
        self.run = -1
        self.step = self.total = 0
        self.first_step = 0
        self.started = 0.0
        self.interrupt_run: int | None = None

    def _run_no(self) -> int:
        stats = self.service.scheduler.stats
        return stats.completed + stats.failed

    def __call__(self, completed: int, total: int) -> None:
        """The engine's hook (worker thread): record the step, stop here if interrupted."""
        run = self._run_no()
        with self._lock:
            if run != self.run:
                self.run, self.first_step, self.started = run, completed, time.perf_counter()
            self.step, self.total = completed, total
            if self.interrupt_run == run:
                self.interrupt_run = None
                self.step = self.total = 0
                raise Interrupted()

    def running(self) -> bool:
        scheduler = self.service.scheduler
        return scheduler is not None and scheduler.stats.running == 1 and self.step < self.total

    def interrupt(self) -> bool:
        """Stop the generation that is denoising now (at its next step); False when none is."""
        with self._lock:
            if not self.running():
                return False
            self.interrupt_run = self.run
            return True

    def state(self) -> dict:
        with self._lock:
            active = self.running()
            step, total = (self.step, self.total) if active else (0, 0)
            done = step - self.first_step
            eta = (time.perf_counter() - self.started) / done * (total - step) if active and done > 0 else 0.0
        scheduler = self.service.scheduler
        queued = scheduler.depth if scheduler is not None else 0
        return {"progress": step / total if total else 0.0, "eta_relative": eta,
                "state": {"skipped": False, "interrupted": self.interrupt_run is not None,
                          "stopping_generation": False, "job": "",
                          "job_count": queued + int(active), "job_timestamp": "0", "job_no": 0,
                          "sampling_step": step, "sampling_steps": total},
                "current_image": None, "textinfo": None}


def router(service) -> APIRouter:
    """The A1111 routes for ``service`` (also installs its progress hook on the engine)."""
    progress = Progress(service)
    service.engine.progress = progress
    api = APIRouter(tags=["a1111"])

    def base_title() -> tuple[str, str]:
        fingerprint = service.engine.manifest.fingerprint
        return f"{service.engine.base} [{fingerprint[:10]}]", fingerprint

    def served() -> Served:
        return Served(service.engine.base, service.engine.manifest.fingerprint[:10], f"loramgr {__version__}")

    async def generate(request: A1111Request, img2img: bool) -> dict:
        if not service.engine.ready or service.scheduler is None:
            raise CatalogError(503, None, "the runner is not open")
        started = datetime.now()
        the_plan = await run_in_threadpool(plan, request, service.config, img2img=img2img)
        units = [c["unit"] for c in the_plan.controls]
        results, interrupted = [], False
        for native in the_plan.requests:
            try:
                results.append(await service.generate(native))
            except Interrupted:
                if not results:
                    raise
                interrupted = True
                break
            except CatalogError as exc:
                raise CatalogError(exc.status, a1111_field(exc.field, request, units), exc.reason) from None
            except LoramgrError as exc:  # found late, in the pipeline
                raise CatalogError(422, a1111_field(field_of(str(exc)), request, units), str(exc)) from None
        images = [r["images"][0] for r in results]
        images += results[0]["control_maps"]  # the detected maps after the images, as the ControlNet extension
        info = response_info(request, the_plan, results, served(), img2img=img2img, started=started,
                             interrupted=interrupted)
        return {"images": images, "parameters": echo_parameters(request, img2img=img2img), "info": json.dumps(info)}

    @api.post("/sdapi/v1/txt2img", response_model=A1111Response, responses=ERRORS)
    async def txt2img(request: A1111Request):
        """A1111 text-to-image; `<lora:NAME:WEIGHT>` tags and ControlNet units in `alwayson_scripts`."""
        return await generate(request, img2img=False)

    @api.post("/sdapi/v1/img2img", response_model=A1111Response, responses=ERRORS)
    async def img2img(request: Img2ImgRequest):
        """A1111 image-to-image from `init_images[0]` with `denoising_strength`."""
        return await generate(request, img2img=True)

    @api.get("/sdapi/v1/loras")
    async def loras():
        adapters = await run_in_threadpool(service.engine.catalog.list)
        return [{"name": a["name"], "alias": a["name"], "path": f"adapters/{a['name']}.lora",
                 "metadata": {"sha256": a["sha256"], "rank": a["rank"], "trigger_words": a["trigger_words"],
                              "default_weight": a["default_weight"], "base": a["base"], "fits": a["fits"]}}
                for a in adapters if a["kind"] == "lora"]

    @api.get("/sdapi/v1/sd-models")
    async def sd_models():
        title, fingerprint = base_title()
        return [{"title": title, "model_name": service.engine.base, "hash": fingerprint[:10], "sha256": fingerprint,
                 "filename": f"base_models/{service.engine.base}", "config": None}]

    @api.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": name, "aliases": list(s.aliases),
                 "options": {**({"scheduler": s.automatic} if s.automatic in ("karras", "exponential") else {}),
                             "loramgr_scheduler": s.scheduler}}
                for name, s in SAMPLERS.items()]

    @api.get("/sdapi/v1/schedulers")
    async def schedulers():
        return [{"name": name, "label": s.label, "aliases": list(s.aliases) or None, "default_rho": s.default_rho,
                 "need_inner_model": s.need_inner_model} for name, s in SCHEDULES.items()]

    @api.get("/sdapi/v1/options")
    async def get_options():
        title, fingerprint = base_title()
        return {"sd_model_checkpoint": title, "sd_checkpoint_hash": fingerprint, "samples_format": "png",
                "eta_ddim": 0.0, "eta_ancestral": 1.0, "CLIP_stop_at_last_layers": 1,
                "control_net_unit_count": service.config.max_controlnets}

    @api.post("/sdapi/v1/options", responses=ERRORS)
    async def set_options(options: dict[str, Any] = Body(...)):
        """Only `sd_model_checkpoint` naming the loaded base is accepted; other options are ignored and listed."""
        checkpoint = options.get("sd_model_checkpoint")
        title, _ = base_title()
        if checkpoint is not None and checkpoint not in (title, service.engine.base):
            raise CatalogError(422, "sd_model_checkpoint", f"{checkpoint!r}: this server serves only {title!r} "
                                                           "(start loramgr serve --base NAME for another)")
        return {"ignored": sorted(k for k in options if k != "sd_model_checkpoint")}

    @api.get("/sdapi/v1/progress")
    async def get_progress():
        return progress.state()

    @api.post("/sdapi/v1/interrupt")
    async def interrupt():
        """Stop the generation denoising now at its next step; its request gets the images done before, or 409."""
        return {"interrupted": progress.interrupt()}

    @api.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": list(SCRIPTS), "img2img": list(SCRIPTS)}

    @api.get("/controlnet/model_list")
    async def controlnet_models():
        adapters = await run_in_threadpool(service.engine.catalog.list)
        return {"model_list": [BASE_CONTROLNET, *(a["name"] for a in adapters
                                                  if a["kind"] == "controlnet" and a["fits"])]}

    @api.get("/controlnet/module_list")
    async def controlnet_modules():
        """The preprocessors, with the extension's `module_detail` (their sliders and defaults)."""
        return {"module_list": list(CONTROL_MODULES), "module_detail": MODULE_DETAIL}

    @api.get("/controlnet/control_types")
    async def controlnet_control_types():
        """The extension's control types: `Canny` (the base's ControlNet) and `All` (every converted one too)."""
        models = (await controlnet_models())["model_list"]
        return {"control_types": {
            "All": {"module_list": list(CONTROL_MODULES), "model_list": ["None", *models], "default_option": "none",
                    "default_model": "None"},
            "Canny": {"module_list": list(CONTROL_MODULES), "model_list": ["None", BASE_CONTROLNET],
                      "default_option": "canny", "default_model": BASE_CONTROLNET}}}

    @api.get("/controlnet/settings")
    async def controlnet_settings():
        """Units per request: ``--max-controlnets``."""
        return {"control_net_unit_count": service.config.max_controlnets}

    @api.post("/controlnet/detect", responses=ERRORS)
    async def controlnet_detect(request: DetectRequest):
        """Run a preprocessor (`canny`, `none`) on images: base64 PNG maps, as the ControlNet extension answers."""
        return await run_in_threadpool(detect, request, service.config)

    @api.get("/controlnet/version")
    async def controlnet_version():
        return {"version": CONTROLNET_API_VERSION}

    # -- what clients read at start-up: what is true of this server ------------------------------

    @api.get("/sdapi/v1/embeddings")
    async def embeddings():
        """Textual-inversion embeddings in the workspace: `loaded` fit the base, `skipped` do not."""
        return await run_in_threadpool(list_embeddings, service.engine.catalog)

    for path in NOTHING_HERE:  # features this server does not have: nothing of them to list
        api.add_api_route(path, _empty_list, methods=["GET"], summary=f"{path.rsplit('/', 1)[1]}: none here")

    @api.get("/sdapi/v1/upscalers")
    async def upscalers():
        """A1111's "None" upscaler only (no hires fix, no extras tab on this server)."""
        return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}]

    @api.get("/sdapi/v1/script-info")
    async def script_info():
        """The ControlNet script's arguments (one per unit, up to ``--max-controlnets``), for txt2img and img2img."""
        units = [{"label": f"ControlNet Unit {i}", "value": None, "minimum": None, "maximum": None, "step": None,
                  "choices": None} for i in range(service.config.max_controlnets)]
        return [{"name": "controlnet", "is_alwayson": True, "is_img2img": img2img, "args": units}
                for img2img in (False, True)]

    @api.get("/sdapi/v1/extensions")
    async def extensions():
        """The ControlNet extension's API, which this server has built in (docs/a1111.md)."""
        return [{"name": "sd-webui-controlnet", "remote": "https://github.com/Mikubill/sd-webui-controlnet",
                 "branch": "main", "commit_hash": "", "commit_date": 0,
                 "version": f"API {CONTROLNET_API_VERSION} (built into loramgr {__version__})", "enabled": True}]

    @api.get("/sdapi/v1/memory")
    async def memory():
        """A1111's shape: this process's RAM; CUDA memory when torch sees a GPU."""
        return await run_in_threadpool(memory_stats)

    @api.get("/sdapi/v1/cmd-flags")
    async def cmd_flags():
        """The A1111 flags that describe this server (never the credentials)."""
        c, ws = service.config, service.workspace
        return {"api": True, "nowebui": True, "listen": not is_loopback(c.host), "port": c.port,
                "data_dir": str(ws.home), "ckpt_dir": str(ws.base_models), "lora_dir": str(ws.adapters),
                "embeddings_dir": str(ws.adapters), "controlnet_dir": str(ws.adapters),
                "api_auth": None if c.api_auth is None else "(set)"}

    async def refresh():
        """Re-scan adapters/ now (new, changed and removed files); A1111 answers null."""
        await run_in_threadpool(service.engine.catalog.list)

    for path in REFRESH:
        api.add_api_route(path, refresh, methods=["POST"], summary="re-scan the workspace's adapters")

    return api


# -- the ControlNet extension's preprocessor API -----------------------------------------------------

# The extension's sliders (/controlnet/module_list's `module_detail`); the thresholds are canny's.
MODULE_DETAIL = {
    "none": {"model_free": False, "sliders": []},
    "canny": {"model_free": False, "sliders": [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}]},
}


class DetectRequest(BaseModel):
    """The extension's ``/controlnet/detect`` body (``controlnet_images`` is webuiapi's older name)."""

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_images: list[str] = Field(default_factory=list)
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = Field(-1, allow_inf_nan=False)
    controlnet_threshold_b: float = Field(-1, allow_inf_nan=False)
    controlnet_masks: list[str] = Field(default_factory=list)
    low_vram: bool = False


def detect(request: DetectRequest, config) -> dict:
    """Each image's map: `none` gives the image itself, `canny` the edges a unit with these settings
    computes (ControlNet's annotator: the short side at ``processor_res``, default 512, both sides
    rounded to multiples of 64), before they are fitted to an output size."""
    images, key = ((request.controlnet_input_images, "controlnet_input_images") if request.controlnet_input_images
                   else (request.controlnet_images, "controlnet_images"))
    if not images:
        raise CatalogError(422, "controlnet_input_images", "no image given")
    if len(images) > config.max_num_samples:
        raise CatalogError(422, key, f"{len(images)} images exceed this server's limit of "
                                     f"{config.max_num_samples} (--max-num-samples)")
    unit = ControlNetUnit(module=request.controlnet_module, processor_res=request.controlnet_processor_res,
                          threshold_a=request.controlnet_threshold_a, threshold_b=request.controlnet_threshold_b,
                          resize_mode="Just Resize")
    module, res = unit.module.strip().lower(), 512 if unit.processor_res < 0 else unit.processor_res
    maps = []
    for i, data in enumerate(images):
        image = rgb(decode_image(data, f"{key}.{i}", config.max_image_bytes, config.max_image_pixels,
                                 exif_orientation=True))
        h, w = image.shape[:2]  # the annotator's size (pipeline/canny.py resize_image): the map comes unfitted
        size = tuple(max(64, side) for side in reversed(output_size(h, w, res)))  # (width, height)
        if module == "canny" and size[0] * size[1] > config.max_image_pixels:
            raise CatalogError(413, "controlnet_processor_res", f"a {size[0]}x{size[1]} map exceeds the limit of "
                                                                f"{config.max_image_pixels:,} pixels")
        try:
            the_map = image if module == "none" else control_map(unit, "controlnet", image, *size,
                                                                   config.max_image_pixels)
        except CatalogError as exc:  # "controlnet.module" -> the request's "controlnet_module"
            raise CatalogError(exc.status, (exc.field or "").replace("controlnet.", "controlnet_"), exc.reason) from None
        maps.append(encode_png(np.ascontiguousarray(the_map)))
    return {"images": maps, "info": "Success"}


# -- lists ---------------------------------------------------------------------------------------------

NOTHING_HERE = ("/sdapi/v1/sd-vae", "/sdapi/v1/sd-modules", "/sdapi/v1/latent-upscale-modes",
                "/sdapi/v1/hypernetworks", "/sdapi/v1/face-restorers", "/sdapi/v1/realesrgan-models",
                "/sdapi/v1/prompt-styles")
REFRESH = ("/sdapi/v1/refresh-loras", "/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-vae")


async def _empty_list() -> list:
    """The base's own VAE and text encoder only, no hires fix, face restoration or prompt styles."""
    return []


def list_embeddings(catalog) -> dict:
    """A1111's ``/sdapi/v1/embeddings`` from the workspace's adapters of kind ``embedding``.

    Each comes from the catalog's embedding index (``{vectors, dim}`` and A1111's ``step``,
    ``sd_checkpoint``, ``sd_checkpoint_name``: docs/lora-format.md). One of another text width
    is ``skipped``, as A1111 skips one of another architecture; one that cannot be read is left
    out, as ``catalog.list`` leaves out unreadable files.
    """
    out: dict[str, dict] = {"loaded": {}, "skipped": {}}
    for entry in catalog.list():
        if entry["kind"] != "embedding" or len(entry["embeddings"]) != 1:
            continue
        found = next(iter(entry["embeddings"].values()))
        item = {"step": found.get("step"), "sd_checkpoint": found.get("sd_checkpoint"),
                "sd_checkpoint_name": found.get("sd_checkpoint_name"), "shape": found["dim"],
                "vectors": found["vectors"]}
        out["loaded" if entry["fits"] else "skipped"][entry["name"]] = item
    return out


def memory_stats() -> dict:
    """A1111's ``/sdapi/v1/memory``: ``ram`` (this process's RSS as used), ``cuda`` (or an error)."""
    import psutil

    total = psutil.virtual_memory().total
    rss = psutil.Process(os.getpid()).memory_info().rss
    ram = {"free": total - rss, "used": rss, "total": total}
    try:
        import torch

        if not torch.cuda.is_available():
            return {"ram": ram, "cuda": {"error": "unavailable"}}
        free, total_gpu = torch.cuda.mem_get_info()
        return {"ram": ram, "cuda": {"system": {"free": free, "used": total_gpu - free, "total": total_gpu}}}
    except Exception as exc:  # noqa: BLE001 - a broken CUDA setup is reported, as A1111 does
        return {"ram": ram, "cuda": {"error": f"{type(exc).__name__}: {exc}"}}
