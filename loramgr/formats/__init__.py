"""Adapter files (LoRA family and ControlNets) in one normalized form, and their delta math.

This layer knows torch parameter names only: ``read_adapter`` turns any common SD1.5
adapter file into :class:`WeightDelta` objects named by the base's torch parameters;
``delta_weight`` / ``merge_weight`` compute what they do to a weight. Mapping to ONNX
names happens elsewhere.

Example::

    from loramgr.formats import merge_weight, read_adapter

    parsed = read_adapter("style.safetensors", base_param_shapes)
    for delta in parsed.deltas:
        new = merge_weight(base_weights[delta.param], [(delta, 0.8)])
"""

from .adapter import ParsedAdapter, WeightDelta
from .deltas import delta_weight, merge_weight
from .reader import read_adapter

__all__ = ["ParsedAdapter", "WeightDelta", "delta_weight", "merge_weight", "read_adapter"]
