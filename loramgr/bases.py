"""A base opened once: its folder and its manifest, passed down to every layer that needs them.

``manifest.json`` is read here and nowhere else on the way from ``loramgr run`` to the
backends: the runtime, the ONNX Runtime runner, the TensorRT runner and the engine
builder all take an :class:`OpenBase` (a bare folder is still accepted and opened).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .manifest import Manifest
from .workspace import Workspace, resolve_base


@dataclass(frozen=True)
class OpenBase:
    """One exported base: ``name``, its folder ``dir`` and its loaded ``manifest``."""

    name: str
    dir: Path
    manifest: Manifest

    @classmethod
    def open(cls, folder: str | Path) -> "OpenBase":
        folder = Path(folder)
        return cls(folder.name, folder, Manifest.load(folder))

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
