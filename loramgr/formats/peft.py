"""PEFT and new-diffusers LoRA alphas, for files whose keys carry no ``.alpha``.

PEFT keeps ``lora_alpha`` (and per-module ``alpha_pattern``, ``use_rslora``) in a
``LoraConfig``: in ``adapter_config.json`` next to a PEFT folder's weights, or, for
files written by diffusers' ``save_lora_weights``, as JSON in the safetensors metadata
key ``lora_adapter_metadata`` with fields prefixed by component (``unet.lora_alpha``).
Without any of these, PEFT and diffusers use alpha = rank (scale 1).
"""

from __future__ import annotations

import json
import math
import re

from loramgr.errors import BadFileError

from .files import WeightFile
from .names import Resolved

ADAPTER_METADATA_KEY = "lora_adapter_metadata"

PeftConfigs = dict[str | None, dict]  # component (None: every component) -> LoraConfig fields


def peft_configs(source: WeightFile) -> PeftConfigs:
    """The LoRA configs a file or folder carries, by component."""
    configs: PeftConfigs = {}
    if source.config is not None and {"lora_alpha", "alpha"} & set(source.config):
        configs[None] = source.config  # a PEFT folder: one config for its one model
    raw = source.metadata.get(ADAPTER_METADATA_KEY)
    if raw:
        try:
            fields = json.loads(raw)
        except ValueError as e:
            raise BadFileError(source.path, f"metadata {ADAPTER_METADATA_KEY!r} is not valid JSON ({e})") from None
        for name, value in fields.items():
            component, _, field = name.partition(".")
            configs.setdefault(component, {})[field] = value
    return configs


def peft_alpha(configs: PeftConfigs, module: Resolved, rank: int | None) -> float | None:
    """The alpha PEFT would use for ``module``, as alpha over ``rank`` (rsLoRA folded in)."""
    config = configs.get(module.component, configs.get(None))
    if config is None:
        return None
    alpha = config.get("lora_alpha", config.get("alpha"))  # LoRA configs say lora_alpha, LoHa/LoKr alpha
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module.local):  # PEFT's own get_pattern_key rule
            alpha = value
            break
    if alpha is None:
        return None
    if config.get("use_rslora") and rank:
        return alpha * math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r): that is this alpha over r
    return float(alpha)
