"""The comparisons: weights, graph outputs and images, injected against the reference (its export, or its
torch modules for what the export does not hold: ControlNets of other slots, embedding vectors)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..manifest import CONTROLNET, Manifest
from ..merge import BaseWeights


@dataclass
class TensorDiff:
    """One weight the adapters change: loramgr's injected tensor against the reference's."""

    graph: str
    param: str
    initializer: str
    max_abs: float  # max |injected - reference|
    rel: float  # max_abs / max |reference|
    change: float  # max |reference - base|: how much the adapters move this weight
    passed: bool
    slot: str = ""  # a ControlNet compared in its slot, against diffusers' module (not the export)


@dataclass
class OutputDiff:
    name: str
    max_abs: float
    rel: float  # max_abs / max |reference output|
    passed: bool


@dataclass
class ImageDiff:
    psnr_db: float  # inf when the images are identical
    max_pixel_diff: int
    size: int
    steps: int
    passed: bool


def tensor_diff(graph: str, param: str, initializer: str, injected: np.ndarray, reference: np.ndarray | None,
                base: np.ndarray, rtol: float, slot: str = "") -> TensorDiff:
    """Compare in float32, all three in the torch layout of ``param`` (``reference`` None: it has no such weight)."""
    if reference is None or np.shape(injected) != np.shape(reference):
        return TensorDiff(graph, param, initializer, math.inf, math.inf, math.nan, False, slot)
    injected, reference, base = (np.asarray(a, dtype=np.float32) for a in (injected, reference, base))
    max_abs = float(np.abs(injected - reference).max(initial=0.0))
    scale = float(np.abs(reference).max(initial=0.0))
    rel = max_abs / scale if scale else (0.0 if max_abs == 0 else math.inf)
    change = float(np.abs(reference - base).max(initial=0.0))
    return TensorDiff(graph, param, initializer, max_abs, rel, change, max_abs <= rtol * scale, slot)


def compare_tensors(base: BaseWeights, injected: dict[str, dict[str, np.ndarray]], merged: Manifest,
                    merged_dir: Path, rtol: float) -> list[TensorDiff]:
    """Every injected initializer against the merged export's initializer of the same torch parameter."""
    maps = {g: np.memmap(merged_dir / info.data, dtype=np.uint8, mode="r") for g, info in merged.graphs.items() if info.data}
    diffs = []
    for graph, named in injected.items():
        by_initializer = base.manifest.graphs[graph].by_initializer()
        for initializer, array in named.items():
            param = by_initializer[initializer]
            entry = base.entry(graph, initializer)
            reference = merged.graphs[graph].weights.get(param)
            diffs.append(tensor_diff(graph, param, initializer, entry.to_torch_layout(array),
                                     None if reference is None else reference.to_torch_layout(reference.read(maps[graph])),
                                     entry.to_torch_layout(base.read(graph, entry)), rtol))
    return diffs


def compare_slot(base: BaseWeights, name: str, injected: dict[str, dict[str, np.ndarray]], module: torch.nn.Module,
                 rtol: float) -> list[TensorDiff]:
    """A ControlNet's tensors as merged into its slot against the parameters of the module diffusers
    loaded from its source, matched through the base's weight map (``controlnet.<parameter>``)."""
    params = {f"controlnet.{n}": p.detach().float().numpy() for n, p in module.named_parameters()}
    by_initializer = base.manifest.graphs[CONTROLNET].by_initializer()
    diffs = []
    for initializer, array in injected.get(CONTROLNET, {}).items():
        param, entry = by_initializer[initializer], base.entry(CONTROLNET, initializer)
        diffs.append(tensor_diff(CONTROLNET, param, initializer, entry.to_torch_layout(array), params.get(param),
                                 entry.to_torch_layout(base.read(CONTROLNET, entry)), rtol, slot=name))
    return diffs


def untouched_mismatches(base: BaseWeights, base_dir: Path, touched: dict[str, set[str]], merged: Manifest,
                         merged_dir: Path) -> list[str]:
    """Torch parameters loramgr leaves alone whose bytes differ in the reference (or that it lacks)."""
    mismatches = []
    for graph, info in base.manifest.graphs.items():
        if not info.data:
            continue
        ours = np.memmap(base_dir / info.data, dtype=np.uint8, mode="r")
        theirs = np.memmap(merged_dir / merged.graphs[graph].data, dtype=np.uint8, mode="r")
        for param, entry in info.weights.items():
            if entry.initializer in touched.get(graph, ()):
                continue
            other = merged.graphs[graph].weights.get(param)
            if (other is None or (other.shape, other.dtype) != (entry.shape, entry.dtype)
                    or not np.array_equal(_bytes(entry.read(ours)), _bytes(other.read(theirs)))):
                mismatches.append(param)
    return mismatches


def _bytes(array: np.ndarray) -> np.ndarray:
    """The bytes of a contiguous array, as a view (bytes, not values: NaN and -0.0 compare as stored)."""
    return array.reshape(-1).view(np.uint8)


def output_diff(name: str, ours: torch.Tensor, theirs: torch.Tensor, rtol: float) -> OutputDiff:
    """``max |ours - theirs|`` against ``max |theirs|``; tensors of different shapes differ infinitely."""
    if ours.shape != theirs.shape:
        return OutputDiff(name, math.inf, math.inf, False)
    max_abs = float((ours.float() - theirs.float()).abs().max())
    scale = float(theirs.float().abs().max())
    rel = max_abs / scale if scale else (0.0 if max_abs == 0 else math.inf)
    return OutputDiff(name, max_abs, rel, max_abs <= rtol * scale)


def compare_outputs(injected, reference, manifest: Manifest, image_size: int, seed: int, rtol: float,
                    controlnet: str | None = None) -> list[OutputDiff]:
    """Graph outputs of two runners on the same seeded inputs: the ControlNet's residuals, the UNet with
    those residuals and without any, and the text encoder (every CLIP-skip layer).

    ``controlnet``: the injected runner's ControlNet that the reference's export holds (by name;
    ``None``: its only one).
    """
    gen = torch.Generator().manual_seed(seed)
    text = manifest.configs["text_encoder"]
    latent = image_size // 8
    inputs = {
        "sample": torch.randn(2, 4, latent, latent, generator=gen),
        "timestep": torch.tensor([981.0, 981.0]),
        "encoder_hidden_states": torch.randn(2, 77, text["hidden_size"], generator=gen),
    }
    cond = torch.rand(2, 3, image_size, image_size, generator=gen)
    ours = injected.control_residuals(controlnet, **inputs, controlnet_cond=cond)
    theirs = reference.control_residuals(None, **inputs, controlnet_cond=cond)
    diffs = [output_diff("controlnet residuals", torch.cat([r.flatten() for r in ours]),
                          torch.cat([r.flatten() for r in theirs]), rtol)]
    diffs += [output_diff("noise_pred", injected.predict_noise(**inputs, residuals=theirs),
                           reference.predict_noise(**inputs, residuals=theirs), rtol),
              output_diff("noise_pred, no unit", injected.predict_noise(**inputs), reference.predict_noise(**inputs),
                           rtol)]
    input_ids = torch.randint(0, text["vocab_size"], (2, 77), generator=gen)
    diffs.append(output_diff("text embeddings", injected.encode_text(input_ids), reference.encode_text(input_ids), rtol))
    return diffs


def compare_images(injected_pipeline, reference_pipeline, prompt: str, image_size: int, steps: int, seed: int,
                   min_psnr_db: float, n_prompt: str | None = None, controlnet: str | None = None) -> ImageDiff:
    """The canny pipeline end to end on the sample picture, same prompt and seed on both sides.

    ``controlnet``: the injected side's ControlNet that the reference's export holds (``None``: its only one).
    """
    from ..pipeline.control import ControlUnit
    from ..pipeline.settings import GenerationSettings
    from ..samples import sample_image

    picture = sample_image(image_size)
    settings = GenerationSettings(prompt=prompt, resolution=image_size, steps=steps, seed=seed)
    if n_prompt is not None:
        settings.n_prompt = n_prompt
    one_unit = settings if controlnet is None else replace(settings, units=(ControlUnit(controlnet),))
    ours = injected_pipeline(picture, one_unit).images[0]
    theirs = reference_pipeline(picture, settings).images[0]
    return image_diff(ours, theirs, steps, min_psnr_db)


def image_diff(ours: np.ndarray, theirs: np.ndarray, steps: int, min_psnr_db: float) -> ImageDiff:
    """PSNR and largest pixel difference of two HxWx3 uint8 images."""
    ours, theirs = ours.astype(np.float64), theirs.astype(np.float64)
    mse = float(np.mean((ours - theirs) ** 2))
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return ImageDiff(psnr, int(np.abs(ours - theirs).max()), ours.shape[0], steps, psnr >= min_psnr_db)


def compare_vectors(ours: dict[str, np.ndarray], theirs: dict[str, torch.Tensor], rtol: float) -> list[OutputDiff]:
    """Each embedding's vectors in loramgr's ``.lora`` against the token-table rows diffusers loaded, by trigger."""
    return [output_diff(trigger, torch.tensor(np.asarray(vectors, dtype=np.float32)), theirs[trigger], rtol)
            for trigger, vectors in ours.items()]
