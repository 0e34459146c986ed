"""TensorRT engines of a base: built once from the base ONNX, cached, and checked before use.

Also the backend's options (:class:`TrtOptions`) and the TensorRT module import, the one
place ``tensorrt`` is imported (lazily: loramgr runs without it).

Build (docs/tensorrt.md has the design and the sources):

* ``trt.OnnxParser.parse_from_file`` on the base's ``model.onnx``, so TensorRT finds the
  external data file itself; the parser names every weight after its ONNX initializer,
  which is the name the refitter later accepts.
* The UNet, the ControlNet and the text encoder are built with ``BuilderFlag.REFIT``
  (adapters arrive by refit; ``REFIT_IDENTICAL`` would forbid other weights); the VAE
  graphs carry no adapters and are built without it, keeping every fusion.
* One optimization profile from a :class:`ShapeProfile` (batch, latent height/width).
* fp16: ``BuilderFlag.FP16`` on an fp32 base where TensorRT still has it (10.x); an fp16
  base is built as a strongly typed network (TensorRT 11 and TensorRT-RTX only build
  strongly typed networks, so there an fp16 engine needs an fp16 base).

Cache: ``base_models/NAME/engines/GRAPH.plan`` plus ``GRAPH.json``, a sidecar holding
the :class:`EngineKey` the plan was built for. A plan is used only when its sidecar
holds exactly the key wanted now (GPU, compute capability, TensorRT, precision, input
shapes, base fingerprint, graph, loramgr's engine format); anything else is rebuilt.
``engines/options.json`` records the options the cache is current for; options left
unset at open take those values (:func:`resolve_options`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import torch

from ...bases import OpenBase, as_open_base
from ...errors import LoramgrError
from ...manifest import ADAPTER_GRAPHS, GRAPHS, Manifest
from ...workspace import atomic_path
from .profiles import DEFAULT_PROFILE, ShapeProfile, input_shapes

TRT_MODULES = ("tensorrt", "tensorrt_rtx")
REFITTABLE = ADAPTER_GRAPHS  # the UNet, the ControlNet (one engine per slot) and the text encoder
ENGINE_FORMAT = 2  # bump when the way engines are built changes (2: UNet and ControlNet apart)
ENGINES_DIR = "engines"
BuildStep = Callable[[str], None]

# TensorRT DataType member name -> torch dtype (names, so this table needs no TensorRT).
TORCH_DTYPES = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
    "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool,
}
TRT_DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}

# -- the TensorRT module ------------------------------------------------------------------


def missing_runtime_message(import_errors: list[str], cuda: bool, torch_version: str) -> str:
    """Say what the TensorRT backend lacks here and how to get it (no TensorRT needed)."""
    problems = []
    if import_errors:
        problems.append(
            f"no TensorRT Python module ({'; '.join(import_errors)}): install NVIDIA's `tensorrt` wheel "
            "(`pip install tensorrt`; TensorRT 10.x or later) or, for GeForce RTX GPUs, `pip install tensorrt-rtx`")
    if not cuda:
        build = " is a CPU-only build: install a CUDA build of torch" if "+cpu" in torch_version else ""
        problems.append(f"no CUDA GPU (torch.cuda.is_available() is False; torch {torch_version}{build})")
    return ("the TensorRT backend needs an NVIDIA GPU with TensorRT; here there is " + ", and ".join(problems)
            + ". Use the ONNX Runtime backend on this machine.")


def import_tensorrt() -> ModuleType:
    """``tensorrt`` or else ``tensorrt_rtx`` (same Python API), with a CUDA GPU; else LoramgrError."""
    errors, module = [], None
    for name in TRT_MODULES:
        try:
            module = __import__(name)
            break
        except (ImportError, OSError) as exc:  # OSError: the wheel is there, a CUDA library is not
            errors.append(f"import {name}: {exc}")
    cuda = torch.cuda.is_available()
    if module is None or not cuda:
        raise LoramgrError(missing_runtime_message(errors if module is None else [], cuda, torch.__version__))
    return module


_LOGGERS: dict[str, object] = {}


def trt_logger(trt: ModuleType):
    """One logger per TensorRT module: TensorRT expects the same logger for every object."""
    if trt.__name__ not in _LOGGERS:
        _LOGGERS[trt.__name__] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[trt.__name__]


# -- precision ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    name: str  # "fp16" | "fp32": what the engine computes in
    fp16_flag: bool  # BuilderFlag.FP16 on a weakly typed network (TensorRT 10)
    strongly_typed: bool  # precision taken from the ONNX types


def plan_precision(base_dtype: str, fp16: bool, has_fp16_flag: bool) -> Precision:
    """How to build ``fp16`` (or not) from a base exported in ``base_dtype``.

    An fp16 base is built strongly typed: its engine is fp16 with or without ``--fp16``.
    """
    if base_dtype == "fp16":
        return Precision("fp16", fp16_flag=False, strongly_typed=True)
    if not fp16:
        return Precision("fp32", fp16_flag=False, strongly_typed=False)
    if has_fp16_flag:
        return Precision("fp16", fp16_flag=True, strongly_typed=False)
    raise LoramgrError(
        "--fp16 on an fp32 base needs TensorRT's FP16 builder flag, which this TensorRT does not have "
        "(TensorRT 11 and TensorRT-RTX build strongly typed networks only): export the base with "
        "`loramgr export --dtype fp16` and build its engines")


# -- options ------------------------------------------------------------------------------

PRECISIONS = ("fp32", "fp16")
OPTIONS_FILE = "options.json"


@dataclass(frozen=True)
class TrtOptions:
    """The ``tensorrt`` backend's one options object: precision and shape profile of the engines.

    ``None`` means "as the engines in the cache were built" (by ``loramgr build-engine``
    or an earlier run), else fp32 and :data:`DEFAULT_PROFILE`: so ``build-engine --fp16``
    followed by ``run --backend tensorrt`` asks the cache for the engines just built
    instead of rebuilding them in fp32. :func:`resolve_options` fills the ``None`` fields.
    """

    precision: str | None = None  # "fp32" | "fp16" | None
    profile: ShapeProfile | None = None

    def __post_init__(self):
        if self.precision not in (None, *PRECISIONS):
            raise LoramgrError(f"TensorRT precision {self.precision!r}: choose {' or '.join(PRECISIONS)}")

    @property
    def fp16(self) -> bool:
        return self.precision == "fp16"


def options_path(folder: Path) -> Path:
    return Path(folder) / OPTIONS_FILE


def resolve_options(folder: Path, options: TrtOptions | None = None) -> TrtOptions:
    """``options`` with every ``None`` field taken from the options the cache in ``folder`` was built with.

    Without a record (or with a damaged one) the defaults apply: fp32, :data:`DEFAULT_PROFILE`.
    """
    options = options or TrtOptions()
    recorded = TrtOptions("fp32", DEFAULT_PROFILE)
    path = options_path(folder)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            recorded = TrtOptions(data["precision"], ShapeProfile.parse(*data["profile"],
                                                                       max_tokens=data.get("max_tokens", 3 * 77)))
        except (ValueError, KeyError, TypeError, LoramgrError):
            pass
    return TrtOptions(options.precision or recorded.precision, options.profile or recorded.profile)


def record_options(folder: Path, options: TrtOptions) -> None:
    """Write the (resolved) options the engines in ``folder`` are now current for."""
    profile = options.profile
    data = {"precision": options.precision, "profile": [str(profile.min), str(profile.opt), str(profile.max)],
            "max_tokens": profile.max_tokens}
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(options_path(folder)) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


# -- cache keys ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeInfo:
    """What an engine is bound to besides the base: TensorRT build and GPU."""

    tensorrt: str  # "tensorrt 10.13.0.35"
    gpu: str
    compute_capability: str  # "9.0"


def runtime_info(trt: ModuleType) -> RuntimeInfo:
    device = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(device)
    return RuntimeInfo(f"{trt.__name__} {trt.__version__}", torch.cuda.get_device_name(device), f"{major}.{minor}")


@dataclass(frozen=True)
class EngineKey:
    """Everything a serialized engine depends on; a plan is reused only for an equal key."""

    graph: str
    base_fingerprint: str
    tensorrt: str
    gpu: str
    compute_capability: str
    precision: dict
    refittable: bool
    input_shapes: dict[str, list[list[int]]]
    engine_format: int = ENGINE_FORMAT

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def engine_key(manifest: Manifest, graph: str, precision: Precision, profile: ShapeProfile,
               runtime: RuntimeInfo) -> EngineKey:
    return EngineKey(
        graph=graph, base_fingerprint=manifest.fingerprint, tensorrt=runtime.tensorrt, gpu=runtime.gpu,
        compute_capability=runtime.compute_capability, precision=asdict(precision),
        refittable=graph in REFITTABLE, input_shapes=input_shapes(manifest.graphs[graph].inputs, profile),
    )


def engine_keys(manifest: Manifest, options: TrtOptions, runtime: RuntimeInfo, has_fp16_flag: bool,
                graphs: tuple[str, ...] = GRAPHS) -> dict[str, EngineKey]:
    """Graph -> the key a cached engine must hold for resolved ``options`` (what build and open both ask for)."""
    precision = plan_precision(manifest.dtype, options.fp16, has_fp16_flag)
    return {graph: engine_key(manifest, graph, precision, options.profile, runtime) for graph in graphs}


def engines_dir(base_dir: Path) -> Path:
    return Path(base_dir) / ENGINES_DIR


def plan_path(folder: Path, graph: str) -> Path:
    return folder / f"{graph}.plan"


def sidecar_path(folder: Path, graph: str) -> Path:
    return folder / f"{graph}.json"


@dataclass(frozen=True)
class EngineStatus:
    current: bool
    reason: str  # why it must be (re)built, or "current"


def engine_status(folder: Path, key: EngineKey) -> EngineStatus:
    """Whether ``GRAPH.plan`` was built for exactly ``key``; if not, why."""
    plan, sidecar = plan_path(folder, key.graph), sidecar_path(folder, key.graph)
    if not plan.is_file() or not sidecar.is_file():
        return EngineStatus(False, "no engine yet" if not plan.is_file() else "engine without its key file")
    try:
        recorded = json.loads(sidecar.read_text())
        old_key, plan_bytes = recorded["key"], recorded["plan_bytes"]
    except (ValueError, KeyError, TypeError):
        return EngineStatus(False, f"damaged key file {sidecar.name}")
    if plan.stat().st_size != plan_bytes:
        return EngineStatus(False, f"{plan.name} is {plan.stat().st_size} bytes, its key file says {plan_bytes}")
    changes = key_differences(old_key, key.to_json())
    return EngineStatus(not changes, "current" if not changes else "built for " + "; ".join(changes))


def key_differences(old: dict, new: dict) -> list[str]:
    """``field: old -> new`` for every field that differs (what a rebuild reports)."""
    return [f"{name}: {old.get(name)!r} -> {new.get(name)!r}"
            for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]


def save_engine(folder: Path, key: EngineKey, plan) -> Path:
    """Write a serialized engine and its key file, atomically.

    The old key file goes first: a crash while the plan is replaced leaves a plan without
    key file (rebuilt next time), never an old key vouching for a new plan.
    """
    folder.mkdir(parents=True, exist_ok=True)
    sidecar_path(folder, key.graph).unlink(missing_ok=True)
    target = plan_path(folder, key.graph)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(memoryview(plan))
    record = {"key": key.to_json(), "plan_bytes": target.stat().st_size}
    with atomic_path(sidecar_path(folder, key.graph)) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return target


# -- building -----------------------------------------------------------------------------


def build_engines(base: OpenBase | Path, options: TrtOptions | None = None, *, on_step: BuildStep | None = None,
                  graphs: tuple[str, ...] = GRAPHS) -> dict[str, Path]:
    """Make sure every graph of a base has a current engine; return graph -> plan path.

    ``options`` are resolved against the cache first (:func:`resolve_options`); cached
    engines whose key matches are reused; missing, stale or foreign ones are built. The
    resolved options are recorded, so a later open with unset options finds these engines.

    Example:
        >>> paths = build_engines(ws.base_dir("sd15"), TrtOptions("fp16", DEFAULT_PROFILE), on_step=print)
        >>> sorted(paths)
        ['controlnet', 'text_encoder', 'unet', 'vae_decoder', 'vae_encoder']
    """
    step = on_step or (lambda _: None)
    base = as_open_base(base)
    folder = engines_dir(base.dir)
    if options is not None and options.profile is not None:
        options.profile.check()
    options = resolve_options(folder, options)
    trt = import_tensorrt()
    keys = engine_keys(base.manifest, options, runtime_info(trt), hasattr(trt.BuilderFlag, "FP16"), graphs)
    for graph, key in keys.items():
        status = engine_status(folder, key)
        if status.current:
            step(f"{graph}: cached engine is current")
            continue
        precision = key.precision["name"]
        step(f"{graph}: building a {precision}{' refittable' if key.refittable else ''} engine ({status.reason})")
        start = time.perf_counter()
        plan = build_plan(trt, base.graph_path(graph), key.input_shapes, Precision(**key.precision),
                          refittable=key.refittable)
        path = save_engine(folder, key, plan)
        step(f"{graph}: built in {time.perf_counter() - start:.1f} s, {path.stat().st_size / 2**20:.1f} MiB")
    if set(graphs) == set(GRAPHS):
        record_options(folder, options)
    return {graph: plan_path(folder, graph) for graph in graphs}


def build_plan(trt: ModuleType, onnx_path: Path, shapes: dict[str, list[list[int]]], precision: Precision,
               *, refittable: bool):
    """Parse ``onnx_path`` and build one serialized engine (``IHostMemory``) for ``shapes``."""
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if precision.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise LoramgrError(f"{onnx_path}: TensorRT cannot parse it: {'; '.join(errors[:5])}")
    config = builder.create_builder_config()
    if refittable:
        if not hasattr(trt.BuilderFlag, "REFIT"):
            raise LoramgrError(f"{trt.__name__} {trt.__version__} has no BuilderFlag.REFIT: adapters need refit")
        config.set_flag(trt.BuilderFlag.REFIT)
    if precision.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise LoramgrError(f"{onnx_path}: TensorRT could not build an engine (its log above says why)")
    return plan
