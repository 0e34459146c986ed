"""What one ``loramgr serve`` process is configured with: limits, security, scheduling.

Every limit has a flag of the same name on ``loramgr serve`` (``max_resolution`` is
``--max-resolution``). The defaults are sized for SD1.5 on one machine: a request beyond
a limit gets a 4xx naming the field, never a half-run generation.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

ENV_API_KEY = "LORAMGR_API_KEY"
SCHEDULING = ("grouping", "fifo")


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
    api_key: str | None = None
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

    def __post_init__(self):
        if self.scheduling not in SCHEDULING:
            raise ValueError(f"scheduling {self.scheduling!r}: choose one of {', '.join(SCHEDULING)}")
        for name in ("max_queue", "max_resolution", "max_steps", "max_num_samples", "max_image_bytes",
                     "max_image_pixels", "max_upload_bytes", "max_controlnets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_prompt_tokens < 75:
            raise ValueError(f"max_prompt_tokens must be at least 75 (one chunk), got {self.max_prompt_tokens}")
        if self.max_overtake < 0 or self.swap_budget_mb < 0:
            raise ValueError("max_overtake and swap_budget_mb must not be negative")

    @property
    def max_body_bytes(self) -> int:
        """A generate request: base64 images (the image, the mask, one per ControlNet unit) and some JSON."""
        return (2 + self.max_controlnets) * (self.max_image_bytes * 4 // 3 + 4) + 1024 * 1024

    @staticmethod
    def api_key_from_env() -> str | None:
        return os.environ.get(ENV_API_KEY) or None


def is_loopback(host: str) -> bool:
    """``127.0.0.0/8``, ``::1`` or ``localhost``; anything else (``0.0.0.0`` included) is exposed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
