"""The A1111 routes (``/sdapi/v1/...``, ``/controlnet/...``) over :class:`~loramgr.serve.app.Service`.

Generation goes through :func:`loramgr.serve.a1111.plan` (A1111 request -> native requests)
and then :meth:`Service.generate`, one image at a time; the lists and options read the
engine's base and catalog. :class:`Progress` watches the denoising steps through the
engine's ``progress`` hook: ``/sdapi/v1/progress`` reads it and ``/sdapi/v1/interrupt``
stops the running generation at its next step. docs/a1111.md is the contract.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from fastapi import APIRouter, Body
from fastapi.concurrency import run_in_threadpool

from .. import __version__
from ..errors import LoramgrError
from .a1111 import (BASE_CONTROLNET, CONTROL_MODULES, A1111Request, A1111Response,
                    Img2ImgRequest, Plan, a1111_field, plan)
from .a1111_samplers import SAMPLERS, SCHEDULES
from .catalog import CatalogError
from .engine import field_of
from .schemas import ErrorBody

ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 409, 413, 422, 503)}
CONTROLNET_API_VERSION = 2  # what the ControlNet extension's /controlnet/version answers


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
                "state": {"skipped": False, "interrupted": self.interrupt_run is not None, "job": "",
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

    async def generate(request: A1111Request, img2img: bool) -> dict:
        if not service.engine.ready or service.scheduler is None:
            raise CatalogError(503, None, "the runner is not open")
        the_plan = await run_in_threadpool(plan, request, service.config, img2img=img2img)
        unit = the_plan.control["unit"] if the_plan.control else None
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
                raise CatalogError(exc.status, a1111_field(exc.field, request, unit), exc.reason) from None
            except LoramgrError as exc:  # found late, in the pipeline
                raise CatalogError(422, a1111_field(field_of(str(exc)), request, unit), str(exc)) from None
        return respond(request, the_plan, results, interrupted, img2img)

    def respond(request: A1111Request, the_plan: Plan, results: list[dict], interrupted: bool,
                img2img: bool) -> dict:
        n = len(results)
        first = results[0]
        images = [r["images"][0] for r in results]
        if the_plan.control is not None:  # the detected map after the images, as the ControlNet extension
            images.append(first["control_map"])
        seeds = the_plan.seeds[:n]
        hashes = ", ".join(f"{a['name']}: {a['sha256'][:12]}" for a in first["adapters"] if a["kind"] == "lora")
        _, fingerprint = base_title()
        infotext = (f"{request.prompt}\nNegative prompt: {request.negative_prompt}\nSteps: {request.steps}, "
                    f"Sampler: {the_plan.sampler_name}, Schedule type: {SCHEDULES[the_plan.schedule].label}, "
                    f"CFG scale: {request.cfg_scale}, Seed: {{seed}}, Size: {first['width']}x{first['height']}, "
                    f"Model: {service.engine.base}"
                    + (f", Lora hashes: \"{hashes}\"" if hashes else "") + f", Version: loramgr {__version__}")
        info = {
            "prompt": request.prompt, "all_prompts": [request.prompt] * n,
            "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * n,
            "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
            "width": first["width"], "height": first["height"], "sampler_name": the_plan.sampler_name,
            "scheduler": the_plan.schedule, "cfg_scale": request.cfg_scale, "steps": request.steps,
            "batch_size": request.batch_size, "n_iter": request.n_iter,
            "denoising_strength": getattr(request, "denoising_strength", None) if img2img else None,
            "eta": first["settings"]["eta"], "sd_model_name": service.engine.base, "sd_model_hash": fingerprint[:10],
            "index_of_first_image": 0, "infotexts": [infotext.replace("{seed}", str(s)) for s in seeds],
            "extra_generation_params": {"Lora hashes": hashes} if hashes else {},
            "clip_skip": 1, "version": f"loramgr {__version__}",
            "loramgr": {
                "base": first["base"], "backend": first["backend"], "adapters": first["adapters"],
                "control": the_plan.control, "seeds": seeds, "swapped": [r["swapped"] for r in results],
                "timings": [r["timings"] for r in results], "ignored_fields": the_plan.ignored,
                "warnings": the_plan.warnings, "interrupted": interrupted,
            },
        }
        parameters = request.model_dump()
        if img2img and not parameters.pop("include_init_images", False):
            parameters["init_images"] = None
        return {"images": images, "parameters": parameters, "info": json.dumps(info)}

    @api.post("/sdapi/v1/txt2img", response_model=A1111Response, responses=ERRORS)
    async def txt2img(request: A1111Request):
        """A1111 text-to-image; `<lora:NAME:WEIGHT>` tags and one ControlNet unit in `alwayson_scripts`."""
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
                "control_net_unit_count": 1}

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
        return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}

    @api.get("/controlnet/model_list")
    async def controlnet_models():
        adapters = await run_in_threadpool(service.engine.catalog.list)
        return {"model_list": [BASE_CONTROLNET, *(a["name"] for a in adapters
                                                  if a["kind"] == "controlnet" and a["fits"])]}

    @api.get("/controlnet/module_list")
    async def controlnet_modules():
        return {"module_list": list(CONTROL_MODULES)}

    @api.get("/controlnet/version")
    async def controlnet_version():
        return {"version": CONTROLNET_API_VERSION}

    return api
