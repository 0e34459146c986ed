"""The bench's measurements: convert, swap routes, step against torch and ORT settings, GPU.

1. convert: ``convert_adapter`` on kohya LoRAs of rank 4 and 128 (UNet + text encoder);
2. swap to a LoRA: (a) new sessions on a merged export, at ORT levels ``all`` and
   ``basic``; (b) new sessions with the merged tensors injected; (c) a hot swap on an
   open runner, with the share of it spent merging;
3. step: one UNet+ControlNet call (CFG batch of 2) in ONNX Runtime against diffusers
   torch on the same weights and inputs, plus ORT settings as rows of their own;
5. step and swap on CUDA, where torch and onnxruntime both see a GPU.
(4, memory, is :mod:`.memory`.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..adapters import AdapterSet, union_touched
from ..backends.onnxruntime import PROVIDERS, OrtOptions, OrtRunner, plain_session
from ..convert import convert_adapter
from ..manifest import FUSED, TEXT_ENCODER, Manifest
from ..merge import BaseWeights, merge_tensors
from ..workspace import Workspace
from .fixtures import CHECK_IMAGE, LARGE, LORA_WEIGHT, RANKS, SMALL, StepInputs, _adapter_name, fused_feeds, merged_base
from .harness import Step, _ratio, _synced, interleaved


def _sessions(paths: list[Path], level: str, provider: str, config: Mapping[str, str] | None = None) -> list:
    """Plain InferenceSessions (ORT's own defaults but the level): what a merged export gets."""
    options = OrtOptions(provider=provider, optimization=level)
    return [plain_session(p, options, config) for p in paths]


class FusedSession:
    """The fused graph in a plain session with extra config entries: settings OrtRunner does not expose."""

    def __init__(self, path: Path, level: str, config: Mapping[str, str]):
        self.session = _sessions([path], level, "cpu", config)[0]

    def predict_noise(self, *args: torch.Tensor) -> np.ndarray:
        return self.session.run(None, fused_feeds(*args))[0]

    def close(self) -> None:
        self.session = None

def _graph_paths(folder: Path, manifest: Manifest) -> list[Path]:
    return [folder / manifest.graphs[g].path for g in (FUSED, TEXT_ENCODER)]

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
    inputs = StepInputs.random(manifest, CHECK_IMAGE, seed=1)
    ids = torch.arange(77, dtype=torch.int64).reshape(1, 77) % 3

    def outputs(runner) -> tuple[np.ndarray, np.ndarray]:
        return runner.predict_noise(*inputs.args()).cpu().numpy(), runner.encode_text(ids).cpu().numpy()

    hot_out = outputs(hot)
    with _open_injected(base_dir, adapter_set, provider) as injected:
        injected_out = outputs(injected)
    fused, text = _sessions(_graph_paths(merged, manifest), "basic", provider)
    merged_out = (fused.run(None, inputs.feeds())[0], text.run(None, {"input_ids": ids.numpy()})[0])
    return {
        "hot_swap_vs_injection": max(_max_diff(x, y) for x, y in zip(hot_out, injected_out)),
        "merged_export_vs_injection": max(_max_diff(x, y) for x, y in zip(merged_out, injected_out)),
    }

def _torch_single_threaded(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` with torch limited to one thread: the merge's many small matmuls then skip OpenMP barriers."""
    def call() -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fn()
        finally:
            torch.set_num_threads(threads)
    return call

def bench_swap(workspace: Workspace, base_dir: Path, manifest: Manifest, sets: Mapping[int, AdapterSet],
               repeats: int, provider: str, step: Step) -> dict:
    """Seconds to go from one LoRA to another: (a) merged export, (b) injection, (c) hot swap.

    Hot swaps alternate between the two sample LoRAs on one runner whose swappable set
    covers both; ``..._merge`` times :func:`merge_tensors` alone with the swap's arguments,
    so (c) minus it is the ``update_inplace`` part; ``..._torch1`` repeats the swaps with
    torch on one thread (a setting, not loramgr's default).
    """
    lora = sets[SMALL]
    merged = merged_base(workspace, base_dir, manifest, lora, step)
    step(f"swap ({provider}): opening the hot-swap runner")
    hot = OrtRunner.open(base_dir, lora, OrtOptions(provider=provider), swappable=union_touched(sets.values()))
    try:
        step(f"swap ({provider}): merged-export sessions, injection and hot swaps, {repeats}x")
        to_large, to_small = partial(hot.set_adapters, sets[LARGE]), partial(hot.set_adapters, lora)
        variants = {  # hot swaps in pairs, so each starts from the other LoRA
            "merged_export_all": partial(_sessions, _graph_paths(merged, manifest), "all", provider),
            "merged_export_basic": partial(_sessions, _graph_paths(merged, manifest), "basic", provider),
            "injection": lambda: _open_injected(base_dir, lora, provider).close(),
            f"hot_swap_r{LARGE}": to_large,
            f"hot_swap_r{SMALL}": to_small,
            f"hot_swap_r{SMALL}_merge": partial(merge_tensors, BaseWeights(manifest, base_dir), lora, only=hot.swappable()),
            f"hot_swap_r{LARGE}_torch1": _torch_single_threaded(to_large),
            f"hot_swap_r{SMALL}_torch1": _torch_single_threaded(to_small),  # last: the runner holds `lora`
        }
        times = interleaved({k: _synced(fn, provider) for k, fn in variants.items()}, repeats)
        step(f"swap ({provider}): checking that the routes hold the same model")
        agreement = _agreement(hot, merged, base_dir, manifest, lora, provider)
        swappable = hot.swappable()
        base = BaseWeights(manifest, base_dir)
        buffer_bytes = sum(base.entry(g, n).length for g, names in swappable.items() for n in names)
    finally:
        hot.close()
    hot_swap = times[f"hot_swap_r{SMALL}"]
    return {
        "lora": {"rank": SMALL, "weight": LORA_WEIGHT, "targets": {g: len(n) for g, n in lora.touched().items()}},
        "buffers": {"count": sum(len(n) for n in swappable.values()), "bytes": buffer_bytes},
        "times": times,
        "hot_swap_merge_share": _ratio(times[f"hot_swap_r{SMALL}_merge"], hot_swap),
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
    fused = base_dir / manifest.graphs[FUSED].path
    return {
        "basic, hot-swap buffers (run --lora: prepacking off)":
            lambda: OrtRunner.open(base_dir, sets[SMALL], OrtOptions()),
        "all, no hot swap (run --ort-opt all --no-hot-swap)":
            lambda: OrtRunner.open(base_dir, AdapterSet(), OrtOptions(optimization="all", hot_swap=False)),
        "basic, session.intra_op.allow_spinning=0":
            lambda: FusedSession(fused, "basic", {"session.intra_op.allow_spinning": "0"}),
        "all, session.intra_op.allow_spinning=0":
            lambda: FusedSession(fused, "all", {"session.intra_op.allow_spinning": "0"}),
    }

def _setting_row(open_variant: Callable, default_step: Callable[[], None], inputs: StepInputs, repeats: int,
                 torch_speedup: float) -> dict:
    variant = open_variant()
    try:
        variant_step = partial(variant.predict_noise, *inputs.args())
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
        ort_step = _synced(partial(default.predict_noise, *inputs.args()), provider)
        torch_step = _synced(partial(_torch_runner(base_dir, manifest, provider).predict_noise, *inputs.args()),
                             provider)
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
            "step": bench_step(base_dir, manifest, inputs, repeats, "cuda", step)}
