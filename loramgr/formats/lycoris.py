"""LyCORIS LoHa and LoKr factors -> ``loha`` / ``lokr`` WeightDeltas (layouts as LyCORIS saves them).

LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b); with Tucker, each product is
``einsum("i j ..., j r, i p -> p r ...", t, w_b, w_a)``. LoKr: dW = kron(w1, w2), each
factor full or low-rank (``w2`` possibly Tucker), reshaped to the weight. Conv factors
may be flattened to 2-D (old LyCORIS files): only the element count has to fit then.
Factors are checked here against the base shape; the math lives in :mod:`.deltas`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .adapter import Incomplete, ShapeMismatch, WeightDelta, alpha_scale, expect_shape, require

LOKR_PARTS = {"w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2"}


def loha_delta(param: str, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], alpha: float | None) -> WeightDelta:
    """Validate LoHa factors (plain or Tucker) against the base weight ``shape``."""
    out, fan_in, *kernel = shape
    tucker = "t1" in parts or "t2" in parts
    names = ("w1_a", "w1_b", "w2_a", "w2_b") + (("t1", "t2") if tucker else ())
    require(parts, *names)
    if set(parts) - set(names):
        raise Incomplete(f"unexpected parts {sorted(set(parts) - set(names))}")
    for i in ("1", "2"):
        w_a, w_b = parts[f"w{i}_a"], parts[f"w{i}_b"]
        rank = w_b.shape[0]
        if tucker:
            expect_shape(f"t{i}", parts[f"t{i}"], (rank, rank, *kernel))
            expect_shape(f"w{i}_a", w_a, (rank, out))
            expect_shape(f"w{i}_b", w_b, (rank, fan_in))
        else:
            expect_shape(f"w{i}_a", w_a, (out, rank))
            flat = (rank, fan_in * math.prod(kernel))
            expect_shape(f"w{i}_b", w_b, (rank, fan_in, *kernel) if w_b.dim() == len(shape) else flat)
    tensors = {name: parts[name] for name in names}
    return WeightDelta(param, "loha", tensors, alpha_scale(alpha, parts["w1_b"].shape[0]))


def lokr_delta(param: str, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], alpha: float | None) -> WeightDelta:
    """Validate LoKr factors against the base weight ``shape``.

    The scale is alpha / rank of the low-rank factor; with both factors full, LyCORIS
    applies no scale (1.0), whatever alpha says.
    """
    if set(parts) - LOKR_PARTS:
        raise Incomplete(f"unexpected parts {sorted(set(parts) - LOKR_PARTS)}")
    out, fan_in, *kernel = shape
    (a, c), rank1 = _w1_shape(parts)
    (b, d, *w2_kernel), rank2 = _w2_shape(parts)
    w2_cols = d * math.prod(w2_kernel)
    if a * b != out or c * w2_cols != fan_in * math.prod(kernel) or (w2_kernel and (w2_kernel != kernel or c * d != fan_in)):
        got = (a * b, c * d, *w2_kernel)
        raise ShapeMismatch("w2", shape, got, f"kron(w1 [{a}, {c}], w2 {[b, d, *w2_kernel]}) makes {list(got)}")
    return WeightDelta(param, "lokr", dict(parts), alpha_scale(alpha, rank1 or rank2))


def _w1_shape(parts: Mapping[str, torch.Tensor]) -> tuple[tuple[int, int], int | None]:
    """(rows, cols) of w1 and its rank (None if full)."""
    if "w1" in parts:
        if "w1_a" in parts or "w1_b" in parts:
            raise Incomplete("both w1 and w1_a/w1_b")
        w1 = parts["w1"]
        if w1.dim() != 2:
            raise ShapeMismatch("w1", (w1.shape[0], w1[0].numel()), tuple(w1.shape), "w1 must be a matrix")
        return (w1.shape[0], w1.shape[1]), None
    w1_a, w1_b = require(parts, "w1_a", "w1_b")
    rank = w1_b.shape[0]
    expect_shape("w1_a", w1_a, (w1_a.shape[0], rank))
    expect_shape("w1_b", w1_b, (rank, w1_b.shape[1]))
    return (w1_a.shape[0], w1_b.shape[1]), rank


def _w2_shape(parts: Mapping[str, torch.Tensor]) -> tuple[tuple[int, ...], int | None]:
    """(rows, cols, *kernel) of w2 and its rank (None if full)."""
    if "w2" in parts:
        if {"w2_a", "w2_b", "t2"} & set(parts):
            raise Incomplete("both w2 and w2_a/w2_b")
        return tuple(parts["w2"].shape), None
    w2_a, w2_b = require(parts, "w2_a", "w2_b")
    rank = w2_b.shape[0]
    if "t2" in parts:  # Tucker: t2 [r, r, *k], w2_a [r, rows], w2_b [r, cols]
        t2 = parts["t2"]
        expect_shape("t2", t2, (rank, rank, *t2.shape[2:]))
        expect_shape("w2_a", w2_a, (rank, w2_a.shape[1]))
        expect_shape("w2_b", w2_b, (rank, w2_b.shape[1]))
        return (w2_a.shape[1], w2_b.shape[1], *t2.shape[2:]), rank
    expect_shape("w2_a", w2_a, (w2_a.shape[0], rank))
    return (w2_a.shape[0], *w2_b.shape[1:]), rank
