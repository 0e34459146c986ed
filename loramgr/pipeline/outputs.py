"""Writing a generation's files: the images, the edge map and a JSON sidecar.

Each file is written under a temporary name and renamed into place
(:func:`loramgr.workspace.atomic_path`); the sidecar comes last, so a sidecar on disk
means every file it lists is complete.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import LoramgrError
from ..workspace import atomic_path
from .controlnet import GenerationResult


def output_paths(out_dir: Path, stem: str, num_samples: int) -> dict[str, list[Path]]:
    """``{stem}-{i}.png`` per image, ``{stem}-edges.png`` and ``{stem}.json``."""
    return {
        "images": [out_dir / f"{stem}-{i}.png" for i in range(num_samples)],
        "edge_map": [out_dir / f"{stem}-edges.png"],
        "sidecar": [out_dir / f"{stem}.json"],
    }


def save_result(
    result: GenerationResult, out_dir: str | Path, stem: str, metadata: dict | None = None, overwrite: bool = False
) -> list[Path]:
    """Write ``result`` to ``out_dir`` and return the paths written (images, edge map, sidecar).

    ``metadata`` (backend, base, adapters, ...) is stored in the sidecar as given.
    Existing files are refused unless ``overwrite``.

    Example::

        save_result(pipe(image, settings), "outputs", "bird-0001", {"backend": "torch"})
    """
    out_dir = Path(out_dir)
    paths = output_paths(out_dir, stem, len(result.images))
    every = [p for group in paths.values() for p in group]
    existing = [p for p in every if p.exists()]
    if existing and not overwrite:
        raise LoramgrError(f"{existing[0]} already exists; choose another name or overwrite")
    for image, path in zip([*result.images, result.edge_map], [*paths["images"], *paths["edge_map"]]):
        _write_png(image, path)
    height, width = result.edge_map.shape[:2]
    sidecar = {
        "images": [p.name for p in paths["images"]],
        "edge_map": paths["edge_map"][0].name,
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
