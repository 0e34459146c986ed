"""ControlNet units: which ControlNet, how strong, when, and on which half of the guidance batch.

A unit names a ControlNet of the adapter set, says how its control map is made, and how its
13 residuals enter the UNet: scaled by ``strength`` (and, in the two non-balanced modes, by
the soft weights ``0.825 ** (12 - k)``), at the steps of its window only, on both halves of
the classifier-free guidance batch or (mode ``control``) on the conditional half alone. The
residuals of all units acting at a step are summed, as diffusers' ``MultiControlNetModel``
sums them; a step no unit acts at runs the UNet alone.

Modes (A1111's ControlNet extension: ``soft_injection = mode != balanced``,
``cfg_injection = mode == control``; docs/a1111.md):

* ``balanced``: ``strength`` on every residual, both halves;
* ``prompt`` ("My prompt is more important"): soft weights, both halves;
* ``control`` ("ControlNet is more important"): soft weights, conditional half only. With
  ``control_schedule="diffusers"`` the soft weights are ``logspace(-1, 0, 13)``: diffusers'
  ``guess_mode``.

Windows: ``start`` / ``end`` are fractions of the denoising steps. diffusers' rule
(``control_guidance_start/end``) keeps step ``i`` of ``S`` unless ``i / S < start`` or
``(i + 1) / S > end``; the A1111 extension's rule acts when ``start <= i / S <= end``. The
two differ at the edges, so the rule is a setting (:data:`WINDOW_RULES`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.graphs import NUM_CONTROL_RESIDUALS

# "controlnet": soft weights strength * 0.825 ** (12 - i), as ControlNet's process() and A1111;
# "diffusers": strength * logspace(-1, 0, 13), as diffusers' ControlNetModel guess mode.
CONTROL_SCHEDULES = ("controlnet", "diffusers")
CONTROL_MODES = ("balanced", "prompt", "control")
WINDOW_RULES = ("diffusers", "a1111")
# What turns a unit's image into the map its ControlNet sees: "canny" runs ControlNet's canny
# annotator on it; "none" takes it as a map made before (depth, pose, hed, scribble, ...); "inpaint"
# takes the image with the generation's masked pixels at -1 (control_v11p_sd15_inpaint; pipeline/inpaint.py).
PREPROCESSORS = ("canny", "none", "inpaint")


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet unit of a generation (its image travels beside the settings).

    ``controlnet``: a ControlNet of the adapter set by name (``None``: the set's only one,
    or the base's own; ``canny``: the base's own).
    """

    controlnet: str | None = None
    preprocessor: str = "canny"
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    low_threshold: int = 100
    high_threshold: int = 200

    def acts(self, step: int, steps: int, rule: str) -> bool:
        """Whether this unit adds its residuals at denoising step ``step`` of ``steps``."""
        if self.strength == 0:
            return False
        if rule == "a1111":
            return self.start <= step / steps <= self.end
        return not (step / steps < self.start or (step + 1) / steps > self.end)

    def scales(self, schedule: str) -> torch.Tensor:
        """The 13 residual scales, ``[13]`` float32."""
        if self.mode == "balanced":
            return torch.full((NUM_CONTROL_RESIDUALS,), float(self.strength))
        return soft_weights(self.strength, schedule)


def soft_weights(strength: float, schedule: str) -> torch.Tensor:
    """The 13 soft weights (guess mode), shallow residuals weakest: ``[13]`` float32.

    ``"controlnet"``: ``strength * 0.825 ** (12 - i)`` (ControlNet's ``process()``, A1111);
    ``"diffusers"``: ``strength * logspace(-1, 0, 13)`` (diffusers' ``ControlNetModel``).
    """
    if schedule == "controlnet":
        last = NUM_CONTROL_RESIDUALS - 1
        return torch.tensor([strength * 0.825 ** float(last - i) for i in range(NUM_CONTROL_RESIDUALS)])
    if schedule == "diffusers":
        return torch.logspace(-1, 0, NUM_CONTROL_RESIDUALS) * strength
    raise ValueError(f"unknown control schedule {schedule!r}")
