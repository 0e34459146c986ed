"""``read_adapter``: any adapter file, read against one base, with every key accounted for.

The LoRA family (kohya LoRA/LoCon, LyCORIS LoHa/LoKr, DoRA, PEFT, diffusers,
cloneofsimo) goes through one pipeline: split each key into module name and part
(:mod:`.names`), resolve the module in the base, group the parts per module and hand
each group to the builder of its kind (:mod:`.lora`, :mod:`.lycoris`). ControlNets go
to :mod:`.controlnet`. What happens to each key:

- used: part of a delta, or of a bundled textual-inversion embedding (:mod:`.embeddings`);
- unknown (reported, refused with ``strict``): a part loramgr does not apply (OFT, IA3,
  biases, norms…) or a module whose parts do not form a whole delta;
- refused (always): a key naming a module the base lacks, or a tensor whose shape does
  not fit its base weight: the adapter belongs to another model, and applying the rest
  of it would be silently wrong.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loramgr.errors import BadFileError

from .adapter import Incomplete, ParsedAdapter, ShapeMismatch, WeightDelta
from .cloneofsimo import cloneofsimo_modules, is_cloneofsimo
from .controlnet import controlnet_format, read_controlnet
from .deltas import dora_axis, factor_rank
from .embeddings import bundled_embeddings
from .files import WeightFile, load_weight_file
from .lora import lora_delta
from .lycoris import loha_delta, lokr_delta
from .metadata import dominant_dtype, trigger_words
from .names import (
    FORMAT_PRIORITY,
    ModuleIndex,
    Resolved,
    other_model_hint,
    other_width_hint,
    split_key,
    unknown_part_hint,
)
from .peft import PeftConfigs, peft_alpha, peft_configs

KINDS = ("lora", "controlnet")
BUILDERS = {"lora": lora_delta, "loha": loha_delta, "lokr": lokr_delta}


def read_adapter(
    path: str | Path,
    params: Mapping[str, tuple[int, ...]],
    *,
    kind: str | None = None,
    controlnet_config: dict | None = None,
    strict: bool = False,
) -> ParsedAdapter:
    """Read a LoRA-family file or a ControlNet checkpoint (file or diffusers folder) against a base.

    Args:
        path: the adapter file, or a PEFT / diffusers ControlNetModel / diffusers LoRA folder.
        params: the base's torch parameter table, name -> shape (``unet.…``, ``controlnet.…``,
            text-encoder names).
        kind: ``"lora"`` or ``"controlnet"`` to refuse the other; None accepts both.
        controlnet_config: the diffusers ControlNetModel config, for original checkpoints.
        strict: refuse keys that are not applied instead of listing them in ``unknown_keys``.

    Raises:
        BadFileError: unreadable file, or an adapter that does not belong to this base.

    Example::

        parsed = read_adapter("my_lora.safetensors", base_param_shapes)
        if parsed.unknown_keys:
            print(f"{len(parsed.unknown_keys)} keys not applied, first {parsed.unknown_keys[0]}")
    """
    if kind not in (None, *KINDS):
        raise ValueError(f"kind must be one of {KINDS} or None, not {kind!r}")
    source = load_weight_file(path)
    cn_format = controlnet_format(source)
    found = "controlnet" if cn_format else "lora"
    if kind is not None and kind != found:
        raise BadFileError(source.path, f"is a {_KIND_NAMES[found]}, not a {_KIND_NAMES[kind]}")
    if cn_format:
        fmt = cn_format
        deltas, unknown = read_controlnet(source, params, cn_format, controlnet_config)
        embeddings = {}
    else:
        embeddings, embedding_keys = bundled_embeddings(source)
        fmt, deltas, unknown = _read_lora(source, ModuleIndex(params), embedding_keys)
    if strict and unknown:
        raise BadFileError(source.path, f"{len(unknown)} of {len(source.tensors)} keys are not applied "
                                        f"(strict mode), e.g. {_describe_unknown(unknown)}")
    ranks = {rank for d in deltas if (rank := factor_rank(d.kind, d.tensors)) is not None}
    return ParsedAdapter(
        path=source.path, format=fmt, kind=found, deltas=deltas, keys_total=len(source.tensors),
        keys_used=len(source.tensors) - len(unknown), unknown_keys=unknown, metadata=source.metadata,
        trigger_words=trigger_words(source.metadata), ranks=ranks, dtype=dominant_dtype(source.tensors),
        embeddings=embeddings,
    )


_KIND_NAMES = {"lora": "LoRA-family adapter", "controlnet": "ControlNet checkpoint"}


@dataclass
class _Group:
    """The keys of one base module: part -> tensor, keyed by (kind or None, part name)."""

    module: Resolved
    parts: dict[tuple[str | None, str], torch.Tensor] = field(default_factory=dict)
    keys: dict[tuple[str | None, str], str] = field(default_factory=dict)
    duplicated: bool = False

    def add(self, key: str, kind: str | None, part: str, tensor: torch.Tensor) -> None:
        self.duplicated |= (kind, part) in self.parts
        self.parts[(kind, part)] = tensor
        self.keys[(kind, part)] = key


def _read_lora(source: WeightFile, index: ModuleIndex,
               embedding_keys: set[str]) -> tuple[str, list[WeightDelta], list[str]]:
    keys = [key for key in source.tensors if key not in embedding_keys]
    groups: dict[str, _Group] = {}
    unknown: list[str] = []
    unmatched: list[str] = []
    styles: set[str] = set()
    if is_cloneofsimo(keys):
        placements = cloneofsimo_modules(source, index)
        placed = [(key, module, "lora", part) for key, (module, part) in placements.items()]
        unknown = [key for key in keys if key not in placements]
        styles.add("cloneofsimo")
    else:
        placed = []
        for key in keys:
            name = split_key(key)
            module = index.resolve(name.module) if name else None
            if name is None:
                unknown.append(key)
            elif module is None:
                unmatched.append(key)
            else:
                placed.append((key, module, name.kind, name.part))
                styles |= {name.style, module.style}
    if unmatched:
        hint = other_model_hint(unmatched[0])
        raise BadFileError(source.path, f"{len(unmatched)} of {len(keys)} keys match no weight of the base: "
                                        f"first unmatched: {unmatched[0]}" + (f" (a key of {hint})" if hint else ""))
    for key, module, kind, part in placed:
        groups.setdefault(module.module, _Group(module)).add(key, kind, part, source.tensors[key])
    configs = peft_configs(source)
    deltas = []
    for group in groups.values():
        try:
            deltas.append(_build(group, index, configs))
        except Incomplete:
            unknown.extend(group.keys.values())
        except ShapeMismatch as e:
            raise BadFileError(source.path, _mismatch_reason(group, e, index)) from None
    if not deltas:
        example = f", e.g. {_describe_unknown(unknown)}" if unknown else ""
        raise BadFileError(source.path, f"no LoRA, LoHa, LoKr or ControlNet weights loramgr can apply{example}")
    return _format_name(styles, {d.kind for d in deltas}), deltas, unknown


def _build(group: _Group, index: ModuleIndex, configs: PeftConfigs) -> WeightDelta:
    """The delta of one module; Incomplete if its parts do not make one, ShapeMismatch if they misfit."""
    kinds = {kind for kind, _ in group.parts if kind is not None}
    if group.duplicated or len(kinds) != 1:
        raise Incomplete("duplicated parts, mixed kinds or no weights")
    (kind,) = kinds
    parts = {part: tensor for (k, part), tensor in group.parts.items() if k == kind}
    param = group.module.module + ".weight"
    shape = index.shapes[param]
    if len(shape) < 2:
        raise ShapeMismatch(next(iter(parts)), shape, tuple(next(iter(parts.values())).shape),
                            f"{param} is a 1-D weight (a norm or bias), which takes no {kind} delta")
    alpha_tensor = group.parts.get((None, "alpha"))
    if alpha_tensor is not None and alpha_tensor.numel() != 1:
        raise Incomplete("alpha is not a scalar")
    alpha = float(alpha_tensor) if alpha_tensor is not None else peft_alpha(configs, group.module, factor_rank(kind, parts))
    delta = BUILDERS[kind](param, parts, shape, alpha)
    dora = _dora_scale(group, shape)
    if dora is None:
        return delta
    rule = "peft" if (None, "magnitude") in group.parts else "lycoris"
    return dataclasses.replace(delta, dora_scale=dora, dora_rule=rule)


def _dora_scale(group: _Group, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The DoRA magnitude with the weight's rank: LyCORIS' as saved, PEFT's [out] as [out, 1, …]."""
    magnitude = group.parts.get((None, "magnitude"))
    if magnitude is not None:
        if magnitude.numel() != shape[0]:
            raise ShapeMismatch("magnitude", (shape[0],), tuple(magnitude.shape))
        return magnitude.reshape(shape[0], *(1,) * (len(shape) - 1))
    dora = group.parts.get((None, "dora_scale"))
    if dora is not None:
        try:
            dora_axis(dora, shape)
        except ValueError as e:
            raise ShapeMismatch("dora_scale", shape, tuple(dora.shape), str(e)) from None
    return dora


def _mismatch_reason(group: _Group, error: ShapeMismatch, index: ModuleIndex) -> str:
    key = next((k for (_, part), k in group.keys.items() if part == error.part), next(iter(group.keys.values())))
    param = group.module.module + ".weight"
    hint = other_width_hint(error.expected, error.got)
    return (f"{key}: {error.what} (base weight {param} is {list(index.shapes[param])})"
            + (f"; it looks like an adapter for {hint}, not for this base" if hint else ""))


def _describe_unknown(unknown: list[str]) -> str:
    """One unapplied key, preferring one whose kind is recognizable (OFT, IA3, a bias…)."""
    key = next((k for k in unknown if unknown_part_hint(k)), unknown[0])
    what = unknown_part_hint(key)
    return f"{key} ({what}, which loramgr does not apply)" if what else key


def _format_name(styles: set[str], kinds: set[str]) -> str:
    lycoris = sorted(kinds & {"loha", "lokr"})
    if lycoris:
        return "lycoris-" + "+".join(lycoris)
    return next((name for name in ("cloneofsimo", *FORMAT_PRIORITY) if name in styles), "diffusers")
