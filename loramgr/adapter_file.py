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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import BadFileError, LoramgrError
from .manifest import Manifest
from .workspace import atomic_path

FORMAT_VERSION = 1
SEPARATOR = "::"
KINDS = ("lora", "controlnet", "baked")
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

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def base_fingerprint(self) -> str:
        return self.metadata.get("loramgr.base_fingerprint", "")

    @property
    def default_weight(self) -> float:
        return float(self.metadata.get("loramgr.default_weight", "1.0"))

    def check_base(self, manifest: Manifest) -> None:
        """Refuse an adapter converted against another base before any work is done."""
        if self.base_fingerprint != manifest.fingerprint:
            raise LoramgrError(
                f"{self.path}: converted for base {self.metadata.get('loramgr.base_name', '?')!r} "
                f"(fingerprint {self.base_fingerprint[:12]}), not for base {manifest.name!r} "
                f"({manifest.fingerprint[:12]}): convert the source again with --base {manifest.name}"
            )


def save_adapter(path: Path, kind: str, metadata: dict[str, str], targets: list[AdapterTarget]) -> None:
    """Write a ``.lora`` atomically (temp file + rename).

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
    graph = onnx.helper.make_graph([], "loramgr_adapter", [], [], initializer=initializers)
    model = onnx.helper.make_model(graph, producer_name="loramgr")
    props = {"loramgr.format_version": str(FORMAT_VERSION), "loramgr.kind": kind, **metadata,
             "loramgr.targets": json.dumps(index)}
    onnx.helper.set_model_props(model, props)
    size = sum(a.nbytes for t in targets for a in t.tensors.values())
    with atomic_path(path) as tmp:
        if size > _PROTO_LIMIT:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp))


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
    for initializer, entry in json.loads(meta.pop("loramgr.targets", "{}")).items():
        names = ([initializer] if entry["kind"] == "full"
                 else [f"{initializer}{SEPARATOR}{k}" for k in entry["factors"]])
        try:
            arrays = {k: numpy_helper.to_array(tensors[n]) for k, n in zip(entry["factors"], names)}
        except KeyError as exc:
            raise BadFileError(path, f"tensor {exc.args[0]!r} listed in the metadata is missing") from None
        targets[initializer] = AdapterTarget(initializer, entry["graph"], entry["param"], entry["kind"],
                                             float(entry["scale"]), arrays, entry.get("dora_rule", "lycoris"))
    return AdapterFile(Path(path), meta["loramgr.kind"], meta, targets)


def _load(path: Path, load_external_data: bool) -> onnx.ModelProto:
    if not Path(path).is_file():
        raise BadFileError(path, "no such adapter file")
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # protobuf raises DecodeError, onnx its own: both mean "not an ONNX file"
        raise BadFileError(path, f"not a readable .lora (ONNX) file: {type(exc).__name__}") from None
