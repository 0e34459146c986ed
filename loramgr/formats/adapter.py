"""The normalized form every adapter file is read into.

Readers of every format produce the same two types, so everything downstream (the
``.lora`` writer, verification, the CLI) handles one kind of object whatever file the
user brought.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class WeightDelta:
    """One base weight's change, kept factored (and in the file's dtype) to stay small.

    ``param`` is a torch parameter name of the base namespace (``unet.…``, ``controlnet.…``,
    or a text-encoder name). Tensor names by ``kind``:

    - ``lora``: ``up`` [out, r], ``down`` [r, in*kh*kw] (a Tucker ``lora_mid`` is folded
      into ``down``, so the product stays rank r);
    - ``loha``: ``w1_a``, ``w1_b``, ``w2_a``, ``w2_b`` (+ ``t1``, ``t2`` for Tucker), LyCORIS layout;
    - ``lokr``: ``w1`` or ``w1_a``/``w1_b``; ``w2`` or ``w2_a``/``w2_b`` (+ ``t2``), LyCORIS layout;
    - ``full``: ``weight``, the complete replacement tensor (ControlNet checkpoints).

    ``scale`` is alpha / rank for multiplier 1. ``dora_scale`` is the DoRA magnitude,
    shaped [out, 1, …] or [1, in, …] (the two LyCORIS orientations) with the weight's rank;
    ``dora_rule`` says whose semantics the multiplier follows (the file's trainer's).
    """

    param: str
    kind: str
    tensors: dict[str, torch.Tensor]
    scale: float
    dora_scale: torch.Tensor | None = None
    dora_rule: str = "lycoris"  # how a multiplier enters DoRA: "lycoris" or "peft" (see deltas._apply_dora)


@dataclass
class ParsedAdapter:
    """An adapter file read against one base: its deltas and an account of every key."""

    path: Path
    format: str
    kind: str  # "lora" | "controlnet"
    deltas: list[WeightDelta]
    keys_total: int
    keys_used: int
    unknown_keys: list[str]
    metadata: dict[str, str]
    trigger_words: list[str]
    ranks: set[int]
    dtype: str
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # bundled textual inversion: name -> [n, D]


class ShapeMismatch(Exception):
    """A file tensor that cannot belong to the base weight it names (caught by the reader)."""

    def __init__(self, part: str, expected: tuple[int, ...], got: tuple[int, ...], what: str = ""):
        self.part = part
        self.expected = tuple(expected)
        self.got = tuple(got)
        self.what = what or f"expected shape {list(self.expected)}, got {list(self.got)}"
        super().__init__(f"{part}: {self.what}")


class Incomplete(Exception):
    """A module's keys do not form a whole delta (a factor missing or doubled); they stay unused."""


def expect_shape(part: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Raise :class:`ShapeMismatch` unless ``tensor`` has exactly ``expected`` shape."""
    if tuple(tensor.shape) != tuple(expected):
        raise ShapeMismatch(part, expected, tuple(tensor.shape))


def require(parts: Mapping[str, torch.Tensor], *names: str) -> list[torch.Tensor]:
    """The named factors, or :class:`Incomplete` naming the first one missing."""
    missing = [name for name in names if name not in parts]
    if missing:
        raise Incomplete(f"missing {missing[0]}")
    return [parts[name] for name in names]


def alpha_scale(alpha: float | None, rank: int | None) -> float:
    """alpha / rank; a missing or zero alpha means alpha = rank (kohya and LyCORIS define it so)."""
    return alpha / rank if alpha and rank else 1.0
