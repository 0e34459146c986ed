"""``loramgr serve --ray``: the service as a Ray Serve application, one runner per replica.

Two deployments (docs/ray.md):

* ``Generator``: N replicas (or autoscaled), each a :class:`~loramgr.serve.app.Service` with
  its own engine (one base, one runner) and scheduler. ``generate`` registers the request's
  set id through ``@serve.multiplexed``, so Ray's router sends later requests with that id to
  this replica, and answers with the replica's id.
* ``Ingress``: the same FastAPI app as ``loramgr serve`` (routes, auth, limits, error bodies)
  over a :class:`RayService` that forwards each generation to ``Generator`` with the set id
  from the ``serve_multiplexed_model_id`` header, else derived from the body (:func:`set_id`).

Routing is a preference, never a condition of correctness: a replica that holds another set
swaps to the request's own adapters, exactly as ``loramgr serve`` does.

A cluster started here (:func:`init_local`) listens on loopback only, and SIGTERM drains
the ingress before Serve and Ray are stopped (:func:`run`); docs/ray.md, "Network and shutdown".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from ..bases import OpenBase
from ..defaults import base_defaults
from ..errors import LoramgrError
from ..workspace import Workspace
from .app import Service, create_app
from .catalog import AdapterCatalog, CatalogError
from .config import ENV_API_AUTH, ServeConfig, is_loopback
from .ray_config import APP_NAME, GENERATOR, INGRESS, RayOptions, app_args, set_id
from .scheduler import Draining, QueueFull, SchedulerStats
from .schemas import GenerateRequest

logger = logging.getLogger("loramgr.serve")

RETRY_AFTER_S = 5
# Ray's single-node mode (its default on macOS / Windows): every server of the node on loopback.
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
SHUTDOWN_WAIT_LOOP_S = 0.2  # how often a stopping replica checks for requests left (Ray's default: 2 s)


class ReplicaLost(Exception):
    """The replica running a generation died before answering: the client may send it again."""


def _config(fields: dict) -> ServeConfig:
    known = {f.name for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise LoramgrError(f"args.config: unknown field {unknown[0]!r} for this loramgr version; write the Serve "
                           "config again with `loramgr serve --write-config`")
    config = ServeConfig(**fields)
    return dataclasses.replace(config, api_key=config.api_key or ServeConfig.api_key_from_env(),
                               api_auth=config.api_auth or os.environ.get(ENV_API_AUTH) or None)


@dataclasses.dataclass
class HeldSet:
    """What ``@serve.multiplexed`` keeps per replica: a set id this replica advertises to the router.

    The runner holds one set at a time (the last one run); the held ids are the replica's
    ``sets_per_replica`` most recent ones, for which Ray's router prefers this replica.
    Nothing is loaded here: the adapters are read (and cached) by the engine's catalog.
    """

    set_id: str


def _replica_grpc_on_loopback() -> None:
    """On a loopback node, bind this replica's inter-deployment gRPC server to loopback too.

    Ray Serve 2.60 starts that server (used only with ``RAY_SERVE_USE_GRPC_BY_DEFAULT``) on
    ``[::]:0`` whatever the node's address, with no option to change it (ray-project/ray#64623
    adds a port range, not a host): the one listener of a local cluster that would stay
    reachable from the network. Ray binds its own servers to loopback on a loopback node; this
    does the same for the replica's, and changes nothing on a node with a routable address.
    Called in the deployments' constructors, which Serve runs before it starts the server.
    """
    import ray
    from ray._common.network_utils import build_address
    from ray.serve._private import replica

    node_ip = ray.util.get_node_ip_address()
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or not is_loopback(node_ip):
        return

    def loopback(server, address: str) -> int:
        host, _, port = address.rpartition(":")
        return bind(server, build_address(node_ip, int(port)) if host in ("[::]", "0.0.0.0") else address)

    replica.add_port_to_grpc_server = loopback


@serve.deployment(name=GENERATOR, graceful_shutdown_timeout_s=120, graceful_shutdown_wait_loop_s=SHUTDOWN_WAIT_LOOP_S)
class Generator:
    """One replica: a started :class:`Service` (engine + scheduler) on the workspace's base."""

    def __init__(self, home: str, config: dict, sets_per_replica: int):
        _replica_grpc_on_loopback()
        self.service = Service(Workspace.resolve(home), _config(config))
        self.service.start()
        self.replica = serve.get_replica_context().replica_id.unique_id

        async def hold(model_id: str) -> HeldSet:
            return HeldSet(model_id)

        # Wired here, not as a decorated method, so sets_per_replica can come from the config.
        self._hold = serve.multiplexed(max_num_models_per_replica=sets_per_replica)(hold)

    async def generate(self, request: GenerateRequest) -> dict:
        """``{"result": response}`` or ``{"error": [kind, ...]}`` (exceptions do not cross Ray intact)."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self._hold(model_id)
        try:
            result = await self.service.generate(request)
        except CatalogError as exc:
            return {"error": ["catalog", exc.status, exc.field, exc.reason]}
        except QueueFull as exc:
            return {"error": ["queue_full", exc.retry_after]}
        except Draining:
            return {"error": ["draining"]}
        except LoramgrError as exc:  # bad input found late, in the pipeline
            return {"error": ["input", str(exc)]}
        return {"result": {**result, "replica": self.replica, "set_id": model_id or None}}

    def stats(self) -> dict:
        """This replica's counters (tests and operators: swaps, re-opens, what the runner holds)."""
        engine = self.service.engine
        return {"replica": self.replica, "pid": os.getpid(), "rss_mib": _rss_mib(), "swaps": engine.swaps,
                "reopens": engine.reopens, "current": [list(k[:3]) for k in engine.current_key],
                "completed": self.service.scheduler.stats.completed}

    def check_health(self) -> None:
        if not self.service.engine.ready:
            raise RuntimeError("the runner is not open")

    def __del__(self):
        service = getattr(self, "service", None)
        if service is not None:
            service.stop()  # Ray calls this after the replica's requests finished (graceful shutdown)


def _rss_mib() -> float:
    """This process's resident memory (Linux), for the memory per replica in docs/ray.md."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0.0
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(found.group(1)) / 1024 if found else 0.0


class _BaseView:
    """What the ingress's routes read from an engine: the base, its manifest and adapters; no runner."""

    def __init__(self, workspace: Workspace, config: ServeConfig):
        opened = OpenBase.resolve(workspace, config.base)
        self.base = opened.name
        self.manifest = opened.manifest
        self.defaults = base_defaults(opened)
        self.catalog = AdapterCatalog(workspace, self.manifest)
        self.ready = False
        self.startup: dict = {}
        self.progress = None  # the A1111 progress hook: generations run in the replicas

    def close(self) -> None:
        self.ready = False


class _Forwarded:
    """The ingress's scheduler: counts generations forwarded to the replicas (they queue there)."""

    def __init__(self):
        self.stats = SchedulerStats()
        self.accepting = True
        self._idle = asyncio.Event()  # no generation forwarded and unanswered
        self._idle.set()

    @property
    def depth(self) -> int:
        return self.stats.queued

    @contextlib.contextmanager
    def forwarding(self) -> Iterator[None]:
        """One generation on its way to a replica and back."""
        self.stats.queued += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.stats.queued -= 1
            if not self.stats.queued:
                self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def drain(self) -> None:
        self.accepting = False

    def close(self, timeout: float | None = None) -> None:
        self.drain()


class RayService(Service):
    """The ingress's :class:`Service`: the same routes, generations forwarded to ``Generator``."""

    def __init__(self, workspace: Workspace, config: ServeConfig, generator: DeploymentHandle):
        super().__init__(workspace, config, engine=_BaseView(workspace, config))
        self.generator = generator

    def start(self) -> None:
        self.scheduler = _Forwarded()
        self.engine.ready = True
        self.engine.startup = {"ray_app": APP_NAME, "deployment": GENERATOR}
        self.metrics.ready.set(1)

    async def generate(self, request: GenerateRequest) -> dict:
        if not self.scheduler.accepting:
            raise Draining()
        start = time.perf_counter()
        model_id = serve.get_multiplexed_model_id() or set_id(request)
        stats = self.scheduler.stats
        try:
            with self.scheduler.forwarding():
                self.metrics.queue_depth.set(stats.queued)
                reply = await self.generator.options(multiplexed_model_id=model_id).generate.remote(request)
        except RayActorError as exc:  # ActorDiedError, ActorUnavailableError
            stats.failed += 1
            self.metrics.generations.labels("failed").inc()
            logger.warning("a replica was lost during a generation (%s); the client may retry", type(exc).__name__)
            raise ReplicaLost() from None
        finally:
            self.metrics.queue_depth.set(stats.queued)
        if "error" in reply:
            stats.failed += 1
            raise _exception(reply["error"])
        result = reply["result"]
        stats.completed += 1
        self.metrics.generations.labels("ok").inc()
        if result["swapped"]:
            self.metrics.swaps.inc()
            self.metrics.swap_seconds.observe(result["timings"]["swap"])
        self.metrics.denoise_seconds.observe(result["timings"]["denoise"])
        self.metrics.queue_seconds.observe(result["timings"]["queue_wait"])
        self.metrics.total_seconds.observe(time.perf_counter() - start)
        return result

    def stop(self) -> None:
        self.begin_drain()
        self.engine.close()


def _exception(error: list) -> Exception:
    kind, *args = error
    if kind == "catalog":
        return CatalogError(*args)
    if kind == "queue_full":
        return QueueFull(*args)
    if kind == "draining":
        return Draining()
    return LoramgrError(*args)


@serve.deployment(name=INGRESS, num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024,
                  graceful_shutdown_wait_loop_s=SHUTDOWN_WAIT_LOOP_S)
@serve.ingress()
class Ingress:
    """The HTTP app of ``loramgr serve`` behind Ray's proxy; built in the replica (it holds locks and a catalog)."""

    async def __init__(self, generator: DeploymentHandle, home: str, config: dict):
        _replica_grpc_on_loopback()
        self._generator = generator
        self._workspace = Workspace.resolve(home)
        self._config = _config(config)
        self._service = RayService(self._workspace, self._config, generator)
        await generator.stats.remote()  # ready (/readyz 200) once a replica's runner is open

    async def drain(self) -> None:
        """Stop accepting generations (503 + Retry-After) and return once every accepted one is answered."""
        self._service.begin_drain()
        await self._service.scheduler.wait_idle()

    def __serve_build_asgi_app__(self):
        from .app import _error

        app = create_app(self._workspace, self._config, self._service)

        @app.exception_handler(ReplicaLost)
        async def _lost(request, exc: ReplicaLost):
            return _error(503, None, "the replica running this generation stopped (Ray restarts it); send the "
                                     "request again", {"Retry-After": str(RETRY_AFTER_S)})

        return app


def application(home, config: ServeConfig, options: RayOptions, *, with_api_key: bool = True):
    """The Serve application (``serve.run`` it); deployment options from ``options``."""
    args = app_args(home, config, options.sets_per_replica, with_api_key=with_api_key)
    generator = Generator.options(**options.generator_options(config)).bind(
        args["home"], args["config"], args["sets_per_replica"])
    return Ingress.bind(generator, args["home"], args["config"])


def build_app(args: dict):
    """The builder named in the Serve config (``import_path``): deployment options come from its file."""
    generator = Generator.bind(args["home"], args["config"], int(args["sets_per_replica"]))
    return Ingress.bind(generator, args["home"], args["config"])


def init_local(**options) -> None:
    """``ray.init`` a new single-node cluster of our own whose servers all listen on loopback.

    ``_node_ip_address="127.0.0.1"`` does not do it: ``ray.init`` replaces a loopback node
    address by the machine's outward one. Ray keeps a node on loopback in its single-node
    mode, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which the processes it starts inherit
    from the environment; this process read the variable when it imported ``ray``, so its
    copy (``ray_constants.ENABLE_RAY_CLUSTER``) is set too. docs/ray.md lists each listener.
    """
    import ray
    from ray._private import ray_constants

    os.environ[SINGLE_NODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", include_dashboard=False, **options)


def run(workspace: Workspace, config: ServeConfig, options: RayOptions, log_level: str = "info") -> int:
    """Start (or join) a Ray cluster, deploy, serve until SIGINT / SIGTERM, drain, then take it all down."""
    import ray

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    logs = {"logging_level": log_level.upper(), "log_to_driver": log_level in ("debug", "info")}
    if options.address:
        ray.init(address=options.address, include_dashboard=False, **logs)
    else:
        init_local(**logs)  # always a new cluster, never one found on this machine: we stop it on exit
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own (abort) handler
        signal.signal(sig, lambda *_: stop.set())
    deployed = False
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        scale = (f"{options.autoscale[0]}-{options.autoscale[1]} replicas (autoscaled)" if options.autoscale
                 else f"{options.replicas} replica{'s' * (options.replicas > 1)}")
        print(f"deploying on Ray: {scale}, {options.sets_per_replica} adapter sets per replica", flush=True)
        serve.run(application(workspace.home, config, options), name=APP_NAME, route_prefix="/")
        deployed = True
        print(f"serving on http://{config.host}:{config.port} (Ray Serve); Ctrl-C or SIGTERM stops", flush=True)
        stop.wait()
        print("stopping: accepted generations finish first", flush=True)
        serve.get_app_handle(APP_NAME).drain.remote().result(timeout_s=None)
    finally:
        if deployed or options.address:  # a cluster we joined keeps running, without our application
            # Each replica stops once its requests are done: the ingress's last responses reach
            # Ray's proxy, which serve.shutdown kills without a drain of its own.
            serve.delete(APP_NAME)
        if not options.address:
            serve.shutdown()
        ray.shutdown()
    return 0
