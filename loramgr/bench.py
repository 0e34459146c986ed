"""``loramgr bench``: conversion, swap, step and memory figures, measured side by side.

The machines these numbers come from are often shared (2 cores, other jobs running),
so absolute seconds drift from minute to minute. Every comparison is therefore made
in one run with its variants interleaved repeat by repeat (A, B, C, A, B, C, ...) and
reported as medians and as ratios of those medians: a drift then hits every variant
alike. docs/benchmarks.md has the measured figures and the commands behind them.

1. convert: ``convert_adapter`` on kohya LoRAs of rank 4 and 128 (UNet + text encoder);
2. swap to a LoRA: (a) new sessions on a merged export, at ORT levels ``all`` and
   ``basic``; (b) new sessions with the merged tensors injected; (c) a hot swap on an
   open runner, with the share of it spent merging;
3. step: one UNet+ControlNet call (CFG batch of 2) in ONNX Runtime against diffusers
   torch on the same weights and inputs, plus ORT settings as rows of their own;
4. memory: peak RSS of a ``run`` with two LoRAs, in a child process, against the size
   of the base's weight files;
5. step and swap on CUDA, where torch and onnxruntime both see a GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .backends.onnxruntime import PROVIDERS, OrtOptions, OrtRunner
from .convert import convert_adapter, load_adapter_set
from .errors import LoramgrError
from .export import export_base
from .manifest import FUSED, TEXT_ENCODER, Manifest
from .merge import AdapterSet, BaseWeights, merge_tensors
from .models.architectures import ARCHITECTURES
from .pipeline.control import control_scales
from .workspace import Workspace, atomic_dir

Step = Callable[[str], None]
SMALL, LARGE = 4, 128  # ranks of a typical LoRA and a large one; both cover UNet attention + text encoder
RANKS = (SMALL, LARGE)
LORA_WEIGHT = 0.8
STEP_IMAGE = {"tiny": 128, "sd15": 512}  # image side of the timed step (latents: 1/8 of it)
OTHER_STEP_IMAGES = {"sd15": (256,)}  # REFERENCE.md's CPU anchors were taken at 256x256
MEMORY_RUN = {"tiny": 64, "sd15": 256}  # resolution of the run whose peak RSS is measured
MEMORY_RUN_STEPS = 3
CHECK_IMAGE = 64  # image side of the outputs compared across the swap routes
MERGED_VERSION = 1  # bump when the merged copy's recipe changes: old caches no longer apply

# Goals of the issue, for sd15 on CPU (on tiny the figures are shown but not judged).
HOT_SWAP_MAX_S = 1.0
HOT_SWAP_MIN_SPEEDUP = 20.0
STEP_MIN_SPEEDUP = 2.5
MEMORY_MAX_RATIO = 1.2


# -- timing --------------------------------------------------------------------------------


def interleaved(variants: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
    """Run every variant once per repeat, in turn, so load drifts hit all alike; seconds per variant."""
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(r), "runs_s": r} for name, r in runs.items()}


def _ratio(numerator: dict, denominator: dict) -> float:
    return numerator["median_s"] / denominator["median_s"]


def _synced(fn: Callable[[], object], provider: str) -> Callable[[], None]:
    """``fn`` followed by a device sync on CUDA, so its time covers the kernels it queued."""
    def call() -> None:
        fn()
        if provider == "cuda":
            torch.cuda.synchronize()
    return call


# -- the machine ---------------------------------------------------------------------------


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

    from . import __version__

    return {"loramgr": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__,
            "torch_threads": torch.get_num_threads()}


# -- inputs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepInputs:
    """One UNet+ControlNet call: a CFG batch of 2 (uncond + cond) at ``image`` pixels a side."""

    sample: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor
    controlnet_cond: torch.Tensor
    control_scales: torch.Tensor

    @classmethod
    def random(cls, manifest: Manifest, image: int, seed: int = 0) -> StepInputs:
        latent = image // 2 ** (len(manifest.configs["vae"]["block_out_channels"]) - 1)
        width = manifest.configs["text_encoder"]["hidden_size"]
        gen = torch.Generator().manual_seed(seed)
        return cls(torch.randn(2, 4, latent, latent, generator=gen), torch.tensor([500.0, 500.0]),
                   torch.randn(2, 77, width, generator=gen), torch.rand(2, 3, image, image, generator=gen),
                   control_scales(1, 1.0, False, "controlnet"))

    def args(self) -> tuple[torch.Tensor, ...]:
        return (self.sample, self.timestep, self.encoder_hidden_states, self.controlnet_cond, self.control_scales)

    def describe(self) -> dict:
        return {"image": self.controlnet_cond.shape[-1], "latent": list(self.sample.shape)}

    def feeds(self) -> dict[str, np.ndarray]:
        """The fused graph's inputs by name (for a plain InferenceSession)."""
        return fused_feeds(*self.args())


def fused_feeds(*args: torch.Tensor) -> dict[str, np.ndarray]:
    """``predict_noise``'s arguments as the fused graph's named inputs."""
    names = ("sample", "timestep", "encoder_hidden_states", "controlnet_cond", "control_scales")
    return {name: tensor.numpy() for name, tensor in zip(names, args)}


# -- ONNX Runtime sessions outside OrtRunner ------------------------------------------------


def _sessions(paths: list[Path], level: str, provider: str, config: Mapping[str, str] | None = None) -> list:
    """Plain InferenceSessions (ORT's own defaults but the level): what a merged export gets."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    return [ort.InferenceSession(str(p), so, providers=providers) for p in paths]


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


# -- 0. the base and the sample LoRAs --------------------------------------------------------


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
    from .samples import write_kohya_lora

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


# -- 1. convert ------------------------------------------------------------------------------


def bench_convert(workspace: Workspace, base: str, sources: Mapping[int, Path], repeats: int) -> dict:
    """Seconds of ``convert_adapter`` per rank (each repeat writes the same ``.lora`` again)."""
    reports = {}

    def convert(rank: int) -> None:
        reports[rank] = convert_adapter(workspace, sources[rank], base=base, name=_adapter_name(base, rank))

    times = interleaved({f"r{rank}": partial(convert, rank) for rank in RANKS}, repeats)
    return {f"r{rank}": {**times[f"r{rank}"], "rank": rank, "modules": reports[rank].modules,
                         "source_bytes": reports[rank].source_bytes, "lora_bytes": reports[rank].size_bytes}
            for rank in RANKS}


# -- 2. swap ---------------------------------------------------------------------------------


def merged_base(workspace: Workspace, base_dir: Path, manifest: Manifest, adapter_set: AdapterSet,
                step: Step) -> Path:
    """The fused and text encoder graphs with ``adapter_set`` merged into copies of their data files.

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
        for graph in (FUSED, TEXT_ENCODER):
            info = manifest.graphs[graph]
            (tmp / info.path).parent.mkdir(parents=True)
            shutil.copyfile(base_dir / info.path, tmp / info.path)
            shutil.copyfile(base_dir / info.data, tmp / info.data)
            data = np.memmap(tmp / info.data, dtype=np.uint8, mode="r+")
            for name, array in tensors.get(graph, {}).items():
                entry = weights.entry(graph, name)
                data[entry.offset: entry.offset + entry.length] = np.ascontiguousarray(array).view(np.uint8).ravel()
            data.flush()
            del data
        (tmp / "recipe.json").write_text(json.dumps(recipe))
    return folder


def _union(sets: list[AdapterSet]) -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for adapter_set in sets:
        for graph, touched in adapter_set.touched().items():
            names.setdefault(graph, set()).update(touched)
    return names


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
    hot = OrtRunner.open(base_dir, lora, OrtOptions(provider=provider), swappable=_union(list(sets.values())))
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


# -- 3. step ---------------------------------------------------------------------------------


def _torch_runner(base_dir: Path, manifest: Manifest, provider: str):
    """diffusers' modules from the diffusers folder a bench base keeps beside its graphs (``source/``)."""
    from .backends.torch_runner import TorchRunner
    from .models.loading import load_components

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


# -- 4. memory -------------------------------------------------------------------------------


_CHILD = "import json, sys; from loramgr.bench import memory_probe; print(json.dumps(memory_probe(*sys.argv[1:])))"


def memory_probe(home: str, base: str, mode: str) -> dict:
    """In a child process: a ``run`` with both sample LoRAs (or only the imports, ``mode="imports"``).

    Returns this process's peak RSS and, for a run, what RSS was made of at its highest sample.
    """
    import onnxruntime  # noqa: F401  - the floor counts the libraries a run loads

    from .pipeline.settings import GenerationSettings
    from .runtime import AdapterChoice, generate
    from .samples import sample_image

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
    package_root = str(Path(__file__).resolve().parents[1])
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


# -- 5. GPU ----------------------------------------------------------------------------------


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


# -- goals and the whole run -------------------------------------------------------------------


def goals(result: dict) -> list[dict]:
    """The issue's goals next to the measured figures; judged for sd15 only (``applies``)."""
    swap, step, memory = result["swap"], result["step"], result["memory"]
    hot = swap["times"][f"hot_swap_r{SMALL}"]["median_s"]
    rows = [
        (f"hot swap < {HOT_SWAP_MAX_S:g} s", f"{hot:.3f} s", hot < HOT_SWAP_MAX_S),
        (f"hot swap > {HOT_SWAP_MIN_SPEEDUP:g}x faster than new sessions on a merged export (ORT level all)",
         f"{swap['speedup_vs_merged_all']:.1f}x", swap["speedup_vs_merged_all"] > HOT_SWAP_MIN_SPEEDUP),
        (f"ORT step >= {STEP_MIN_SPEEDUP:g}x faster than diffusers torch (loramgr defaults)",
         f"{step['vs_torch']['speedup']:.2f}x", step["vs_torch"]["speedup"] >= STEP_MIN_SPEEDUP),
        (f"peak RSS of a run with {len(RANKS)} LoRAs <= {MEMORY_MAX_RATIO:g}x base weights",
         f"{memory['ratio']:.2f}x", memory["ratio"] <= MEMORY_MAX_RATIO),
    ]
    return [{"goal": g, "measured": m, "passed": bool(p), "applies": result["arch"] == "sd15"} for g, m, p in rows]


def run_bench(workspace: Workspace, arch: str = "tiny", *, repeats: int = 3, on_step: Step | None = None) -> dict:
    """Measure conversion, swaps, step time and memory on ``bench-<arch>``; a JSON-able dict.

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
    inputs = StepInputs.random(manifest, STEP_IMAGE[arch])
    result["step"] = bench_step(base_dir, manifest, inputs, repeats, "cpu", step,
                                _ort_settings(base_dir, manifest, sets))
    result["step_other_sizes"] = [bench_step(base_dir, manifest, StepInputs.random(manifest, image), repeats, "cpu",
                                             step) for image in OTHER_STEP_IMAGES.get(arch, ())]
    result["memory"] = bench_memory(workspace, base, manifest, step)
    result["gpu"] = bench_gpu(workspace, base_dir, manifest, sets, inputs, repeats, step)
    result["goals"] = goals(result)
    result["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["seconds"] = time.perf_counter() - start
    return result


# -- rendering -------------------------------------------------------------------------------


def _caption(result: dict) -> str:
    m, v = result["machine"], result["versions"]
    load = (f", load {m['load_average'][0]:.1f} -> {result['load_average_end'][0]:.1f}"
            if m["load_average"] and result["load_average_end"] else "")
    return (f"{m['cpu']}, {m['physical_cores']} cores ({m['logical_cpus']} logical), "
            f"{m['ram_bytes'] / 2**30:.0f} GiB RAM{load}; torch {v['torch']} ({v['torch_threads']} threads), "
            f"onnxruntime {v['onnxruntime']}, diffusers {v['diffusers']}; "
            f"{result['arch']}, medians of {result['repeats']}")


def _s(timing: dict) -> str:
    return f"{timing['median_s']:.3f}"


def _convert_table(result: dict):
    from .console import human_size, table

    return table("convert: kohya LoRA (UNet + text encoder) -> .lora",
                 ["rank", "seconds", "weights", "source", ".lora"],
                 [[c["rank"], _s(c), sum(c["modules"].values()), human_size(c["source_bytes"]),
                   human_size(c["lora_bytes"])] for c in result["convert"].values()])


def _swap_table(swap: dict, where: str = "CPU"):
    from .console import human_size, table

    t, small, large = swap["times"], f"hot_swap_r{SMALL}", f"hot_swap_r{LARGE}"
    diff = swap["max_abs_diff"]
    return table(
        f"swap to a rank-{SMALL} LoRA, UNet+ControlNet and text encoder ({where})",
        ["route", "seconds", "(c) is faster by"],
        [["(a) new sessions on a merged export, ORT all", _s(t["merged_export_all"]),
          f"{swap['speedup_vs_merged_all']:.1f}x"],
         ["(a) new sessions on a merged export, ORT basic", _s(t["merged_export_basic"]),
          f"{swap['speedup_vs_merged_basic']:.1f}x"],
         ["(b) new sessions, injection (merge + create)", _s(t["injection"]), f"{swap['speedup_vs_injection']:.1f}x"],
         [f"(c) hot swap r{LARGE} -> r{SMALL}", _s(t[small]), ""],
         ["    of which merge_tensors", _s(t[f"{small}_merge"]), f"{swap['hot_swap_merge_share']:.0%} of (c)"],
         [f"(c) hot swap r{SMALL} -> r{LARGE}", _s(t[large]), ""],
         [f"hot swap r{LARGE} -> r{SMALL}, torch on 1 thread (setting)", _s(t[f"{small}_torch1"]), ""],
         [f"hot swap r{SMALL} -> r{LARGE}, torch on 1 thread (setting)", _s(t[f"{large}_torch1"]), ""],
         [f"buffers a hot swap rewrites: {swap['buffers']['count']} ({human_size(swap['buffers']['bytes'])})", "", ""],
         [f"max |diff| of outputs vs (b): (a) {diff['merged_export_vs_injection']:.1e}, "
          f"(c) {diff['hot_swap_vs_injection']:.1e}", "", ""]])


def _step_table(step: dict, where: str = "CPU"):
    from .console import table

    vs_torch = step["vs_torch"]
    rows = [["diffusers torch (inference_mode)", _s(vs_torch["torch"]), "1.00x"],
            ["loramgr ORT defaults (basic)", _s(vs_torch["ort"]), f"{vs_torch['speedup']:.2f}x"]]
    rows += [[f"ORT {label}", _s(row), f"{row['speedup_vs_torch']:.2f}x ({row['speedup_vs_default']:.2f}x "
              "vs defaults, side by side)"] for label, row in step.get("ort_settings", {}).items()]
    return table(f"step: UNet+ControlNet, batch 2 (CFG), {step['image']}x{step['image']} "
                 f"(latents {step['latent'][2]}x{step['latent'][3]}) ({where})",
                 ["runner", "seconds", "faster than torch by"], rows)


def _memory_table(mem: dict):
    from .console import human_size, table

    weights = mem["base_weights_bytes"]
    return table("memory: peak RSS of a run with 2 LoRAs (child process)", ["what", "size", "x base weights"],
                 [["base weights (external data files)", human_size(weights), "1.00x"],
                  [f"peak RSS, run at {mem['run']['resolution']}px, {mem['run']['steps']} steps",
                   human_size(mem["peak_rss_bytes"]), f"{mem['ratio']:.2f}x"],
                  *[[f"  at the sampled peak: {label}", human_size(mem["at_peak"][key]),
                     f"{mem['at_peak'][key] / weights:.2f}x"]
                    for label, key in (("anonymous", "RssAnon"), ("mapped files", "RssFile")) if key in mem["at_peak"]],
                  ["peak RSS of the imports alone", human_size(mem["imports_rss_bytes"]),
                   f"{mem['imports_rss_bytes'] / weights:.2f}x"]])


def _goals_table(result: dict):
    from .console import table

    def verdict(goal: dict) -> str:
        if not goal["applies"]:
            return "not judged (sd15 goal)"
        return "pass" if goal["passed"] else "FAIL"

    return table("goals (sd15, CPU)", ["goal", "measured", "result"],
                 [[g["goal"], g["measured"], verdict(g)] for g in result["goals"]])


def _tables(result: dict) -> list:
    from .console import table

    tables = [_convert_table(result), _swap_table(result["swap"]), _step_table(result["step"]),
              *map(_step_table, result["step_other_sizes"]), _memory_table(result["memory"])]
    gpu = result["gpu"]
    if gpu["measured"]:
        tables += [_swap_table(gpu["swap"], gpu["device"]), _step_table(gpu["step"], gpu["device"])]
    else:
        tables.append(table("GPU", ["what", "measured"], [["swap, step", gpu["reason"]]]))
    return tables + [_goals_table(result)]


def render_bench(result: dict, console) -> None:
    """Print the result of :func:`run_bench` as rich tables, each captioned with the machine and versions."""
    caption = _caption(result)
    for t in _tables(result):
        t.caption = caption
        t.caption_justify = "left"
        console.print(t)
