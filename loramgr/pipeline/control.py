"""Per-sample, per-residual ControlNet scales: the ``control_scales`` input of the fused graph.

The batch is ``[uncond] * N + [cond] * N`` (classifier-free guidance in one batch, as
diffusers orders it). Guess mode gives the ControlNet to the conditional half only: its
rows carry the guess-mode schedule and the unconditional rows zeros, which equals
ControlNet's ``c_concat=None`` for the unconditional branch and diffusers running the
ControlNet on the conditional half alone.
"""

from __future__ import annotations

import torch

from ..models.fused import NUM_CONTROL_RESIDUALS


def guess_mode_scales(strength: float, schedule: str) -> torch.Tensor:
    """The 13 guess-mode scales, shallow residuals weakest: ``[13]`` float32.

    ``"controlnet"``: ``strength * 0.825 ** (12 - i)`` (ControlNet's ``process()``);
    ``"diffusers"``: ``strength * logspace(-1, 0, 13)`` (diffusers' ``ControlNetModel``).
    """
    if schedule == "controlnet":
        last = NUM_CONTROL_RESIDUALS - 1
        return torch.tensor([strength * 0.825 ** float(last - i) for i in range(NUM_CONTROL_RESIDUALS)])
    if schedule == "diffusers":
        return torch.logspace(-1, 0, NUM_CONTROL_RESIDUALS) * strength
    raise ValueError(f"unknown control schedule {schedule!r}")


def control_scales(num_samples: int, strength: float, guess_mode: bool, schedule: str) -> torch.Tensor:
    """The ``[2N, 13]`` float32 scales for a CFG batch of ``N`` unconditional then ``N`` conditional rows."""
    if not guess_mode:
        return torch.full((2 * num_samples, NUM_CONTROL_RESIDUALS), float(strength))
    cond = guess_mode_scales(strength, schedule).expand(num_samples, -1)
    return torch.cat([torch.zeros_like(cond), cond])
