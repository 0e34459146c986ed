"""TensorRT backend: refittable engines built once per base, adapters applied by refit.

The engines (:mod:`.tensorrt_engines`) hold the base weights. Opening a runner loads
them and refits the weights an adapter set changes; switching sets refits again, in
place, without a rebuild. What makes a switch exact:

* **The union is refit.** Going from set A to set B rewrites every initializer A or B
  touches; those B does not touch go back to their base value (``merge_tensors(...,
  only=...)``). Refitting only B's names would leave A's residue in the engine.
* **Merged in fp32, cast once** to the dtype the refitter expects for each weight
  (``get_weights_prototype``: the ONNX dtype, or fp16 in an fp16 engine), uploaded as
  torch CUDA tensors and handed over with ``TensorLocation.DEVICE``.
* **Everything TensorRT asks for is supplied.** Where TensorRT combined a weight with
  others at build time, ``get_missing_weights`` names the partners; they get their
  current values (base weights, or graph constants read from the ONNX file).
* **Only refittable weights are promised.** At open, every initializer of the weight
  map is looked up in ``get_all_weights()``; those TensorRT folded away are listed in
  :attr:`TrtRunner.unrefittable`, and a set touching one is refused before any refit.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..errors import LoramgrError
from ..manifest import FUSED, GRAPHS, TEXT_ENCODER, VAE_DECODER, VAE_ENCODER, Manifest
from ..merge import AdapterSet, BaseWeights, check_shapes, merge_tensors
from .tensorrt_engines import (
    DEFAULT_PROFILE, REFITTABLE, TORCH_DTYPES, TRT_DTYPE_NAMES, BuildStep, ShapeProfile, build_engines,
    check_input_shapes, import_tensorrt, input_shapes, trt_logger,
)

Names = dict[str, set[str]]  # graph -> initializer names


@dataclass(frozen=True)
class TrtOptions:
    fp16: bool = False
    profile: ShapeProfile = DEFAULT_PROFILE


@dataclass
class RefitTimings:
    engines_s: float = 0.0  # cache check, and builds where an engine was missing or stale
    load_s: float = 0.0
    merge_s: float = 0.0  # last swap: merging and shape checks
    refit_s: float = 0.0  # last swap: upload and refit
    swaps: list[float] = field(default_factory=list)


# -- refit planning and weight preparation (no GPU needed) --------------------------------


def union_names(a: Names, b: Names) -> Names:
    out: Names = defaultdict(set)
    for names in (a, b):
        for graph, initializers in names.items():
            out[graph] |= set(initializers)
    return dict(out)


def refit_plan(previous: AdapterSet, new: AdapterSet) -> Names:
    """Graph -> initializers to refit going from ``previous`` to ``new``: what either touches."""
    return union_names(previous.touched(), new.touched())


def refit_tensors(base: BaseWeights, plan: Names, new: AdapterSet) -> dict[str, dict[str, np.ndarray]]:
    """The value under ``new`` of every planned initializer (base value where ``new`` leaves it)."""
    tensors = merge_tensors(base, new, only=plan)
    check_shapes(base, tensors)
    return tensors


def check_refittable(plan: Names, refittable: Names) -> None:
    """Refuse, before touching the engine, a plan naming a weight the engine cannot take."""
    for graph, names in plan.items():
        if graph not in refittable:
            raise LoramgrError(f"the {graph} engine is not refittable, yet the adapters change {len(names)} of its "
                               f"weights (first: {sorted(names)[0]}): use the ONNX Runtime backend for them")
        lost = sorted(names - refittable[graph])
        if lost:
            raise LoramgrError(
                f"{len(lost)} weights these adapters change are not refittable in the {graph} engine (TensorRT "
                f"folded them at build time), first: {', '.join(lost[:3])}: use the ONNX Runtime backend "
                "for these adapters")


def weight_dtype(prototype: str | None, initializer_dtype: np.dtype) -> torch.dtype:
    """The dtype to hand the refitter: its prototype's (a TensorRT DataType name), else the ONNX one."""
    if prototype is None:
        return torch.from_numpy(np.zeros(0, dtype=initializer_dtype)).dtype
    if prototype not in TORCH_DTYPES:
        raise LoramgrError(f"TensorRT expects weights of type {prototype}, which loramgr cannot produce")
    return TORCH_DTYPES[prototype]


def prepare_weight(array: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous ``dtype`` copy of ``array`` on ``device``: the buffer TensorRT reads.

    The cast runs after the upload, so an fp32 merge becomes fp16 once, on the device.
    """
    host = torch.from_numpy(np.require(array, requirements=("C", "W")))
    return host.to(device).to(dtype).contiguous()


def read_constants(onnx_path: Path, names: set[str]) -> dict[str, np.ndarray]:
    """Values of non-weight initializers and Constant outputs of a graph, by name.

    TensorRT may fold such a constant into a weight (a GroupNorm's ones into its scale);
    the refitter then asks for it again when the weight changes.
    """
    model = onnx.load(str(onnx_path), load_external_data=False)
    found = {t.name: numpy_helper.to_array(t, base_dir=str(Path(onnx_path).parent))
             for t in model.graph.initializer if t.name in names}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in names:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                found[node.output[0]] = numpy_helper.to_array(value)
    return found


def missing_values(base: BaseWeights, graph: str, onnx_path: Path, names: set[str]) -> dict[str, np.ndarray]:
    """Values for the weights TensorRT reports missing after the planned ones are set.

    They are outside the plan, so no adapter of the old or new set touches them: weights
    take their base value, other constants the value in the ONNX file.
    """
    in_map = base.manifest.graphs[graph].by_initializer()
    values = {n: np.array(base.read(graph, base.entry(graph, n))) for n in names if n in in_map}
    values.update(read_constants(onnx_path, names - set(values)))
    unknown = sorted(names - set(values))
    if unknown:
        raise LoramgrError(f"{graph}: TensorRT asks for {len(unknown)} weights loramgr cannot supply to refit "
                           f"(first: {', '.join(unknown[:3])}): use the ONNX Runtime backend")
    return values


def _set_weights(trt: ModuleType, refitter, tensors: dict[str, np.ndarray],
                 device: torch.device) -> dict[str, torch.Tensor]:
    location = trt.TensorLocation.DEVICE if device.type == "cuda" else trt.TensorLocation.HOST
    uploaded = {}
    for name, array in tensors.items():
        prototype = (refitter.get_weights_prototype(name).dtype.name
                     if hasattr(refitter, "get_weights_prototype") else None)
        tensor = prepare_weight(array, weight_dtype(prototype, array.dtype), device)
        weights = trt.Weights(getattr(trt.DataType, TRT_DTYPE_NAMES[tensor.dtype]), tensor.data_ptr(),
                              tensor.numel())
        if not refitter.set_named_weights(name, weights, location):
            raise LoramgrError(f"TensorRT refused the weights {name} ({tensor.dtype}, {tensor.numel()} values)")
        uploaded[name] = tensor
    return uploaded


def refit_weights(trt: ModuleType, refitter, tensors: dict[str, np.ndarray], *, device: torch.device,
                  validate: bool, fill_missing: Callable[[set[str]], dict[str, np.ndarray]]) -> int:
    """Set ``tensors`` on a fresh refitter, add what it reports missing, refit; return how many were set.

    Device buffers stay referenced until the refit has completed (TensorRT reads them then).
    """
    if hasattr(refitter, "weights_validation"):
        refitter.weights_validation = validate
    uploaded = _set_weights(trt, refitter, tensors, device)
    missing = set(refitter.get_missing_weights())
    if missing:
        uploaded.update(_set_weights(trt, refitter, fill_missing(missing), device))
        left = sorted(refitter.get_missing_weights())
        if left:
            raise LoramgrError(f"TensorRT still misses {len(left)} weights for the refit: {', '.join(left[:3])}")
    if device.type == "cuda" and hasattr(refitter, "refit_cuda_engine_async"):
        stream = torch.cuda.current_stream(device)
        ok = refitter.refit_cuda_engine_async(stream.cuda_stream)  # ordered after the uploads and earlier runs
        stream.synchronize()
    else:
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # uploads and runs done before a blocking refit
        ok = refitter.refit_cuda_engine()
    if not ok:
        raise RuntimeError("TensorRT refit failed (its log above says why)")
    return len(uploaded)


# -- running engines ----------------------------------------------------------------------


def load_engine(runtime, path: Path):
    """Deserialize a plan; ``runtime`` (a ``trt.Runtime``) must outlive the engine."""
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise LoramgrError(f"{path}: TensorRT cannot load this engine: delete it and build the engines again")
    return engine


@dataclass
class EngineSession:
    """One deserialized engine with its execution context, run on torch's current CUDA stream.

    Inputs and outputs are torch CUDA tensors whose device pointers are handed to
    TensorRT (``set_tensor_address``): latents never leave the GPU (CPU inputs are moved
    there first).
    """

    trt: ModuleType
    engine: object
    device: torch.device
    context: object = field(init=False)
    inputs: list[str] = field(init=False)
    outputs: list[str] = field(init=False)

    def __post_init__(self):
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]

    def dtype(self, name: str) -> torch.dtype:
        return TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Enqueue one inference on the current stream; outputs are new CUDA tensors."""
        missing = sorted(set(self.inputs) - set(feeds))
        if missing:
            raise ValueError(f"missing engine inputs: {', '.join(missing)}")
        bound = {n: feeds[n].to(self.device, self.dtype(n)).contiguous() for n in self.inputs}
        for name, tensor in bound.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise LoramgrError(f"TensorRT refused shape {list(tensor.shape)} for input {name}")
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtype(name),
                                        device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (its log above says why)")
        # The inputs may be freed now: torch's allocator reuses memory in stream order.
        return outputs


# -- the runner ---------------------------------------------------------------------------


class TrtRunner:
    """The four graphs of a base as TensorRT engines, with adapters applied by refit.

    Example:
        >>> runner = TrtRunner.open(ws.base_dir("sd15"), AdapterSet(((load_adapter(p), 0.8),)),
        ...                         TrtOptions(fp16=True))
        >>> noise = runner.predict_noise(sample, t, ctx, cond, scales)  # CUDA tensors in, CUDA out
        >>> runner.set_adapters(AdapterSet())  # back to the plain base, same engines
    """

    def __init__(self, base_dir: Path, manifest: Manifest, options: TrtOptions, trt: ModuleType):
        self.base_dir = Path(base_dir)
        self.manifest = manifest
        self.options = options
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.weights = BaseWeights(manifest, self.base_dir)
        self.timings = RefitTimings()
        self.adapter_set = AdapterSet()
        self.unrefittable: Names = {}  # graph -> weight-map initializers TensorRT folded away
        self._trt = trt
        self._runtime = trt.Runtime(trt_logger(trt))
        self._paths: dict[str, Path] = {}
        self._sessions: dict[str, EngineSession] = {}
        self._refittable: Names = {}
        self._applied: Names = {}  # weights that may differ from the base in the engines now
        self._validated: set[str] = set()
        self._shapes = {g: input_shapes(manifest.graphs[g].inputs, options.profile) for g in GRAPHS}
        self._lock = threading.Lock()  # a refit waits for the run being enqueued, and the reverse

    @classmethod
    def open(cls, base_dir: Path, adapter_set: AdapterSet | None = None, options: TrtOptions | None = None,
             *, on_step: BuildStep | None = None) -> "TrtRunner":
        """Load (building once if needed) the base's engines and refit ``adapter_set`` into them."""
        options = options or TrtOptions()
        trt = import_tensorrt()
        start = time.perf_counter()
        paths = build_engines(base_dir, fp16=options.fp16, profile=options.profile, on_step=on_step)
        runner = cls(base_dir, Manifest.load(Path(base_dir)), options, trt)
        runner._paths = paths
        runner.timings.engines_s = time.perf_counter() - start
        runner._load_refittable()
        runner.set_adapters(adapter_set or AdapterSet())
        return runner

    def _load_refittable(self) -> None:
        start = time.perf_counter()
        for graph in REFITTABLE:
            engine = load_engine(self._runtime, self._paths[graph])
            if not engine.refittable:
                raise LoramgrError(f"{self._paths[graph]}: engine is not refittable: delete it and build again")
            self._sessions[graph] = EngineSession(self._trt, engine, self.device)
            names = set(self._trt.Refitter(engine, trt_logger(self._trt)).get_all_weights())
            self._refittable[graph] = names
            self.unrefittable[graph] = {e.initializer for e in self.manifest.graphs[graph].weights.values()} - names
        self.timings.load_s = time.perf_counter() - start

    def _session(self, graph: str) -> EngineSession:
        with self._lock:
            if graph not in self._sessions:  # the VAE engines carry no adapters: loaded on first use
                engine = load_engine(self._runtime, self._paths[graph])
                self._sessions[graph] = EngineSession(self._trt, engine, self.device)
            return self._sessions[graph]

    def set_adapters(self, adapter_set: AdapterSet) -> float:
        """Switch to ``adapter_set`` by refit; returns the seconds it took.

        Refits every weight the engines may hold from earlier sets plus every weight the new
        set touches. If a refit fails halfway, those weights stay marked, so the next switch
        rewrites them too.
        """
        start = time.perf_counter()
        with self._lock:
            plan = union_names(self._applied, adapter_set.touched())
            check_refittable(plan, self._refittable)
            tensors = refit_tensors(self.weights, plan, adapter_set)
            merged = time.perf_counter()
            self._applied = plan
            torch.cuda.synchronize(self.device)  # runs enqueued on any stream end before weights change
            for graph, named in tensors.items():
                self._refit(graph, named)
            self._applied = {g: set(n) for g, n in adapter_set.touched().items()}
            self.adapter_set = adapter_set
        self.timings.merge_s = merged - start
        self.timings.refit_s = time.perf_counter() - merged
        elapsed = time.perf_counter() - start
        self.timings.swaps.append(elapsed)
        return elapsed

    def _refit(self, graph: str, tensors: dict[str, np.ndarray]) -> None:
        refitter = self._trt.Refitter(self._sessions[graph].engine, trt_logger(self._trt))
        onnx_path = self.base_dir / self.manifest.graphs[graph].path
        refit_weights(self._trt, refitter, tensors, device=self.device, validate=graph not in self._validated,
                      fill_missing=lambda names: missing_values(self.weights, graph, onnx_path, names))
        self._validated.add(graph)  # the first refit validated the weights; later ones skip it

    # -- Runner interface --------------------------------------------------------------------

    def _run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_input_shapes(graph, self._shapes[graph], {n: tuple(t.shape) for n, t in feeds.items()})
        session = self._session(graph)
        with self._lock:
            return session.run(feeds)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run(TEXT_ENCODER, {"input_ids": input_ids})["last_hidden_state"]

    def predict_noise(self, sample, timestep, encoder_hidden_states, controlnet_cond, control_scales):
        feeds = {
            "sample": sample, "timestep": timestep.float().reshape(-1).expand(sample.shape[0]).contiguous(),
            "encoder_hidden_states": encoder_hidden_states, "controlnet_cond": controlnet_cond,
            "control_scales": control_scales,
        }
        return self._run(FUSED, feeds)["noise_pred"]

    def vae_decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self._run(VAE_DECODER, {"latent": latent})["image"]

    def vae_encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._run(VAE_ENCODER, {"image": image})
        return out["latent_mean"], out["latent_std"]

    def close(self) -> None:
        with self._lock:
            if self._sessions:
                torch.cuda.synchronize(self.device)
            self._sessions.clear()

    def __enter__(self) -> "TrtRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
