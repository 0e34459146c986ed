"""Open a base with adapters on a backend, and run the canny pipeline on it.

Two entry points, one code path:

* :class:`Generator` keeps one runner and one pipeline open for a base and, per call,
  takes an adapter choice, an input image (or a precomputed control map) and
  :class:`~loramgr.pipeline.settings.GenerationSettings`, and returns a
  :class:`Generation` in memory: the images, the control map, the adapters applied
  (name, weight, sha256) and the timings. Nothing is written. This is what a
  long-lived service calls; calls from several threads are safe, and each image comes
  from exactly the adapter set its call asked for (the generation holds the runner's
  set until its last decode, see :mod:`loramgr.backends.base`).
* :func:`generate` (``loramgr run``, ``loramgr demo``) is a thin layer over it that
  reads the image file and writes each generation's PNGs and JSON sidecar, so the CLI
  and the service give identical images for identical requests.

Both resolve names in the workspace and check every adapter against the base's
fingerprint before any session is created.

Example:
    >>> from loramgr.pipeline.settings import GenerationSettings
    >>> with Generator.open(Workspace.resolve(), choices=[AdapterChoice(("blindbox:0.8",))]) as gen:
    ...     out = gen.generate(AdapterChoice(("blindbox:0.8",)), GenerationSettings(prompt="a bird"), image=pixels)
    >>> out.adapters[0]["name"], len(out.images)
    ('blindbox', 1)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .adapters import BASE_CONTROLNET, AdapterChoice, AdapterSet, Names, touched_names
from .backends import BACKENDS, open_runner
from .backends.base import Runner, seconds
from .bases import OpenBase
from .errors import LoramgrError
from .workspace import Workspace

__all__ = ["BACKENDS", "AdapterChoice", "Generation", "Generator", "RunReport", "generate", "make_pipeline",
           "open_runner"]


def make_pipeline(base: OpenBase, runner: Runner, workspace: Workspace | None = None):
    """The pipeline over ``runner`` with the base's tokenizer and scheduler config.

    ``workspace``: its textual-inversion embeddings are read by every prompt (files re-read when
    they change); without one, only the embeddings bundled in the set's LoRAs are known.
    """
    import json

    from transformers import CLIPTokenizer

    from .embeddings import EmbeddingLibrary
    from .pipeline.controlnet import ControlNetPipeline

    tokenizer = CLIPTokenizer.from_pretrained(base.dir / "tokenizer", local_files_only=True)
    scheduler_config = json.loads((base.dir / "scheduler" / "scheduler_config.json").read_text())
    library = None if workspace is None else EmbeddingLibrary(
        workspace, base.manifest.configs["text_encoder"]["hidden_size"])
    return ControlNetPipeline(runner, tokenizer, scheduler_config, base.manifest.vae_scaling_factor,
                              embeddings=None if library is None else library.vectors)


@dataclass
class Generation:
    """One generation, in memory: what :meth:`Generator.generate` returns.

    ``images``: ``num_samples`` HxWx3 uint8 RGB; ``control_maps``: the HWC3 map each
    ControlNet unit saw (``control_map``: the first, ``None`` without units);
    ``adapters``: name, kind, weight, source name and sha256 of every adapter applied;
    ``timings``: seconds of the pipeline phases plus ``step_s``, ``run_s`` and how the set
    was loaded (``open_s`` and session timings on the first call, ``swap_s`` after a switch).
    """

    images: list[np.ndarray]
    control_maps: list[np.ndarray]
    adapters: list[dict]
    settings: object
    timesteps: list[float]
    timings: dict[str, float]
    load: dict[str, float]
    result: object  # the pipeline's GenerationResult (what save_result writes)

    @property
    def control_map(self) -> np.ndarray | None:
        return self.control_maps[0] if self.control_maps else None


class Generator:
    """One runner and one pipeline kept open for a base; generations in memory, per adapter choice.

    ``choices`` declares the adapter choices expected up front: they are loaded and
    checked now, the runner opens with the first, and every weight any of them touches
    becomes swappable, so switching between them is a hot swap. Other choices work too
    (loaded on first use; a switch to weights outside the swappable set re-creates
    sessions on ONNX Runtime).
    """

    def __init__(self, workspace: Workspace, base: OpenBase, runner: Runner, pipeline, open_s: float,
                 sets: dict | None = None):
        self.workspace = workspace
        self.base = base
        self.runner = runner
        self.pipeline = pipeline
        self._sets: dict[tuple, AdapterSet] = dict(sets or {})
        self._switch = threading.Lock()  # "switch, then hold" is one step per call
        self._open_timings: dict[str, float] | None = {"open_s": open_s, **seconds(runner.timings)}

    @classmethod
    def open(cls, workspace: Workspace, base: str | OpenBase | None = None, backend: str = "ort-cpu",
             options=None, *, choices: Sequence[AdapterChoice | AdapterSet] = (),
             swappable: Names | None = None) -> "Generator":
        """Open ``base`` (or the workspace's only base) on ``backend`` with that backend's ``options``.

        ``swappable``: weights to declare swappable besides those the ``choices`` touch
        (the service declares every adapter that fits its budget).
        """
        start = time.perf_counter()
        opened = base if isinstance(base, OpenBase) else OpenBase.resolve(workspace, base)
        sets = {}
        for choice in choices:
            if not isinstance(choice, AdapterSet):
                sets[choice.key()] = choice.load(workspace, opened.manifest)
        loaded = [c if isinstance(c, AdapterSet) else sets[c.key()] for c in choices]
        first = loaded[0] if loaded else AdapterSet()
        runner = open_runner(opened, first, backend, options, touched_names(swappable, *loaded))
        try:
            pipeline = make_pipeline(opened, runner, workspace)
        except BaseException:
            runner.close()
            raise
        return cls(workspace, opened, runner, pipeline, time.perf_counter() - start, sets)

    def adapter_set(self, choice: AdapterChoice | AdapterSet | None) -> AdapterSet:
        """The loaded set of ``choice`` (loaded and checked against the base once, then kept)."""
        if isinstance(choice, AdapterSet):
            return choice
        choice = choice or AdapterChoice()
        key = choice.key()
        if key not in self._sets:
            self._sets[key] = choice.load(self.workspace, self.base.manifest)
        return self._sets[key]

    def generate(self, choice: AdapterChoice | AdapterSet | None, settings, image: np.ndarray | None = None, *,
                 control_image: np.ndarray | None = None, control_images=None, progress=None,
                 release: bool = False, mask: np.ndarray | None = None) -> Generation:
        """Generate with ``choice`` applied, from ``image`` and the units' images (HxWxC uint8).

        ``control_image``: the one unit's image when it is not ``image`` (the one-unit form);
        ``control_images``: one per unit of ``settings.units`` (``None``: ``image``). The
        ControlNets the units name join ``choice`` (:func:`with_units`). ``mask``: inpaint
        ``image`` where it is white (``settings.inpaint``).
        ``release``: free each graph's weights once this generation is done with it (the
        pipeline's ``release``), for the last generation of a one-shot run.
        """
        from .pipeline.settings import check_inputs, check_mask

        for given in (image, control_image, *(control_images or ())):
            if given is not None:
                check_inputs(given, settings)
        check_mask(mask, image, settings.control_units(), settings)
        adapter_set = self.adapter_set(with_units(choice, settings))
        lease = None
        with self._switch:  # "switch, then hold" is one step among this Generator's calls
            while lease is None:
                if self.runner.adapter_set is adapter_set:
                    load, self._open_timings = self._open_timings or {"swap_s": 0.0}, None
                else:
                    load, self._open_timings = {"swap_s": self.runner.set_adapters(adapter_set)}, None
                candidate = self.runner.hold()
                if candidate.__enter__() is adapter_set:
                    lease = candidate  # no swap happens until this call is done
                else:  # someone swapped the runner directly in between: release and switch again
                    candidate.__exit__(None, None, None)
        try:
            start = time.perf_counter()
            result = self.pipeline(image, settings, progress, control_image=control_image,
                                   control_images=control_images, release=release, mask=mask)
        finally:
            lease.__exit__(None, None, None)
        timings = {**load, **result.timings}
        timings["step_s"] = result.timings.get("denoise", 0.0) / max(1, len(result.timesteps))
        timings["run_s"] = time.perf_counter() - start
        return Generation(result.images, result.control_maps, adapter_set.describe(), result.settings,
                          result.timesteps, timings, load, result)

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def with_units(choice: AdapterChoice | AdapterSet | None, settings) -> AdapterChoice | AdapterSet:
    """``choice`` with the ControlNets ``settings.units`` name (a unit without one takes ``choice.control``)."""
    if isinstance(choice, AdapterSet) or settings.units is None:
        return choice
    choice = choice or AdapterChoice()
    controls = tuple(u.controlnet or choice.control or BASE_CONTROLNET for u in settings.units)
    return AdapterChoice(choice.loras, choice.control, controls)


@dataclass
class RunReport:
    base: str
    backend: str
    adapters: list[dict]
    files: list[Path]
    timings: dict[str, float] = field(default_factory=dict)


def generate(
    workspace: Workspace, image: str | Path | None, settings, choices: list[AdapterChoice] | None = None, *,
    base: str | None = None, backend: str = "ort-cpu", options=None, control_image: str | Path | None = None,
    control_images: Sequence[str | Path | None] | None = None, out_dir: str | Path = "outputs",
    stem: str | None = None, progress=None, overwrite: bool = False, mask: str | Path | None = None,
) -> list[RunReport]:
    """Run the pipeline once per adapter choice, on one :class:`Generator`, and write the files.

    The runner is opened with the first choice and switched to the next ones with
    ``set_adapters``; every weight any choice touches is declared swappable up front,
    so with hot swap (the ONNX Runtime default) each switch rewrites buffers in place.
    All adapters are loaded and checked against the base before any session exists.
    ``options``: the backend's options object (``OrtOptions`` or ``TrtOptions``).
    ``control_image``: the file the one unit's map is made from, when not ``image``;
    ``control_images``: one file per unit of ``settings.units`` (``None``: ``image``).
    With no file at all, ``settings.width`` and ``settings.height`` give the size.
    ``mask``: an image file, white where ``image`` is inpainted (``settings.inpaint``).

    Example:
        >>> from loramgr.pipeline.settings import GenerationSettings
        >>> reports = generate(Workspace.resolve(), "bird.png", GenerationSettings(prompt="a bird"),
        ...                    [AdapterChoice(("blindbox:0.8",), "canny"), AdapterChoice()])
        >>> [r.files[0].suffix for r in reports]
        ['.png', '.png']
    """
    from .pipeline.images import load_image
    from .pipeline.outputs import claim_stems, save_result
    from .pipeline.settings import check_inputs, check_mask

    choices = [with_units(c, settings) for c in choices or [AdapterChoice()]]
    opened = OpenBase.resolve(workspace, base)
    files = [image, control_image, *(control_images or ())]
    if all(f is None for f in files) and (settings.width is None or settings.height is None):
        raise LoramgrError("no input: give --image, --control-image, a --unit image, or --width and --height")
    pixels = None if image is None else load_image(image)
    control_pixels = None if control_image is None else load_image(control_image)
    unit_pixels = None if control_images is None else [None if f is None else load_image(f) for f in control_images]
    given = [p for p in (pixels, control_pixels, *(unit_pixels or ())) if p is not None]
    for each in given or [None]:  # no image at all: the settings alone
        check_inputs(each, settings)
    mask_pixels = None if mask is None else load_image(mask)
    check_mask(mask_pixels, pixels, settings.control_units(), settings)
    stems = claim_stems(out_dir, stem, [c.label() for c in choices], settings.num_samples, overwrite,
                        num_maps=len(settings.control_units()))
    reports = []
    with Generator.open(workspace, opened, backend, options, choices=choices) as generator:
        for i, choice in enumerate(choices):
            made = generator.generate(choice, settings, pixels, control_image=control_pixels,
                                      control_images=unit_pixels, progress=progress, mask=mask_pixels,
                                      release=i == len(choices) - 1)  # the last one: each graph freed once done
            metadata = {"base": opened.name, "base_fingerprint": opened.manifest.fingerprint, "backend": backend,
                        "image": None if image is None else str(image),
                        "control_image": None if control_image is None else str(control_image),
                        "mask": None if mask is None else str(mask),
                        "control_images": None if control_images is None else [
                            None if f is None else str(f) for f in control_images],
                        "adapters": made.adapters, "controls": list(choice.controlnet_names()),
                        "load_timings": made.load}  # the pipeline's phases are the sidecar's own "timings"
            written = save_result(made.result, out_dir, stems[i], metadata, overwrite=overwrite)
            reports.append(RunReport(opened.name, backend, made.adapters, written, made.timings))
    return reports
