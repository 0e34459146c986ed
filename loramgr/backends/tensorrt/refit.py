"""Refit planning and weight preparation: what a switch of adapter sets rewrites, and how (no GPU needed).

docs/tensorrt.md explains why the union of both sets is refit and why weights are
merged in fp32 and cast once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ...adapters import AdapterSet, Names, touched_names
from ...errors import LoramgrError
from ...merge import BaseWeights, merge_tensors
from .engines import TORCH_DTYPES, TRT_DTYPE_NAMES


def refit_plan(previous: AdapterSet, new: AdapterSet) -> Names:
    """Graph -> initializers to refit going from ``previous`` to ``new``: what either touches."""
    return touched_names(previous, new)


def refit_tensors(base: BaseWeights, plan: Names, new: AdapterSet) -> dict[str, dict[str, np.ndarray]]:
    """The value under ``new`` of every planned initializer (base value where ``new`` leaves it)."""
    return merge_tensors(base, new, only=plan)


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
