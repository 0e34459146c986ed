"""Adapter key names -> base module paths: data tables plus one index built from the base.

A key is ``<module name><part suffix>``. The suffix (``.lora_down.weight``,
``.hada_w1_a``, ``.lora_A.weight``…) says which factor it is. The module name is
spelled the kohya way (``lora_unet_`` + path with ``.`` -> ``_``, in diffusers or LDM
block naming) or dotted (``unet.`` / ``text_encoder.`` / ``base_model.model.`` / bare).
Both are looked up in tables built from the base's own parameter names, so a name
resolves only to a module that exists; underscores are never split back into dots.

The text encoder's module paths are compared in one canonical spelling,
``text_model.encoder…``: files use it, while transformers >= 5 names the parameters
of ``CLIPTextModel`` without the ``text_model.`` level.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from loramgr.models.ldm import diffusers_unet_module_to_ldm

# (suffix, kind, part, style). kind None: shared by every kind. style feeds the format name.
PART_SUFFIXES: tuple[tuple[str, str | None, str, str], ...] = (
    (".lora_up.weight", "lora", "up", ""),
    (".lora_down.weight", "lora", "down", ""),
    (".lora_mid.weight", "lora", "mid", ""),
    (".lora.up.weight", "lora", "up", ""),
    (".lora.down.weight", "lora", "down", ""),
    (".lora_B.weight", "lora", "up", "peft"),
    (".lora_A.weight", "lora", "down", "peft"),
    (".hada_w1_a", "loha", "w1_a", ""),
    (".hada_w1_b", "loha", "w1_b", ""),
    (".hada_w2_a", "loha", "w2_a", ""),
    (".hada_w2_b", "loha", "w2_b", ""),
    (".hada_t1", "loha", "t1", ""),
    (".hada_t2", "loha", "t2", ""),
    (".lokr_w1", "lokr", "w1", ""),
    (".lokr_w1_a", "lokr", "w1_a", ""),
    (".lokr_w1_b", "lokr", "w1_b", ""),
    (".lokr_w2", "lokr", "w2", ""),
    (".lokr_w2_a", "lokr", "w2_a", ""),
    (".lokr_w2_b", "lokr", "w2_b", ""),
    (".lokr_t2", "lokr", "t2", ""),
    (".alpha", None, "alpha", ""),
    (".dora_scale", None, "dora_scale", ""),  # LyCORIS / kohya DoRA magnitude
    (".lora_magnitude_vector", None, "magnitude", "peft"),  # PEFT DoRA magnitude, always per output
)

# Older diffusers spellings, rewritten to ``<module>.lora.{up,down}.weight`` before splitting.
KEY_REWRITES: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (re.compile(r"\.processor\.to_out_lora\.(up|down)\.weight$"), r".to_out.0.lora.\1.weight", "diffusers-old-processor"),
    (re.compile(r"\.processor\.to_([qkv])_lora\.(up|down)\.weight$"), r".to_\1.lora.\2.weight", "diffusers-old-processor"),
    (re.compile(r"\.self_attn\.to_out_lora\.(up|down)\.weight$"), r".self_attn.out_proj.lora.\1.weight", "diffusers-old-processor"),
    (re.compile(r"\.self_attn\.to_([qkv])_lora\.(up|down)\.weight$"), r".self_attn.\1_proj.lora.\2.weight", "diffusers-old-processor"),
    (re.compile(r"\.lora_linear_layer\.(up|down)\.weight$"), r".lora.\1.weight", ""),
)

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
# Checked in order; the bare prefix comes last and tries both components.
DOTTED_PREFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("unet.", ("unet",)),
    ("text_encoder.", ("text_encoder",)),
    ("base_model.model.", ("unet", "text_encoder")),
    ("", ("unet", "text_encoder")),
)
TEXT_MODEL = "text_model."

# Most specific format first; a file with none of these is "diffusers".
FORMAT_PRIORITY = ("kohya-ldm", "kohya", "diffusers-old-processor", "peft")

# Hints for keys that name modules an SD1.5 base does not have.
OTHER_MODEL_HINTS = {
    "lora_te2_": "SDXL (its second text encoder)",
    "text_encoder_2.": "SDXL (its second text encoder)",
    "lora_transformer_": "a transformer (DiT) model such as Flux or SD3",
    "transformer.": "a transformer (DiT) model such as Flux or SD3",
}
# Hints for keys that are adapter parts loramgr does not apply, by suffix.
UNSUPPORTED_PARTS = {
    ".oft_blocks": "OFT", ".oft_diag": "OFT", ".oft_R": "OFT", ".on_input": "(IA)^3",
    ".a1.weight": "GLoRA", ".a2.weight": "GLoRA", ".b1.weight": "GLoRA", ".b2.weight": "GLoRA",
    ".diff": "LyCORIS full weight diff", ".diff_b": "LyCORIS full bias diff",
    ".w_norm": "LyCORIS norm", ".b_norm": "LyCORIS norm", ".lora_up.bias": "LoRA bias",
    ".lora_B.bias": "LoRA bias", ".lora.up.bias": "LoRA bias",
}
# Widths that betray another model family when a shape does not fit.
OTHER_WIDTHS = {1024: "SD 2.x (cross-attention width 1024)", 2048: "SDXL (cross-attention width 2048)"}

# cloneofsimo/lora replaces every nn.Linear below modules of its target classes, in
# ``model.modules()`` order. Module names relative to a transformer block / encoder layer:
CLONEOFSIMO_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CLONEOFSIMO_UNET_TARGETS = {"CrossAttention": "attention", "Attention": "attention", "GEGLU": "ff"}
CLONEOFSIMO_FF = ("ff.net.0.proj",)  # GEGLU's only Linear
# diffusers declared BasicTransformerBlock's ``ff`` between the two attentions in the
# versions cloneofsimo/lora was written for, and after them later: both orders exist.
CLONEOFSIMO_BLOCK_ORDERS = (("attn1", "ff", "attn2"), ("attn1", "attn2", "ff"))
CLONEOFSIMO_TEXT_TARGETS = {
    "CLIPAttention": ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj"),
    "CLIPMLP": ("mlp.fc1", "mlp.fc2"),
}
# UNet blocks in the order diffusers registers them (mid_block is assigned last).
UNET_BLOCK_ORDER = ("down_blocks", "up_blocks", "mid_block")


@dataclass(frozen=True)
class KeyName:
    """A key split into its module name (as the file spells it) and its part."""

    module: str
    kind: str | None
    part: str
    style: str


@dataclass(frozen=True)
class Resolved:
    """A file module name resolved in the base: ``module`` is the base path (no ``.weight``)."""

    module: str
    component: str  # "unet" | "text_encoder"
    local: str  # the name inside its component, as the file spells it (PEFT patterns match it)
    style: str  # "kohya" | "kohya-ldm" | ""


def split_key(key: str) -> KeyName | None:
    """``…attn1.to_q.lora_A.weight`` -> module ``…attn1.to_q``, part ``down``; None if no part fits."""
    name, style = key, ""
    for pattern, replacement, rewrite_style in KEY_REWRITES:
        rewritten = pattern.sub(replacement, key)
        if rewritten != key:
            name, style = rewritten, rewrite_style
            break
    for suffix, kind, part, suffix_style in PART_SUFFIXES:
        if name.endswith(suffix):
            return KeyName(name[: -len(suffix)], kind, part, style or suffix_style)
    return None


def canonical_text_path(path: str) -> str:
    """Text-encoder module path with the ``text_model.`` level, whatever transformers version named it."""
    return path if path.startswith(TEXT_MODEL) else TEXT_MODEL + path


class ModuleIndex:
    """Every spelling of the base's weight-carrying modules, built from its parameter table."""

    def __init__(self, params: Mapping[str, tuple[int, ...]]):
        self.shapes = {name: tuple(shape) for name, shape in params.items()}
        modules = [name.removesuffix(".weight") for name in params if name.endswith(".weight")]
        self.components: dict[str, dict[str, str]] = {"unet": {}, "text_encoder": {}}
        for module in modules:
            if module.startswith("unet."):
                self.components["unet"][module.removeprefix("unet.")] = module
            elif not module.startswith("controlnet."):
                self.components["text_encoder"][canonical_text_path(module)] = module
        self._kohya = {c: {path.replace(".", "_"): m for path, m in table.items()} for c, table in self.components.items()}
        self._kohya_ldm = {}
        for path, module in self.components["unet"].items():
            ldm = diffusers_unet_module_to_ldm(path)
            if ldm is not None:
                self._kohya_ldm[ldm.replace(".", "_")] = module

    def resolve(self, name: str) -> Resolved | None:
        """The base module a file's module name denotes, or None if the base has no such module."""
        for prefix, component in KOHYA_PREFIXES.items():
            if name.startswith(prefix):
                local = name.removeprefix(prefix)
                if local in self._kohya[component]:
                    return Resolved(self._kohya[component][local], component, local, "kohya")
                if component == "unet" and local in self._kohya_ldm:
                    return Resolved(self._kohya_ldm[local], component, local, "kohya-ldm")
                return None
        for prefix, components in DOTTED_PREFIXES:
            if name.startswith(prefix):
                local = name.removeprefix(prefix)
                for component in components:
                    path = canonical_text_path(local) if component == "text_encoder" else local
                    if path in self.components[component]:
                        return Resolved(self.components[component][path], component, local, "")
                return None
        return None


def unknown_part_hint(key: str) -> str | None:
    """What a key loramgr does not apply most likely is (OFT, IA3, a bias…), if recognizable."""
    return next((what for suffix, what in UNSUPPORTED_PARTS.items() if key.endswith(suffix)), None)


def other_model_hint(key: str) -> str | None:
    """The model family a key's module name belongs to, when it is clearly not SD1.5."""
    return next((what for prefix, what in OTHER_MODEL_HINTS.items() if key.startswith(prefix)), None)


def other_width_hint(expected: tuple[int, ...], got: tuple[int, ...]) -> str | None:
    """The model family a mismatching shape betrays (SD 2.x, SDXL), if its widths say so."""
    return next((what for width, what in OTHER_WIDTHS.items() if width in got and width not in expected), None)
