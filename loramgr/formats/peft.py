"""PEFT and new-diffusers LoRA alphas, for files whose keys carry no ``.alpha``.

PEFT keeps ``lora_alpha`` (and per-module ``alpha_pattern``, ``use_rslora``) in a
``LoraConfig``: in ``adapter_config.json`` next to a PEFT folder's weights, or, for
files written by diffusers' ``save_lora_weights``, as JSON in the safetensors metadata
key ``lora_adapter_metadata`` with fields prefixed by component (``unet.lora_alpha``).
Without any of these, PEFT and diffusers use alpha = rank (scale 1).

Every field is checked when the file is read (a :class:`BadFileError` naming the field):
an alpha must be a number finite in float32, and ``alpha_pattern`` keys are regular
expressions from the file, matched as PEFT's ``get_pattern_key`` matches them. They are
compiled with RE2 (``google-re2``), which matches in time linear in the name, so a pattern
such as ``([a-z_0-9.]+)*X`` cannot backtrack for hours while holding the GIL (Python's
``re`` would, and nothing can interrupt it short of killing the process). A timeout
would need a separate process per match; RE2 needs nothing. The price: patterns RE2
does not support (backreferences, lookaround) are refused, which no module-name pattern
needs. docs/serving.md ("Hostile input") lists the limits.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass

import re2

from loramgr.errors import BadFileError, finite32

from .files import WeightFile
from .names import Resolved

ADAPTER_METADATA_KEY = "lora_adapter_metadata"
MAX_PATTERNS = 4096  # alpha_pattern entries per component: one per module of an SDXL UNet fits
MAX_PATTERN_CHARS = 1000
MAX_METADATA_CHARS = 8 << 20  # the metadata JSON (every pattern at its longest fits)

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is reported in the BadFileError, not on stderr


@dataclass(frozen=True)
class PeftConfig:
    """The fields of one LoraConfig that decide alphas, checked."""

    alpha: float | None
    patterns: tuple[tuple[object, float], ...]  # (compiled RE2 pattern, alpha), in the file's order
    rslora: bool


PeftConfigs = dict[str | None, PeftConfig]  # component (None: every component) -> its config


def peft_configs(source: WeightFile) -> PeftConfigs:
    """The LoRA configs a file or folder carries, by component, checked."""
    raw: dict[str | None, dict] = {}
    if source.config is not None and {"lora_alpha", "alpha"} & set(source.config):
        raw[None] = source.config  # a PEFT folder: one config for its one model
    text = source.metadata.get(ADAPTER_METADATA_KEY)
    if text:
        where = f"metadata {ADAPTER_METADATA_KEY!r}"
        if len(text) > MAX_METADATA_CHARS:
            raise BadFileError(source.path, f"{where} of {len(text):,} characters, over the limit of "
                                            f"{MAX_METADATA_CHARS:,}")
        try:
            fields = json.loads(text)
        except ValueError as e:
            raise BadFileError(source.path, f"{where} is not valid JSON ({e})") from None
        except RecursionError:
            raise BadFileError(source.path, f"{where} is nested too deep to be a LoraConfig") from None
        if not isinstance(fields, dict):
            raise BadFileError(source.path, f"{where} must be a JSON object, got {type(fields).__name__}")
        for name, value in fields.items():
            component, _, field = name.partition(".")
            raw.setdefault(component, {})[field] = value
    return {component: _checked(source, component, fields) for component, fields in raw.items()}


def _checked(source: WeightFile, component: str | None, fields: dict) -> PeftConfig:
    prefix = f"{component}." if component else ""
    key = "lora_alpha" if "lora_alpha" in fields else "alpha"  # LoRA configs say lora_alpha, LoHa/LoKr alpha
    alpha = fields.get(key)
    if alpha is not None:
        alpha = _alpha(source, f"{prefix}{key}", alpha)
    patterns = fields.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise BadFileError(source.path, f"{prefix}alpha_pattern must be a JSON object (pattern -> alpha), "
                                        f"got {type(patterns).__name__}")
    if len(patterns) > MAX_PATTERNS:
        raise BadFileError(source.path, f"{prefix}alpha_pattern has {len(patterns)} entries, over the limit of "
                                        f"{MAX_PATTERNS}")
    compiled = tuple((_pattern(source, f"{prefix}alpha_pattern", p),
                      _alpha(source, f"{prefix}alpha_pattern[{p!r:.80}]", v)) for p, v in patterns.items())
    rslora = fields.get("use_rslora", False)
    if not isinstance(rslora, bool) and rslora is not None:
        raise BadFileError(source.path, f"{prefix}use_rslora must be true or false, got {rslora!r:.80}")
    return PeftConfig(alpha, compiled, bool(rslora))


def _alpha(source: WeightFile, field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadFileError(source.path, f"{field} must be a number, got {value!r:.80}")
    if not finite32(value):
        raise BadFileError(source.path, f"{field} {value!r} is not a finite number (float32)")
    return float(value)


def _pattern(source: WeightFile, field: str, pattern: str):
    """``pattern`` as PEFT's ``get_pattern_key`` uses it: ``re.match(rf"(.*\\.)?({key})$", name)``, in RE2."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise BadFileError(source.path, f"{field} key of {len(pattern)} characters, over the limit of "
                                        f"{MAX_PATTERN_CHARS}")
    try:
        return re2.compile(rf"(.*\.)?({pattern})$", _RE2_OPTIONS)
    except re2.error as e:
        reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise BadFileError(source.path, f"{field} key {pattern!r:.80} is not a regular expression loramgr "
                                        "matches (RE2 syntax, linear time; no backreferences or lookaround): "
                                        f"{reason}") from None


def peft_alpha(configs: PeftConfigs, module: Resolved, rank: int | None) -> float | None:
    """The alpha PEFT would use for ``module``, as alpha over ``rank`` (rsLoRA folded in)."""
    config = configs.get(module.component, configs.get(None))
    if config is None:
        return None
    alpha = config.alpha
    for pattern, value in config.patterns:
        if pattern.match(module.local):  # PEFT's own get_pattern_key rule: the first pattern that matches
            alpha = value
            break
    if alpha is None:
        return None
    if config.rslora and rank:
        return alpha * math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r): that is this alpha over r
    return alpha
