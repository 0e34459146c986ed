"""What a workspace holds: bases and adapters as plain dicts (for tables and ``--json``)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from .adapter_file import read_metadata
from .errors import LoramgrError
from .manifest import Manifest
from .workspace import Workspace


def block_of(param: str) -> str:
    """A coarse block label for per-block counts: ``unet.down_blocks.1``, ``text_model.encoder.layers.3``."""
    parts = param.split(".")
    for i, part in enumerate(parts):
        if part in ("down_blocks", "up_blocks", "layers", "controlnet_down_blocks") and i + 1 < len(parts):
            return ".".join(parts[: i + 2])
        if part in ("mid_block", "controlnet_mid_block", "conv_in", "conv_out", "time_embedding",
                    "controlnet_cond_embedding", "embeddings", "final_layer_norm"):
            return ".".join(parts[: i + 1])
    return ".".join(parts[:2])


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def base_summary(workspace: Workspace, name: str) -> dict:
    manifest = Manifest.load(workspace.base_dir(name))
    params = {g: sum(math.prod(e.torch_shape) for e in gi.weights.values()) for g, gi in manifest.graphs.items()}
    return {
        "name": name, "dtype": manifest.dtype, "opset": manifest.opset, "source": manifest.source,
        "fingerprint": manifest.fingerprint, "size_bytes": _folder_size(workspace.base_dir(name)),
        "parameters": params, "weights": {g: len(gi.weights) for g, gi in manifest.graphs.items()},
    }


def base_details(workspace: Workspace, name: str) -> dict:
    """Per-graph inputs/outputs, layouts and weights per block."""
    manifest = Manifest.load(workspace.base_dir(name))
    graphs = {}
    for graph, info in manifest.graphs.items():
        graphs[graph] = {
            "inputs": [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape)} for i in info.inputs],
            "outputs": [{"name": o.name, "dtype": o.dtype, "shape": list(o.shape)} for o in info.outputs],
            "layouts": dict(Counter(e.layout for e in info.weights.values())),
            "blocks": dict(Counter(block_of(p) for p in info.weights)),
        }
    return {**base_summary(workspace, name), "graphs": graphs}


def adapter_summary(workspace: Workspace, name: str) -> dict:
    path = workspace.adapter_path(name)
    meta = read_metadata(path)
    targets = json.loads(meta.get("loramgr.targets", "{}"))
    return {
        "name": name, "kind": meta.get("loramgr.kind"), "base": meta.get("loramgr.base_name"),
        "format": meta.get("loramgr.source_format", ""), "source": meta.get("loramgr.source_name", ""),
        "size_bytes": path.stat().st_size, "targets": len(targets),
        "trigger_words": json.loads(meta.get("loramgr.trigger_words", "[]")),
        "default_weight": float(meta.get("loramgr.default_weight", "1.0")),
    }


def adapter_details(workspace: Workspace, name: str) -> dict:
    meta = read_metadata(workspace.adapter_path(name))
    targets = json.loads(meta.get("loramgr.targets", "{}"))
    return {
        **adapter_summary(workspace, name),
        "source_sha256": meta.get("loramgr.source_sha256", ""),
        "base_fingerprint": meta.get("loramgr.base_fingerprint", ""),
        "graphs": dict(Counter(t["graph"] for t in targets.values())),
        "kinds": dict(Counter(t["kind"] for t in targets.values())),
        "blocks": dict(Counter(block_of(t["param"]) for t in targets.values())),
    }


def inventory(workspace: Workspace) -> dict:
    return {
        "home": str(workspace.home),
        "bases": [base_summary(workspace, n) for n in workspace.base_names()],
        "adapters": [adapter_summary(workspace, n) for n in workspace.adapter_names()],
    }


def details(workspace: Workspace, name: str) -> dict:
    """``inspect NAME``: a base if one has that name, else an adapter."""
    if name in workspace.base_names():
        return {"type": "base", **base_details(workspace, name)}
    if name in workspace.adapter_names():
        return {"type": "adapter", **adapter_details(workspace, name)}
    raise LoramgrError(
        f"no base or adapter named {name!r} in {workspace.home} "
        f"(bases: {', '.join(workspace.base_names()) or 'none'}; adapters: {', '.join(workspace.adapter_names()) or 'none'})"
    )
