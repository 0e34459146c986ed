"""``loramgr serve --ray``: the set id, the deployment settings and the Serve config file.

Nothing here imports Ray, so ``--write-config`` and :func:`set_id` work without the
``ray`` extra; :mod:`.ray_serve` holds the deployments (docs/ray.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..workspace import atomic_path
from .config import ServeConfig

APP_NAME = "loramgr"
IMPORT_PATH = "loramgr.serve.ray_serve:build_app"
GENERATOR = "Generator"
INGRESS = "Ingress"
HEADER = "serve_multiplexed_model_id"  # Ray Serve's header: clients may set the set id themselves
DEFAULT_SETS_PER_REPLICA = 3  # Ray's own default for max_num_models_per_replica


def set_id(request) -> str:
    """The multiplexed id of a request's adapter set: ``CONTROLNETS|NAME:WEIGHT,...``, both sorted.

    The same set written in another order gets the same id, so it is routed to the same
    replica (its image may differ in the last bits: the weights are summed in request
    order). A weight left out is written ``default``; the ingress never opens adapter files.
    The ControlNets are those the units use (``none`` without units).
    Examples: ``canny``, ``canny|sv_a:0.8``, ``sv_hed|sv_a:0.5,sv_b:default``, ``canny+sv_hed``.
    """
    loras = sorted((spec.name, "default" if spec.weight is None else repr(float(spec.weight)))
                   for spec in request.loras)
    items = ",".join(f"{name}:{weight}" for name, weight in loras)
    names = [request.control] if request.controls is None else [unit.name for unit in request.controls]
    controls = "+".join(sorted(set(names))) or "none"
    return f"{controls}|{items}" if items else controls


def parse_autoscale(text: str) -> tuple[int, int]:
    """``MIN,MAX`` replicas for Ray's autoscaler."""
    low, sep, high = text.partition(",")
    try:
        bounds = (int(low), int(high)) if sep else None
    except ValueError:
        bounds = None
    if bounds is None:
        raise ValueError(f"--autoscale {text!r}: expected MIN,MAX replicas, e.g. 1,4")
    return bounds


@dataclass(frozen=True)
class RayOptions:
    """How the service is spread over Ray: replicas of ``Generator``, each one base and one runner."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; replaces ``replicas``
    sets_per_replica: int = DEFAULT_SETS_PER_REPLICA
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    address: str | None = None  # an existing cluster (``auto``, ``ray://host:10001``); None: start one here

    def __post_init__(self):
        if self.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {self.replicas}")
        if self.autoscale is not None:
            low, high = self.autoscale
            if not 0 <= low <= high or high < 1:
                raise ValueError(f"--autoscale {low},{high}: need 0 <= MIN <= MAX and MAX >= 1")
        if self.sets_per_replica < 1:
            raise ValueError(f"--sets-per-replica must be at least 1, got {self.sets_per_replica}")
        if self.cpus_per_replica < 0 or self.gpus_per_replica < 0:
            raise ValueError("--cpus-per-replica and --gpus-per-replica must not be negative")

    def generator_options(self, config: ServeConfig) -> dict:
        """Deployment options of ``Generator`` (the ``deployments`` entry of the Serve config)."""
        scale = ({"autoscaling_config": {"min_replicas": self.autoscale[0], "max_replicas": self.autoscale[1]}}
                 if self.autoscale else {"num_replicas": self.replicas})
        actor = {"num_cpus": self.cpus_per_replica}
        if self.gpus_per_replica:
            actor["num_gpus"] = self.gpus_per_replica
        # A replica queues up to max_queue requests itself (then 503 + Retry-After): Ray may
        # send it that many, so requests for its sets wait there instead of spilling elsewhere.
        return {**scale, "max_ongoing_requests": config.max_queue + 1, "ray_actor_options": actor,
                "graceful_shutdown_timeout_s": 120}


def app_args(home: Path | str, config: ServeConfig, sets_per_replica: int, *, with_api_key: bool = False) -> dict:
    """The builder's arguments (``args`` in the Serve config). The API key and credentials only when
    asked: a config file gets them from ``LORAMGR_API_KEY`` / ``LORAMGR_API_AUTH`` in the replicas'
    environment instead. The host stays: the ingress answers only requests whose ``Host`` names it
    (docs/serving.md, Security)."""
    fields = dataclasses.asdict(config)
    for name in ("port",) + (() if with_api_key else ("api_key", "api_auth")):
        fields.pop(name)
    return {"home": str(Path(home).resolve()), "config": fields, "sets_per_replica": sets_per_replica}


def serve_config(home: Path | str, config: ServeConfig, options: RayOptions) -> dict:
    """The Serve config (``serve deploy FILE``) that deploys what ``loramgr serve --ray`` runs."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": config.host, "port": config.port},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": app_args(home, config, options.sets_per_replica),
            "deployments": [
                {"name": GENERATOR, **options.generator_options(config)},
                {"name": INGRESS, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
            ],
        }],
    }


def write_serve_config(path: Path | str, home: Path | str, config: ServeConfig, options: RayOptions) -> Path:
    import yaml

    text = ("# loramgr serve --ray as a Ray Serve config: `serve deploy THIS_FILE` (docs/ray.md).\n"
            "# The workspace path must exist on every node; the API key comes from LORAMGR_API_KEY there.\n"
            + yaml.safe_dump(serve_config(home, config, options), sort_keys=False))
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, "utf-8")
    return path
