"""What the bench measures on: the bench base, the sample LoRAs, step inputs and a merged copy of the base."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..adapters import AdapterSet
from ..export import export_base
from ..manifest import CONTROLNET, TEXT_ENCODER, UNET, Manifest
from ..merge import BaseWeights, merge_tensors
from ..models.graphs import RESIDUALS
from ..workspace import Workspace, atomic_dir
from .harness import Step

SMALL, LARGE = 4, 128  # ranks of a typical LoRA and a large one; both cover UNet attention + text encoder

RANKS = (SMALL, LARGE)

LORA_WEIGHT = 0.8

STEP_IMAGE = {"tiny": 128, "sd15": 512}  # image side of the timed step (latents: 1/8 of it)

OTHER_STEP_IMAGES = {"sd15": (256,)}  # the CPU anchors of docs/benchmarks.md were taken at 256x256

MEMORY_RUN = {"tiny": 64, "sd15": 256}  # resolution of the run whose peak RSS is measured

MEMORY_RUN_STEPS = 3

CHECK_IMAGE = 64  # image side of the outputs compared across the swap routes

MERGED_VERSION = 3  # bump when the merged copy's recipe changes: old caches no longer apply (3: graphs apart)


@dataclass(frozen=True)
class StepInputs:
    """One denoising step's inputs: a CFG batch of 2 (uncond + cond) at ``image`` pixels a side."""

    sample: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor
    controlnet_cond: torch.Tensor

    @classmethod
    def random(cls, manifest: Manifest, image: int, seed: int = 0) -> StepInputs:
        latent = image // 2 ** (len(manifest.configs["vae"]["block_out_channels"]) - 1)
        width = manifest.configs["text_encoder"]["hidden_size"]
        gen = torch.Generator().manual_seed(seed)
        return cls(torch.randn(2, 4, latent, latent, generator=gen), torch.tensor([500.0, 500.0]),
                   torch.randn(2, 77, width, generator=gen), torch.rand(2, 3, image, image, generator=gen))

    def step(self, runner, units: int = 1) -> torch.Tensor:
        """One step as the pipeline makes it: ``units`` ControlNet calls, residuals summed, then the UNet."""
        context = (self.sample, self.timestep, self.encoder_hidden_states)
        residuals = None
        for _ in range(units):
            out = runner.control_residuals(None, *context, self.controlnet_cond)
            residuals = out if residuals is None else [a + b for a, b in zip(residuals, out)]
        return runner.predict_noise(*context, residuals)

    def describe(self) -> dict:
        return {"image": self.controlnet_cond.shape[-1], "latent": list(self.sample.shape)}

    def run_sessions(self, controlnet, unet) -> np.ndarray:
        """The same step on plain InferenceSessions of the ControlNet and the UNet graphs."""
        context = {"sample": self.sample.numpy(), "timestep": self.timestep.numpy(),
                   "encoder_hidden_states": self.encoder_hidden_states.numpy()}
        residuals = controlnet.run(None, {**context, "controlnet_cond": self.controlnet_cond.numpy()})
        return unet.run(None, {**context, **dict(zip(RESIDUALS, residuals))})[0]


def _ensure_base(workspace: Workspace, arch: str, step: Step) -> tuple[str, float | None]:
    """``bench-<arch>`` with random weights, exported once per workspace; (name, export seconds or None)."""
    name = f"bench-{arch}"
    if name in workspace.base_names():
        return name, None
    start = time.perf_counter()
    export_base(workspace, name, arch=arch, seed=0, on_step=step)
    return name, time.perf_counter() - start

def _sample_loras(workspace: Workspace, arch: str, manifest: Manifest) -> dict[int, Path]:
    """kohya LoRAs of every rank in :data:`RANKS`, written once per workspace."""
    from ..samples import write_kohya_lora

    folder = workspace.cache / "bench" / arch
    paths = {}
    for rank in RANKS:
        paths[rank] = folder / f"kohya-r{rank}.safetensors"
        if not paths[rank].is_file():
            write_kohya_lora(paths[rank], manifest.param_shapes(), seed=rank, rank=rank, alpha=rank / 2)
    return paths

def _adapter_name(base: str, rank: int) -> str:
    """One name per base and rank: adapters are converted against one base each."""
    return f"{base}-r{rank}"

def merged_base(workspace: Workspace, base_dir: Path, manifest: Manifest, adapter_set: AdapterSet,
                step: Step) -> Path:
    """The adapter graphs (UNet, ControlNet, text encoder) with ``adapter_set`` merged into copies of their data files.

    The graphs are the base's own (the exporter would trace the merged model to the same
    nodes); only weight bytes differ, so creating sessions on this copy costs what it
    costs on a merged torch export, without the minutes and the RAM of exporting one.
    Cached under ``.cache/bench/merged-<key>`` by base fingerprint, sources and weights.
    """
    recipe = {"version": MERGED_VERSION, "base": manifest.fingerprint,
              "adapters": [[a.metadata.get("loramgr.source_sha256", a.name), w] for a, w in adapter_set.adapters]}
    key = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]
    folder = workspace.cache / "bench" / f"merged-{key}"
    if (folder / "recipe.json").is_file():
        return folder
    step("writing a merged copy of the base for the merged-export sessions")
    weights = BaseWeights(manifest, base_dir)
    tensors = merge_tensors(weights, adapter_set)
    with atomic_dir(folder) as tmp:
        for graph in (UNET, CONTROLNET, TEXT_ENCODER):
            info = manifest.graphs[graph]
            (tmp / info.path).parent.mkdir(parents=True)
            shutil.copyfile(base_dir / info.path, tmp / info.path)
            shutil.copyfile(base_dir / info.data, tmp / info.data)
            data = np.memmap(tmp / info.data, dtype=np.uint8, mode="r+")
            for name, array in tensors.get(graph, {}).items():
                weights.entry(graph, name).read(data)[...] = array
            data.flush()
            del data
        (tmp / "recipe.json").write_text(json.dumps(recipe))
    return folder
