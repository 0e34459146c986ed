"""Turn adapters into injectable tensors: base + sum(weight * delta), in the base's layout.

This is the one place where adapters meet base weights. Base tensors are read from
the memory-mapped external data files at the offsets the weight map records, so only
the touched tensors are ever materialized; the math runs in fp32 (torch) and the result
is cast once to the base dtype.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from .adapter_file import AdapterTarget
from .adapters import AdapterSet, Names
from .errors import LoramgrError
from .formats import WeightDelta, merge_weight
from .manifest import Manifest, WeightEntry


class BaseWeights:
    """Read-only memory maps of a base's external data files, one per graph."""

    def __init__(self, manifest: Manifest, base_dir: Path):
        self.manifest = manifest
        # Copy-on-write maps: views are writable for torch (no defensive copies), and the
        # data files are never written.
        self._maps = {
            name: np.memmap(base_dir / g.data, dtype=np.uint8, mode="c")
            for name, g in manifest.graphs.items() if g.data
        }
        self._params = {name: g.by_initializer() for name, g in manifest.graphs.items()}

    def entry(self, graph: str, initializer: str) -> WeightEntry:
        param = self._params[graph].get(initializer)
        if param is None:
            raise LoramgrError(f"initializer {initializer!r} is not a weight of graph {graph!r}")
        return self.manifest.graphs[graph].weights[param]

    def read(self, graph: str, entry: WeightEntry) -> np.ndarray:
        """The base value of one initializer, without copying (a view of the memory map)."""
        return entry.read(self._maps[graph])


def _as_delta(target: AdapterTarget, entry: WeightEntry) -> WeightDelta:
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in target.tensors.items() if k != "dora_scale"}
    if target.kind == "full":
        tensors = {"weight": torch.from_numpy(entry.to_torch_layout(target.tensors["weight"]).copy())}
    dora = target.tensors.get("dora_scale")
    return WeightDelta(target.param, target.kind, tensors, target.scale,
                       torch.from_numpy(np.array(dora)) if dora is not None else None, target.dora_rule)


def merge_tensors(base: BaseWeights, adapter_set: AdapterSet, only: Names | None = None
                  ) -> dict[str, dict[str, np.ndarray]]:
    """Graph -> {initializer: merged tensor} for every initializer the set touches.

    ``only`` extends the result to initializers the set does not touch (they come back
    at their base value): a hot swap from set A to set B must rewrite A's tensors too.
    """
    for adapter, _ in adapter_set.adapters:
        adapter.check_base(base.manifest)
    contributions: dict[tuple[str, str], list[tuple[AdapterTarget, float]]] = defaultdict(list)
    for adapter, weight in adapter_set.adapters:
        for t in adapter.targets.values():
            contributions[(t.graph, t.initializer)].append((t, weight))
    for graph, names in (only or {}).items():
        for name in names:
            contributions.setdefault((graph, name), [])
    merged: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    for (graph, initializer), parts in contributions.items():
        entry = base.entry(graph, initializer)
        base_value = base.read(graph, entry)
        if not parts:
            merged[graph][initializer] = np.array(base_value)
            continue
        parts.sort(key=lambda p: p[0].kind != "full")  # a replacement first, deltas on top of it
        torch_base = torch.from_numpy(entry.to_torch_layout(base_value).astype(np.float32, copy=False))
        result = merge_weight(torch_base, [(_as_delta(t, entry), w) for t, w in parts])
        merged[graph][initializer] = entry.to_onnx_layout(result.numpy()).astype(entry.dtype, copy=False)
    return dict(merged)


def check_shapes(base: BaseWeights, tensors: dict[str, dict[str, np.ndarray]]) -> None:
    """Every tensor about to be injected must match its initializer exactly (ORT requires it)."""
    for graph, named in tensors.items():
        for name, array in named.items():
            entry = base.entry(graph, name)
            if tuple(array.shape) != entry.shape or array.dtype != np.dtype(entry.dtype):
                raise LoramgrError(f"{name}: merged tensor {array.dtype}{list(array.shape)} does not match "
                                   f"the base initializer {entry.dtype}{list(entry.shape)}")
