"""``manifest.json``: what a base is, and where each of its weights lives in ONNX.

The weight map is the contract every adapter is built against: for each torch
parameter (``unet.down_blocks.0...to_q.weight``, ``controlnet....``, ``text_model....``)
the ONNX initializer that holds it, the layout transform between the two
(``identity``, ``transpose`` for Linear weights feeding MatMul, ``reshape`` for norm
weights folded from an Unsqueeze), shapes, dtype, and the byte range of the tensor in
the graph's external data file, so merged tensors can be computed from a memory map
without loading the graph.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadFileError, LoramgrError

# 2: the UNet and the ControlNet are separate graphs, the text encoder takes textual-inversion
# vectors and returns every CLIP-skip output (docs/base-layout.md). 1 fused UNet + ControlNet.
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
UNET = "unet"
CONTROLNET = "controlnet"
TEXT_ENCODER = "text_encoder"
VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"
GRAPHS = (UNET, CONTROLNET, TEXT_ENCODER, VAE_DECODER, VAE_ENCODER)
ADAPTER_GRAPHS = (UNET, CONTROLNET, TEXT_ENCODER)  # the graphs adapters change (the VAE carries none)
LAYOUTS = ("identity", "transpose", "reshape")


@dataclass(frozen=True)
class WeightEntry:
    """Where one torch parameter lives in a graph."""

    initializer: str
    layout: str  # one of LAYOUTS: how torch_shape becomes shape
    torch_shape: tuple[int, ...]
    shape: tuple[int, ...]  # the initializer's shape
    dtype: str  # numpy dtype name of the initializer
    offset: int  # byte offset in the graph's external data file
    length: int

    def read(self, buffer: np.ndarray) -> np.ndarray:
        """This tensor in ``buffer``, the graph's external data file mapped as bytes: a view, no copy.

        The view has the initializer's layout, shape and dtype (:meth:`to_torch_layout`
        gives the torch layout). It is writable where the map is: ``np.memmap(path,
        dtype=np.uint8, mode="c")`` for torch math without defensive copies, ``mode="r+"``
        to write a tensor in place (``entry.read(data)[...] = array``).

        Example::

            data = np.memmap(base / graph.data, dtype=np.uint8, mode="r")
            weight = entry.to_torch_layout(entry.read(data))
        """
        data = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, dtype=np.uint8)
        if data.dtype != np.uint8 or data.ndim != 1:
            raise TypeError(f"expected the data file as a 1-D uint8 buffer, got {data.dtype}{list(data.shape)}")
        end = self.offset + self.length
        if end > data.size:
            raise LoramgrError(f"{self.initializer}: bytes {self.offset:,}..{end:,} lie beyond the end of its "
                               f"{data.size:,}-byte data file; the base is damaged, re-export it")
        return data[self.offset: end].view(self.dtype).reshape(self.shape)

    def to_onnx_layout(self, array: np.ndarray) -> np.ndarray:
        """Bring a torch-layout array into this initializer's layout (no dtype change)."""
        if self.layout == "transpose":
            return np.ascontiguousarray(array.T)
        return array.reshape(self.shape)

    def to_torch_layout(self, array: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_onnx_layout` (a view where possible)."""
        if self.layout == "transpose":
            return array.T
        return array.reshape(self.torch_shape)


@dataclass(frozen=True)
class IOSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # str = dynamic axis


def axis_size(axis: int | str, sizes: dict[str, int]) -> int:
    """The size of one input axis: a fixed ``int``, or a named dynamic axis ``NAME`` or ``NAME/k``
    (a k-th of it: the export names a ControlNet residual's axes ``latent_height/4``)."""
    if isinstance(axis, int):
        return axis
    name, _, factor = axis.partition("/")
    if name not in sizes or (factor and not factor.isdigit()):
        raise LoramgrError(f"the base has a dynamic axis {axis!r} loramgr does not know: re-export the base")
    return sizes[name] // int(factor or 1)


@dataclass
class GraphInfo:
    path: str  # relative to the base folder
    data: str | None  # external data file, relative to the base folder
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    weights: dict[str, WeightEntry] = field(default_factory=dict)
    data_sha256: str | None = None
    # Checked at every open (docs/base-layout.md); None in manifests written before they were recorded.
    data_size: int | None = None
    model_sha256: str | None = None
    model_size: int | None = None

    def by_initializer(self) -> dict[str, str]:
        """Initializer name -> torch parameter name."""
        return {entry.initializer: param for param, entry in self.weights.items()}


@dataclass
class Manifest:
    name: str
    dtype: str  # "fp32" | "fp16"
    opset: int
    source: dict
    graphs: dict[str, GraphInfo]
    configs: dict  # diffusers configs of unet / controlnet / vae / text_encoder (readers need them)
    vae_scaling_factor: float
    fingerprint: str = ""
    format_version: int = FORMAT_VERSION
    exporter: dict = field(default_factory=dict)

    def compute_fingerprint(self) -> str:
        """sha256 over every weight map and the content of every external data file.

        Adapters record it; a base re-exported from other weights gets a new one.
        """
        digest = hashlib.sha256()
        for name in sorted(self.graphs):
            graph = self.graphs[name]
            digest.update(name.encode())
            digest.update(json.dumps({p: asdict(e) for p, e in sorted(graph.weights.items())}, sort_keys=True).encode())
            digest.update((graph.data_sha256 or "").encode())
        return digest.hexdigest()

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Torch parameter name -> torch shape, over every graph (the formats layer's view of a base)."""
        return {p: e.torch_shape for g in self.graphs.values() for p, e in g.weights.items()}

    def graph_of(self, param: str) -> str:
        for name, graph in self.graphs.items():
            if param in graph.weights:
                return name
        raise KeyError(param)

    def save(self, folder: Path) -> None:
        (folder / MANIFEST_NAME).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise LoramgrError(f"{folder}: not a loramgr base (no {MANIFEST_NAME})")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format_version") != FORMAT_VERSION:
                raise BadFileError(path, f"manifest format {raw.get('format_version')} is not {FORMAT_VERSION}: "
                                         + reexport_hint(raw))
            graphs = {
                name: GraphInfo(
                    path=g["path"], data=g["data"], data_sha256=g.get("data_sha256"),
                    data_size=_optional(g, "data_size", int), model_sha256=_optional(g, "model_sha256", str),
                    model_size=_optional(g, "model_size", int),
                    inputs=[IOSpec(i["name"], i["dtype"], tuple(i["shape"])) for i in g["inputs"]],
                    outputs=[IOSpec(o["name"], o["dtype"], tuple(o["shape"])) for o in g["outputs"]],
                    weights={
                        p: WeightEntry(e["initializer"], e["layout"], tuple(e["torch_shape"]), tuple(e["shape"]),
                                       e["dtype"], e["offset"], e["length"])
                        for p, e in g["weights"].items()
                    },
                )
                for name, g in raw["graphs"].items()
            }
            return cls(
                name=raw["name"], dtype=raw["dtype"], opset=raw["opset"], source=raw["source"], graphs=graphs,
                configs=raw["configs"], vae_scaling_factor=raw["vae_scaling_factor"],
                fingerprint=raw["fingerprint"], format_version=raw["format_version"], exporter=raw.get("exporter", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadFileError(path, f"damaged manifest ({type(exc).__name__}: {exc}): re-export the base") from None


def reexport_hint(raw: dict) -> str:
    """What to run to rebuild a base in today's layout, from what its (old) manifest says of its source."""
    name, source = raw.get("name", "NAME"), raw.get("source")
    source = source if isinstance(source, dict) else {}
    if source.get("kind") == "random":
        args = f"--arch {source.get('arch')} --random --seed {source.get('seed')}"
    elif source.get("model"):
        args = f"--model {source['model']}" + (f" --controlnet {source['controlnet']}" if source.get("controlnet") else "")
    else:
        args = "--model SRC --controlnet SRC"
    return (f"this base was exported by an older loramgr (format 1: UNet and ControlNet fused in one graph); "
            f"re-export it with `loramgr export {args} --name {name}`, then convert its adapters "
            f"again (`loramgr convert FILE`)")


def _optional(raw: dict, key: str, kind: type):
    """``raw[key]`` if present (a TypeError when it is not a ``kind``), else None."""
    value = raw.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise TypeError(f"{key} is {value!r}, not a {kind.__name__}")
    return value
