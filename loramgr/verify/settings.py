"""What ``verify`` checks, on which inputs, and the tolerances it passes at (docs/verify.md justifies them)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LoramgrError

CHECKS = ("tensors", "outputs", "images", "units")  # docs/verify.md, "The checks"
ROUTES = ("auto", "diffusers", "formulas")  # who merges LoRAs for the reference


@dataclass(frozen=True)
class Tolerances:
    """Pass thresholds for one base dtype.

    Relative errors are ``max |injected - reference| / max |reference|`` over one tensor
    (a weight or a graph output): an error measured against the tensor's own scale, so
    near-zero elements do not blow it up and a wrong element anywhere still shows.
    """

    tensor_rtol: float
    output_rtol: float
    min_psnr_db: float


# Measured on the tiny base (docs/verify.md): fp32 weights 9.4e-8, outputs 1.2e-6, images 79.5 dB;
# fp16 weights 8.4e-4 (one fp16 step), noise_pred 1.2e-3. The margins cover deeper stacks and SD1.5 widths.
TOLERANCES = {
    "fp32": Tolerances(tensor_rtol=1e-6, output_rtol=1e-4, min_psnr_db=40.0),
    "fp16": Tolerances(tensor_rtol=2e-3, output_rtol=1e-2, min_psnr_db=30.0),
}


@dataclass(frozen=True)
class VerifySettings:
    """Inputs of the checks. ``image_size`` is in pixels (latents are 1/8 of it)."""

    checks: tuple[str, ...] = CHECKS
    reference: str = "auto"  # "auto" | "diffusers" | "formulas": who merges LoRAs for the reference
    seed: int = 0
    image_size: int = 64
    steps: int = 4
    prompt: str = "a house by a lake, sunny day"
    n_prompt: str | None = None  # the images check's negative prompt; None: GenerationSettings' default
    use_cache: bool = True

    def __post_init__(self):
        unknown = [c for c in self.checks if c not in CHECKS]
        if unknown or not self.checks:
            raise LoramgrError(f"--checks {','.join(self.checks)!r}: choose from {', '.join(CHECKS)}")
        if self.reference not in ROUTES:
            raise LoramgrError(f"--reference {self.reference!r}: choose one of {', '.join(ROUTES)}")
        if self.image_size < 64 or self.image_size % 64:
            raise LoramgrError(f"image size {self.image_size}: use a multiple of 64 (at least 64)")
        from ..pipeline.settings import check_output_size

        check_output_size(self.image_size, self.image_size, self.image_size, override=None)
