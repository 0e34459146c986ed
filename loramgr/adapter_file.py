"""The ``.lora`` file: an initializer-only ONNX model named by the base's initializers.

A ``.lora`` is an ONNX ``ModelProto`` whose graph has no nodes, inputs or outputs, only
initializers, as in seed 001, so any ONNX reader (``onnx.load``, protobuf in C++) can
open it. Two kinds of content (docs/lora-format.md is the full contract):

* **Full tensors**, named exactly as a base initializer, in the initializer's layout
  and dtype: ControlNet checkpoints and ``loramgr bake`` output. Such a file can be
  passed as it is to ONNX Runtime's ``AddExternalInitializers``.
* **Factors** of a weight delta, named ``<initializer>::<factor>`` (``up``, ``down``,
  ``w1_a``... as :class:`loramgr.formats.WeightDelta` names them, and ``dora_scale``), in torch layout and the
  source dtype, so that strength and stacking are chosen at run time and the file
  stays about the size of the source. The per-target kind, scale (alpha / rank) and
  layout are in the ``loramgr.targets`` metadata entry (JSON).
* **Textual-inversion embeddings**, named ``loramgr.embedding::<trigger>`` ([n, D] float32),
  indexed by ``loramgr.embeddings``: the whole content of a file of kind ``embedding``, or
  the ones a LoRA bundles, triggered by name in prompts while the LoRA is applied.

``loramgr.content_sha256`` records a sha256 of every tensor and metadata entry, written
by :func:`save_adapter` and checked by :func:`load_adapter` at every load, so a damaged
file is refused instead of changing the image; files written before it existed have no
such entry and are read unchecked (docs/lora-format.md, "Integrity").
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import BadFileError, LoramgrError, finite32, parse_weight
from .manifest import Manifest
from .workspace import atomic_path

FORMAT_VERSION = 1
SEPARATOR = "::"
KINDS = ("lora", "controlnet", "baked", "embedding")
CHECKSUM_KEY = "loramgr.content_sha256"
EMBEDDINGS_KEY = "loramgr.embeddings"
EMBEDDING_PREFIX = "loramgr.embedding::"
# ONNX's protobuf limit is 2 GiB; larger files keep their tensors in a sibling data file.
_PROTO_LIMIT = 1_800_000_000


@dataclass
class AdapterTarget:
    """Everything needed to rebuild one base initializer's change."""

    initializer: str
    graph: str
    param: str
    kind: str  # "lora" | "loha" | "lokr" | "full"
    scale: float
    tensors: dict[str, np.ndarray]  # factor name -> array (torch layout); "full": {"weight": ONNX layout}
    dora_rule: str = "lycoris"  # with a "dora_scale" factor: how the weight enters ("lycoris" | "peft")


@dataclass
class AdapterFile:
    path: Path
    kind: str
    metadata: dict[str, str]
    targets: dict[str, AdapterTarget] = field(default_factory=dict)
    # textual-inversion vectors [n, D] by trigger; a file of kind "embedding" holds one, triggered
    # by the adapter's name (the file stem, as A1111 names embeddings by theirs)
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def base_fingerprint(self) -> str:
        return self.metadata.get("loramgr.base_fingerprint", "")

    @property
    def default_weight(self) -> float:
        return parse_weight(self.metadata.get("loramgr.default_weight", "1.0"), f"{self.path} default weight")

    def check_base(self, manifest: Manifest) -> None:
        """Refuse an adapter converted against another base before any work is done."""
        if self.kind == "embedding":
            raise LoramgrError(f"{self.path}: a textual-inversion embedding, not a LoRA: write its name "
                               f"{self.name!r} in the prompt instead")
        if self.base_fingerprint != manifest.fingerprint:
            raise LoramgrError(
                f"{self.path}: converted for base {self.metadata.get('loramgr.base_name', '?')!r} "
                f"(fingerprint {self.base_fingerprint[:12]}), not for base {manifest.name!r} "
                f"({manifest.fingerprint[:12]}): convert the source again with --base {manifest.name}"
            )
        check_target_shapes(self.path, self.targets.values(), manifest)


def save_adapter(path: Path, kind: str, metadata: dict[str, str], targets: list[AdapterTarget],
                 embeddings: dict[str, np.ndarray] | None = None) -> None:
    """Write a ``.lora`` atomically (temp file + rename); ``embeddings``: trigger -> [n, D] vectors.

    Example:
        >>> save_adapter(Path("adapters/x.lora"), "lora", {"loramgr.base_name": "tiny"}, targets)
        >>> load_adapter(Path("adapters/x.lora")).kind
        'lora'
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} not in {KINDS}")
    initializers, index = [], {}
    for t in targets:
        names = [t.initializer] if t.kind == "full" else [f"{t.initializer}{SEPARATOR}{k}" for k in t.tensors]
        for tensor_name, array in zip(names, t.tensors.values()):
            initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), tensor_name))
        index[t.initializer] = {"graph": t.graph, "param": t.param, "kind": t.kind, "scale": t.scale,
                                "factors": list(t.tensors)}
        if "dora_scale" in t.tensors:
            index[t.initializer]["dora_rule"] = t.dora_rule
    embeddings = embeddings or {}
    for trigger, vectors in embeddings.items():
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(vectors, np.float32),
                                                    EMBEDDING_PREFIX + trigger))
    graph = onnx.helper.make_graph([], "loramgr_adapter", [], [], initializer=initializers)
    model = onnx.helper.make_model(graph, producer_name="loramgr")
    props = {"loramgr.format_version": str(FORMAT_VERSION), "loramgr.kind": kind, **metadata,
             "loramgr.targets": json.dumps(index)}
    if embeddings:
        props[EMBEDDINGS_KEY] = json.dumps(embedding_shapes(embeddings))
    onnx.helper.set_model_props(model, props)
    onnx.helper.set_model_props(model, {**props, CHECKSUM_KEY: content_sha256(model)})
    size = sum(a.nbytes for t in targets for a in t.tensors.values())
    with atomic_path(path) as tmp:
        if size > _PROTO_LIMIT:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp))


def embedding_shapes(embeddings: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """Trigger -> ``{vectors, dim}``: the ``loramgr.embeddings`` index entry of each embedding."""
    return {t: {"vectors": int(v.shape[0]), "dim": int(v.shape[1])} for t, v in embeddings.items()}


def content_sha256(model: onnx.ModelProto) -> str:
    """sha256 over every metadata entry but the checksum and every tensor's name, type, shape and bytes."""
    digest = hashlib.sha256()
    for prop in sorted(model.metadata_props, key=lambda p: p.key):
        if prop.key != CHECKSUM_KEY:
            digest.update(json.dumps([prop.key, prop.value]).encode())
    for tensor in model.graph.initializer:
        digest.update(json.dumps([tensor.name, tensor.data_type, list(tensor.dims)]).encode())
        digest.update(tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes())
    return digest.hexdigest()


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a ``.lora`` without its tensors (for ``list`` / ``inspect``)."""
    model = _load(path, load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def load_adapter(path: Path) -> AdapterFile:
    """Read a ``.lora`` (factors or full tensors) written by :func:`save_adapter`."""
    model = _load(path, load_external_data=True)
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("loramgr.format_version") != str(FORMAT_VERSION):
        raise BadFileError(path, f"not a loramgr adapter of format {FORMAT_VERSION} (metadata "
                                 f"loramgr.format_version={meta.get('loramgr.format_version')!r})")
    tensors = {t.name: t for t in model.graph.initializer}
    targets = {}
    index = parse_targets(path, meta)
    meta.pop("loramgr.targets", None)
    if meta.get("loramgr.kind") not in KINDS:
        raise BadFileError(path, f"metadata loramgr.kind {meta.get('loramgr.kind')!r} is not one of {', '.join(KINDS)}")
    recorded = meta.get(CHECKSUM_KEY)
    try:
        actual = content_sha256(model) if recorded is not None else None
    except Exception:  # onnx/numpy raise several types for a damaged TensorProto
        actual = "unreadable"
    if actual != recorded:
        again = "bake it again" if meta["loramgr.kind"] == "baked" else "convert its source again"
        raise BadFileError(path, f"content changed since it was written ({CHECKSUM_KEY} does not match): "
                                 f"the file is damaged, {again}")
    for initializer, entry in index.items():
        names = ([initializer] if entry["kind"] == "full"
                 else [f"{initializer}{SEPARATOR}{k}" for k in entry["factors"]])
        try:
            arrays = {k: numpy_helper.to_array(tensors[n]) for k, n in zip(entry["factors"], names)}
        except KeyError as exc:
            raise BadFileError(path, f"tensor {exc.args[0]!r} listed in the metadata is missing") from None
        except Exception as exc:  # onnx/numpy raise several types for a damaged TensorProto
            raise BadFileError(path, f"tensor of {initializer!r} cannot be read ({type(exc).__name__})") from None
        targets[initializer] = AdapterTarget(initializer, entry["graph"], entry["param"], entry["kind"],
                                             float(entry["scale"]), arrays, entry.get("dora_rule", "lycoris"))
    embeddings = {}
    for trigger, entry in _parse_embeddings(path, meta).items():
        tensor = tensors.get(EMBEDDING_PREFIX + trigger)
        vectors = numpy_helper.to_array(tensor) if tensor is not None else None
        if vectors is None or vectors.shape != (entry["vectors"], entry["dim"]):
            got = "missing" if vectors is None else f"shaped {list(vectors.shape)}"
            raise BadFileError(path, f"embedding {trigger!r} listed in the metadata is {got} (damaged file?)")
        embeddings[trigger] = vectors
    if meta["loramgr.kind"] == "embedding":
        if len(embeddings) != 1 or targets:
            raise BadFileError(path, "an embedding file holds one embedding and no weight changes (damaged file?)")
        embeddings = {Path(path).stem: next(iter(embeddings.values()))}
    return AdapterFile(Path(path), meta["loramgr.kind"], meta, targets, embeddings)


def embedding_index(path: Path, metadata: dict[str, str]) -> dict[str, dict]:
    """Trigger -> ``{vectors, dim}`` of the embeddings a ``.lora`` holds, from its metadata (no
    tensors read); a file of kind ``embedding`` adds A1111's ``step``, ``sd_checkpoint`` and
    ``sd_checkpoint_name`` and is triggered by its name."""
    index = _parse_embeddings(path, metadata)
    if metadata.get("loramgr.kind") != "embedding":
        return index
    if len(index) != 1:
        raise BadFileError(path, f"an embedding file indexes {len(index)} embeddings, not one (damaged file?)")
    fields = {}
    for key in ("step", "sd_checkpoint", "sd_checkpoint_name"):
        try:
            fields[key] = json.loads(metadata.get(f"loramgr.embedding.{key}", "null"))
        except ValueError:
            raise BadFileError(path, f"metadata loramgr.embedding.{key} is not JSON (damaged file?)") from None
    return {Path(path).stem: {**next(iter(index.values())), **fields}}


def _parse_embeddings(path: Path, metadata: dict[str, str]) -> dict[str, dict[str, int]]:
    """The ``loramgr.embeddings`` index of a ``.lora``, checked: name at conversion -> {vectors, dim}."""
    try:
        index = json.loads(metadata.get(EMBEDDINGS_KEY, "{}"))
    except ValueError:
        index = None
    valid = isinstance(index, dict) and all(
        isinstance(e, dict) and all(isinstance(e.get(k), int) and not isinstance(e.get(k), bool) and e[k] > 0
                                    for k in ("vectors", "dim")) for e in index.values())
    if not valid:
        raise BadFileError(path, f"metadata {EMBEDDINGS_KEY} is not a JSON object of {{vectors, dim}} (damaged file?)")
    return index


_TARGET_FIELDS = {"graph": str, "param": str, "kind": str, "scale": (int, float), "factors": list}
_TARGET_KINDS = ("lora", "loha", "lokr", "full")


def parse_targets(path: Path, metadata: dict[str, str]) -> dict[str, dict]:
    """The ``loramgr.targets`` index of a ``.lora``, checked: initializer -> {graph, param, kind, scale, factors}.

    Damaged metadata is refused as a :class:`BadFileError` naming the file, not a traceback.
    """
    try:
        index = json.loads(metadata.get("loramgr.targets", "{}"))
    except ValueError:
        raise BadFileError(path, "metadata loramgr.targets is not valid JSON (damaged file?)") from None
    if not isinstance(index, dict):
        raise BadFileError(path, "metadata loramgr.targets is not a JSON object (damaged file?)")
    for initializer, entry in index.items():
        if not isinstance(entry, dict):
            raise BadFileError(path, f"metadata loramgr.targets[{initializer!r}] is not a JSON object")
        for key, types in _TARGET_FIELDS.items():
            if not isinstance(entry.get(key), types) or isinstance(entry.get(key), bool):
                raise BadFileError(path, f"metadata loramgr.targets[{initializer!r}] has no valid {key!r}")
        if entry["kind"] not in _TARGET_KINDS:
            raise BadFileError(path, f"metadata loramgr.targets[{initializer!r}]: unknown kind {entry['kind']!r}")
        if not finite32(entry["scale"]):
            raise BadFileError(path, f"metadata loramgr.targets[{initializer!r}]: scale {entry['scale']} is not finite "
                                     "(float32)")
        if not all(isinstance(f, str) for f in entry["factors"]) or not entry["factors"]:
            raise BadFileError(path, f"metadata loramgr.targets[{initializer!r}] has no valid 'factors'")
    return index


def check_target_shapes(path: Path, targets, manifest: Manifest) -> None:
    """Every target must name a weight of ``manifest`` and its factors must build that weight's shape.

    Only shapes are compared (the rules of ``formats.deltas``, no tensor math), so a
    damaged or hand-edited file is refused before any session is created.
    """
    from .formats.deltas import dora_axis

    for t in targets:
        graph = manifest.graphs.get(t.graph)
        entry = graph.weights.get(t.param) if graph is not None else None
        if entry is None or entry.initializer != t.initializer:
            raise BadFileError(path, f"target {t.initializer!r} ({t.graph}/{t.param}) is not a weight of base "
                                     f"{manifest.name!r}")
        if t.kind == "full":
            weight = t.tensors.get("weight")
            if weight is None or tuple(weight.shape) != tuple(entry.shape):
                got = list(weight.shape) if weight is not None else None
                raise BadFileError(path, f"tensor {t.initializer!r} has shape {got}, the base weight {list(entry.shape)}")
            continue
        shapes = {k: tuple(v.shape) for k, v in t.tensors.items()}
        try:
            fits = _delta_shape(t.kind, shapes, tuple(entry.torch_shape))
            if "dora_scale" in t.tensors:
                dora_axis(t.tensors["dora_scale"], tuple(entry.torch_shape))
        except (ValueError, KeyError, IndexError, TypeError):
            fits = False
        if not fits:
            described = ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
            raise BadFileError(path, f"the factors of {t.param} ({described}) do not make its shape "
                                     f"{list(entry.torch_shape)} (damaged file?)")


def _low_rank_shape(w_a: tuple[int, ...], w_b: tuple[int, ...]) -> tuple[int, int]:
    if len(w_a) != 2 or len(w_b) < 2 or w_a[1] != w_b[0]:
        raise ValueError("factors do not chain")
    return w_a[0], math.prod(w_b[1:])


def _tucker_shape(t: tuple[int, ...], w_a: tuple[int, ...], w_b: tuple[int, ...]) -> tuple[int, ...]:
    if len(t) < 2 or len(w_a) != 2 or len(w_b) != 2 or t[0] != w_a[0] or t[1] != w_b[0]:
        raise ValueError("factors do not chain")
    return (w_a[1], w_b[1], *t[2:])


def _delta_shape(kind: str, f: dict[str, tuple[int, ...]], shape: tuple[int, ...]) -> bool:
    """Whether the factors ``f`` (shapes only) build a delta of ``shape``, as formats.deltas computes it."""
    if kind == "lora":
        rows, cols = _low_rank_shape(f["up"], f["down"])
        return rows == shape[0] and rows * cols == math.prod(shape)
    if kind == "loha":
        if "t1" in f:
            w1, w2 = _tucker_shape(f["t1"], f["w1_a"], f["w1_b"]), _tucker_shape(f["t2"], f["w2_a"], f["w2_b"])
        else:
            w1, w2 = _low_rank_shape(f["w1_a"], f["w1_b"]), _low_rank_shape(f["w2_a"], f["w2_b"])
        return math.prod(np.broadcast_shapes(w1, w2)) == math.prod(shape)
    if kind == "lokr":
        w1 = f["w1"] if "w1" in f else _low_rank_shape(f["w1_a"], f["w1_b"])
        if "w2" in f:
            w2 = f["w2"]
        elif "t2" in f:
            w2 = _tucker_shape(f["t2"], f["w2_a"], f["w2_b"])
        else:
            w2 = _low_rank_shape(f["w2_a"], f["w2_b"])
        if len(w1) != 2 or len(w2) < 1:
            return False
        return w1[0] * w2[0] == shape[0] and math.prod(w1) * math.prod(w2) == math.prod(shape)
    return False


def check_finite_targets(path: Path, targets) -> None:
    """Refuse NaN or infinity in any tensor or scale: they would render black images."""
    for t in targets:
        if not finite32(t.scale):
            raise BadFileError(path, f"{t.param}: scale (alpha / rank) {t.scale} is not a finite number (float32)")
        for key, array in t.tensors.items():
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                raise BadFileError(path, f"{t.param}: tensor {key!r} holds NaN or infinite values")


def _load(path: Path, load_external_data: bool) -> onnx.ModelProto:
    if not Path(path).is_file():
        raise BadFileError(path, "no such adapter file")
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # protobuf raises DecodeError, onnx its own: both mean "not an ONNX file"
        raise BadFileError(path, f"not a readable .lora (ONNX) file: {type(exc).__name__}") from None
