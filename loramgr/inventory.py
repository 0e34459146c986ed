"""What a workspace holds: bases and adapters as plain dicts (for tables and ``--json``)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from .adapter_file import embedding_index, parse_targets, read_metadata
from .errors import BadFileError, LoramgrError, parse_weight
from .manifest import Manifest
from .workspace import Workspace, stale_temps


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


def natural_key(text: str) -> list:
    """Sort key that orders the numbers in ``text`` by value: ``blocks.2`` before ``blocks.10``.

    Written here rather than taken from a library (natsort): one regular expression.
    """
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def block_counts(params: Iterable[str]) -> dict[str, int]:
    """Weights per :func:`block_of` label, blocks in natural order."""
    return dict(sorted(Counter(block_of(p) for p in params).items(), key=lambda item: natural_key(item[0])))


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
            "blocks": block_counts(info.weights),
        }
    return {**base_summary(workspace, name), "graphs": graphs}


def adapter_summary(workspace: Workspace, name: str) -> dict:
    path = workspace.adapter_path(name)
    meta = read_metadata(path)
    targets = parse_targets(path, meta)
    return {
        "name": name, "kind": meta.get("loramgr.kind"), "base": meta.get("loramgr.base_name"),
        "format": meta.get("loramgr.source_format", ""), "source": meta.get("loramgr.source_name", ""),
        "size_bytes": path.stat().st_size, "targets": len(targets),
        "trigger_words": _json_list(path, meta, "loramgr.trigger_words"),
        "default_weight": parse_weight(meta.get("loramgr.default_weight", "1.0"), f"{path} default weight"),
        "embeddings": embedding_index(path, meta),
    }


def adapter_details(workspace: Workspace, name: str) -> dict:
    meta = read_metadata(workspace.adapter_path(name))
    targets = parse_targets(workspace.adapter_path(name), meta)
    return {
        **adapter_summary(workspace, name),
        "source_sha256": meta.get("loramgr.source_sha256", ""),
        "base_fingerprint": meta.get("loramgr.base_fingerprint", ""),
        "graphs": dict(Counter(t["graph"] for t in targets.values())),
        "kinds": dict(Counter(t["kind"] for t in targets.values())),
        "blocks": block_counts(t["param"] for t in targets.values()),
    }


def _json_list(path: Path, meta: dict[str, str], key: str) -> list:
    try:
        value = json.loads(meta.get(key, "[]"))
    except ValueError:
        value = None
    if not isinstance(value, list):
        raise BadFileError(path, f"metadata {key} is not a JSON list")
    return value


def _readable(summary, workspace: Workspace, kind: str, name: str, problems: list[dict]) -> dict | None:
    """``summary(workspace, name)``, or ``None`` with the reason added to ``problems``."""
    try:
        return summary(workspace, name)
    except (LoramgrError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = exc.reason if isinstance(exc, BadFileError) else (str(exc) or type(exc).__name__)
        path = workspace.base_models / name if kind == "base" else workspace.adapters / f"{name}.lora"
        problems.append({"kind": kind, "name": name, "path": str(path), "reason": reason.splitlines()[0]})
        return None


def leftovers(workspace: Workspace) -> list[dict]:
    """Temporary entries interrupted exports/converts left (removed on the next write of the same name)."""
    found = []
    for folder in (workspace.base_models, workspace.adapters):
        for entry, reason in stale_temps(folder):
            size = _folder_size(entry) if entry.is_dir() else entry.lstat().st_size
            found.append({"kind": "temporary", "name": entry.name, "path": str(entry), "size_bytes": size,
                          "reason": f"{reason}; removed by the next write of that name, or delete it"})
    return found


def inventory(workspace: Workspace) -> dict:
    """Every base and adapter; entries that cannot be read are listed under ``problems`` with the reason."""
    problems: list[dict] = []
    bases = [_readable(base_summary, workspace, "base", n, problems) for n in workspace.base_names()]
    adapters = [_readable(adapter_summary, workspace, "adapter", n, problems) for n in workspace.adapter_names()]
    return {
        "home": str(workspace.home),
        "bases": [b for b in bases if b is not None],
        "adapters": [a for a in adapters if a is not None],
        "problems": problems + leftovers(workspace),
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
