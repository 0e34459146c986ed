"""What one ``loramgr serve`` process is configured with: limits, security, scheduling.

Every limit has a flag of the same name on ``loramgr serve`` (``max_resolution`` is
``--max-resolution``). The defaults are sized for SD1.5 on one machine: a request beyond
a limit gets a 4xx naming the field, never a half-run generation.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from functools import cached_property
from urllib.parse import urlsplit

from .auth import Access

ENV_API_KEY = "LORAMGR_API_KEY"
ENV_API_AUTH = "LORAMGR_API_AUTH"  # USER:PASS[,USER2:PASS2], as A1111's --api-auth
SCHEDULING = ("grouping", "fifo")

# Ranges of the numbers a request carries (docs/serving.md, "Hostile input"). Every number must
# also be finite in float32, the type the runtime computes in: 1e39 is a float64 but not a float32.
MAX_LORA_WEIGHT = 100.0  # |weight| of a LoRA: loras[].weight, <lora:NAME:W>, an upload's default_weight
MAX_STRENGTH = 10.0  # ControlNet strength (an A1111 unit's weight)
MAX_SCALE = 100.0  # classifier-free guidance scale (cfg_scale)
MAX_ETA = 1.0  # DDIM's eta
MAX_JSON_DEPTH = 32  # nesting of request fields loramgr does not read (A1111's free-form fields)
# --max-steps at most: SD1.5's schedulers have 1000 training timesteps, and DDIM with
# steps_offset 1 indexes timestep 1000 (an IndexError) at 1000 steps.
STEPS_CEILING = 999


@dataclass(frozen=True)
class ServeConfig:
    """Settings of the service (not of a generation: those come with each request).

    ``swap_budget_mb``: how much memory the swappable buffers may take at start-up.
    Every workspace adapter that fits the base is declared swappable up front while the
    sum of the base weights it touches (bytes held as owned buffers) stays within the
    budget; an adapter outside that set (or added later) costs one session re-creation
    the first time it is used, and is swappable from then on.
    """

    base: str | None = None
    backend: str = "ort-cpu"
    ort_optimization: str = "basic"
    hot_swap: bool = True
    fuse_attention: bool = True
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = field(default=None, repr=False)
    api_auth: str | None = field(default=None, repr=False)  # HTTP Basic credentials (serve/auth.py)
    scheduling: str = "grouping"
    max_queue: int = 64
    max_overtake: int = 8
    max_resolution: int = 1024
    max_steps: int = 150
    max_num_samples: int = 4
    max_image_bytes: int = 16 * 1024 * 1024  # one decoded-from-base64 image
    max_image_pixels: int = 4096 * 4096
    max_upload_bytes: int = 2048 * 1024 * 1024  # an sd15 ControlNet is 1.4 GB
    swap_budget_mb: int = 4096
    max_controlnets: int = 3  # ControlNet units per request; each distinct ControlNet holds a slot's weights
    max_prompt_tokens: int = 225  # prompt and negative prompt each (3 chunks of 75)
    # Browser safety (docs/serving.md, "Security"): Host names answered besides the bound address,
    # and origins allowed to send state-changing requests (CORS); "*" allows any.
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self):
        if self.scheduling not in SCHEDULING:
            raise ValueError(f"scheduling {self.scheduling!r}: choose one of {', '.join(SCHEDULING)}")
        for name in ("max_queue", "max_resolution", "max_steps", "max_num_samples", "max_image_bytes",
                     "max_image_pixels", "max_upload_bytes", "max_controlnets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_prompt_tokens < 75:
            raise ValueError(f"max_prompt_tokens must be at least 75 (one chunk), got {self.max_prompt_tokens}")
        if self.max_steps > STEPS_CEILING:
            raise ValueError(f"max_steps {self.max_steps}: at most {STEPS_CEILING} (the schedulers' 1000 training "
                             "timesteps)")
        if self.max_overtake < 0 or self.swap_budget_mb < 0:
            raise ValueError("max_overtake and swap_budget_mb must not be negative")
        self.access  # noqa: B018 - parsed now: a bad --api-auth entry is a ValueError here, not at a request
        for origin in self.cors_origins:
            if origin != "*" and (urlsplit(origin).scheme not in ("http", "https") or not urlsplit(origin).netloc
                                  or urlsplit(origin).path not in ("", "/")):
                raise ValueError(f"cors origin {origin!r}: give scheme://host[:port] (or *)")
        object.__setattr__(self, "allowed_hosts", tuple(h.lower() for h in self.allowed_hosts))
        object.__setattr__(self, "cors_origins", tuple(o.rstrip("/").lower() for o in self.cors_origins))

    @cached_property
    def access(self) -> Access:
        """The ``Authorization`` check of ``api_key`` and ``api_auth``, parsed once (not per request)."""
        return Access.of(self.api_key, self.api_auth)

    @property
    def max_body_bytes(self) -> int:
        """A generate request: base64 images (the image, the mask, one per ControlNet unit) and some JSON."""
        return (2 + self.max_controlnets) * (self.max_image_bytes * 4 // 3 + 4) + 1024 * 1024

    @staticmethod
    def api_key_from_env() -> str | None:
        return os.environ.get(ENV_API_KEY) or None


def host_allowed(config: ServeConfig, host: str) -> bool:
    """Whether a request's ``Host`` header (port dropped) names this server: DNS rebinding sends another name.

    Answered: the bound address; ``localhost`` when bound to a loopback address; any IP address
    when bound to every interface (``0.0.0.0``, ``::``: a browser never sends an IP it did not
    connect to); and the names of ``--allowed-hosts``.
    """
    name = _host_name(host)
    if "*" in config.allowed_hosts or name in config.allowed_hosts:
        return True
    bound = config.host.strip("[]").lower()
    if name == bound or (name == "localhost" and is_loopback(bound)):
        return True
    if bound in ("0.0.0.0", "::", ""):
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False
    return False


def origin_allowed(config: ServeConfig, origin: str, host: str) -> bool:
    """Whether a browser page at ``origin`` may send state-changing requests: this server's own, or a CORS one."""
    origin = origin.rstrip("/").lower()
    if "*" in config.cors_origins or origin in config.cors_origins:
        return True
    return origin != "null" and urlsplit(origin).netloc == host.lower()


def _host_name(host: str) -> str:
    """``example.com:7860`` -> ``example.com``; ``[::1]:7860`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """``127.0.0.0/8``, ``::1`` or ``localhost``; anything else (``0.0.0.0`` included) is exposed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
