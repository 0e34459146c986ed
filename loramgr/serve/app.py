"""The FastAPI application: a thin HTTP layer over :class:`Service`.

Routes, error mapping (every bad input is a 4xx JSON :class:`ErrorBody` naming the
field), credentials check, ``Host`` and ``Origin`` checks (DNS rebinding and cross-site
requests from a page the user opens), body size limit, drain, and the cancellation of a
generation whose client went away. The work is done by
:class:`~loramgr.serve.engine.Engine` (runtime) and :class:`~loramgr.serve.scheduler.Scheduler`
(queue and worker); :class:`Service` ties them together for any caller, HTTP or not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from contextvars import ContextVar
from importlib import resources

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from ..errors import LoramgrError
from ..manifest import CONTROLNET
from ..pipeline.schedulers import SCHEDULERS, SCHEDULES
from ..pipeline.settings import CONTROL_SCHEDULES
from ..workspace import Workspace
from .a1111_api import router as a1111_router
from .catalog import CatalogError, remove_stale_uploads
from .codec import encode_png
from .config import (MAX_ETA, MAX_JSON_DEPTH, MAX_LORA_WEIGHT, MAX_SCALE, MAX_STRENGTH, ServeConfig, host_allowed,
                     origin_allowed)
from .engine import Engine, Job, field_of
from .metrics import Metrics
from .scheduler import Cancelled, Draining, QueueFull, Scheduler
from .schemas import (AdapterList, ErrorBody, GenerateRequest, GenerateResponse, ServerInfo,
                      UploadResponse)

logger = logging.getLogger("loramgr.serve")

OPEN_PATHS = ("/healthz", "/", "/favicon.ico")  # no key needed: liveness and the static page (no data)
ENDPOINTS = ("/healthz", "/readyz", "/metrics", "/v1/generate", "/v1/adapters", "/v1/config", "/", "/docs",
             "/openapi.json")
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 409, 413, 422, 503)}
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")  # change nothing: no Origin check
CLIENT_GONE = 499  # nginx's "client closed request": what a cancelled request is counted as


class ClientWatch:
    """Tells when the HTTP client of the current request has gone away.

    It reads the server's own ASGI ``receive`` once the request body has been read: from
    then on the only message left is ``http.disconnect``, sent when the connection closes
    (or after the response was sent, when nobody waits any more). :class:`_Guard` installs
    one per request in :data:`CLIENT`, so every route that generates (native and A1111)
    can cancel its work without knowing about it.
    """

    def __init__(self, receive):
        self._receive = receive

    async def gone(self) -> None:
        """Return once the client has disconnected."""
        while (await self._receive())["type"] != "http.disconnect":
            pass


CLIENT: ContextVar[ClientWatch | None] = ContextVar("loramgr_client", default=None)


class Service:
    """Engine + scheduler + metrics: what the routes call."""

    def __init__(self, workspace: Workspace, config: ServeConfig, engine: Engine | None = None):
        self.workspace = workspace
        self.config = config
        self.engine = engine or Engine(workspace, config)
        self.metrics = Metrics()
        self.scheduler: Scheduler | None = None
        self.draining = False

    def start(self) -> None:
        remove_stale_uploads()
        if not self.engine.ready:
            self.engine.start()
        self.scheduler = Scheduler(self._execute, lambda: self.engine.current_key, policy=self.config.scheduling,
                                   max_queue=self.config.max_queue, max_overtake=self.config.max_overtake,
                                   steps=lambda job: job.steps)
        self._record_slots()
        self.metrics.ready.set(1)

    def _record_slots(self) -> None:
        if self.engine.runner is not None:
            self.metrics.record_slots(len(self.engine.runner.controlnet_slots()), self.engine.manifest.graphs[CONTROLNET])

    def _execute(self, job: Job):
        self.metrics.in_flight.set(1)
        self.metrics.queue_depth.set(self.scheduler.depth)
        reopens = self.engine.reopens
        try:
            generation = self.engine.run(job)
        except Cancelled:
            self.metrics.generations.labels("cancelled").inc()
            self.metrics.cancelled.labels("running").inc()
            raise
        except Exception:
            self.metrics.generations.labels("failed").inc()
            raise
        finally:
            self.metrics.in_flight.set(0)
            self.metrics.reopens.inc(self.engine.reopens - reopens)  # a failed swap re-opens the runner too
            self._record_slots()  # a swap fills slots, failed or not
        self.metrics.generations.labels("ok").inc()
        if generation.swapped:
            self.metrics.swaps.inc()
            self.metrics.swap_seconds.observe(generation.timings["swap"])
        self.metrics.denoise_seconds.observe(generation.timings.get("denoise", 0.0))
        return generation

    def begin_drain(self) -> None:
        self.draining = True
        self.metrics.ready.set(0)
        if self.scheduler is not None:
            self.scheduler.drain()

    def stop(self) -> None:
        self.begin_drain()
        if self.scheduler is not None:
            self.scheduler.close()
        self.engine.close()

    async def generate(self, request: GenerateRequest) -> dict:
        start = time.perf_counter()
        job = await run_in_threadpool(self.engine.prepare, request)
        future = self.scheduler.submit(job, job.key)
        self.metrics.queue_depth.set(self.scheduler.depth)
        generation, wait = await self._outcome(job, future)
        self.metrics.queue_seconds.observe(wait)
        images = await run_in_threadpool(lambda: [encode_png(i) for i in generation.images])
        control_maps = await run_in_threadpool(lambda: [encode_png(m) for m in generation.control_maps])
        t = generation.timings
        height, width = generation.images[0].shape[:2]
        total = time.perf_counter() - start
        self.metrics.total_seconds.observe(total)
        return {
            "images": images, "control_map": control_maps[0] if control_maps else None, "control_maps": control_maps,
            "adapters": job.applied, "control": job.controls[0] if job.controls else "none",
            "controls": job.controls,
            "seed": generation.settings.seed, "base": self.engine.base, "backend": self.config.backend,
            "width": width, "height": height, "swapped": generation.swapped,
            "timings": {"queue_wait": wait, "swap": t["swap"], "encode": t.get("encode_prompt", 0.0),
                        "prepare_control": t.get("prepare_control", 0.0),
                        "prepare_latents": t.get("prepare_latents", 0.0), "denoise": t.get("denoise", 0.0),
                        "decode": t.get("decode", 0.0), "total": total},
            "settings": self.engine.settings_dict(generation.settings),
        }

    async def _outcome(self, job: Job, future: Future):
        """The job's result; if the client goes away first, the job is cancelled and a 499 raised.

        A queued job leaves the queue at once; a running one stops at its next denoising
        step (the engine's step hook raises :class:`Cancelled` in the worker).
        """
        result = asyncio.wrap_future(future)
        client = CLIENT.get()
        if client is None:  # not over HTTP (a test, Ray's replica): nobody to watch
            return await result
        gone = asyncio.ensure_future(client.gone())
        try:
            await asyncio.wait((result, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if result.done():
            return result.result()
        if self.scheduler.cancel(future):
            self.metrics.cancelled.labels("queued").inc()
            self.metrics.queue_depth.set(self.scheduler.depth)
        else:
            job.cancel.set()  # running: the worker counts it when it stops
        result.cancel()
        raise CatalogError(CLIENT_GONE, None, "the client closed the connection: generation cancelled")

    def info(self) -> dict:
        c = self.config
        return {"base": self.engine.base, "backend": c.backend, "scheduling": c.scheduling,
                "defaults": {**self.engine.defaults.as_dict(), "control": "canny"},
                "limits": {"max_resolution": c.max_resolution, "max_steps": c.max_steps,
                           "max_num_samples": c.max_num_samples, "max_image_bytes": c.max_image_bytes,
                           "max_image_pixels": c.max_image_pixels, "max_upload_bytes": c.max_upload_bytes,
                           "max_queue": c.max_queue, "max_overtake": c.max_overtake,
                           "max_controlnets": c.max_controlnets,
                           "max_lora_weight": MAX_LORA_WEIGHT, "max_strength": MAX_STRENGTH,
                           "max_scale": MAX_SCALE, "max_eta": MAX_ETA, "max_json_depth": MAX_JSON_DEPTH},
                "schedulers": sorted(SCHEDULERS), "schedules": list(SCHEDULES),
                "control_schedules": list(CONTROL_SCHEDULES)}


def _error(status: int, field: str | None, reason: str, headers: dict | None = None) -> JSONResponse:
    message = f"{field}: {reason}" if field else reason
    return JSONResponse({"error": message, "field": field, "reason": reason}, status_code=status, headers=headers)


class _Guard:
    """ASGI middleware: Host and Origin, drain, credentials (serve/auth.py), body size limit, request metrics,
    client watch."""

    def __init__(self, app, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            response = self._refuse(scope, path)
            if response is not None:
                return await response(scope, receive, send_counted)
            limit = self._body_limit(path)
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                return await _error(413, "body", f"request body of {int(length):,} bytes exceeds the limit of "
                                                 f"{limit:,} bytes")(scope, receive, send_counted)
            received = 0

            async def receive_limited():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise StarletteHTTPException(413, f"request body exceeds the limit of {limit:,} bytes")
                return message

            token = CLIENT.set(ClientWatch(receive))
            try:
                await self.app(scope, receive_limited, send_counted)
            finally:
                CLIENT.reset(token)
        finally:
            self.service.metrics.requests.labels(endpoint, str(status["code"])).inc()

    def _body_limit(self, path: str) -> int:
        config = self.service.config
        return config.max_upload_bytes + (1 << 20) if path == "/v1/adapters" else config.max_body_bytes

    def _refuse(self, scope, path: str):
        service = self.service
        if path == "/healthz":
            return None
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if host and not host_allowed(service.config, host):
            return _error(400, "host", f"Host {host!r} is not this server's address (a DNS rebinding page sends "
                                       "its own name); add the name with --allowed-hosts")
        origin = headers.get(b"origin")
        if scope["method"] not in SAFE_METHODS and origin is not None \
                and not origin_allowed(service.config, origin.decode("latin-1"), host):
            return _error(403, "origin", f"cross-origin {scope['method']} from {origin.decode('latin-1')!r} refused "
                                         "(a page of another site); allow the origin with --cors-origins")
        if service.draining and path not in ("/metrics",) and path not in OPEN_PATHS:
            return _error(503, None, "the server is shutting down", {"Retry-After": "5"})
        access = service.config.access  # read per request: the config may be replaced
        if access.required and path not in OPEN_PATHS:
            if not access.allows(headers.get(b"authorization", b"").decode("latin-1")):
                return _error(401, "authorization", f"valid credentials are required ({access.wanted})",
                              {"WWW-Authenticate": access.challenge})
        return None


def create_app(workspace: Workspace, config: ServeConfig, service: Service | None = None) -> FastAPI:
    """The application; the runner opens in its lifespan (so ``/readyz`` is 503 until it is open)."""
    service = service or Service(workspace, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(service.start)
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(title="loramgr serve", version="1", lifespan=lifespan,
                  description="SD1.5 + ControlNet with per-request LoRA / ControlNet hot swap. "
                              "Contract: docs/serving.md.")
    app.state.service = service
    app.add_middleware(_Guard, service=service)
    if config.cors_origins:  # outside the guard: it answers preflights, which carry no key
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return _error(400, "body", f"malformed JSON ({first.get('ctx', {}).get('error', first['msg'])})")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        return _error(422, ".".join(loc) or "body", first.get("msg", "invalid"))

    @app.exception_handler(CatalogError)
    async def _catalog(request, exc: CatalogError):
        return _error(exc.status, exc.field, exc.reason)

    @app.exception_handler(LoramgrError)
    async def _loramgr(request, exc: LoramgrError):  # bad input found late (in the pipeline)
        return _error(422, field_of(str(exc)), str(exc))

    @app.exception_handler(QueueFull)
    async def _full(request, exc: QueueFull):
        return _error(503, None, str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(Draining)
    async def _draining(request, exc: Draining):
        return _error(503, None, "the server is shutting down", {"Retry-After": "5"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        field = "body" if exc.status_code in (400, 413) else None
        return _error(exc.status_code, field, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        logger.exception("internal error")
        return _error(500, None, f"internal error ({type(exc).__name__}); the server goes on")

    @app.get("/healthz", tags=["ops"])
    async def healthz():
        """The process is alive (no key needed)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses=ERRORS)
    async def readyz():
        """The runner is open and requests are accepted."""
        if not service.engine.ready or service.scheduler is None:
            return _error(503, None, "the runner is not open")
        return {"ready": True, "base": service.engine.base, "queue_depth": service.scheduler.depth,
                "startup": service.engine.startup}

    @app.get("/metrics", tags=["ops"])
    async def metrics():
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/config", response_model=ServerInfo, tags=["v1"])
    async def config_():
        """Base, generation defaults (those of `loramgr run`), limits and choices."""
        return service.info()

    @app.get("/v1/adapters", response_model=AdapterList, tags=["v1"])
    async def list_adapters():
        """Adapters in the workspace (new files are picked up without a restart)."""
        return {"base": service.engine.base, **await run_in_threadpool(service.engine.catalog.listing)}

    @app.post("/v1/adapters", response_model=UploadResponse, status_code=201, tags=["v1"], responses=ERRORS)
    async def upload_adapter(file: UploadFile = File(..., description="a .safetensors LoRA or ControlNet, or a "
                                                               "textual-inversion embedding (.safetensors, .pt, .bin)"),
                             name: str | None = Form(None), kind: str | None = Form(None),
                             strict: bool = Form(False), default_weight: float = Form(1.0),
                             overwrite: bool = Form(False)):
        """Convert an uploaded adapter or embedding into the workspace with `loramgr convert`'s checks."""
        return await run_in_threadpool(
            service.engine.catalog.upload, file.file, file.filename or "", name=name or None, kind=kind or None,
            strict=strict, default_weight=default_weight, overwrite=overwrite,
            max_bytes=service.config.max_upload_bytes)

    @app.post("/v1/generate", response_model=GenerateResponse, tags=["v1"], responses=ERRORS)
    async def generate(request: GenerateRequest):
        """Generate with the request's adapters; omitted fields take `loramgr run`'s defaults."""
        if not service.engine.ready or service.scheduler is None:
            return _error(503, None, "the runner is not open", {"Retry-After": "5"})
        return await service.generate(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(resources.files("loramgr.serve").joinpath("static/index.html").read_text("utf-8"))

    app.include_router(a1111_router(service))  # the A1111 web-UI API: docs/a1111.md
    return app
