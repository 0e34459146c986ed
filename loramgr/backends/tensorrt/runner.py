"""TensorRT backend: refittable engines built once per base, adapters applied by refit.

The engines (:mod:`.engines`) hold the base weights. Opening a runner loads
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

ControlNets: the ControlNet engine is deserialized once per slot (each slot an engine of its
own, refit with its ControlNet); slots are filled as the ONNX Runtime runner fills them
(:func:`~loramgr.backends.base.plan_slots`), so units repeating ControlNets refit nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from ...adapter_file import AdapterFile
from ...adapters import AdapterSet, Names, touched_names
from ...bases import OpenBase, as_open_base
from ...errors import LoramgrError
from ...manifest import CONTROLNET, GRAPHS, TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER
from ...merge import BaseWeights
from ...models.graphs import RESIDUALS
from ..base import AdapterLease, plan_slots, residual_shapes, slot_key, slot_set, text_feeds, timesteps
from .engines import (
    REFITTABLE, TORCH_DTYPES, BuildStep, TrtOptions, build_engines, engines_dir, import_tensorrt, resolve_options,
    trt_logger,
)
from .profiles import check_input_shapes, input_shapes
from .refit import check_refittable, missing_values, refit_tensors, refit_weights


@dataclass
class RefitTimings:
    engines_s: float = 0.0  # cache check, and builds where an engine was missing or stale
    load_s: float = 0.0
    merge_s: float = 0.0  # last swap: merging and shape checks
    refit_s: float = 0.0  # last swap: upload and refit
    swaps: list[float] = field(default_factory=list)


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


@dataclass
class _Slot:
    """A ControlNet slot: one ControlNet engine, refit with one ControlNet's weights."""

    controlnet: AdapterFile | None  # None: the base's own
    session: EngineSession
    applied: set[str] = field(default_factory=set)  # ControlNet weights that may differ from the base


class TrtRunner(AdapterLease):
    """A base's graphs as TensorRT engines, with adapters applied by refit.

    Example:
        >>> runner = TrtRunner.open(ws.base_dir("sd15"), AdapterSet(((load_adapter(p), 0.8),)),
        ...                         TrtOptions(precision="fp16"))
        >>> noise = runner.predict_noise(sample, t, ctx)  # CUDA tensors in, CUDA out
        >>> runner.set_adapters(AdapterSet())  # back to the plain base, same engines
    """

    def __init__(self, base: OpenBase, options: TrtOptions, trt: ModuleType):
        manifest = base.manifest
        self.base = base
        self.base_dir = base.dir
        self.manifest = manifest
        self.options = options  # resolved: no None fields
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.weights = BaseWeights(manifest, self.base_dir)
        self.timings = RefitTimings()
        self.adapter_set = AdapterSet(base_controlnet=False)
        self.unrefittable: Names = {}  # graph -> weight-map initializers TensorRT folded away
        self._trt = trt
        self._runtime = trt.Runtime(trt_logger(trt))
        self._paths: dict[str, Path] = {}
        self._sessions: dict[str, EngineSession] = {}  # UNet, text encoder, VAE halves
        self._slots: list[_Slot] = []
        self._refittable: Names = {}
        self._applied: Names = {}  # UNet / text encoder weights that may differ from the base now
        self._validated: set[int] = set()  # engines (by id) whose weights a refit has validated
        self._shapes = {g: input_shapes(manifest.graphs[g].inputs, options.profile) for g in GRAPHS}
        self._init_lease()  # a refit waits for the generation holding the set, and the reverse

    @classmethod
    def open(cls, base: OpenBase | Path, adapter_set: AdapterSet | None = None, options: TrtOptions | None = None,
             *, on_step: BuildStep | None = None) -> "TrtRunner":
        """Load (building once if needed) the base's engines and refit ``adapter_set`` into them.

        Options left ``None`` take the values the cached engines were built with
        (:func:`~loramgr.backends.tensorrt.engines.resolve_options`).
        """
        base = as_open_base(base)
        trt = import_tensorrt()
        options = resolve_options(engines_dir(base.dir), options)
        start = time.perf_counter()
        paths = build_engines(base, options, on_step=on_step)
        runner = cls(base, options, trt)
        runner._paths = paths
        runner.timings.engines_s = time.perf_counter() - start
        runner._load_refittable()
        runner.set_adapters(adapter_set or AdapterSet())
        return runner

    def _load(self, graph: str) -> EngineSession:
        engine = load_engine(self._runtime, self._paths[graph])
        if graph in REFITTABLE and not engine.refittable:
            raise LoramgrError(f"{self._paths[graph]}: engine is not refittable: delete it and build again")
        return EngineSession(self._trt, engine, self.device)

    def _load_refittable(self) -> None:
        start = time.perf_counter()
        for graph in REFITTABLE:
            session = self._load(graph)
            names = set(self._trt.Refitter(session.engine, trt_logger(self._trt)).get_all_weights())
            self._refittable[graph] = names
            self.unrefittable[graph] = {e.initializer for e in self.manifest.graphs[graph].weights.values()} - names
            if graph == CONTROLNET:
                self._slots.append(_Slot(None, session))  # slot 0 holds the base's own ControlNet
            else:
                self._sessions[graph] = session
        self.timings.load_s = time.perf_counter() - start

    def _session(self, graph: str) -> EngineSession:
        """The engine of ``graph``; call with the lease held."""
        if graph not in self._sessions:  # the VAE engines carry no adapters: loaded on first use
            self._sessions[graph] = self._load(graph)
        return self._sessions[graph]

    def _slot(self, controlnet: str | None) -> EngineSession:
        key = slot_key(self.adapter_set.controlnet(controlnet))
        return next(s for s in self._slots if slot_key(s.controlnet) == key).session

    def release(self, graph: str) -> None:
        """Engines stay loaded: they live in device memory, and a reload would refit them again."""

    def swappable(self) -> Names:
        """Every weight TensorRT can refit: any of them changes in place."""
        return {g: set(n) for g, n in self._refittable.items()}

    def controlnet_slots(self) -> list[str | None]:
        """The ControlNet in each slot (``None``: the base's own)."""
        return [None if s.controlnet is None else s.controlnet.name for s in self._slots]

    def set_adapters(self, adapter_set: AdapterSet) -> float:
        """Switch to ``adapter_set`` by refit; returns the seconds it took.

        Refits every weight the engines may hold from earlier sets plus every weight the new
        set touches; each ControlNet the set uses and no slot holds is refit into a slot whose
        ControlNet is not needed, or into a new slot. If a refit fails halfway, those weights
        stay marked, so the next switch rewrites them too.
        """
        start = time.perf_counter()
        with self._swapping():  # swaps one at a time: self._applied changes only here
            loras = adapter_set.loras()
            plan = touched_names(self._applied, loras)
            check_refittable(plan, self._refittable)
            tensors = refit_tensors(self.weights, plan, loras)  # while a generation may still run
            moves = plan_slots([s.controlnet for s in self._slots], adapter_set.controlnets())
            slot_plans = []
            for index, controlnet in moves:
                applied = set() if index is None else self._slots[index].applied
                names = touched_names({CONTROLNET: applied}, slot_set(controlnet)).get(CONTROLNET, set())
                check_refittable({CONTROLNET: names}, self._refittable)
                slot_plans.append((index, controlnet, names, refit_tensors(self.weights, {CONTROLNET: names},
                                                                           slot_set(controlnet)).get(CONTROLNET, {})))
            merged = time.perf_counter()
            with self._lease:  # no generation holds the old set any more
                self._applied = plan
                torch.cuda.synchronize(self.device)  # runs enqueued on any stream end before weights change
                for graph, named in tensors.items():
                    self._refit(graph, self._sessions[graph], named)
                self._applied = {g: set(n) for g, n in loras.touched().items()}
                for index, controlnet, names, named in slot_plans:
                    if index is None:
                        self._slots.append(_Slot(None, self._load(CONTROLNET)))
                        index = len(self._slots) - 1
                    slot = self._slots[index]
                    slot.controlnet, slot.applied = controlnet, names
                    self._refit(CONTROLNET, slot.session, named)
                    slot.applied = set(slot_set(controlnet).touched().get(CONTROLNET, set()))
                self.adapter_set = adapter_set
        self.timings.merge_s = merged - start
        self.timings.refit_s = time.perf_counter() - merged
        elapsed = time.perf_counter() - start
        self.timings.swaps.append(elapsed)
        return elapsed

    def _refit(self, graph: str, session: EngineSession, tensors: dict[str, np.ndarray]) -> None:
        if not tensors:
            return
        refitter = self._trt.Refitter(session.engine, trt_logger(self._trt))
        onnx_path = self.base.graph_path(graph)
        refit_weights(self._trt, refitter, tensors, device=self.device, validate=id(session) not in self._validated,
                      fill_missing=lambda names: missing_values(self.weights, graph, onnx_path, names))
        self._validated.add(id(session))  # the first refit validated the weights; later ones skip it

    # -- Runner interface --------------------------------------------------------------------

    def _run(self, graph: str, feeds: dict[str, torch.Tensor], controlnet: str | None = None) -> dict[str, torch.Tensor]:
        check_input_shapes(graph, self._shapes[graph], {n: tuple(t.shape) for n, t in feeds.items()})
        with self.hold():  # re-entrant: inside a generation's lease this takes it again
            session = self._slot(controlnet) if graph == CONTROLNET else self._session(graph)
            return session.run(feeds)

    def encode_text(self, input_ids: torch.Tensor, token_vectors: torch.Tensor | None = None,
                    token_mask: torch.Tensor | None = None) -> torch.Tensor:
        width = self.manifest.configs["text_encoder"]["hidden_size"]
        return self._run(TEXT_ENCODER, text_feeds(input_ids, token_vectors, token_mask, width))["hidden_states"]

    def control_residuals(self, controlnet, sample, timestep, encoder_hidden_states, controlnet_cond):
        feeds = {"sample": sample, "timestep": timesteps(timestep, sample),
                 "encoder_hidden_states": encoder_hidden_states, "controlnet_cond": controlnet_cond}
        out = self._run(CONTROLNET, feeds, controlnet)
        return [out[name] for name in RESIDUALS]

    def predict_noise(self, sample, timestep, encoder_hidden_states, residuals=None):
        if residuals is None:  # no unit acts: zero residuals (device memory, made per call)
            residuals = [torch.zeros(s, device=self.device) for s in residual_shapes(self.manifest, sample.shape)]
        feeds = {"sample": sample, "timestep": timesteps(timestep, sample),
                 "encoder_hidden_states": encoder_hidden_states, **dict(zip(RESIDUALS, residuals))}
        return self._run(UNET, feeds)["noise_pred"]

    def vae_decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self._run(VAE_DECODER, {"latent": latent})["image"]

    def vae_encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._run(VAE_ENCODER, {"image": image})
        return out["latent_mean"], out["latent_std"]

    def close(self) -> None:
        with self._lease:
            if self._sessions or self._slots:
                torch.cuda.synchronize(self.device)
            self._sessions.clear()
            self._slots.clear()
