"""Shape profiles of TensorRT engines: the min / opt / max input shapes an engine accepts.

Shapes are written ``BATCHxLATENT_HxLATENT_W`` (the CLI's ``--min/--opt/--max``), plus the
longest prompt (``--max-tokens``: 77 per 75-token chunk); the manifest's named dynamic axes
(``batch``, ``latent_height``, ``latent_height/4`` for a ControlNet residual, ``tokens``...)
turn a profile into per-input dims (:func:`input_shapes`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import LoramgrError
from ...manifest import IOSpec, axis_size

_SHAPE_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shape:
    """Graph batch (2 per image with classifier-free guidance) and latent size (image / 8)."""

    batch: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.height}x{self.width}"


@dataclass(frozen=True)
class ShapeProfile:
    """The min / opt / max shapes an engine accepts; TensorRT tunes its kernels for ``opt``."""

    min: Shape
    opt: Shape
    max: Shape
    max_tokens: int = 3 * 77  # the text context of the UNet and ControlNet: 77 per prompt chunk, 3 chunks

    @classmethod
    def parse(cls, min: str, opt: str, max: str, max_tokens: int = 3 * 77) -> "ShapeProfile":
        """From ``BATCHxLATENT_HxLATENT_W`` strings (``--min 1x32x32``), validated."""
        profile = cls(_parse_shape(min, "--min"), _parse_shape(opt, "--opt"), _parse_shape(max, "--max"), max_tokens)
        profile.check()
        return profile

    def check(self) -> None:
        """Batch >= 1, latent sizes multiples of 8 (SD1.5 downsamples 3 times), min <= opt <= max."""
        for option, shape in (("--min", self.min), ("--opt", self.opt), ("--max", self.max)):
            if shape.batch < 1:
                raise LoramgrError(f"{option} {shape}: batch must be at least 1")
            for what, size in (("height", shape.height), ("width", shape.width)):
                if size < 8 or size % 8:
                    raise LoramgrError(
                        f"{option} {shape}: latent {what} {size} must be a positive multiple of 8 "
                        f"(image {what} {size * 8} px, a multiple of 64)")
        for what in ("batch", "height", "width"):
            low, mid, high = (getattr(s, what) for s in (self.min, self.opt, self.max))
            if not low <= mid <= high:
                raise LoramgrError(f"{what} must grow from --min to --opt to --max, got {low}, {mid}, {high} "
                                   f"(--min {self.min} --opt {self.opt} --max {self.max})")
        if self.max_tokens < 77 or self.max_tokens % 77:
            raise LoramgrError(f"--max-tokens {self.max_tokens}: a multiple of 77 (one per 75-token prompt chunk)")

    def __str__(self) -> str:
        return f"min {self.min}, opt {self.opt}, max {self.max}, up to {self.max_tokens} tokens"


def _parse_shape(text: str, option: str) -> Shape:
    match = _SHAPE_RE.match(text)
    if not match:
        raise LoramgrError(f"{option} {text!r}: write BATCHxLATENT_HEIGHTxLATENT_WIDTH, e.g. 2x64x64 for "
                           "one 512x512 image with guidance")
    return Shape(*(int(g) for g in match.groups()))


# 256 px to 768 px images, tuned for one 512 px image with classifier-free guidance.
DEFAULT_PROFILE = ShapeProfile(Shape(1, 32, 32), Shape(2, 64, 64), Shape(4, 96, 96))


def _axis_sizes(shape: Shape, tokens: int) -> dict[str, int]:
    return {"batch": shape.batch, "latent_height": shape.height, "latent_width": shape.width,
            "height": 8 * shape.height, "width": 8 * shape.width, "tokens": tokens}


def input_shapes(inputs: list[IOSpec], profile: ShapeProfile) -> dict[str, list[list[int]]]:
    """Input name -> [min, opt, max] dims, from the manifest's named dynamic axes."""
    sizes = [_axis_sizes(profile.min, 77), _axis_sizes(profile.opt, 77), _axis_sizes(profile.max, profile.max_tokens)]
    return {spec.name: [[axis_size(a, named) for a in spec.shape] for named in sizes] for spec in inputs}


def check_input_shapes(graph: str, shapes: dict[str, list[list[int]]], actual: dict[str, tuple[int, ...]]) -> None:
    """Refuse an input outside the engine's profile with the fix, before TensorRT does."""
    for name, dims in actual.items():
        low, _, high = shapes[name]
        if len(dims) != len(low) or any(not lo <= d <= hi for d, lo, hi in zip(dims, low, high)):
            raise LoramgrError(
                f"{graph} input {name} has shape {list(dims)}, outside the engine's profile {low}..{high}: "
                "build the engines with --min/--max covering it")
