"""``loramgr bench``: conversion, swap, step and memory figures, measured side by side.

The machines these numbers come from are often shared (2 cores, other jobs running),
so absolute seconds drift from minute to minute. Every comparison is therefore made
in one run with its variants interleaved repeat by repeat (A, B, C, A, B, C, ...) and
reported as medians and as ratios of those medians: a drift then hits every variant
alike. docs/benchmarks.md has the measured figures and the commands behind them.

The package: :mod:`.harness` (timing, machine), :mod:`.fixtures` (base, LoRAs, ControlNets,
inputs), :mod:`.measurements` (convert, swap, step, GPU), :mod:`.units` (step by ControlNet
units and guidance, against :mod:`.fused`, the fused graph of base format 1), :mod:`.memory`
(the child-process probes), :mod:`.goals` and :mod:`.rendering`; :func:`run_bench` runs them
in order. What each measures is listed in :mod:`.measurements`, :mod:`.units` and :mod:`.memory`.
"""

from __future__ import annotations

import os
import time

from ..adapters import load_adapter_set
from ..errors import LoramgrError
from ..manifest import Manifest
from ..models.architectures import ARCHITECTURES
from ..workspace import Workspace
from .fixtures import (
    LARGE, LORA_WEIGHT, OTHER_STEP_IMAGES, RANKS, SMALL, STEP_IMAGE, StepInputs, _adapter_name, _ensure_base,
    _sample_loras, merged_base,
)
from .goals import goals
from .harness import Step, interleaved, machine_info, versions
from .measurements import _ort_settings, bench_convert, bench_gpu, bench_step, bench_swap
from .memory import bench_memory, bench_slots, memory_probe
from .rendering import render_bench
from .units import bench_units

__all__ = ["LARGE", "RANKS", "SMALL", "StepInputs", "bench_convert", "bench_gpu", "bench_memory", "bench_slots",
           "bench_step", "bench_swap", "bench_units", "goals", "interleaved", "memory_probe", "merged_base",
           "render_bench", "run_bench"]


def run_bench(workspace: Workspace, arch: str = "tiny", *, repeats: int = 3, on_step: Step | None = None) -> dict:
    """Measure conversion, swaps, step time (by units, guidance, against the fused graph) and memory
    on ``bench-<arch>``; a JSON-able dict.

    The base (random weights), the sample LoRAs and the merged copy are cached in the
    workspace, so a second run only measures.

    Example:
        >>> result = run_bench(Workspace.resolve("/tmp/bench-ws"), "tiny", repeats=1)
        >>> result["swap"]["times"]["hot_swap_r4"]["median_s"] > 0
        True
    """
    if arch not in ARCHITECTURES:
        raise LoramgrError(f"--arch {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    if not isinstance(repeats, int) or repeats < 1:
        raise LoramgrError(f"--repeats must be a positive integer, got {repeats!r}")
    step = on_step or (lambda _: None)
    start = time.perf_counter()
    result: dict = {"arch": arch, "repeats": repeats, "machine": machine_info(), "versions": versions()}
    base, export_s = _ensure_base(workspace, arch, step)
    base_dir = workspace.base_dir(base)
    manifest = Manifest.load(base_dir)
    result["base"] = {"name": base, "export_s": export_s, "fingerprint": manifest.fingerprint}
    sources = _sample_loras(workspace, arch, manifest)
    step(f"convert: rank {' and '.join(map(str, RANKS))}, {repeats}x")
    result["convert"] = bench_convert(workspace, base, sources, repeats)
    sets = {rank: load_adapter_set(workspace, manifest, [f"{_adapter_name(base, rank)}:{LORA_WEIGHT}"])
            for rank in RANKS}
    result["swap"] = bench_swap(workspace, base_dir, manifest, sets, repeats, "cpu", step)
    inputs = StepInputs.random(base_dir, manifest, STEP_IMAGE[arch])
    result["step"] = bench_step(base_dir, manifest, inputs, repeats, "cpu", step,
                                _ort_settings(base_dir, manifest, sets))
    result["step_other_sizes"] = [bench_step(base_dir, manifest, StepInputs.random(base_dir, manifest, image), repeats,
                                             "cpu", step) for image in OTHER_STEP_IMAGES.get(arch, ())]
    result["units"] = bench_units(workspace, base_dir, manifest, inputs, repeats, "cpu", step)
    result["memory"] = bench_memory(workspace, base, manifest, step)
    result["slots"] = bench_slots(workspace, base, manifest, step)
    result["gpu"] = bench_gpu(workspace, base_dir, manifest, sets, inputs, repeats, step)
    result["goals"] = goals(result)
    result["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["seconds"] = time.perf_counter() - start
    return result
