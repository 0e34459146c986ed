"""ONNX Runtime backend: sessions over a base's graphs with adapters injected.

Adapters reach ONNX Runtime in one of two ways (docs/design.md has the measurements):

* **Injection at session creation** (``SessionOptions.add_external_initializers``):
  the merged tensors replace the base's external initializers before graph
  optimization, so the result is exactly a session on a merged model.
* **Hot swap** (``hot_swap=True``, the default on CPU): every initializer that any
  adapter may touch is handed to ONNX Runtime as a buffer loramgr owns (a torch tensor,
  shared through DLPack and ``add_initializer``), and a swap merges straight into those
  buffers between runs (:func:`loramgr.merge.merge_into`), without a new session. On
  CUDA the buffers and a copy of their base values live on the device, so a swap moves
  only the factors. That is only sound if ONNX Runtime reads the buffer itself
  at every run: no prepacking (``session.disable_prepacking``) and no optimizer pass
  that copies the weight into a new constant. Optimization level ``basic`` plus the
  layout folding done at export meet that; the runtime checks the optimized graph
  still names every swappable buffer (see :func:`_check_buffers_survive`) and refuses
  hot swap otherwise rather than running on stale weights.

Optimization level: ``basic`` by default. On the sd15 graphs ``all`` took 9.5 s to
create the sessions against 3.1 s for ``basic`` and gained ~7% per step on CPU
(docs/benchmarks.md); with hot swap a session is created once, but its creation is
still on the critical path of ``loramgr run``. ``--ort-opt all`` is there for long
batch jobs without hot swap.

Either way a swap waits for the generation holding the current set
(:class:`~loramgr.backends.base.AdapterLease`), and re-created sessions replace the old
ones in one step under that lease, so no graph call runs on a session without its
adapters, and no image mixes two sets.

Attention: each exported attention core runs as one ``MultiHeadAttention`` node by default
(:mod:`loramgr.backends.attention_fusion`, applied in memory by :func:`inference_session`;
``OrtOptions(fuse_attention=False)`` runs the graph as exported). A graph the run is done
with can be released (:meth:`OrtRunner.release`) and opens again on its next call.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..adapter_file import AdapterFile
from ..adapters import AdapterSet, Names, touched_names
from ..bases import OpenBase, as_open_base
from ..errors import LoramgrError
from ..manifest import CONTROLNET, TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER
from ..merge import BaseWeights, Tensors, empty_like_entry, merge_into, merge_tensors
from ..models.graphs import RESIDUALS
from ..workspace import atomic_path
from .attention_fusion import fuse_attention
from .base import AdapterLease, plan_slots, residual_shapes, slot_key, slot_set, text_feeds, timesteps
from .options import OPTIMIZATION_LEVELS, PROVIDERS, OrtOptions

__all__ = ["OPTIMIZATION_LEVELS", "PROVIDERS", "OrtOptions", "OrtRunner", "SessionTimings", "inference_session",
           "plain_session", "providers", "session_options"]


@dataclass
class SessionTimings:
    merge_s: float = 0.0
    session_s: float = 0.0
    swaps: list[float] = field(default_factory=list)


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency
        raise LoramgrError(f"onnxruntime is not installed: {exc}") from None
    return onnxruntime


def session_options(options: OrtOptions, *, no_prepacking: bool):
    """``SessionOptions`` for ``options``."""
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[options.optimization]
    so.intra_op_num_threads = options.intra_op_threads
    if no_prepacking:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def providers(options: OrtOptions) -> list:
    """The execution providers of ``options.provider`` (CUDA falls back to CPU for unsupported nodes)."""
    ort = _ort()
    if options.provider not in PROVIDERS:
        raise LoramgrError(f"unknown ONNX Runtime provider {options.provider!r}: choose {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[options.provider]
    if wanted not in ort.get_available_providers():
        raise LoramgrError(
            f"backend ort-{options.provider} needs {wanted}, but this onnxruntime offers "
            f"{', '.join(ort.get_available_providers())}: install onnxruntime-gpu and use a CUDA machine"
        )
    return [wanted] if options.provider == "cpu" else [wanted, "CPUExecutionProvider"]


def inference_session(path: Path, so, options: OrtOptions):
    """An InferenceSession of the graph at ``path`` with session options ``so``.

    With ``options.fuse_attention`` the graph is read without its weights, its attention
    cores are fused (:func:`~loramgr.backends.attention_fusion.fuse_attention`) and the
    session is created from those bytes, its external data still read from ``path``'s
    folder: the base on disk is never rewritten, and every initializer keeps its name.
    """
    ort = _ort()
    if options.fuse_attention:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        if fuse_attention(model):
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
            return ort.InferenceSession(model.SerializeToString(), so, providers=providers(options))
    return ort.InferenceSession(str(path), so, providers=providers(options))


def plain_session(path: Path, options: OrtOptions):
    """An InferenceSession of one ONNX file with ``options`` and no adapters."""
    return inference_session(path, session_options(options, no_prepacking=False), options)


@dataclass
class _Session:
    """One ONNX Runtime session of a graph, with the swappable buffers it reads."""

    session: object
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # initializer -> owned tensor ORT reads
    values: dict[str, object] = field(default_factory=dict)  # the OrtValues sharing those tensors' memory
    base_values: dict[str, torch.Tensor] | None = None  # on CUDA: the base of every buffer, on the device


@dataclass
class _Slot:
    """A ControlNet slot: one session of the ControlNet graph holding one ControlNet's weights."""

    controlnet: AdapterFile | None  # None: the base's own
    graph: _Session | None  # None while released


class OrtRunner(AdapterLease):
    """A base's graphs as ONNX Runtime sessions, with adapters applied.

    The UNet and the text encoder carry the set's LoRAs. Each ControlNet of the set sits in
    a slot, a session of the ControlNet graph of its own: a swap puts a new ControlNet in a
    slot whose ControlNet no unit needs any more (in place where its weights are swappable),
    so ControlNets used again stay where they are (docs/design.md, "ControlNet units").

    Example:
        >>> runner = OrtRunner.open(ws.base_dir("tiny"), AdapterSet(((load_adapter(p), 0.8),)))
        >>> noise = runner.predict_noise(sample, t, ctx, runner.control_residuals(None, sample, t, ctx, cond))
        >>> runner.set_adapters(AdapterSet())  # back to the plain base, same sessions
    """

    def __init__(self, base: OpenBase, options: OrtOptions):
        self.base = base
        self.base_dir = base.dir
        self.manifest = base.manifest
        self.options = options
        self.device = torch.device("cuda" if options.provider == "cuda" else "cpu")
        self.timings = SessionTimings()
        self.adapter_set = AdapterSet()
        self._graphs: dict[str, _Session] = {}  # UNet, text encoder (LoRAs), VAE halves (plain)
        self._slots: list[_Slot] = []
        self._declared: Names = {}  # graph -> weights kept swappable; "controlnet" applies to every slot
        self._released: set[str] = set()  # adapter graphs released (they open again with the current set)
        self._zeros: dict[tuple, list[torch.Tensor]] = {}  # UNet residual inputs of steps no unit acts at
        self._init_lease()

    @classmethod
    def open(cls, base: OpenBase | Path, adapter_set: AdapterSet | None = None, options: OrtOptions | None = None,
             *, swappable: Names | None = None) -> "OrtRunner":
        """Create the sessions with ``adapter_set`` applied.

        With hot swap, ``swappable`` (graph -> initializer names) declares which weights
        later swaps may change, besides those the first set touches. A later swap that
        needs a weight outside them re-creates the sessions (still correct, just slower).
        ControlNet weights (graph ``controlnet``) are swappable in every slot.
        """
        runner = cls(as_open_base(base), options or OrtOptions())
        adapter_set = adapter_set or AdapterSet()
        runner._declared = touched_names(swappable, adapter_set) if runner.options.hot_swap else {}
        start = time.perf_counter()
        runner._graphs = {g: runner._open(g, adapter_set.loras()) for g in (UNET, TEXT_ENCODER)}
        runner._slots = [_Slot(cn, runner._open(CONTROLNET, slot_set(cn))) for cn in adapter_set.controlnets()]
        runner.timings.session_s = time.perf_counter() - start - runner.timings.merge_s
        runner.adapter_set = adapter_set
        return runner

    # -- sessions ---------------------------------------------------------------------------

    def _open(self, graph: str, adapter_set: AdapterSet) -> _Session:
        """A session of ``graph`` with ``adapter_set`` merged in.

        With hot swap the declared weights of the graph (and those the set touches) become
        owned buffers; else every weight the set touches is injected at creation.
        """
        ort = _ort()
        start = time.perf_counter()
        names = touched_names(self._declared, adapter_set).get(graph, set()) if self.options.hot_swap else set()
        opened = _Session(None)
        tensors: dict[str, np.ndarray] = {}
        with BaseWeights(self.manifest, self.base_dir) as base:
            if names:
                only = {graph: names}
                buffers = self._allocate(base, only)
                if self.device.type == "cuda":  # the base stays on the device: a swap then moves factors only
                    base_values = self._allocate(base, only)
                    merge_into(base, AdapterSet(), base_values, only=only, graphs=(graph,))
                    opened.base_values = base_values[graph]
                merge_into(base, adapter_set, buffers, only=only, graphs=(graph,),
                           base_values=None if opened.base_values is None else {graph: opened.base_values})
                opened.buffers = buffers[graph]
            else:
                tensors = merge_tensors(base, adapter_set, graphs=(graph,)).get(graph, {})
        self.timings.merge_s += time.perf_counter() - start
        so = session_options(self.options, no_prepacking=bool(opened.buffers))
        if opened.buffers:
            # ONNX Runtime reads these buffers (shared through DLPack, no copy) at every run;
            # a swap rewrites them in place.
            opened.values = {n: _shared_value(ort, t) for n, t in opened.buffers.items()}
            for name, value in opened.values.items():  # ORT keeps pointers to these: they live with the runner
                so.add_initializer(name, value)
            _check_buffers_survive(self.base_dir, self.manifest.graphs[graph].path, self.options,
                                   set(opened.buffers))
        elif tensors:
            so.add_external_initializers(list(tensors), [ort.OrtValue.ortvalue_from_numpy(a) for a in tensors.values()])
        opened.session = inference_session(self.base.graph_path(graph), so, self.options)
        return opened

    def _allocate(self, base: BaseWeights, names: Names) -> Tensors:
        """Uninitialized tensors on the runner's device, one per initializer of ``names``."""
        return {graph: {n: empty_like_entry(base.entry(graph, n), self.device) for n in sorted(named)}
                for graph, named in names.items() if named}

    def _graph(self, graph: str) -> _Session:
        """The session of ``graph``, opened now if it was released (or is a VAE half); call with the lease held."""
        if graph not in self._graphs:
            carries = AdapterSet() if graph in (VAE_DECODER, VAE_ENCODER) else self.adapter_set.loras()
            self._graphs[graph] = self._open(graph, carries)
            self._released.discard(graph)
        return self._graphs[graph]

    def _slot(self, controlnet: str | None) -> _Session:
        """The session of the slot holding ``controlnet`` (opened again if released); call with the lease held."""
        key = slot_key(self.adapter_set.controlnet(controlnet))
        slot = next(s for s in self._slots if slot_key(s.controlnet) == key)
        if slot.graph is None:
            slot.graph = self._open(CONTROLNET, slot_set(slot.controlnet))
        return slot.graph

    def release(self, graph: str) -> None:
        """Free ``graph``'s sessions (every ControlNet slot for ``controlnet``) until their next call.

        A one-shot run releases each graph once it is done with it (the text encoder after
        the prompt, the UNet and the ControlNets after the last step), so the weights of a
        graph in use are the only ones resident: docs/benchmarks.md, "Memory". A released
        graph opens again with the set current then.
        """
        with self._lease:
            if graph == CONTROLNET:
                for slot in self._slots:
                    slot.graph = None
            elif self._graphs.pop(graph, None) is not None and graph in (UNET, TEXT_ENCODER):
                self._released.add(graph)

    def swappable(self) -> Names:
        out = {g: set(s.buffers) for g, s in self._graphs.items() if s.buffers}
        slots = {n for s in self._slots if s.graph is not None for n in s.graph.buffers}
        declared = {g: self._declared[g] for g in self._released | {CONTROLNET} if self._declared.get(g)}
        return touched_names(out, {CONTROLNET: slots} if slots else {}, declared)

    def controlnet_slots(self) -> list[str | None]:
        """The ControlNet in each slot (``None``: the base's own); its weights are resident while open."""
        return [None if s.controlnet is None else s.controlnet.name for s in self._slots]

    def set_adapters(self, adapter_set: AdapterSet) -> float:
        """Switch to ``adapter_set``; returns the seconds it took.

        UNet and text encoder: in place when every weight the old and the new set touch is a
        swappable buffer, else by re-creating their sessions. ControlNets: each one the new
        set uses and no slot holds goes into a slot whose ControlNet is not needed (in place
        where that slot's weights are swappable), or a new slot. Waits for the generation (or
        graph call) holding the current set; no graph call starts while buffers are half written.
        """
        start = time.perf_counter()
        with self._swapping():
            old, new = self.adapter_set.loras(), adapter_set.loras()
            needed = touched_names(new, old)
            # a released graph holds nothing to rewrite: it opens with the new set on its next call
            live = {g: names for g, names in needed.items() if g in self._graphs}
            in_place = self.options.hot_swap and all(names <= set(self._graphs[g].buffers) for g, names in live.items())
            with self._lease:  # every buffer is written, or session replaced, while no generation runs
                if in_place:
                    self._merge_in_place({g: self._graphs[g] for g in live}, live, new, old)
                elif live:
                    self._declared = touched_names(self._declared, needed) if self.options.hot_swap else {}
                    for graph in live:
                        self._graphs[graph] = self._open(graph, new)
                self._fill_slots(adapter_set.controlnets())
                self.adapter_set = adapter_set
        elapsed = time.perf_counter() - start
        self.timings.swaps.append(elapsed)
        return elapsed

    def _merge_in_place(self, sessions: dict[str, _Session], live: Names, new: AdapterSet, old: AdapterSet) -> None:
        """Merge ``new`` into the buffers ``sessions`` (graph -> session) read for ``live``; on failure
        write ``old`` back (nothing half-written)."""
        buffers = {g: s.buffers for g, s in sessions.items()}
        base_values = {g: s.base_values for g, s in sessions.items() if s.base_values is not None}
        with BaseWeights(self.manifest, self.base_dir) as base:
            try:
                merge_into(base, new, buffers, only=live, base_values=base_values or None, graphs=live)
            except BaseException:
                merge_into(base, old, buffers, only=live, base_values=base_values or None, graphs=live)
                raise

    def _fill_slots(self, wanted: tuple[AdapterFile | None, ...]) -> None:
        """Put every ControlNet of ``wanted`` in a slot, moving as few weights as possible (:func:`plan_slots`)."""
        for index, controlnet in plan_slots([s.controlnet for s in self._slots], wanted):
            if index is None:
                self._slots.append(_Slot(controlnet, self._open(CONTROLNET, slot_set(controlnet))))
                continue
            slot = self._slots[index]
            if slot.graph is not None:  # a released slot opens with its new ControlNet on its next call
                old, new = slot_set(slot.controlnet), slot_set(controlnet)
                names = touched_names(old, new).get(CONTROLNET, set())
                if self.options.hot_swap and names <= set(slot.graph.buffers):
                    self._merge_in_place({CONTROLNET: slot.graph}, {CONTROLNET: names}, new, old)
                else:
                    self._declared = touched_names(self._declared, {CONTROLNET: names}) if self.options.hot_swap else {}
                    slot.graph = self._open(CONTROLNET, new)
            slot.controlnet = controlnet  # once its weights hold it

    # -- graph calls ---------------------------------------------------------------------------

    def _run(self, graph: str | None, feeds: dict[str, torch.Tensor], controlnet: str | None = None
             ) -> list[torch.Tensor]:
        with self.hold():  # re-entrant: inside a generation's lease this takes it again
            session = (self._slot(controlnet) if graph == CONTROLNET else self._graph(graph)).session
            if self.device.type == "cuda":
                return _run_io_binding(session, feeds, self.device)
            outputs = session.run(None, {k: v.detach().cpu().numpy() for k, v in feeds.items()})
        return [torch.from_numpy(o) for o in outputs]

    def encode_text(self, input_ids: torch.Tensor, token_vectors: torch.Tensor | None = None,
                    token_mask: torch.Tensor | None = None) -> torch.Tensor:
        width = self.manifest.configs["text_encoder"]["hidden_size"]
        return self._run(TEXT_ENCODER, text_feeds(input_ids, token_vectors, token_mask, width))[0]

    def control_residuals(self, controlnet, sample, timestep, encoder_hidden_states, controlnet_cond):
        feeds = {"sample": sample.float(), "timestep": timesteps(timestep, sample),
                 "encoder_hidden_states": encoder_hidden_states.float(), "controlnet_cond": controlnet_cond.float()}
        return self._run(CONTROLNET, feeds, controlnet)

    def predict_noise(self, sample, timestep, encoder_hidden_states, residuals=None):
        if residuals is None:  # no unit acts: the UNet alone (its residual inputs are zeros)
            shape = (tuple(sample.shape), sample.device)
            if shape not in self._zeros:
                self._zeros = {shape: [torch.zeros(s, device=sample.device)
                                       for s in residual_shapes(self.manifest, sample.shape)]}
            residuals = self._zeros[shape]
        feeds = {"sample": sample.float(), "timestep": timesteps(timestep, sample),
                 "encoder_hidden_states": encoder_hidden_states.float(),
                 **{name: r.float() for name, r in zip(RESIDUALS, residuals)}}
        return self._run(UNET, feeds)[0]

    def vae_decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self._run(VAE_DECODER, {"latent": latent.float()})[0]

    def vae_encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self._run(VAE_ENCODER, {"image": image.float()})
        return mean, std

    def close(self) -> None:
        with self._lease:
            self._graphs, self._slots, self._released, self._zeros = {}, [], set(), {}


def _shared_value(ort, tensor: torch.Tensor):
    """An OrtValue over ``tensor``'s own memory, no copy: DLPack where onnxruntime has it, else a numpy view."""
    if hasattr(ort.OrtValue, "from_dlpack"):
        return ort.OrtValue.from_dlpack(tensor)
    if tensor.device.type == "cpu":
        return ort.OrtValue.ortvalue_from_numpy(tensor.numpy())
    raise LoramgrError(f"hot swap on {tensor.device} needs OrtValue.from_dlpack: onnxruntime {ort.__version__} "
                       "lacks it; upgrade onnxruntime-gpu or use --no-hot-swap")


def _check_buffers_survive(base_dir: Path, graph_path: str, options: OrtOptions, names: set[str]) -> None:
    """Refuse hot swap when the optimizer would copy a swappable weight into a new constant.

    The optimized graph of the plain base (same level, prepacking off) is written once
    with ``optimized_model_filepath`` and the weights it still reads by name are cached
    under ``base_models/NAME/.ort/``: a buffer handed over with ``add_initializer`` is
    seen by later runs only if the optimized graph reads that initializer itself. The
    cache holds the names with their sha256: one that does not match (a damaged file, or
    a bare list written by an older loramgr) is rebuilt, since a wrong list would refuse
    hot swap for nothing or allow it on a weight the optimizer copied.
    """
    import hashlib
    import json

    import onnx

    def digest(names: list[str]) -> str:
        return hashlib.sha256(json.dumps(names).encode()).hexdigest()

    ort = _ort()
    fused = "-mha" if options.fuse_attention else ""
    key = f"{Path(graph_path).parent.name}-{ort.__version__}-{options.optimization}-{options.provider}{fused}.json"
    cache = base_dir / ".ort" / key
    try:
        cached = json.loads(cache.read_text())
        kept = set(cached["kept"]) if digest(cached["kept"]) == cached["sha256"] else None
    except (OSError, ValueError, TypeError, KeyError):  # none yet, or damaged (UnicodeDecodeError is a ValueError)
        kept = None
    if kept is None:
        so = session_options(options, no_prepacking=True)
        with tempfile.TemporaryDirectory() as tmp:
            so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
            inference_session(base_dir / graph_path, so, replace(options, provider="cpu"))
            optimized = onnx.load(str(Path(tmp) / "optimized.onnx"), load_external_data=False)
        kept = {i for node in optimized.graph.node for i in node.input}
        cache.parent.mkdir(exist_ok=True)
        with atomic_path(cache) as tmp_file:
            tmp_file.write_text(json.dumps({"kept": sorted(kept), "sha256": digest(sorted(kept))}))
    lost = sorted(names - kept)
    if lost:
        raise LoramgrError(
            f"hot swap is not possible at optimization level {options.optimization!r}: the optimizer "
            f"rewrites {len(lost)} swappable weights (first: {lost[0]}); use --no-hot-swap or --ort-opt basic"
        )


def _run_io_binding(session, feeds: dict[str, torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Run with inputs and outputs bound to CUDA memory, so latents never leave the GPU."""
    binding = session.io_binding()
    feeds = {k: v.to(device).contiguous() for k, v in feeds.items()}
    dtypes = {torch.float32: np.float32, torch.int64: np.int64, torch.float16: np.float16}
    for name, tensor in feeds.items():
        binding.bind_input(name, device.type, device.index or 0, dtypes[tensor.dtype], tuple(tensor.shape),
                           tensor.data_ptr())
    for output in session.get_outputs():
        binding.bind_output(output.name, device.type, device.index or 0)
    session.run_with_iobinding(binding)
    return [torch.from_dlpack(o.to_dlpack()) if hasattr(o, "to_dlpack") else torch.from_numpy(o.numpy())
            for o in binding.get_outputs()]
