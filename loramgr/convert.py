"""Adapters in and out of the workspace: ``convert`` sources into ``.lora``, ``bake`` sets into full tensors.

``convert_adapter`` reads any supported LoRA / ControlNet file against a base's weight
map (the formats layer) and writes ``adapters/NAME.lora`` with the factors addressed
by the base's initializer names. ``bake`` merges a set of adapters with their weights
into the plain replacement tensors an ONNX Runtime user passes to
``AddExternalInitializers`` from any language.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .adapter_file import AdapterFile, AdapterTarget, check_finite_targets, load_adapter, save_adapter
from .errors import LoramgrError, check_finite, parse_weight
from .manifest import FUSED, Manifest
from .merge import AdapterSet, BaseWeights, merge_tensors
from .workspace import Workspace, check_name, sha256_tree


@dataclass
class ConversionReport:
    name: str
    path: Path
    base: str
    format: str
    kind: str
    modules: dict[str, int]  # graph -> weights changed
    ranks: list[int]
    dtype: str
    keys_total: int
    keys_used: int
    unknown_keys: list[str]
    source_bytes: int
    size_bytes: int
    seconds: float
    trigger_words: list[str] = field(default_factory=list)


def resolve_base(workspace: Workspace, base: str | None) -> str:
    """``base`` if given (and present), else the workspace's only base."""
    names = workspace.base_names()
    if base is not None:
        if base not in names:
            raise LoramgrError(f"no base named {base!r} in {workspace.base_models} "
                               f"(bases: {', '.join(names) or 'none; run loramgr export first'})")
        return base
    if len(names) == 1:
        return names[0]
    if not names:
        raise LoramgrError(f"no base in {workspace.base_models}: run `loramgr export` (or `loramgr demo`) first")
    raise LoramgrError(f"{len(names)} bases in {workspace.base_models} ({', '.join(names)}): choose one with --base")


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    # numpy has no bfloat16: such factors are widened to fp32 (exact) rather than narrowed.
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.detach().contiguous().numpy()


def convert_adapter(
    workspace: Workspace, source: str | Path, *, base: str | None = None, name: str | None = None,
    kind: str | None = None, strict: bool = False, default_weight: float = 1.0,
) -> ConversionReport:
    """Convert a LoRA-family file or a ControlNet into ``adapters/NAME.lora`` for ``base``.

    Example:
        >>> report = convert_adapter(Workspace.resolve(), "shinkawa.safetensors")
        >>> report.path.name, report.keys_used == report.keys_total
        ('shinkawa.lora', True)
    """
    from .formats import read_adapter

    start = time.perf_counter()
    source = Path(source)
    base = resolve_base(workspace, base)
    name = check_name((source.stem if source.suffix else source.name) if name is None else name, "adapter")
    default_weight = check_finite(default_weight, "--default-weight")
    manifest = Manifest.load(workspace.base_dir(base))
    parsed = read_adapter(source, manifest.param_shapes(), kind=kind,
                          controlnet_config=manifest.configs["controlnet"], strict=strict)
    targets = []
    for delta in parsed.deltas:
        graph = manifest.graph_of(delta.param)
        entry = manifest.graphs[graph].weights[delta.param]
        if delta.kind == "full":
            tensors = {"weight": entry.to_onnx_layout(_numpy(delta.tensors["weight"].to(torch.float32)))
                       .astype(entry.dtype)}
        else:
            tensors = {k: _numpy(v) for k, v in delta.tensors.items()}
            if delta.dora_scale is not None:
                tensors["dora_scale"] = _numpy(delta.dora_scale)
        targets.append(AdapterTarget(entry.initializer, graph, delta.param, delta.kind, delta.scale, tensors,
                                     delta.dora_rule))
    check_finite_targets(source, targets)
    adapter_kind = "controlnet" if parsed.kind == "controlnet" else "lora"
    metadata = {
        "loramgr.source_name": source.name,
        "loramgr.source_path": str(source.resolve()),
        "loramgr.source_sha256": sha256_tree(source),
        "loramgr.source_format": parsed.format,
        "loramgr.base_name": base,
        "loramgr.base_fingerprint": manifest.fingerprint,
        "loramgr.trigger_words": json.dumps(parsed.trigger_words),
        "loramgr.default_weight": str(default_weight),
        "loramgr.ranks": json.dumps(sorted(parsed.ranks)),
        "loramgr.source_dtype": parsed.dtype,
    }
    path = workspace.adapter_path(name)
    save_adapter(path, adapter_kind, metadata, targets)
    source_bytes = source.stat().st_size if source.is_file() else sum(
        p.stat().st_size for p in source.rglob("*") if p.is_file())
    return ConversionReport(
        name=name, path=path, base=base, format=parsed.format, kind=adapter_kind,
        modules=dict(Counter(t.graph for t in targets)), ranks=sorted(parsed.ranks), dtype=parsed.dtype,
        keys_total=parsed.keys_total, keys_used=parsed.keys_used, unknown_keys=parsed.unknown_keys,
        source_bytes=source_bytes, size_bytes=path.stat().st_size, seconds=time.perf_counter() - start,
        trigger_words=parsed.trigger_words,
    )


def parse_adapter_spec(spec: str) -> tuple[str, float | None]:
    """``NAME[:WEIGHT]`` -> (name, weight or None for the adapter's default)."""
    name, sep, weight = spec.partition(":")
    if not sep:
        return name, None
    return name, parse_weight(weight, f"adapter {spec!r}", " (use NAME:0.8)")


def load_adapter_set(workspace: Workspace, manifest: Manifest, loras: list[str], control: str | None = None
                     ) -> AdapterSet:
    """Load ``NAME[:WEIGHT]`` LoRAs and an optional ControlNet adapter, checked against ``manifest``.

    ``control`` of ``None`` or ``"canny"`` keeps the base's own ControlNet.
    """
    chosen: list[tuple[AdapterFile, float]] = []
    for spec in loras:
        name, weight = parse_adapter_spec(spec)
        adapter = _load_named(workspace, name)
        if adapter.kind == "controlnet":
            raise LoramgrError(f"{name} is a ControlNet adapter: pass it with --control {name}")
        chosen.append((adapter, adapter.default_weight if weight is None else weight))
    if control not in (None, "canny"):
        adapter = _load_named(workspace, control)
        if adapter.kind != "controlnet":
            raise LoramgrError(f"--control {control}: {adapter.path} is a {adapter.kind} adapter, not a ControlNet")
        chosen.insert(0, (adapter, 1.0))
    for adapter, _ in chosen:
        adapter.check_base(manifest)
    return AdapterSet(tuple(chosen))


def _load_named(workspace: Workspace, name: str) -> AdapterFile:
    path = Path(name) if name.endswith(".lora") else workspace.adapter_path(name)
    if not path.is_file():
        available = ", ".join(workspace.adapter_names()) or "none; run loramgr convert first"
        raise LoramgrError(f"unknown adapter {name!r}: no {path} (adapters: {available})")
    return load_adapter(path)


def bake(workspace: Workspace, output: Path, loras: list[str], *, base: str | None = None,
         control: str | None = None) -> dict[str, Path]:
    """Merge adapters into full replacement tensors named as the base's initializers.

    Writes ``output`` for the UNet+ControlNet graph and, when the set changes the text
    encoder, ``<output stem>.text_encoder.lora`` beside it (ONNX Runtime refuses
    initializers a graph does not have, so each graph gets its own file). Returns
    graph -> path.
    """
    base = resolve_base(workspace, base)
    base_dir = workspace.base_dir(base)
    manifest = Manifest.load(base_dir)
    adapter_set = load_adapter_set(workspace, manifest, loras, control)
    if not adapter_set.adapters:
        raise LoramgrError("bake needs at least one --lora or --control adapter")
    output = Path(output)
    if output.suffix != ".lora":
        raise LoramgrError(f"-o {output}: the output file must end in .lora")
    tensors = merge_tensors(BaseWeights(manifest, base_dir), adapter_set)
    recipe = json.dumps([{"name": a.name, "weight": w, "sha256": a.metadata.get("loramgr.source_sha256", "")}
                         for a, w in adapter_set.adapters])
    written = {}
    for graph, named in tensors.items():
        path = output if graph == FUSED else output.with_name(f"{output.stem}.{graph}.lora")
        by_init = manifest.graphs[graph].by_initializer()
        targets = [AdapterTarget(n, graph, by_init[n], "full", 1.0, {"weight": a}) for n, a in named.items()]
        metadata = {"loramgr.base_name": base, "loramgr.base_fingerprint": manifest.fingerprint,
                    "loramgr.graph": graph, "loramgr.baked_from": recipe}
        save_adapter(path, "baked", metadata, targets)
        written[graph] = path
    return written

