"""Delta math: one function per adapter kind, all ``(tensors, shape) -> fp32 dW`` unscaled.

Everything is computed in fp32 whatever the file's dtype, then reshaped to the torch
layout of the base weight. ``merge_weight`` adds several adapters onto one base weight
and applies DoRA the way LyCORIS does (see :func:`_apply_dora`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from .adapter import WeightDelta


def _lora_diff(t: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    return (t["up"].float() @ t["down"].float()).reshape(shape)


def _tucker(t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """LyCORIS' Tucker rebuild: t [r, r, *k], w_a [r, rows], w_b [r, cols] -> [rows, cols, *k]."""
    return torch.einsum("i j ..., i p, j r -> p r ...", t.float(), w_a.float(), w_b.float())


def _low_rank(w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """w_a [rows, r] @ w_b [r, …] flattened to [rows, cols]."""
    return w_a.float() @ w_b.float().reshape(w_b.shape[0], -1)


def _loha_diff(t: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    if "t1" in t:
        w1, w2 = _tucker(t["t1"], t["w1_a"], t["w1_b"]), _tucker(t["t2"], t["w2_a"], t["w2_b"])
    else:
        w1, w2 = _low_rank(t["w1_a"], t["w1_b"]), _low_rank(t["w2_a"], t["w2_b"])
    return (w1 * w2).reshape(shape)


def _lokr_diff(t: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    w1 = t["w1"].float() if "w1" in t else _low_rank(t["w1_a"], t["w1_b"])
    if "w2" in t:
        w2 = t["w2"].float()
    elif "t2" in t:
        w2 = _tucker(t["t2"], t["w2_a"], t["w2_b"])
    else:
        w2 = _low_rank(t["w2_a"], t["w2_b"])
    # kron of [a, c] with [b, d, kh, kw] flattened to [b, d*kh*kw] lays out exactly like
    # LyCORIS' kron with w1 unsqueezed to [a, c, 1, 1]: one 2-D kron serves every case.
    return torch.kron(w1, w2.reshape(w2.shape[0], -1)).reshape(shape)


DIFFS: dict[str, Callable[[Mapping[str, torch.Tensor], tuple[int, ...]], torch.Tensor]] = {
    "lora": _lora_diff,
    "loha": _loha_diff,
    "lokr": _lokr_diff,
}


def delta_weight(delta: WeightDelta, shape: tuple[int, ...]) -> torch.Tensor:
    """scale * dW in fp32, torch layout ``shape``, for multiplier 1 and without DoRA.

    A ``full`` delta has no difference to compute (it replaces the weight): use
    :func:`merge_weight` for it.

    Example::

        merged = base + multiplier * delta_weight(delta, tuple(base.shape))
    """
    if delta.kind not in DIFFS:
        raise ValueError(f"{delta.param}: a {delta.kind!r} delta replaces the weight; use merge_weight")
    return DIFFS[delta.kind](delta.tensors, tuple(shape)) * delta.scale


def merge_weight(base: torch.Tensor, contributions: Sequence[tuple[WeightDelta, float]]) -> torch.Tensor:
    """``base`` with every ``(delta, multiplier)`` applied, in fp32.

    A ``full`` delta replaces the base first (at most one, multiplier 1); the others are
    applied in order: plain deltas add ``multiplier * dW``, DoRA deltas rescale as
    :func:`_apply_dora` describes.
    """
    shape = tuple(base.shape)
    full = [(d, m) for d, m in contributions if d.kind == "full"]
    if len(full) > 1:
        raise ValueError(f"{full[0][0].param}: {len(full)} full replacements for one weight")
    weight = base.float()
    if full:
        delta, multiplier = full[0]
        if multiplier != 1:
            raise ValueError(f"{delta.param}: a full replacement takes multiplier 1, not {multiplier}")
        if tuple(delta.tensors["weight"].shape) != shape:
            raise ValueError(f"{delta.param}: replacement shape {list(delta.tensors['weight'].shape)}, base {list(shape)}")
        weight = delta.tensors["weight"].float()
    for delta, multiplier in contributions:
        if delta.kind == "full":
            continue
        diff = delta_weight(delta, shape)
        if delta.dora_scale is None:
            weight = torch.add(weight, diff, alpha=multiplier)
        elif delta.dora_rule == "peft":
            weight = _apply_dora(weight, multiplier * diff, delta.dora_scale, 1.0)
        else:
            weight = _apply_dora(weight, diff, delta.dora_scale, multiplier)
    return weight


def _apply_dora(weight: torch.Tensor, diff: torch.Tensor, dora_scale: torch.Tensor, multiplier: float) -> torch.Tensor:
    """LyCORIS' DoRA merge (``apply_weight_decompose``, used by its forward and merge alike).

    ``W' = W + dW`` at full strength; ``s = dora_scale / (‖W'‖ + eps)`` with the norm over
    every axis but the one ``dora_scale`` keeps (output [out, 1, …] or input [1, in, …]);
    the multiplier interpolates the rescale only: ``W' * (m * (s - 1) + 1)``. So at
    multiplier 0 the result is ``W + dW``, not ``W`` (ComfyUI and A1111 blend
    ``W + m * (W' * s - W)`` instead; they agree with LyCORIS at multiplier 1).
    PEFT (``lora_magnitude_vector`` files) scales the delta instead: its merge is this
    function on ``m * dW`` with multiplier 1, which :func:`merge_weight` does for
    deltas whose ``dora_rule`` is ``"peft"``.
    """
    merged = weight + diff
    magnitude = dora_scale.float()
    keep = dora_axis(magnitude, tuple(weight.shape))
    dims = tuple(i for i in range(weight.dim()) if i != keep)
    norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True) + torch.finfo(torch.float32).eps
    scale = magnitude / norm
    if multiplier != 1:
        scale = multiplier * (scale - 1) + 1
    return merged * scale


def dora_axis(dora_scale: torch.Tensor, shape: tuple[int, ...]) -> int:
    """0 if ``dora_scale`` is per output channel ([out, 1, …]), 1 if per input ([1, in, …])."""
    ones = (1,) * (len(shape) - 2)
    if tuple(dora_scale.shape) == (shape[0], 1, *ones):
        return 0
    if tuple(dora_scale.shape) == (1, shape[1], *ones):
        return 1
    raise ValueError(f"dora_scale shape {list(dora_scale.shape)} fits neither axis of weight {list(shape)}")


def factor_rank(kind: str, tensors: Mapping[str, torch.Tensor]) -> int | None:
    """The rank of a delta's factors, raw from a file or normalized (None: full, or unknown)."""
    name = {"lora": "down", "loha": "w1_b", "lokr": "w1_b" if "w1_b" in tensors else "w2_b"}.get(kind)
    return tensors[name].shape[0] if name in tensors else None
