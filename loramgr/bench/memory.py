"""The bench's memory probes, each in a child process: peak RSS of a ``run`` with two LoRAs, and RSS by ControlNet slots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import LoramgrError
from ..manifest import CONTROLNET, Manifest
from ..workspace import Workspace
from .fixtures import (
    LORA_WEIGHT, MAX_SLOTS, MEMORY_RUN, MEMORY_RUN_STEPS, RANKS, StepInputs, _adapter_name, sample_controlnets,
)
from .harness import Step



_CHILD = "import json, sys; from loramgr.bench.memory import memory_probe; print(json.dumps(memory_probe(*sys.argv[1:])))"

def memory_probe(home: str, base: str, mode: str) -> dict:
    """In a child process: a ``run`` with both sample LoRAs (or only the imports, ``mode="imports"``;
    ``mode="slots"``: :func:`slots_probe`).

    Returns this process's peak RSS and, for a run, what RSS was made of at its highest sample.
    """
    if mode == "slots":
        return slots_probe(Workspace.resolve(home), base)
    import onnxruntime  # noqa: F401  - the floor counts the libraries a run loads

    from ..adapters import AdapterChoice
    from ..pipeline.settings import GenerationSettings
    from ..runtime import generate
    from ..samples import sample_image

    if mode == "run":
        workspace = Workspace.resolve(home)
        arch = Manifest.load(workspace.base_dir(base)).source["arch"]
        folder = workspace.cache / "bench" / arch / "memory-run"
        folder.mkdir(parents=True, exist_ok=True)
        image = folder / "house.png"
        if not image.is_file():
            from PIL import Image

            Image.fromarray(sample_image(MEMORY_RUN[arch])).save(image)
        settings = GenerationSettings(prompt="a house", n_prompt="lowres", resolution=MEMORY_RUN[arch],
                                      steps=MEMORY_RUN_STEPS)
        loras = tuple(f"{_adapter_name(base, rank)}:{LORA_WEIGHT / len(RANKS)}" for rank in RANKS)
        with RssSampler() as sampler:
            generate(workspace, image, settings, [AdapterChoice(loras)], base=base, out_dir=folder, stem="run",
                     overwrite=True)
        return {"peak_rss_bytes": _peak_rss(), "at_peak": sampler.at_peak}
    return {"peak_rss_bytes": _peak_rss()}

def slots_probe(workspace: Workspace, base: str) -> dict:
    """RSS of one ORT runner (loramgr's defaults) as ControlNets come into slots: 0, then 1 to :data:`MAX_SLOTS`.

    As in the service, each ControlNet comes in by a swap (``set_adapters``) and its file is
    loaded once; after each, one step runs a unit per ControlNet at the memory run's size,
    so every slot's weights have been read (ONNX Runtime maps a data file's pages in as they
    are read) before RSS is taken.
    """
    from ..adapters import AdapterSet, load_named
    from ..backends.onnxruntime import OrtRunner

    base_dir = workspace.base_dir(base)
    manifest = Manifest.load(base_dir)
    controls = sample_controlnets(workspace, base, manifest)
    inputs = StepInputs.random(base_dir, manifest, MEMORY_RUN[manifest.source["arch"]])
    rows, files = [], []
    with OrtRunner.open(base_dir, AdapterSet(base_controlnet=False)) as runner:
        for count in range(MAX_SLOTS + 1):
            loaded = None
            if count > 1:
                files.append(load_named(workspace, controls[count - 1]))
                loaded = _proc_status().get("VmRSS")  # its file loaded, as the service's catalog loads it
            runner.set_adapters(AdapterSet(tuple((f, 1.0) for f in files), base_controlnet=count > 0))
            inputs.step(runner, controls[:count])
            status = _proc_status()
            rows.append({"slots": len(runner.controlnet_slots()), "rss_bytes": status.get("VmRSS"),
                         "file_loaded_rss_bytes": loaded,
                         "at_end": {k: status[k] for k in ("VmRSS", "RssAnon", "RssFile") if k in status}})
    return {"rows": rows}

def _proc_status() -> dict[str, int]:
    """/proc/self/status sizes in bytes (``VmHWM``, ``RssAnon``...); empty where there is none."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return {}
    sizes = {}
    for line in status.read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith(" kB"):
            sizes[key] = int(value.split()[0]) * 1024
    return sizes

def _peak_rss() -> int:
    """This process's peak RSS in bytes: ``VmHWM`` where Linux reports it.

    Not ``ru_maxrss``: Linux carries the pre-``exec`` high-water mark into it, and Python
    starts children with ``vfork``, so a child's ``ru_maxrss`` (and the parent's
    ``RUSAGE_CHILDREN``) includes the parent's own peak. ``VmHWM`` belongs to the
    child's address space alone.
    """
    peak = _proc_status().get("VmHWM")
    if peak is not None:
        return peak
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

class RssSampler:
    """Polls /proc/self/status in a thread and keeps the sample with the highest ``VmRSS``.

    ``VmHWM`` gives the peak but not what it is made of. The split matters: anonymous
    memory is loramgr's and ONNX Runtime's own, while mapped file pages are the page
    cache, and a page mapped twice (ONNX Runtime's mapping of a data file and loramgr's
    memory map of the same file) counts twice in RSS.
    """

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.at_peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            status = _proc_status()
            if status.get("VmRSS", 0) > self.at_peak.get("VmRSS", -1):
                self.at_peak = {k: status[k] for k in ("VmRSS", "RssAnon", "RssFile") if k in status}

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

def _child_memory(workspace: Workspace, base: str, mode: str) -> dict:
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(workspace.home), base, mode],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise LoramgrError(f"memory probe ({mode}) failed with exit code {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])

def bench_memory(workspace: Workspace, base: str, manifest: Manifest, step: Step) -> dict:
    base_dir = workspace.base_dir(base)
    weights = sum((base_dir / g.data).stat().st_size for g in manifest.graphs.values() if g.data)
    step(f"memory: a run with {len(RANKS)} LoRAs in a child process")
    start = time.perf_counter()
    run = _child_memory(workspace, base, "run")
    run_s = time.perf_counter() - start
    floor = _child_memory(workspace, base, "imports")["peak_rss_bytes"]
    return {"base_weights_bytes": weights, "peak_rss_bytes": run["peak_rss_bytes"], "at_peak": run["at_peak"],
            "ratio": run["peak_rss_bytes"] / weights,
            "imports_rss_bytes": floor, "run_s": run_s,
            "run": {"resolution": MEMORY_RUN[manifest.source["arch"]], "steps": MEMORY_RUN_STEPS,
                    "loras": [_adapter_name(base, rank) for rank in RANKS]}}

def bench_slots(workspace: Workspace, base: str, manifest: Manifest, step: Step) -> dict:
    """RSS of a runner with 0 to :data:`MAX_SLOTS` distinct ControlNets in slots (:func:`slots_probe`, a child).

    ``added_bytes``: what each ControlNet adds, in bytes and (``added_vs_weights``) in units of
    one ControlNet's weights (the ControlNet graph's data file). The first is the base's own;
    the others are converted ControlNets (``.lora`` files), as a request's further units name.
    A converted one's share is split in two: ``file_bytes``, its loaded file (its tensors stay
    resident while it is in a slot: the slot keeps the file it was filled from), and
    ``slot_bytes`` / ``slot_vs_weights``, what taking it into a slot and running a step adds.
    """
    sample_controlnets(workspace, base, manifest)  # converted here, not in the child being measured
    weights = manifest.graphs[CONTROLNET].data_size or sum(e.length for e in manifest.graphs[CONTROLNET].weights.values())
    step(f"memory: a runner taking 0 to {MAX_SLOTS} ControlNets into slots (child process)")
    rows = _child_memory(workspace, base, "slots")["rows"]
    added = {str(k): rows[k]["rss_bytes"] - rows[k - 1]["rss_bytes"] for k in range(1, len(rows))}  # ControlNet k
    before_slot = {str(k): rows[k]["file_loaded_rss_bytes"] or rows[k - 1]["rss_bytes"] for k in range(1, len(rows))}
    slot = {k: rows[int(k)]["rss_bytes"] - before for k, before in before_slot.items()}
    return {"controlnet_weights_bytes": weights, "image": MEMORY_RUN[manifest.source["arch"]], "rows": rows,
            "added_bytes": added,
            "added_vs_weights": {k: v / weights for k, v in added.items()},
            "file_bytes": {k: added[k] - slot[k] for k in added},
            "slot_bytes": slot,
            "slot_vs_weights": {k: v / weights for k, v in slot.items()}}
