"""Writing a generation's files: the images, each ControlNet unit's map and a JSON sidecar.

Each file is written under a temporary name and renamed into place
(:func:`loramgr.workspace.atomic_path`); the sidecar comes last, so a sidecar on disk
means every file it lists is complete.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import LoramgrError
from ..workspace import atomic_path, check_name
from .controlnet import GenerationResult


def output_paths(out_dir: Path, stem: str, num_samples: int, num_maps: int = 1) -> dict[str, list[Path]]:
    """``{stem}-{i}.png`` per image, ``{stem}-edges.png`` (the first unit's map), ``{stem}-control-{k}.png``
    (unit k's, k >= 1) and ``{stem}.json``."""
    return {
        "images": [out_dir / f"{stem}-{i}.png" for i in range(num_samples)],
        "control_maps": [out_dir / (f"{stem}-edges.png" if k == 0 else f"{stem}-control-{k}.png")
                         for k in range(num_maps)],
        "sidecar": [out_dir / f"{stem}.json"],
    }


def default_stem() -> str:
    """``YYYYmmdd-HHMMSS-PID``: the process id keeps two runs started in the same second apart."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def claim_stems(out_dir: str | Path, stem: str | None, labels: Sequence[str], num_samples: int,
                overwrite: bool = False, num_maps: int = 1) -> list[str]:
    """One free output stem per run (``labels``: the runs' adapter sets), checked before anything is generated.

    ``num_maps``: the ControlNet units' maps each run writes (:func:`output_paths`).

    ``stem`` is the user's ``--name`` (``None``: :func:`default_stem`); with several
    runs each gets ``STEM-i-LABEL``. A chosen stem must be free unless ``overwrite``; a
    default one gets a ``-2``, ``-3``... suffix until every file of every run is free.
    """
    out_dir = Path(out_dir)
    chosen = stem is not None
    base = check_name(stem, "output") if chosen else default_stem()

    def stems_for(prefix: str) -> list[str]:
        if len(labels) == 1:
            return [prefix]
        return [f"{prefix}-{i}-{re.sub(r'[^A-Za-z0-9_.+-]', '_', label)}" for i, label in enumerate(labels)]

    def taken(candidates: Sequence[str]) -> list[Path]:
        return [p for stem in candidates for group in output_paths(out_dir, stem, num_samples, num_maps).values()
                for p in group if p.exists()]

    if chosen:
        stems = stems_for(base)
        existing = [] if overwrite else taken(stems)
        if existing:
            raise LoramgrError(f"{existing[0]} already exists: choose another --name or pass --overwrite")
        return stems
    for n in range(1, 10_000):
        stems = stems_for(base if n == 1 else f"{base}-{n}")
        if not taken(stems):
            return stems
    raise LoramgrError(f"no free output name for {base} in {out_dir}: choose one with --name")


def save_result(
    result: GenerationResult, out_dir: str | Path, stem: str, metadata: dict | None = None, overwrite: bool = False
) -> list[Path]:
    """Write ``result`` to ``out_dir`` and return the paths written (images, control maps, sidecar).

    ``metadata`` (backend, base, adapters, ...) is stored in the sidecar as given.
    Existing files are refused unless ``overwrite``.

    Example::

        save_result(pipe(image, settings), "outputs", "bird-0001", {"backend": "torch"})
    """
    out_dir = Path(out_dir)
    paths = output_paths(out_dir, stem, len(result.images), len(result.control_maps))
    every = [p for group in paths.values() for p in group]
    existing = [p for p in every if p.exists()]
    if existing and not overwrite:
        raise LoramgrError(f"{existing[0]} already exists: choose another --name or pass --overwrite")
    for image, path in zip([*result.images, *result.control_maps], [*paths["images"], *paths["control_maps"]]):
        _write_png(image, path)
    height, width = result.images[0].shape[:2]
    sidecar = {
        "images": [p.name for p in paths["images"]],
        "control_maps": [p.name for p in paths["control_maps"]],
        "height": height,
        "width": width,
        "settings": asdict(result.settings),
        "timesteps": result.timesteps,
        "timings": result.timings,
        "metadata": metadata or {},
    }
    with atomic_path(paths["sidecar"][0]) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return every


def _write_png(image: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
