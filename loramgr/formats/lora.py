"""LoRA and LoCon factors (kohya, diffusers, PEFT, cloneofsimo) -> one ``lora`` WeightDelta.

Every LoRA spelling reduces to ``up`` [out, r] @ ``down`` [r, in*kh*kw]. Conv factors
(LoCon: down [r, in, kh, kw], up [out, r, 1, 1]) are flattened; a Tucker ``mid``
[r, r, kh, kw] with a 1x1 ``down`` is folded into ``down`` here, once, so every later
step sees a plain rank-r product.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .adapter import Incomplete, WeightDelta, alpha_scale, expect_shape, require


def lora_delta(param: str, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], alpha: float | None) -> WeightDelta:
    """Validate LoRA factors against the base weight ``shape`` and normalize them."""
    up, down = require(parts, "up", "down")
    if set(parts) - {"up", "down", "mid"}:
        raise Incomplete(f"unexpected parts {sorted(set(parts) - {'up', 'down', 'mid'})}")
    out, fan_in, *kernel = shape
    rank = down.shape[0]
    ones = (1,) * len(kernel)
    expect_shape("up", up, (out, rank, *ones) if up.dim() == len(shape) else (out, rank))
    mid = parts.get("mid")
    if mid is None:
        flat = (rank, fan_in * math.prod(kernel))
        expect_shape("down", down, (rank, fan_in, *kernel) if down.dim() == len(shape) else flat)
        down = down.reshape(flat)
    else:
        expect_shape("mid", mid, (rank, rank, *kernel))
        expect_shape("down", down, (rank, fan_in, *ones) if down.dim() == len(shape) else (rank, fan_in))
        down = _fold_tucker(mid, down.reshape(rank, fan_in))
    return WeightDelta(param, "lora", {"up": up.reshape(out, rank), "down": down}, alpha_scale(alpha, rank))


def _fold_tucker(mid: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``mid`` [r, r, kh, kw] applied after a 1x1 ``down`` [r, in] is one ``down`` [r, in*kh*kw]."""
    folded = torch.einsum("i j ..., j n -> i n ...", mid.float(), down.float())
    return folded.reshape(folded.shape[0], -1).to(down.dtype)
