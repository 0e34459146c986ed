"""A base opened once: its folder and its manifest, checked, passed down to every layer that needs them.

``manifest.json`` is read here and nowhere else on the way from ``loramgr run`` to the
backends: the runtime, the ONNX Runtime runner, the TensorRT runner and the engine
builder all take an :class:`OpenBase` (a bare folder is still accepted and opened).
Opening a base checks its files (docs/base-layout.md, "Integrity"): every graph and
data file must exist with the size the manifest records, and its content must match
the recorded sha256, hashed once per file identity and remembered in ``.verified.json``
in the base folder. So every command that uses a base's weights (run, verify, bench,
serve, bake, engine builds) refuses a damaged one before anything is rendered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .integrity import VerifiedFiles, check_size
from .manifest import Manifest
from .workspace import Workspace, resolve_base

VERIFIED_CACHE = ".verified.json"


@dataclass(frozen=True)
class OpenBase:
    """One exported base: ``name``, its folder ``dir`` and its loaded ``manifest``."""

    name: str
    dir: Path
    manifest: Manifest

    @classmethod
    def open(cls, folder: str | Path, *, progress: bool = True) -> "OpenBase":
        """Load the manifest of ``folder`` and check the base's files (``progress``: a bar while hashing)."""
        folder = Path(folder)
        manifest = Manifest.load(folder)
        check_base_files(folder, manifest, progress=progress)
        return cls(folder.name, folder, manifest)

    @classmethod
    def resolve(cls, workspace: Workspace, base: str | None = None) -> "OpenBase":
        """``base`` of ``workspace`` (or its only base), opened."""
        return cls.open(workspace.base_dir(resolve_base(workspace, base)))

    def graph_path(self, graph: str) -> Path:
        """The ONNX file of ``graph``."""
        return self.dir / self.manifest.graphs[graph].path


def as_open_base(base: "OpenBase | str | Path") -> OpenBase:
    """``base`` itself, or the folder ``base`` opened."""
    return base if isinstance(base, OpenBase) else OpenBase.open(base)


def check_base_files(folder: Path, manifest: Manifest, *, progress: bool = True) -> None:
    """Refuse a base whose graph or data files are missing, of the wrong size, or changed since export.

    Sizes are checked at every open. Content is checked against the sha256 the manifest
    records, once per file identity (size, mtime, ctime, inode): an unchanged base is
    not hashed again. Manifests written before sizes were recorded are checked against
    the end of their last tensor; their ``model.onnx`` files have no recorded sha256.
    """
    fix = f"re-export base {manifest.name!r} with loramgr export"
    files = []
    for name in sorted(manifest.graphs):
        graph = manifest.graphs[name]
        model = folder / graph.path
        check_size(model, graph.model_size, fix)
        files.append((model, graph.model_sha256))
        if graph.data is not None:
            data = folder / graph.data
            end = max((e.offset + e.length for e in graph.weights.values()), default=0)
            check_size(data, graph.data_size, fix, at_least=end)
            files.append((data, graph.data_sha256))
    verified = VerifiedFiles(folder / VERIFIED_CACHE)
    hashed = False
    try:
        for path, sha256 in files:
            if sha256:
                hashed = verified.check(path, sha256, fix, progress=progress) or hashed
    finally:  # what was found sound is remembered even when a later file is refused
        if hashed:
            verified.save()
