"""Open a base with adapters on a backend, and run the canny pipeline on it.

This is the layer ``loramgr run`` and ``loramgr demo`` call: it resolves names in the
workspace, checks every adapter against the base's fingerprint before any session is
created, picks the backend, and writes the pipeline's outputs with a sidecar that
records every parameter, adapter (with weight and sha256) and timing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .backends.onnxruntime import OrtOptions, OrtRunner
from .convert import load_adapter_set, resolve_base
from .errors import LoramgrError
from .manifest import Manifest
from .merge import AdapterSet
from .workspace import Workspace

BACKENDS = ("ort-cpu", "ort-cuda", "tensorrt")


def open_runner(base_dir: Path, adapter_set: AdapterSet, backend: str = "ort-cpu",
                ort_options: OrtOptions | None = None, swappable: dict[str, set[str]] | None = None):
    """A :class:`~loramgr.backends.base.Runner` over ``base_dir`` with ``adapter_set`` applied.

    ``swappable`` names the weights later :meth:`set_adapters` calls may change, so
    that they happen in place (hot swap) instead of re-creating sessions.
    """
    if backend in ("ort-cpu", "ort-cuda"):
        options = ort_options or OrtOptions()
        options = OrtOptions(provider=backend.removeprefix("ort-"), optimization=options.optimization,
                             intra_op_threads=options.intra_op_threads, hot_swap=options.hot_swap)
        return OrtRunner.open(base_dir, adapter_set, options, swappable=swappable)
    if backend == "tensorrt":
        from .backends.tensorrt import TrtRunner

        return TrtRunner.open(base_dir, adapter_set)
    raise LoramgrError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def make_pipeline(base_dir: Path, manifest: Manifest, runner):
    """The canny pipeline over ``runner`` with the base's tokenizer and scheduler config."""
    import json

    from transformers import CLIPTokenizer

    from .pipeline.controlnet import ControlNetPipeline

    tokenizer = CLIPTokenizer.from_pretrained(base_dir / "tokenizer", local_files_only=True)
    scheduler_config = json.loads((base_dir / "scheduler" / "scheduler_config.json").read_text())
    return ControlNetPipeline(runner, tokenizer, scheduler_config, manifest.vae_scaling_factor)


@dataclass(frozen=True)
class AdapterChoice:
    """One adapter set to run: LoRAs as ``NAME[:WEIGHT]`` and a ControlNet (``None``/``canny``: the base's)."""

    loras: tuple[str, ...] = ()
    control: str | None = None

    @classmethod
    def parse(cls, spec: str, workspace: Workspace) -> "AdapterChoice":
        """``blindbox:0.8,moxin:0.5,hed`` (a ControlNet name switches the ControlNet); ``none``: the plain base."""
        from .adapter_file import read_metadata

        loras, control = [], None
        for item in filter(None, (i.strip() for i in spec.split(","))):
            if item in ("none", "canny"):
                continue
            name = item.partition(":")[0]
            path = workspace.adapter_path(name)
            if path.is_file() and read_metadata(path).get("loramgr.kind") == "controlnet":
                control = name
            else:
                loras.append(item)
        return cls(tuple(loras), control)

    def label(self) -> str:
        return "+".join([*self.loras, *([self.control] if self.control else [])]) or "base"


@dataclass
class RunReport:
    base: str
    backend: str
    adapters: list[dict]
    files: list[Path]
    timings: dict[str, float] = field(default_factory=dict)


def describe_adapters(adapter_set: AdapterSet) -> list[dict]:
    return [{"name": a.name, "kind": a.kind, "weight": w, "source": a.metadata.get("loramgr.source_name", ""),
             "source_sha256": a.metadata.get("loramgr.source_sha256", "")} for a, w in adapter_set.adapters]


def generate(
    workspace: Workspace, image: str | Path, settings, choices: list[AdapterChoice] | None = None, *,
    base: str | None = None, backend: str = "ort-cpu", ort_options: OrtOptions | None = None,
    out_dir: str | Path = "outputs", stem: str | None = None, progress=None, overwrite: bool = False,
) -> list[RunReport]:
    """Run the canny pipeline once per adapter choice, on one runner.

    The runner is opened with the first choice and switched to the next ones with
    ``set_adapters``; every weight any choice touches is declared swappable up front,
    so with hot swap (the ONNX Runtime default) each switch rewrites buffers in place.
    All adapters are loaded and checked against the base before any session exists.

    Example:
        >>> from loramgr.pipeline.settings import GenerationSettings
        >>> reports = generate(Workspace.resolve(), "bird.png", GenerationSettings(prompt="a bird"),
        ...                    [AdapterChoice(("blindbox:0.8",), "canny"), AdapterChoice()])
        >>> [r.files[0].suffix for r in reports]
        ['.png', '.png']
    """
    from .pipeline.images import load_image
    from .pipeline.outputs import claim_stems, save_result
    from .pipeline.settings import check_inputs

    start = time.perf_counter()
    choices = choices or [AdapterChoice()]
    base = resolve_base(workspace, base)
    base_dir = workspace.base_dir(base)
    manifest = Manifest.load(base_dir)
    pixels = load_image(image)
    check_inputs(pixels, settings)
    sets = [load_adapter_set(workspace, manifest, list(c.loras), c.control) for c in choices]
    stems = claim_stems(out_dir, stem, [c.label() for c in choices], settings.num_samples, overwrite)
    swappable: dict[str, set[str]] = {}
    for adapter_set in sets:
        for graph, names in adapter_set.touched().items():
            swappable.setdefault(graph, set()).update(names)
    runner = open_runner(base_dir, sets[0], backend, ort_options, swappable)
    pipeline = make_pipeline(base_dir, manifest, runner)
    load_timings = {"open_s": time.perf_counter() - start, **_session_timings(runner)}
    reports = []
    try:
        for i, (choice, adapter_set) in enumerate(zip(choices, sets)):
            load = dict(load_timings) if i == 0 else {"swap_s": runner.set_adapters(adapter_set)}
            run_start = time.perf_counter()
            result = pipeline(pixels, settings, progress)
            timings = {**load, **result.timings}
            timings["step_s"] = result.timings.get("denoise", 0.0) / max(1, len(result.timesteps))
            adapters = describe_adapters(adapter_set)
            metadata = {"base": base, "base_fingerprint": manifest.fingerprint, "backend": backend,
                        "image": str(image), "adapters": adapters, "control": choice.control or "canny",
                        "load_timings": load}  # the pipeline's phases are the sidecar's own "timings"
            files = save_result(result, out_dir, stems[i], metadata, overwrite=overwrite)
            timings["run_s"] = time.perf_counter() - run_start
            reports.append(RunReport(base, backend, adapters, files, timings))
    finally:
        runner.close()
    return reports


def _session_timings(runner) -> dict[str, float]:
    timings = getattr(runner, "timings", None)
    if timings is None:
        return {}
    return {k: v for k, v in asdict(timings).items() if isinstance(v, float)}
