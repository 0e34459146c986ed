"""The bench's measurements: convert, swap routes, step against torch and ORT settings, GPU.

1. convert: ``convert_adapter`` on kohya LoRAs of rank 4 and 128 (UNet + text encoder);
2. swap to a LoRA: (a) new sessions on a merged export, at ORT levels ``all`` and
   ``basic``; (b) new sessions with the merged tensors injected; (c) a hot swap on an
   open runner, against its floor (a plain copy of the bytes it rewrites) and again
   while a busy process competes for a core;
3. step: one denoising step with one ControlNet unit (the pipeline's, CFG batch of 2) in
   ONNX Runtime against diffusers torch on the same weights and inputs, plus ORT settings
   as rows of their own;
5. step, units and swap on CUDA, where torch and onnxruntime both see a GPU.
(4, memory, is :mod:`.memory`; step by units and guidance, :mod:`.units`.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..adapters import AdapterSet, touched_names, union_touched
from ..backends.base import text_feeds
from ..backends.onnxruntime import PROVIDERS, OrtOptions, OrtRunner, plain_session
from ..convert import convert_adapter
from ..manifest import CONTROLNET, TEXT_ENCODER, UNET, Manifest
from ..merge import BaseWeights, one_torch_thread
from ..workspace import Workspace
from .fixtures import CHECK_IMAGE, LARGE, LORA_WEIGHT, RANKS, SMALL, StepInputs, _adapter_name, merged_base
from .harness import Step, _ratio, _synced, competing_process, interleaved
from .units import bench_units


def _sessions(paths: list[Path], level: str, provider: str) -> list:
    """Plain InferenceSessions (loramgr's defaults but the level): what a merged export gets."""
    options = OrtOptions(provider=provider, optimization=level)
    return [plain_session(p, options) for p in paths]


def _graph_paths(folder: Path, manifest: Manifest) -> list[Path]:
    return [folder / manifest.graphs[g].path for g in (CONTROLNET, UNET, TEXT_ENCODER)]

def bench_convert(workspace: Workspace, base: str, sources: Mapping[int, Path], repeats: int) -> dict:
    """Seconds of ``convert_adapter`` per rank (each repeat writes the same ``.lora`` again)."""
    reports = {}

    def convert(rank: int) -> None:
        reports[rank] = convert_adapter(workspace, sources[rank], base=base, name=_adapter_name(base, rank))

    times = interleaved({f"r{rank}": partial(convert, rank) for rank in RANKS}, repeats)
    return {f"r{rank}": {**times[f"r{rank}"], "rank": rank, "modules": reports[rank].modules,
                         "source_bytes": reports[rank].source_bytes, "lora_bytes": reports[rank].size_bytes}
            for rank in RANKS}

def _open_injected(base_dir: Path, adapter_set: AdapterSet, provider: str) -> OrtRunner:
    return OrtRunner.open(base_dir, adapter_set, OrtOptions(provider=provider, hot_swap=False))

def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())

def _agreement(hot: OrtRunner, merged: Path, base_dir: Path, manifest: Manifest, adapter_set: AdapterSet,
               provider: str) -> dict:
    """Max |difference| of noise_pred and text embeddings between the three routes, at one small input.

    All three run the same weights at level basic, so they should agree to rounding
    (prepacked and unpacked kernels may sum in another order): a large figure would
    mean the routes being timed do not hold the same model.
    """
    inputs = StepInputs.random(base_dir, manifest, CHECK_IMAGE, seed=1)
    ids = torch.arange(77, dtype=torch.int64).reshape(1, 77) % 3

    def outputs(runner) -> tuple[np.ndarray, np.ndarray]:
        return inputs.noise(runner).cpu().numpy(), runner.encode_text(ids).cpu().numpy()

    hot_out = outputs(hot)
    with _open_injected(base_dir, adapter_set, provider) as injected:
        injected_out = outputs(injected)
    controlnet, unet, text = _sessions(_graph_paths(merged, manifest), "basic", provider)
    width = manifest.configs["text_encoder"]["hidden_size"]
    merged_out = (inputs.run_sessions(controlnet, unet),
                  text.run(None, {k: v.numpy() for k, v in text_feeds(ids, None, None, width).items()})[0])
    return {
        "hot_swap_vs_injection": max(_max_diff(x, y) for x, y in zip(hot_out, injected_out)),
        "merged_export_vs_injection": max(_max_diff(x, y) for x, y in zip(merged_out, injected_out)),
    }

def _copy_floor(buffers: Mapping[str, Mapping[str, torch.Tensor]], names: Mapping[str, set[str]]) -> Callable[[], None]:
    """A plain copy of the bytes a swap rewrites (one thread, into memory already touched): the swap's floor."""
    sources = [buffers[g][n] for g, named in names.items() for n in sorted(named)]
    copies = [torch.zeros_like(t) for t in sources]

    def copy() -> None:
        with one_torch_thread():
            for source, target in zip(sources, copies):
                target.copy_(source)
    return copy

def bench_swap(workspace: Workspace, base_dir: Path, manifest: Manifest, sets: Mapping[int, AdapterSet],
               repeats: int, provider: str, step: Step) -> dict:
    """Seconds to go from one LoRA to another: (a) merged export, (b) injection, (c) hot swap, and the floor.

    Hot swaps alternate between the two sample LoRAs on one runner whose swappable set
    covers both; ``copy_floor`` copies the bytes such a swap rewrites from one buffer to
    another, so ``hot_swap_*`` over it says how far the swap is from memory speed. The
    hot swaps and the floor are then measured again while one busy process competes for
    a core (``under_load``; started and stopped here, bounded in time).
    """
    lora = sets[SMALL]
    merged = merged_base(workspace, base_dir, manifest, lora, step)
    step(f"swap ({provider}): opening the hot-swap runner")
    hot = OrtRunner.open(base_dir, lora, OrtOptions(provider=provider), swappable=union_touched(sets.values()))
    try:
        step(f"swap ({provider}): merged-export sessions, injection and hot swaps, {repeats}x")
        rewritten = touched_names(sets[SMALL], sets[LARGE])
        swaps = {f"hot_swap_r{LARGE}": partial(hot.set_adapters, sets[LARGE]),  # in pairs, each from the other
                 f"hot_swap_r{SMALL}": partial(hot.set_adapters, lora),  # LoRA; the runner ends holding `lora`
                 "copy_floor": _copy_floor({g: s.buffers for g, s in hot._graphs.items()}, rewritten)}
        variants = {
            "merged_export_all": partial(_sessions, _graph_paths(merged, manifest), "all", provider),
            "merged_export_basic": partial(_sessions, _graph_paths(merged, manifest), "basic", provider),
            "injection": lambda: _open_injected(base_dir, lora, provider).close(),
            **swaps,
        }
        times = interleaved({k: _synced(fn, provider) for k, fn in variants.items()}, repeats)
        step(f"swap ({provider}): hot swaps while a busy process competes for a core, {repeats}x")
        with competing_process():
            loaded = interleaved({k: _synced(fn, provider) for k, fn in swaps.items()}, repeats)
        step(f"swap ({provider}): checking that the routes hold the same model")
        agreement = _agreement(hot, merged, base_dir, manifest, lora, provider)
        swappable = hot.swappable()
        base = BaseWeights(manifest, base_dir)
        buffer_bytes = sum(base.entry(g, n).length for g, names in swappable.items() for n in names)
        rewritten_bytes = sum(base.entry(g, n).length for g, names in rewritten.items() for n in names)
    finally:
        hot.close()
    hot_swap = times[f"hot_swap_r{SMALL}"]
    return {
        "lora": {"rank": SMALL, "weight": LORA_WEIGHT, "targets": {g: len(n) for g, n in lora.touched().items()}},
        "buffers": {"count": sum(len(n) for n in swappable.values()), "bytes": buffer_bytes,
                    "rewritten_bytes": rewritten_bytes},
        "times": times,
        "vs_floor": {f"r{rank}": _ratio(times[f"hot_swap_r{rank}"], times["copy_floor"]) for rank in RANKS},
        "under_load": {"times": loaded,
                       "vs_quiet": {k: _ratio(loaded[k], times[k]) for k in swaps},
                       "vs_floor": {f"r{rank}": _ratio(loaded[f"hot_swap_r{rank}"], loaded["copy_floor"])
                                    for rank in RANKS}},
        "speedup_vs_merged_all": _ratio(times["merged_export_all"], hot_swap),
        "speedup_vs_merged_basic": _ratio(times["merged_export_basic"], hot_swap),
        "speedup_vs_injection": _ratio(times["injection"], hot_swap),
        "max_abs_diff": agreement,
    }

def _torch_runner(base_dir: Path, manifest: Manifest, provider: str):
    """diffusers' modules from the diffusers folder a bench base keeps beside its graphs (``source/``)."""
    from ..backends.torch_runner import TorchRunner
    from ..models.loading import load_components

    components = load_components(base_dir / manifest.source["model"])
    if provider == "cuda":
        for name in ("unet", "controlnet", "vae", "text_encoder"):
            components[name].to("cuda")
    return TorchRunner.from_components(components)

def _ort_settings(base_dir: Path, manifest: Manifest, sets: Mapping[int, AdapterSet]) -> dict[str, Callable]:
    """ORT configurations worth a row of their own, each opened on demand (one at a time: RAM)."""
    return {
        "hot-swap buffers (--lora: prepacking off)":
            lambda: OrtRunner.open(base_dir, sets[SMALL], OrtOptions()),
        "all, no hot swap (--ort-opt all --no-hot-swap)":
            lambda: OrtRunner.open(base_dir, AdapterSet(), OrtOptions(optimization="all", hot_swap=False)),
        "attention as exported (--no-fuse-attention)":
            lambda: OrtRunner.open(base_dir, AdapterSet(), OrtOptions(fuse_attention=False)),
    }

def _setting_row(open_variant: Callable, default_step: Callable[[], None], inputs: StepInputs, repeats: int,
                 torch_speedup: float) -> dict:
    variant = open_variant()
    try:
        variant_step = inputs.stepper(variant)
        variant_step()  # warm-up
        times = interleaved({"default": default_step, "variant": variant_step}, repeats)
    finally:
        variant.close()
    speedup = _ratio(times["default"], times["variant"])
    return {**times["variant"], "default_median_s": times["default"]["median_s"],
            "speedup_vs_default": speedup, "speedup_vs_torch": torch_speedup * speedup}

def bench_step(base_dir: Path, manifest: Manifest, inputs: StepInputs, repeats: int, provider: str, step: Step,
               settings: Mapping[str, Callable] | None = None) -> dict:
    """loramgr's ORT runner (defaults, plain base) against diffusers torch, then against each setting.

    Every runner gets a warm-up call first (first runs allocate). The torch model is
    released before the settings, which are opened one at a time and interleaved with
    the default runner (an sd15 session holds GBs); a setting's ``speedup_vs_torch``
    chains the two ratios measured side by side.
    """
    step(f"step ({provider}): opening ORT and loading the torch model")
    with OrtRunner.open(base_dir, options=OrtOptions(provider=provider)) as default:
        ort_step = _synced(inputs.stepper(default), provider)
        torch_step = _synced(inputs.stepper(_torch_runner(base_dir, manifest, provider)), provider)
        torch_step(), ort_step()
        step(f"step ({provider}): torch and ORT, {repeats}x")
        times = interleaved({"torch": torch_step, "ort": ort_step}, repeats)
        del torch_step  # the torch model goes with it
        speedup = _ratio(times["torch"], times["ort"])
        rows = {}
        for label, open_variant in (settings or {}).items():
            step(f"step: ORT {label}, {repeats}x")
            rows[label] = _setting_row(open_variant, ort_step, inputs, repeats, speedup)
    return {**inputs.describe(), "vs_torch": {**times, "speedup": speedup}, "ort_settings": rows}

def _no_gpu_reason() -> str | None:
    import onnxruntime

    if not torch.cuda.is_available():
        return "not measured: no GPU (torch.cuda.is_available() is False)"
    if PROVIDERS["cuda"] not in onnxruntime.get_available_providers():
        return "not measured: no GPU for onnxruntime (no CUDAExecutionProvider: install onnxruntime-gpu)"
    return None

def bench_gpu(workspace: Workspace, base_dir: Path, manifest: Manifest, sets: Mapping[int, AdapterSet],
              inputs: StepInputs, repeats: int, step: Step) -> dict:
    reason = _no_gpu_reason()
    if reason:
        return {"measured": False, "reason": reason}
    return {"measured": True, "device": torch.cuda.get_device_name(),
            "swap": bench_swap(workspace, base_dir, manifest, sets, repeats, "cuda", step),
            "step": bench_step(base_dir, manifest, inputs, repeats, "cuda", step),
            "units": bench_units(workspace, base_dir, manifest, inputs, repeats, "cuda", step)}
