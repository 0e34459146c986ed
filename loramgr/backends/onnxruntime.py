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

from ..adapters import AdapterSet, Names, touched_names
from ..bases import OpenBase, as_open_base
from ..errors import LoramgrError
from ..manifest import FUSED, TEXT_ENCODER, VAE_DECODER, VAE_ENCODER
from ..merge import BaseWeights, Tensors, empty_like_entry, merge_into, merge_tensors
from ..workspace import atomic_path
from .attention_fusion import fuse_attention
from .base import AdapterLease
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


class OrtRunner(AdapterLease):
    """The four graphs of a base as ONNX Runtime sessions, with adapters applied.

    Example:
        >>> runner = OrtRunner.open(ws.base_dir("tiny"), AdapterSet(((load_adapter(p), 0.8),)))
        >>> noise = runner.predict_noise(sample, t, ctx, cond, scales)
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
        self._sessions: dict[str, object] = {}
        self._buffers: Tensors = {}  # hot swap: graph -> initializer -> owned tensor ONNX Runtime reads
        self._values: dict[str, dict[str, object]] = {}  # the OrtValues sharing those tensors' memory
        self._base_values: Tensors | None = None  # on CUDA: the base of every buffer, resident on the device
        self._released: Names = {}  # graph -> the swappable names it had, while released
        self._init_lease()

    @classmethod
    def open(cls, base: OpenBase | Path, adapter_set: AdapterSet | None = None, options: OrtOptions | None = None,
             *, swappable: Names | None = None) -> "OrtRunner":
        """Create the sessions with ``adapter_set`` applied.

        With hot swap, ``swappable`` (graph -> initializer names) declares which weights
        later swaps may change, besides those the first set touches. A later swap that
        needs a weight outside them re-creates the sessions (still correct, just slower).
        """
        runner = cls(as_open_base(base), options or OrtOptions())
        runner._create(adapter_set or AdapterSet(), swappable)
        return runner

    # -- sessions ---------------------------------------------------------------------------

    def _create(self, adapter_set: AdapterSet, swappable: Names | None) -> None:
        """New sessions for ``adapter_set``; they replace the old ones in one step, under the lease."""
        names = touched_names(swappable, adapter_set) if self.options.hot_swap else {}
        sessions, buffers, values, base_values = self._open_graphs((FUSED, TEXT_ENCODER), adapter_set, names)
        with self._lease:  # no graph call sees a mix of old and new sessions, or none at all
            for graph in (VAE_DECODER, VAE_ENCODER):  # they carry no adapters: kept
                if graph in self._sessions:
                    sessions[graph] = self._sessions[graph]
            self._sessions, self._buffers, self._values, self._base_values = sessions, buffers, values, base_values
            self._released = {}
            self.adapter_set = adapter_set

    def _open_graphs(self, graphs: tuple[str, ...], adapter_set: AdapterSet, names: Names):
        """Sessions of ``graphs`` with ``adapter_set`` merged: (sessions, buffers, OrtValues, CUDA base values).

        With hot swap the weights of ``names`` become owned buffers; else every weight the
        set touches is injected at creation.
        """
        ort = _ort()
        start = time.perf_counter()
        names = {g: n for g, n in names.items() if g in graphs and n}
        buffers: Tensors = {}
        base_values: Tensors | None = None
        tensors: dict[str, dict[str, np.ndarray]] = {}
        with BaseWeights(self.manifest, self.base_dir) as base:
            if self.options.hot_swap:
                buffers = self._allocate(base, names)
                if self.device.type == "cuda":  # the base stays on the device: a swap then moves factors only
                    base_values = self._allocate(base, names)
                    merge_into(base, AdapterSet(), base_values, only=names, graphs=graphs)
                merge_into(base, adapter_set, buffers, only=names, base_values=base_values, graphs=graphs)
            else:
                tensors = merge_tensors(base, adapter_set, graphs=graphs)
        self.timings.merge_s = time.perf_counter() - start
        start = time.perf_counter()
        sessions: dict[str, object] = {}
        values: dict[str, dict[str, object]] = {}
        for graph in graphs:
            so = session_options(self.options, no_prepacking=bool(buffers.get(graph)))
            if buffers.get(graph):
                # ONNX Runtime reads these buffers (shared through DLPack, no copy) at every run;
                # a swap rewrites them in place.
                values[graph] = {n: _shared_value(ort, t) for n, t in buffers[graph].items()}
                for name, value in values[graph].items():  # ORT keeps pointers to these: they live with the runner
                    so.add_initializer(name, value)
                _check_buffers_survive(self.base_dir, self.manifest.graphs[graph].path, self.options,
                                       set(buffers[graph]))
            elif tensors.get(graph):
                so.add_external_initializers(
                    list(tensors[graph]), [ort.OrtValue.ortvalue_from_numpy(a) for a in tensors[graph].values()]
                )
            sessions[graph] = inference_session(self.base.graph_path(graph), so, self.options)
        self.timings.session_s = time.perf_counter() - start
        return sessions, buffers, values, base_values

    def _allocate(self, base: BaseWeights, names: Names) -> Tensors:
        """Uninitialized tensors on the runner's device, one per initializer of ``names``."""
        return {graph: {n: empty_like_entry(base.entry(graph, n), self.device) for n in sorted(named)}
                for graph, named in names.items() if named}

    def _session(self, graph: str):
        """The session of ``graph``, opened now if it was released (or is a VAE); call with the lease held."""
        if graph not in self._sessions:
            if graph in (FUSED, TEXT_ENCODER):  # released: opened again with the current set
                sessions, buffers, values, base_values = self._open_graphs(
                    (graph,), self.adapter_set, {graph: self._released.pop(graph, set())})
                self._buffers.update(buffers)
                self._values.update(values)
                if base_values:
                    self._base_values = {**(self._base_values or {}), **base_values}
                self._sessions.update(sessions)
            else:  # the VAE graphs carry no adapters: created on first use
                self._sessions[graph] = plain_session(self.base.graph_path(graph), self.options)
        return self._sessions[graph]

    def release(self, graph: str) -> None:
        """Free ``graph``'s session and its swappable buffers until its next call, which opens them again.

        A one-shot run releases each graph once it is done with it (the text encoder after
        the prompt, the UNet+ControlNet after the last step), so the weights of a graph
        in use are the only ones resident: docs/benchmarks.md, "Memory".
        """
        with self._lease:
            self._sessions.pop(graph, None)
            self._values.pop(graph, None)
            if graph in (FUSED, TEXT_ENCODER):
                self._released[graph] = self._released.get(graph, set()) | set(self._buffers.pop(graph, {}))
            if self._base_values:
                self._base_values.pop(graph, None)

    def swappable(self) -> Names:
        return touched_names({g: set(b) for g, b in self._buffers.items()}, self._released)

    def set_adapters(self, adapter_set: AdapterSet) -> float:
        """Switch to ``adapter_set``; returns the seconds it took.

        In place when every weight the old and the new set touch is a swappable buffer,
        else by re-creating the sessions. Waits for the generation (or graph call) holding
        the current set; no graph call starts while buffers are half written.
        """
        start = time.perf_counter()
        with self._swapping():
            needed = touched_names(adapter_set, self.adapter_set)
            # a released graph holds nothing to rewrite: it opens with the new set on its next call
            live = {graph: names for graph, names in needed.items() if graph not in self._released}
            in_place = self.options.hot_swap and all(
                names <= set(self._buffers.get(graph, {})) for graph, names in live.items())
            if in_place:
                # Only the weights the old or the new set touch can differ from what the buffers
                # hold; everything else already holds its base value. The merge writes into the
                # buffers ONNX Runtime reads, so it runs under the lease: a generation holding
                # the old set finishes first, and none starts until every buffer is written.
                with self._lease, BaseWeights(self.manifest, self.base_dir) as base:
                    try:
                        merge_into(base, adapter_set, self._buffers, only=live, base_values=self._base_values,
                                   graphs=self._buffers)
                    except BaseException:  # nothing half-written: the buffers go back to the set they held
                        merge_into(base, self.adapter_set, self._buffers, only=live, base_values=self._base_values,
                                   graphs=self._buffers)
                        raise
                    self.adapter_set = adapter_set
            else:
                with self._lease:  # re-created while no generation runs: sessions are GBs
                    self._create(adapter_set, touched_names(needed, self.swappable()))
        elapsed = time.perf_counter() - start
        self.timings.swaps.append(elapsed)
        return elapsed

    # -- graph calls ---------------------------------------------------------------------------

    def _run(self, graph: str, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        with self.hold():  # re-entrant: inside a generation's lease this takes it again
            session = self._session(graph)
            if self.device.type == "cuda":
                return _run_io_binding(session, feeds, self.device)
            outputs = session.run(None, {k: v.detach().cpu().numpy() for k, v in feeds.items()})
        return [torch.from_numpy(o) for o in outputs]

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run(TEXT_ENCODER, {"input_ids": input_ids.to(torch.int64)})[0]

    def predict_noise(self, sample, timestep, encoder_hidden_states, controlnet_cond, control_scales):
        feeds = {
            "sample": sample.float(), "timestep": timestep.float().reshape(-1).expand(sample.shape[0]).contiguous(),
            "encoder_hidden_states": encoder_hidden_states.float(), "controlnet_cond": controlnet_cond.float(),
            "control_scales": control_scales.float(),
        }
        return self._run(FUSED, feeds)[0]

    def vae_decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self._run(VAE_DECODER, {"latent": latent.float()})[0]

    def vae_encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self._run(VAE_ENCODER, {"image": image.float()})
        return mean, std

    def close(self) -> None:
        with self._lease:
            self._sessions.clear()
            self._buffers, self._values, self._base_values, self._released = {}, {}, None, {}


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
