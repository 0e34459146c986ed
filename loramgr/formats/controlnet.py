"""ControlNet checkpoints -> one ``full`` WeightDelta for every ControlNet parameter of the base.

All SD1.5 ControlNets share one architecture, so swapping one for another replaces
every ``controlnet.*`` weight of the fused graph. Two layouts exist: diffusers'
``ControlNetModel`` (a folder or its ``.safetensors``) and lllyasviel's original
``control_model.*`` checkpoints (``control_sd15_*.pth`` / ``.safetensors``), converted
with diffusers' own ``convert_controlnet_checkpoint``. A checkpoint that lacks a weight
of the base's ControlNet, or has one of another shape, is of another architecture.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from loramgr.errors import BadFileError

from .adapter import WeightDelta
from .files import WeightFile
from .names import other_width_hint

BASE_PREFIX = "controlnet."
ORIGINAL_PREFIX = "control_model."
ORIGINAL_MARKERS = ("input_hint_block.", "zero_convs.", "middle_block_out.")
DIFFUSERS_MARKERS = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
DIFFUSERS_CLASS = "ControlNetModel"


def controlnet_format(source: WeightFile) -> str | None:
    """``controlnet-diffusers`` / ``controlnet-original`` if ``source`` is a ControlNet, else None."""
    if source.config is not None and source.config.get("_class_name") == DIFFUSERS_CLASS:
        return "controlnet-diffusers"
    if any(key.startswith((ORIGINAL_PREFIX, *ORIGINAL_MARKERS)) for key in source.tensors):
        return "controlnet-original"
    if any(key.startswith(DIFFUSERS_MARKERS) for key in source.tensors):
        return "controlnet-diffusers"
    return None


def read_controlnet(
    source: WeightFile, params: Mapping[str, tuple[int, ...]], fmt: str, controlnet_config: Mapping | None
) -> tuple[list[WeightDelta], list[str]]:
    """The full deltas for every ``controlnet.*`` parameter of the base, and the unused keys.

    ``controlnet_config`` (a diffusers ControlNetModel config) drives the conversion of
    original checkpoints; without it, ``layers_per_block`` is read off the base's names.
    """
    base = {name.removeprefix(BASE_PREFIX): tuple(shape) for name, shape in params.items() if name.startswith(BASE_PREFIX)}
    if not base:
        raise BadFileError(source.path, "is a ControlNet, but the base has no ControlNet weights to replace")
    if fmt == "controlnet-original":
        converted = _convert_original(source.tensors, controlnet_config or {"layers_per_block": _layers_per_block(base)})
    else:
        converted = dict(source.tensors)
    _check_architecture(source, base, converted)
    used = {id(converted[name]) for name in base}
    unknown = [key for key, tensor in source.tensors.items() if id(tensor) not in used]
    deltas = [WeightDelta(BASE_PREFIX + name, "full", {"weight": converted[name]}, 1.0) for name in base]
    return deltas, unknown


def _convert_original(tensors: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers' converter, minus the entries it fills with None for keys the file lacks."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    converted = convert_controlnet_checkpoint(dict(tensors), dict(config))
    return {name: tensor for name, tensor in converted.items() if tensor is not None}


def _layers_per_block(base: Mapping[str, tuple[int, ...]]) -> int:
    resnets = {m[1] for name in base if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", name))}
    return len(resnets)


def _check_architecture(source: WeightFile, base: Mapping[str, tuple[int, ...]], converted: Mapping[str, torch.Tensor]) -> None:
    for name, shape in base.items():
        if name in converted and tuple(converted[name].shape) != shape:
            got = tuple(converted[name].shape)
            hint = other_width_hint(shape, got)
            raise BadFileError(source.path, f"ControlNet of another architecture: {name} has shape {list(got)}, "
                                            f"the base's is {list(shape)}" + (f"; it looks like {hint}" if hint else ""))
    missing = [name for name in base if name not in converted]
    if missing:
        raise BadFileError(source.path, f"ControlNet of another architecture: {len(missing)} of the base's {len(base)} "
                                        f"ControlNet weights are not in the file, first: {missing[0]}")
