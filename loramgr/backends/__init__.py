"""Interchangeable runtimes for an exported base: ONNX Runtime, TensorRT, torch (reference).

Every backend implements :class:`~loramgr.backends.base.Runner`; :func:`open_runner`
opens one by name with that backend's options object (:class:`OrtOptions` for
``ort-cpu`` / ``ort-cuda``, :class:`~loramgr.backends.tensorrt.TrtOptions` for
``tensorrt``). Optional backends are imported only when opened.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LoramgrError

if TYPE_CHECKING:
    from ..adapters import AdapterSet, Names
    from ..bases import OpenBase
    from .base import Runner

BACKENDS = ("ort-cpu", "ort-cuda", "tensorrt")  # the one list of backend names (CLI choices included)


def open_runner(base: "OpenBase | Path", adapter_set: "AdapterSet | None" = None, backend: str = "ort-cpu",
                options=None, swappable: "Names | None" = None) -> "Runner":
    """A :class:`~loramgr.backends.base.Runner` over ``base`` with ``adapter_set`` applied.

    ``options``: an ``OrtOptions`` for the ``ort-*`` backends (its provider is the
    backend's), a ``TrtOptions`` for ``tensorrt``; ``None`` takes the defaults.
    ``swappable`` names the weights later :meth:`set_adapters` calls may change, so
    that they happen in place (hot swap) instead of re-creating sessions; TensorRT can
    refit any refittable weight and needs no such list.
    """
    if backend in ("ort-cpu", "ort-cuda"):
        from .onnxruntime import OrtOptions, OrtRunner

        if options is not None and not isinstance(options, OrtOptions):
            raise LoramgrError(f"backend {backend} takes OrtOptions, got {type(options).__name__}")
        options = replace(options or OrtOptions(), provider=backend.removeprefix("ort-"))
        return OrtRunner.open(base, adapter_set, options, swappable=swappable)
    if backend == "tensorrt":
        from .tensorrt import TrtOptions, TrtRunner

        if options is not None and not isinstance(options, TrtOptions):
            raise LoramgrError(f"backend tensorrt takes TrtOptions, got {type(options).__name__}")
        return TrtRunner.open(base, adapter_set, options)
    raise LoramgrError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
