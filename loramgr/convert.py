"""Adapters into the workspace: ``convert`` sources into ``adapters/NAME.lora``.

``convert_adapter`` reads any supported LoRA / ControlNet file against a base's weight
map (the formats layer) and writes ``adapters/NAME.lora`` with the factors addressed
by the base's initializer names, plus the textual-inversion embeddings the file bundles.
A textual-inversion embedding becomes a ``.lora`` of kind ``embedding`` whose name is its
trigger. Merging adapters into full tensors is :mod:`loramgr.bake`'s job.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .adapter_file import AdapterTarget, check_finite_targets, embedding_shapes, save_adapter
from .errors import BadFileError, check_finite
from .formats.names import other_width_hint
from .manifest import Manifest
from .workspace import Workspace, check_name, resolve_base, sha256_tree


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
    embeddings: dict[str, dict[str, int]] = field(default_factory=dict)  # trigger -> {vectors, dim}


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    # numpy has no bfloat16: such factors are widened to fp32 (exact) rather than narrowed.
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.detach().contiguous().numpy()


def convert_adapter(
    workspace: Workspace, source: str | Path, *, base: str | None = None, name: str | None = None,
    kind: str | None = None, strict: bool = False, default_weight: float = 1.0,
) -> ConversionReport:
    """Convert a LoRA-family file, a ControlNet or a textual-inversion embedding into
    ``adapters/NAME.lora`` for ``base``; ``kind`` (lora, controlnet, embedding) refuses the others.

    Example:
        >>> report = convert_adapter(Workspace.resolve(), "shinkawa.safetensors")
        >>> report.path.name, report.keys_used == report.keys_total
        ('shinkawa.lora', True)
    """
    from .formats import read_adapter
    from .formats.embeddings import read_embedding

    start = time.perf_counter()
    source = Path(source)
    base = resolve_base(workspace, base)
    name = check_name((source.stem if source.suffix else source.name) if name is None else name, "adapter")
    default_weight = check_finite(default_weight, "--default-weight")
    manifest = Manifest.load(workspace.base_dir(base))
    embedding = read_embedding(source)
    if embedding is not None and kind not in (None, "embedding"):
        raise BadFileError(source, f"is a textual-inversion embedding, not a {kind} (--kind {kind})")
    if embedding is None and kind == "embedding":
        raise BadFileError(source, "is not a textual-inversion embedding (--kind embedding)")
    source_info = {"loramgr.source_name": source.name, "loramgr.source_path": str(source.resolve()),
                   "loramgr.source_sha256": sha256_tree(source), "loramgr.base_name": base}
    if embedding is not None:
        return _convert_embedding(workspace, source, name, manifest, embedding, source_info, start)
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
    embeddings = {trigger: _fitting(source, trigger, vectors, manifest) for trigger, vectors in parsed.embeddings.items()}
    adapter_kind = "controlnet" if parsed.kind == "controlnet" else "lora"
    metadata = {
        **source_info,
        "loramgr.source_format": parsed.format,
        "loramgr.base_fingerprint": manifest.fingerprint,
        "loramgr.trigger_words": json.dumps(parsed.trigger_words),
        "loramgr.default_weight": str(default_weight),
        "loramgr.ranks": json.dumps(sorted(parsed.ranks)),
        "loramgr.source_dtype": parsed.dtype,
    }
    path = workspace.adapter_path(name)
    save_adapter(path, adapter_kind, metadata, targets, embeddings)
    return ConversionReport(
        name=name, path=path, base=base, format=parsed.format, kind=adapter_kind,
        modules=dict(Counter(t.graph for t in targets)), ranks=sorted(parsed.ranks), dtype=parsed.dtype,
        keys_total=parsed.keys_total, keys_used=parsed.keys_used, unknown_keys=parsed.unknown_keys,
        source_bytes=_size(source), size_bytes=path.stat().st_size, seconds=time.perf_counter() - start,
        trigger_words=parsed.trigger_words, embeddings=embedding_shapes(embeddings),
    )


def _size(source: Path) -> int:
    return source.stat().st_size if source.is_file() else sum(p.stat().st_size for p in source.rglob("*") if p.is_file())


def _fitting(source: Path, trigger: str, vectors: torch.Tensor, manifest: Manifest) -> np.ndarray:
    """``vectors`` as numpy, refused unless their width is the base's text width."""
    width = manifest.configs["text_encoder"]["hidden_size"]
    if vectors.shape[1] != width:
        hint = other_width_hint((width,), (vectors.shape[1],))
        raise BadFileError(source, f"embedding {trigger!r} has vectors of width {vectors.shape[1]}"
                                   + (f" ({hint})" if hint else "") + f"; base {manifest.name!r} has text width {width}")
    return _numpy(vectors)


def _convert_embedding(workspace: Workspace, source: Path, name: str, manifest: Manifest, embedding,
                       source_info: dict[str, str], start: float) -> ConversionReport:
    """A textual-inversion file as ``adapters/NAME.lora`` of kind ``embedding``, triggered by NAME.

    Only the text width binds it to a base (docs/lora-format.md, "Embeddings"), so no
    fingerprint is recorded.
    """
    vectors = _fitting(source, name, embedding.vectors, manifest)
    fields = {"step": embedding.step, "sd_checkpoint": embedding.sd_checkpoint,
              "sd_checkpoint_name": embedding.sd_checkpoint_name}
    metadata = {**source_info, "loramgr.source_format": embedding.format,
                **{f"loramgr.embedding.{k}": json.dumps(v) for k, v in fields.items()}}
    path = workspace.adapter_path(name)
    save_adapter(path, "embedding", metadata, [], {name: vectors})
    return ConversionReport(
        name=name, path=path, base=manifest.name, format=embedding.format, kind="embedding", modules={}, ranks=[],
        dtype="float32", keys_total=1, keys_used=1, unknown_keys=[], source_bytes=_size(source),
        size_bytes=path.stat().st_size, seconds=time.perf_counter() - start,
        embeddings=embedding_shapes({name: vectors}),
    )
