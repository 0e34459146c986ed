"""The bench's harness: interleaved timing, device syncs, and what machine the figures come from.

The machines these numbers come from are often shared (2 cores, other jobs running),
so every comparison is made in one run with its variants interleaved repeat by repeat
(A, B, C, A, B, C, ...) and reported as medians and as ratios of those medians: a
drift then hits every variant alike.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

Step = Callable[[str], None]


def interleaved(variants: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
    """Run every variant once per repeat, in turn, so load drifts hit all alike; seconds per variant."""
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(r), "runs_s": r} for name, r in runs.items()}

BUSY_LIMIT_S = 900  # a competing process ends by itself after this, should the bench be killed

_BUSY = "import time\nend = time.monotonic() + float(__import__('sys').argv[1])\nwhile time.monotonic() < end: pass"


@contextmanager
def competing_process(limit_s: float = BUSY_LIMIT_S) -> Iterator[int]:
    """One process spinning on a core for the length of the block (and never longer than ``limit_s``); its pid."""
    busy = subprocess.Popen([sys.executable, "-c", _BUSY, str(limit_s)])
    try:
        time.sleep(0.2)  # scheduled and spinning before the first timing
        yield busy.pid
    finally:
        busy.kill()
        busy.wait()

def _ratio(numerator: dict, denominator: dict) -> float:
    return numerator["median_s"] / denominator["median_s"]

def paired(fn: Callable[..., float], *timings: dict) -> float:
    """The median over repeats of ``fn`` of each repeat's seconds (one per timing of :func:`interleaved`).

    A repeat's variants run back to back, so a ratio taken within each repeat sees one load;
    a ratio of medians does not when the load changes during the run (another job starting
    halfway makes the medians of some variants slow runs and of others fast ones).
    """
    return statistics.median(fn(*runs) for runs in zip(*(t["runs_s"] for t in timings)))

def _synced(fn: Callable[[], object], provider: str) -> Callable[[], None]:
    """``fn`` followed by a device sync on CUDA, so its time covers the kernels it queued."""
    def call() -> None:
        fn()
        if provider == "cuda":
            torch.cuda.synchronize()
    return call

def machine_info() -> dict:
    """CPU model, cores, RAM and load: figures only mean something next to these."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        "cpu": models[0] if models else platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": _physical_cores(cpuinfo) or os.cpu_count(),
        "ram_bytes": ram,
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }

def _physical_cores(cpuinfo: str) -> int:
    """Distinct (physical id, core id) pairs of /proc/cpuinfo; 0 where it does not say."""
    pairs, physical = set(), ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            physical = value.strip()
        elif key.strip() == "core id":
            pairs.add((physical, value.strip()))
    return len(pairs)

def versions() -> dict:
    import diffusers
    import onnxruntime
    import transformers

    from .. import __version__

    return {"loramgr": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__,
            "torch_threads": torch.get_num_threads()}
