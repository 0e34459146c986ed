"""The reference's name resolution: adapter module names -> the source model's modules.

Written apart from ``loramgr.formats.names`` on purpose: tables here come from
docs/verify.md (what the reference reads) and the formats' own projects, and every lookup is against the
module tree of the torch model the reference merges into (:class:`Namespace`), so a
name loramgr resolves wrongly shows up as a mismatch instead of being agreed with.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

UNET, TEXT = "unet.", "text_model."  # the base namespace: UNet weights, text-encoder weights
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text", "lora_te1_": "text"}
DOTTED_PREFIXES = (("unet.", ("unet",)), ("text_encoder.", ("text",)), ("base_model.model.", ("unet", "text")),
                   ("", ("unet", "text")))
# SD1.5's LDM (original checkpoint) block names (docs/lora-format.md, docs/verify.md: LDM block names).
LDM_RESNET_PARTS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                    "conv_shortcut": "skip_connection"}
LDM_FIXED = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2"}
CLONEOFSIMO_FF_FIRST = ("attn1", "ff", "attn2")  # BasicTransformerBlock's child order in diffusers < 0.12


@dataclass(frozen=True)
class Namespace:
    """The source model's weight-carrying modules, in the base namespace (``unet.…``, ``text_model.…``).

    ``order`` lists every module as ``(path, class name, is nn.Linear)`` in ``named_modules``
    order: cloneofsimo files address modules only by their position in that walk.
    """

    shapes: dict[str, tuple[int, ...]]  # module path -> weight shape, weights with 2 or more dims
    order: tuple[tuple[str, str, bool], ...]

    @classmethod
    def of(cls, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> "Namespace":
        """Built from torch modules; ``meta``-device modules work (only names, classes and shapes are read)."""
        shapes, order = {}, []
        for prefix, model in ((UNET, unet), (TEXT, text_encoder)):
            for name, module in model.named_modules():
                order.append((prefix + name, type(module).__name__, isinstance(module, torch.nn.Linear)))
                weight = getattr(module, "weight", None)
                if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
                    shapes[prefix + name] = tuple(weight.shape)
        return cls(shapes, tuple(order))

    def component(self, prefix: str) -> dict[str, str]:
        """Module path inside a component (``down_blocks.0…``, ``encoder.layers.0…``) -> namespace path."""
        return {path.removeprefix(prefix): path for path in self.shapes if path.startswith(prefix)}


class Resolver:
    """Module names as files spell them -> namespace module paths (never guessing dots from underscores)."""

    def __init__(self, namespace: Namespace):
        self.unet = namespace.component(UNET)
        self.text = namespace.component(TEXT)
        self.kohya = {
            "unet": {p.replace(".", "_"): m for p, m in self.unet.items()},
            # kohya spells text modules with CLIP's ``text_model.`` level, whatever transformers names them
            "text": {_with_text_model(p).replace(".", "_"): m for p, m in self.text.items()},
        }
        self.ldm = {ldm.replace(".", "_"): m for p, m in self.unet.items() if (ldm := ldm_module(p, self.unet))}

    def resolve(self, name: str) -> tuple[str, str] | None:
        """(namespace module, ``"kohya-ldm"`` for LDM block names else ``""``), or None if no module has the name."""
        for prefix, component in KOHYA_PREFIXES.items():
            if name.startswith(prefix):
                local = name.removeprefix(prefix)
                if local in self.kohya[component]:
                    return self.kohya[component][local], ""
                if component == "unet" and local in self.ldm:
                    return self.ldm[local], "kohya-ldm"
                return None
        for prefix, components in DOTTED_PREFIXES:
            if name.startswith(prefix):
                local = name.removeprefix(prefix)
                for component in components:
                    if component == "unet" and local in self.unet:
                        return self.unet[local], ""
                    if component == "text":
                        for spelled in (local, local.removeprefix("text_model.")):
                            if spelled in self.text:
                                return self.text[spelled], ""
                return None
        return None


def _with_text_model(path: str) -> str:
    return path if path.startswith("text_model.") else "text_model." + path


def ldm_module(path: str, unet: Mapping[str, str]) -> str | None:
    """The SD1.5 LDM name of a diffusers UNet module (``down_blocks.1.resnets.0.conv1`` -> ``input_blocks.4.0.in_layers.2``)."""
    if path in LDM_FIXED:
        return LDM_FIXED[path]
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if m:
        i, j = int(m[2]), int(m[4])
        block = f"input_blocks.{3 * i + j + 1}" if m[1] == "down_blocks" else f"output_blocks.{3 * i + j}"
        return _ldm_layer(block, m[3], m[5], middle=False)
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if m:
        index = 1 if m[1] == "attentions" else 2 * int(m[2])
        return _ldm_layer(f"middle_block.{index}", m[1], m[3], middle=True)
    m = re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv$", path)
    if m:
        return f"input_blocks.{3 * (int(m[1]) + 1)}.0.op"
    m = re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv$", path)
    if m:
        i = int(m[1])
        has_attention = any(p.startswith(f"up_blocks.{i}.attentions.") for p in unet)
        return f"output_blocks.{3 * i + 2}.{2 if has_attention else 1}.conv"
    return None


def _ldm_layer(block: str, kind: str, rest: str, middle: bool) -> str | None:
    """An LDM block holds ``[resnet, attention]`` at ``.0`` / ``.1``; the middle block's parts are numbered alone."""
    if kind == "attentions":
        return f"{block}.{rest}" if middle else f"{block}.1.{rest}"
    part = LDM_RESNET_PARTS.get(rest)
    if part is None:
        return None
    return f"{block}.{part}" if middle else f"{block}.0.{part}"


def cloneofsimo_orders(namespace: Namespace, prefix: str, targets: set[str]) -> list[list[str]]:
    """The module orders a cloneofsimo file of ``targets`` (class names) may use: today's walk, and the
    walk over diffusers < 0.12, which declared each transformer block's ``ff`` before ``attn2``."""
    walked: list[str] = []  # cloneofsimo's ``_find_modules_v2``: each nn.Linear below a target class
    for path, class_name, _ in namespace.order:
        if path.startswith(prefix) and class_name in targets:
            walked += [p for p, _, linear in namespace.order if linear and p.startswith(path + ".") and p not in walked]
    groups: dict[str, list[tuple[int, int, str]]] = {}  # block (or lone module) -> (child rank, position, path)
    for position, path in enumerate(walked):
        m = re.match(r"^(.*\.transformer_blocks\.\d+)\.(attn1|attn2|ff)\.", path)
        block, rank = (m[1], CLONEOFSIMO_FF_FIRST.index(m[2])) if m else (path, 0)
        groups.setdefault(block, []).append((rank, position, path))
    old = [path for members in groups.values() for _, _, path in sorted(members)]
    return [walked] if old == walked else [walked, old]
