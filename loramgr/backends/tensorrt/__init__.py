"""TensorRT backend, split as Polygraphy splits its own: one module per concept.

- :mod:`.profiles`: shape profiles (``--min/--opt/--max``) and per-input dims;
- :mod:`.engines`: the TensorRT import, :class:`TrtOptions`, building engines and their cache;
- :mod:`.refit`: what a switch of adapter sets refits, and how the weights are prepared;
- :mod:`.runner`: :class:`TrtRunner`, the :class:`~loramgr.backends.base.Runner` over engines.

The names below are imported lazily (on first access), and nothing imports ``tensorrt``
itself until an engine is built or opened.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "engines": (
        "ENGINE_FORMAT", "PRECISIONS", "EngineKey", "EngineStatus", "Precision", "RuntimeInfo", "TrtOptions",
        "build_engines", "engine_key", "engine_keys", "engine_status", "engines_dir", "import_tensorrt",
        "plan_precision", "record_options", "resolve_options", "save_engine",
    ),
    "profiles": ("DEFAULT_PROFILE", "Shape", "ShapeProfile", "check_input_shapes", "input_shapes"),
    "refit": (
        "check_refittable", "missing_values", "prepare_weight", "read_constants", "refit_plan", "refit_tensors",
        "refit_weights", "weight_dtype",
    ),
    "runner": ("EngineSession", "RefitTimings", "TrtRunner", "load_engine"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value
