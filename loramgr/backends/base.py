"""The one interface every backend implements, so the pipeline and the runtime never know which runs.

The contract (:class:`Runner`) follows Polygraphy's runner base: one interface, one
folder or module per backend behind it (``onnxruntime``, ``tensorrt/``, ``torch_runner``),
and optional libraries (TensorRT) imported only when their backend is opened
(:func:`loramgr.backends.open_runner`).

Tensors cross this interface as ``torch.Tensor`` (CPU or CUDA): the schedulers the
pipeline uses are diffusers' torch schedulers, and a GPU backend can keep latents on
the device (ONNX Runtime IO binding, TensorRT device pointers) without round trips.

**One adapter set per image.** A generation makes many graph calls (text encoder, one
UNet call per step, VAE decode); a swap between two of them would give an image from
no adapter set. So a generation holds the runner's current set for all of its calls
with ``with runner.hold() as adapter_set:`` (the pipeline does, for a whole
``__call__``), and ``set_adapters`` waits until no generation holds it. The lease is
re-entrant: graph calls inside it take it again without deadlock. :class:`AdapterLease`
is the shared implementation.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from ..adapter_file import CHECKSUM_KEY
from ..errors import LoramgrError
from ..manifest import UNET, Manifest, axis_size

if TYPE_CHECKING:
    from ..adapter_file import AdapterFile
    from ..adapters import AdapterSet, Names


@runtime_checkable
class Runner(Protocol):
    """What the pipeline and the runtime need from a backend: the graphs of a base, adapters, lifetime.

    Graph calls (B = batch, h/w = latent size = image size / 8, T = tokens, 77 per prompt chunk,
    D = text width, L = text encoder layers):
      - ``encode_text(input_ids [B,77] int64, token_vectors [B,77,D] | None, token_mask [B,77] | None)
        -> [L,B,77,D] float32``: index ``k - 1`` is CLIP skip ``k``; where ``token_mask`` is 1 the
        token embedding is replaced by ``token_vectors`` (textual inversion);
      - ``control_residuals(controlnet, sample [B,4,h,w], timestep [B], encoder_hidden_states [B,T,D],
        controlnet_cond [B,3,8h,8w] in [0,1]) -> 13 residuals``, unscaled: ``controlnet`` names one
        ControlNet of the current set (``None`` or ``"canny"``: the base's own);
      - ``predict_noise(sample, timestep, encoder_hidden_states, residuals (13) | None) -> [B,4,h,w]``:
        the UNet, with the summed residuals of the units acting at this step (``None``: none acts);
      - ``vae_decode(latent [B,4,h,w], already divided by the scaling factor) -> [B,3,8h,8w] in [-1,1]``
      - ``vae_encode(image [B,3,8h,8w] in [-1,1]) -> (mean, std) each [B,4,h,w]``

    Adapters and lifetime:
      - ``adapter_set``: the set applied now;
      - ``set_adapters(adapter_set) -> seconds``: switch sets (waits for a generation holding the current one);
      - ``hold()``: context manager yielding the current set, which no swap changes until it exits;
      - ``swappable() -> {graph: initializer names}``: the weights a swap changes in place;
      - ``release(graph)``: a graph is not needed for now: the runner may free its session and
        weights, and opens them again (same adapters) on its next call;
      - ``timings``: a dataclass of seconds (``float`` fields) spent opening and swapping;
      - ``close()``, and ``with runner:`` closes on exit.
    """

    device: torch.device
    adapter_set: AdapterSet
    timings: Any

    def encode_text(self, input_ids: torch.Tensor, token_vectors: torch.Tensor | None = None,
                    token_mask: torch.Tensor | None = None) -> torch.Tensor: ...

    def control_residuals(self, controlnet: str | None, sample: torch.Tensor, timestep: torch.Tensor,
                          encoder_hidden_states: torch.Tensor, controlnet_cond: torch.Tensor) -> list[torch.Tensor]: ...

    def predict_noise(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                      residuals: Sequence[torch.Tensor] | None = None) -> torch.Tensor: ...

    def vae_decode(self, latent: torch.Tensor) -> torch.Tensor: ...

    def vae_encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def set_adapters(self, adapter_set: AdapterSet) -> float: ...

    def hold(self) -> contextlib.AbstractContextManager[AdapterSet]: ...

    def swappable(self) -> Names: ...

    def release(self, graph: str) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> "Runner": ...

    def __exit__(self, *exc) -> None: ...


def text_feeds(input_ids: torch.Tensor, token_vectors: torch.Tensor | None, token_mask: torch.Tensor | None,
               width: int) -> dict[str, torch.Tensor]:
    """The text encoder's three inputs; no vectors means no token replaced."""
    batch, tokens = input_ids.shape
    if token_vectors is None:
        token_vectors = torch.zeros(batch, tokens, width, device=input_ids.device)
    if token_mask is None:
        token_mask = torch.zeros(batch, tokens, device=input_ids.device)
    return {"input_ids": input_ids.to(torch.int64), "token_vectors": token_vectors.float(),
            "token_mask": token_mask.float()}


def timesteps(timestep: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """One float32 timestep per sample: the ``timestep`` input of the UNet and ControlNet graphs."""
    return timestep.float().reshape(-1).expand(sample.shape[0]).contiguous()


def slot_key(controlnet: AdapterFile | None) -> tuple | None:
    """What tells two ControlNets apart in a slot: name and content (a file converted again is another one)."""
    return None if controlnet is None else (controlnet.name, controlnet.metadata.get(CHECKSUM_KEY, id(controlnet)))


def slot_set(controlnet: AdapterFile | None) -> AdapterSet:
    """The adapter set one ControlNet slot carries: that ControlNet, or nothing (the base's own)."""
    from ..adapters import AdapterSet

    return AdapterSet(((controlnet, 1.0),) if controlnet is not None else (), base_controlnet=controlnet is None)


def plan_slots(held: Sequence[AdapterFile | None], wanted: Sequence[AdapterFile | None]
               ) -> list[tuple[int | None, AdapterFile | None]]:
    """Where each ControlNet of ``wanted`` that no slot holds goes: (slot index, or None for a new slot, ControlNet).

    A ControlNet already in a slot stays there; a newcomer takes a slot whose ControlNet
    ``wanted`` does not use, in slot order, else a new slot: a set of units that repeats
    ControlNets moves no weights (docs/design.md, "ControlNet units").
    """
    held_keys = [slot_key(c) for c in held]
    wanted_keys = {slot_key(c) for c in wanted}
    free = [i for i, key in enumerate(held_keys) if key not in wanted_keys]
    moves = []
    for controlnet in wanted:
        if slot_key(controlnet) not in held_keys:
            moves.append((free.pop(0) if free else None, controlnet))
    return moves


def residual_shapes(manifest: Manifest, sample_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """The shapes of the 13 residuals the UNet of ``manifest`` takes for a ``sample`` of this shape.

    Read from the UNet graph's inputs: ``batch``, fixed channels, and ``latent_height/k`` axes.
    """
    from ..models.graphs import RESIDUALS

    batch, _, height, width = sample_shape
    sizes = {"batch": batch, "latent_height": height, "latent_width": width}
    inputs = {spec.name: spec.shape for spec in manifest.graphs[UNET].inputs}
    return [tuple(axis_size(a, sizes) for a in inputs[name]) for name in RESIDUALS]


def seconds(timings: Any) -> dict[str, float]:
    """The ``float`` fields of a runner's ``timings`` dataclass (lists of swaps left out)."""
    if timings is None or not is_dataclass(timings):
        return {}
    return {k: v for k, v in asdict(timings).items() if isinstance(v, float)}


class AdapterLease:
    """The lease of a runner's adapter set: generations hold it, swaps wait for it.

    ``_lease`` is re-entrant and held by :meth:`hold` (a whole generation) and by every
    graph call (one call, when no generation holds it), so a graph call never runs on
    half-written weights, and never on another set than the one its generation started
    with. ``_swap`` serializes swaps, so a swap may prepare its tensors (merge) before it
    takes the lease, while a generation still runs. A swap from inside a generation's
    own lease is refused: it would change the set that generation holds.
    """

    def _init_lease(self) -> None:
        self._lease = threading.RLock()
        self._swap = threading.Lock()
        self._no_swap = threading.Event()  # cleared while a swap waits or runs: no new generation starts
        self._no_swap.set()
        self._holders = threading.local()

    @contextlib.contextmanager
    def hold(self) -> Iterator[AdapterSet]:
        """Hold the current adapter set: no swap happens until the block exits.

        A new (outermost) hold waits while a swap is pending, so swaps are not starved by
        back-to-back generations; holds nested in one thread (graph calls inside a
        generation) never wait for a swap.
        """
        depth = getattr(self._holders, "depth", 0)
        if depth == 0:
            self._no_swap.wait()
        with self._lease:
            self._holders.depth = depth + 1
            try:
                yield self.adapter_set
            finally:
                self._holders.depth = depth

    @contextlib.contextmanager
    def _swapping(self) -> Iterator[None]:
        """Serialize swaps and hold back new generations; refuse a swap inside this thread's own :meth:`hold`."""
        if getattr(self._holders, "depth", 0):
            raise LoramgrError("set_adapters inside runner.hold(): a generation holds the adapter set; "
                               "swap after it, outside the `with` block")
        with self._swap:
            self._no_swap.clear()
            try:
                yield
            finally:
                self._no_swap.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
