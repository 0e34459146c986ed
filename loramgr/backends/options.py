"""Options of the ONNX Runtime backends, importable without onnxruntime or torch (the CLI's parser uses them)."""

from __future__ import annotations

from dataclasses import dataclass

OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")  # ONNX Runtime graph optimization levels
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class OrtOptions:
    """How ONNX Runtime sessions are made: the ``ort-cpu`` / ``ort-cuda`` backends' one options object.

    ``optimization``: ``basic`` by default (docs/design.md and the module docstring of
    :mod:`loramgr.backends.onnxruntime` say why); ``hot_swap``: keep swappable weights in
    buffers loramgr owns and rewrite them in place on a swap; ``fuse_attention``: run each
    attention core as one ``MultiHeadAttention`` node, projections untouched
    (:mod:`loramgr.backends.attention_fusion`; docs/benchmarks.md has what it gains).
    """

    provider: str = "cpu"  # "cpu" | "cuda"
    optimization: str = "basic"  # one of OPTIMIZATION_LEVELS
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one thread per physical core)
    hot_swap: bool = True
    fuse_attention: bool = True
