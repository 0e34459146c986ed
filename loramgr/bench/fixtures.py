"""What the bench measures on: the bench base, the sample LoRAs, step inputs and a merged copy of the base."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..adapters import BASE_CONTROLNET, AdapterSet
from ..export import export_base
from ..manifest import CONTROLNET, TEXT_ENCODER, UNET, Manifest
from ..merge import BaseWeights, merge_tensors
from ..models.graphs import RESIDUALS
from ..pipeline.control import ControlUnit
from ..pipeline.controlnet import ControlNetPipeline, _Unit
from ..pipeline.schedulers import make_scheduler
from ..pipeline.settings import GenerationSettings
from ..workspace import Workspace, atomic_dir
from .harness import Step

SMALL, LARGE = 4, 128  # ranks of a typical LoRA and a large one; both cover UNet attention + text encoder

RANKS = (SMALL, LARGE)

LORA_WEIGHT = 0.8

STEP_IMAGE = {"tiny": 128, "sd15": 512}  # image side of the timed step (latents: 1/8 of it)

OTHER_STEP_IMAGES = {"sd15": (256,)}  # the CPU anchors of docs/benchmarks.md were taken at 256x256

MEMORY_RUN = {"tiny": 64, "sd15": 256}  # resolution of the run whose peak RSS is measured

MEMORY_RUN_STEPS = 3

MAX_SLOTS = 3  # ControlNets in slots for the memory rows (the service's --max-controlnets default)

CHECK_IMAGE = 64  # image side of the outputs compared across the swap routes

MERGED_VERSION = 3  # bump when the merged copy's recipe changes: old caches no longer apply (3: graphs apart)


GUIDED_SCALE = 7.0  # A1111's default CFG scale; any scale > 1 runs both halves

SCHEDULER_STEPS = 20  # the step timed is the middle one of a 20-step DDIM schedule


@dataclass(frozen=True)
class StepInputs:
    """One denoising step's inputs at ``image`` pixels a side: latents, the prompt's two halves, a control image.

    The step itself is the pipeline's (:meth:`ControlNetPipeline.predict`): each unit's
    ControlNet call, the residuals scaled and summed, the UNet on a batch of 2 (CFG) or
    of 1 (``scale <= 1``), the guidance mix. Not an imitation of it.
    """

    latents: torch.Tensor  # [1, 4, h, w]
    cond: torch.Tensor  # [1, 77, D]
    uncond: torch.Tensor  # [1, 77, D]
    control_image: torch.Tensor  # [1, 3, H, W] in [0, 1]
    scheduler_config: dict

    @classmethod
    def random(cls, base_dir: Path, manifest: Manifest, image: int, seed: int = 0) -> StepInputs:
        latent = image // 2 ** (len(manifest.configs["vae"]["block_out_channels"]) - 1)
        width = manifest.configs["text_encoder"]["hidden_size"]
        gen = torch.Generator().manual_seed(seed)
        config = json.loads((base_dir / "scheduler" / "scheduler_config.json").read_text())
        return cls(torch.randn(1, 4, latent, latent, generator=gen), torch.randn(1, 77, width, generator=gen),
                   torch.randn(1, 77, width, generator=gen), torch.rand(1, 3, image, image, generator=gen), config)

    def stepper(self, runner, controlnets: Sequence[str | None] = (None,), scale: float = GUIDED_SCALE
                ) -> Callable[[], torch.Tensor]:
        """One step with a unit per entry of ``controlnets`` (``None``: the set's only ControlNet), set up once.

        The call is ``ControlNetPipeline.predict`` on ready units, as the denoising loop makes it.
        """
        pipe, scheduler, t = self._pipeline(runner)
        settings = GenerationSettings(prompt="", scale=scale, units=tuple(ControlUnit(c) for c in controlnets))
        acting = self._ready(pipe, settings)
        latents, cond, uncond = (x.to(runner.device) for x in (self.latents, self.cond, self.uncond))
        return partial(pipe.predict, scheduler, latents, t, cond, uncond, acting, settings)

    def step(self, runner, controlnets: Sequence[str | None] = (None,), scale: float = GUIDED_SCALE) -> torch.Tensor:
        """:meth:`stepper`, called once: the guided noise prediction."""
        return self.stepper(runner, controlnets, scale)()

    def noise(self, runner) -> torch.Tensor:
        """The UNet's raw output on the CFG batch (uncond, cond) with one unit: ``ControlNetPipeline.model``."""
        pipe, _, t = self._pipeline(runner)
        settings = GenerationSettings(prompt="", units=(ControlUnit(),))
        latents, context = self.batch(runner.device)
        return pipe.model(latents, t, context, self._ready(pipe, settings), halves=(False, True))

    def batch(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The CFG batch of 2 the guided step runs on: latents twice, and (uncond, cond)."""
        return (torch.cat([self.latents] * 2).to(device), torch.cat([self.uncond, self.cond]).to(device))

    def scheduler(self, device: torch.device | str = "cpu") -> tuple[object, torch.Tensor]:
        """A DDIM scheduler from the base's config, and the timestep every step here runs at."""
        scheduler = make_scheduler("ddim", self.scheduler_config)
        scheduler.set_timesteps(SCHEDULER_STEPS, device=device)
        return scheduler, scheduler.timesteps[SCHEDULER_STEPS // 2]

    def _pipeline(self, runner) -> tuple[ControlNetPipeline, object, torch.Tensor]:
        pipe = ControlNetPipeline(runner, None, self.scheduler_config, 1.0)  # no tokenizer or VAE: one step only
        return (pipe, *self.scheduler(runner.device))

    def _ready(self, pipe: ControlNetPipeline, settings: GenerationSettings) -> list[_Unit]:
        """The units as the pipeline readies them (``_generate``, phase 3), all on this control image."""
        image = self.control_image.to(pipe.runner.device)
        return [_Unit(unit, image, unit.scales(settings.control_schedule)) for unit in settings.control_units()]

    def describe(self) -> dict:
        return {"image": self.control_image.shape[-1], "latent": [2, *self.latents.shape[1:]]}

    def control_feeds(self) -> dict[str, np.ndarray]:
        """The ControlNet graph's inputs by name on the CFG batch (the fused graph's, less its scales)."""
        latents, context = self.batch()
        return {"sample": latents.numpy(), "timestep": self.scheduler()[1].float().expand(2).numpy(),
                "encoder_hidden_states": context.numpy(),
                "controlnet_cond": self.control_image.expand(2, -1, -1, -1).numpy()}

    def run_sessions(self, controlnet, unet) -> np.ndarray:
        """:meth:`noise` on plain InferenceSessions of the ControlNet and the UNet graphs."""
        feeds = self.control_feeds()
        residuals = controlnet.run(None, feeds)
        del feeds["controlnet_cond"]  # the UNet takes the residuals instead
        return unet.run(None, {**feeds, **dict(zip(RESIDUALS, residuals))})[0]


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

def sample_controlnets(workspace: Workspace, base: str, manifest: Manifest) -> list[str]:
    """The ControlNets of the slot rows: the base's own (``canny``), then converted random ones, written once."""
    from ..convert import convert_adapter
    from ..samples import write_controlnet

    names = [BASE_CONTROLNET]
    for i in range(1, MAX_SLOTS):
        name = f"{base}-cn{i}"
        if not workspace.adapter_path(name).is_file():
            source = write_controlnet(workspace.cache / "bench" / manifest.source["arch"] / f"cn{i}",
                                      manifest.configs["controlnet"], seed=100 + i)
            convert_adapter(workspace, source, base=base, name=name)
            shutil.rmtree(source)  # the .lora holds every weight; the source is not needed again
        names.append(name)
    return names

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
