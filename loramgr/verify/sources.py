"""The reference's own reading of an adapter's source file, independent of ``loramgr.formats``.

Verification is only worth something if the reference does not share loramgr's bugs,
so this module re-reads the file the user converted without any of the formats layer:
key spellings are matched against tables written here from the published formats
(REFERENCE.md section 2), and module names are resolved against the *source torch
model's* own module tree (:class:`Namespace`), not against the base's weight map.
What it produces is deliberately raw: the file's factors as they are, plus the scale
the format defines; :mod:`.formulas` turns them into weights.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LoramgrError

UNET, TEXT = "unet.", "text_model."  # the base namespace: UNet weights, text-encoder weights

# Key suffix -> (kind, part); kind None: a part every kind may carry.
SUFFIXES: tuple[tuple[str, str | None, str], ...] = (
    (".lora_up.weight", "lora", "up"), (".lora_down.weight", "lora", "down"), (".lora_mid.weight", "lora", "mid"),
    (".lora.up.weight", "lora", "up"), (".lora.down.weight", "lora", "down"),
    (".lora_linear_layer.up.weight", "lora", "up"), (".lora_linear_layer.down.weight", "lora", "down"),
    (".lora_B.weight", "lora", "up"), (".lora_A.weight", "lora", "down"),
    (".hada_w1_a", "loha", "w1_a"), (".hada_w1_b", "loha", "w1_b"), (".hada_w2_a", "loha", "w2_a"),
    (".hada_w2_b", "loha", "w2_b"), (".hada_t1", "loha", "t1"), (".hada_t2", "loha", "t2"),
    (".lokr_w1", "lokr", "w1"), (".lokr_w1_a", "lokr", "w1_a"), (".lokr_w1_b", "lokr", "w1_b"),
    (".lokr_w2", "lokr", "w2"), (".lokr_w2_a", "lokr", "w2_a"), (".lokr_w2_b", "lokr", "w2_b"), (".lokr_t2", "lokr", "t2"),
    (".alpha", None, "alpha"), (".dora_scale", None, "dora_scale"), (".lora_magnitude_vector", None, "magnitude"),
)
# diffusers' attention-processor LoRA (before PEFT): ``<attention>.processor.to_q_lora.down.weight``.
OLD_PROCESSOR = re.compile(r"^(?P<attention>.+?)\.(?:processor\.)?to_(?P<proj>q|k|v|out)_lora\.(?P<part>up|down)\.weight$")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text", "lora_te1_": "text"}
DOTTED_PREFIXES = (("unet.", ("unet",)), ("text_encoder.", ("text",)), ("base_model.model.", ("unet", "text")),
                   ("", ("unet", "text")))
CLONEOFSIMO_KEY = re.compile(r"^(?P<component>unet|text_encoder):(?P<index>\d+):(?P<part>up|down)$")
# SD1.5's LDM (original checkpoint) names, from the block layout in REFERENCE.md section 2.
LDM_RESNET_PARTS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                    "conv_shortcut": "skip_connection"}
LDM_FIXED = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2"}


class SourceError(LoramgrError):
    """The reference cannot read an adapter's source file (it then verifies nothing)."""


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


@dataclass
class SourceModule:
    """One module's change as the source file states it."""

    module: str  # namespace module path; the weight is ``module + ".weight"``
    kind: str  # "lora" | "loha" | "lokr"
    factors: dict[str, torch.Tensor]  # part name -> tensor, as in the file
    scale: float  # what the format multiplies the product of the factors by, at multiplier 1
    alpha: float | None = None  # the file's own alpha key, if any
    dora: str | None = None  # "lycoris" (dora_scale) | "peft" (lora_magnitude_vector)
    magnitude: torch.Tensor | None = None

    @property
    def param(self) -> str:
        return self.module + ".weight"


@dataclass
class SourceAdapter:
    path: Path
    spelling: str  # kohya | kohya-ldm | peft | diffusers | old-processor | old-processor-bare | cloneofsimo
    modules: dict[str, SourceModule]  # by namespace module path
    keys_total: int
    ignored: list[str] = field(default_factory=list)  # keys no module's change uses


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict | None]:
    """(tensors, safetensors metadata, PEFT ``adapter_config.json``) of a file or adapter folder."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    config = None
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            config = json.loads((path / "adapter_config.json").read_text())
        weights = [path / n for n in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors",
                                      "adapter_model.bin", "pytorch_lora_weights.bin") if (path / n).is_file()]
        if not weights:
            raise SourceError(f"{path}: no adapter_model / pytorch_lora_weights file in the folder")
        path = weights[0]
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata, config
    state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, {}, config


def read_source(path: str | Path, namespace: Namespace) -> SourceAdapter:
    """Every module the file changes, resolved in ``namespace``; a key naming no module is an error."""
    tensors, metadata, config = read_tensors(Path(path))
    if tensors and all(CLONEOFSIMO_KEY.match(k) for k in tensors):
        return _cloneofsimo(Path(path), tensors, metadata, namespace)
    groups: dict[str, dict[str, tuple[str | None, str, torch.Tensor]]] = {}
    spellings, ignored = set(), []
    resolver = _Resolver(namespace)
    for key, tensor in tensors.items():
        split = _split(key)
        if split is None:
            ignored.append(key)
            continue
        name, kind, part, spelling = split
        found = resolver.resolve(name)
        if found is None:
            raise SourceError(f"{path}: key {key} names no module of the base model")
        module, resolved_spelling = found
        spellings.add(resolved_spelling or spelling)
        groups.setdefault(module, {})[key] = (kind, part, tensor)
    peft = _peft_configs(metadata, config)
    modules = {}
    for module, parts in groups.items():
        built = _module(module, parts, namespace.shapes[module], peft)
        if built is None:
            ignored.extend(parts)
        else:
            modules[module] = built
    if not modules:
        raise SourceError(f"{path}: the reference found no LoRA, LoHa or LoKr module in the file")
    return SourceAdapter(Path(path), _spelling(spellings), modules, len(tensors), sorted(ignored))


def _split(key: str) -> tuple[str, str | None, str, str] | None:
    """(module name as spelled, kind, part, spelling) of one key, or None if no known part ends it."""
    old = OLD_PROCESSOR.match(key)
    if old:
        attention, proj = old["attention"], old["proj"]
        if attention.endswith("self_attn"):  # the text encoder's CLIPAttention
            name = f"{attention}.{'out_proj' if proj == 'out' else proj + '_proj'}"
        else:
            name = f"{attention}.{'to_out.0' if proj == 'out' else 'to_' + proj}"
        spelling = "old-processor" if key.startswith(("unet.", "text_encoder.")) else "old-processor-bare"
        return name, "lora", old["part"], spelling
    for suffix, kind, part in SUFFIXES:
        if key.endswith(suffix):
            name = key[: -len(suffix)]
            if name.startswith(tuple(KOHYA_PREFIXES)):
                spelling = "kohya"
            elif suffix.startswith((".lora_A", ".lora_B", ".lora_magnitude")):
                spelling = "peft"
            else:
                spelling = "diffusers"
            return name, kind, part, spelling
    return None


class _Resolver:
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
        i, j, rest = int(m[2]), int(m[4]), m[5]
        block = f"input_blocks.{3 * i + j + 1}" if m[1] == "down_blocks" else f"output_blocks.{3 * i + j}"
        return _ldm_layer(block, m[3], rest)
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if m:
        index = 1 if m[1] == "attentions" else 2 * int(m[2])
        return _ldm_layer(f"middle_block.{index}", m[1], m[3])
    m = re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv$", path)
    if m:
        return f"input_blocks.{3 * (int(m[1]) + 1)}.0.op"
    m = re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv$", path)
    if m:
        i = int(m[1])
        has_attention = any(p.startswith(f"up_blocks.{i}.attentions.") for p in unet)
        return f"output_blocks.{3 * i + 2}.{2 if has_attention else 1}.conv"
    return None


def _ldm_layer(block: str, kind: str, rest: str) -> str | None:
    if kind == "attentions":
        return f"{block}.1.{rest}" if not block.startswith("middle_block") else f"{block}.{rest}"
    part = LDM_RESNET_PARTS.get(rest)
    if part is None:
        return None
    return f"{block}.0.{part}" if not block.startswith("middle_block") else f"{block}.{part}"


def _peft_configs(metadata: Mapping[str, str], config: dict | None) -> dict[str | None, dict]:
    """PEFT LoRA configs by component (``unet`` / ``text_encoder``; None: a folder's one config)."""
    configs: dict[str | None, dict] = {}
    if config is not None:
        configs[None] = config
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        for name, value in json.loads(raw).items():
            component, _, key = name.partition(".")
            configs.setdefault(component, {})[key] = value
    return configs


def _peft_scale(configs: dict[str | None, dict], module: str, rank: int) -> float | None:
    """PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), ``alpha_pattern`` applied; None without a config."""
    component = "unet" if module.startswith(UNET) else "text_encoder"
    config = configs.get(component, configs.get(None))
    if config is None or config.get("lora_alpha") is None:
        return None
    alpha = config["lora_alpha"]
    local = module.removeprefix(UNET).removeprefix(TEXT)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", local):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _module(module: str, parts: dict[str, tuple[str | None, str, torch.Tensor]], shape: tuple[int, ...],
            peft: dict[str | None, dict]) -> SourceModule | None:
    """One module's change, or None when its keys do not make a whole one (they are then ignored)."""
    kinds = {kind for kind, _, _ in parts.values() if kind is not None}
    named = {part: tensor for _, part, tensor in parts.values()}
    if len(kinds) != 1 or len(named) != len(parts):
        return None
    (kind,) = kinds
    factors = {p: t for (k, p, t) in parts.values() if k == kind}
    required = {"lora": ({"up", "down"},), "loha": ({"w1_a", "w1_b", "w2_a", "w2_b"},),
                "lokr": ({"w1", "w2"}, {"w1_a", "w1_b", "w2"}, {"w1", "w2_a", "w2_b"}, {"w1_a", "w1_b", "w2_a", "w2_b"})}
    if not any(need <= set(factors) for need in required[kind]):
        return None
    alpha = float(named["alpha"]) if "alpha" in named else None
    rank = _rank(kind, factors)
    if kind == "lora" and alpha is None and rank is not None:
        scale = _peft_scale(peft, module, rank)
    else:
        scale = None
    if scale is None:
        scale = alpha / rank if alpha and rank else 1.0  # LyCORIS / kohya: a missing or zero alpha is the rank
    if "dora_scale" in named:
        return SourceModule(module, kind, factors, scale, alpha, "lycoris", named["dora_scale"])
    if "magnitude" in named:
        return SourceModule(module, kind, factors, scale, alpha, "peft", named["magnitude"])
    return SourceModule(module, kind, factors, scale, alpha)


def _rank(kind: str, factors: Mapping[str, torch.Tensor]) -> int | None:
    """The rank alpha divides by: LoRA's down rows, LoHa's w1_b rows, LoKr's low-rank factor (None if both full)."""
    if kind == "lora":
        return factors["down"].shape[0]
    if kind == "loha":
        return factors["w1_b"].shape[0]
    for name in ("w2_b", "w1_b"):
        if name in factors:
            return factors[name].shape[0]
    return None


def _spelling(spellings: set[str]) -> str:
    for name in ("kohya-ldm", "old-processor-bare", "old-processor", "kohya", "peft", "diffusers"):
        if name in spellings:
            return name
    return "diffusers"


# cloneofsimo/lora: modules numbered by their position in a walk over the model.

CLONEOFSIMO_FF_FIRST = ("attn1", "ff", "attn2")  # BasicTransformerBlock's child order in old diffusers


def _cloneofsimo(path: Path, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str],
                 namespace: Namespace) -> SourceAdapter:
    modules = {}
    for component, prefix in (("unet", UNET), ("text_encoder", TEXT)):
        indices = {int(m["index"]) for k in tensors if (m := CLONEOFSIMO_KEY.match(k)) and m["component"] == component}
        if not indices:
            continue
        if component not in metadata:
            raise SourceError(f"{path}: cloneofsimo file without the {component!r} metadata (its target classes)")
        targets = set(json.loads(metadata[component]))
        walked = _cloneofsimo_walk(namespace, prefix, targets)
        fitting = [order for order in _unique((walked, _ff_before_attn2(walked)))
                   if len(order) == len(indices) and all(_fits(tensors, component, i, namespace.shapes[m])
                                                          for i, m in enumerate(order))]
        if len(fitting) != 1:
            raise SourceError(f"{path}: {len(fitting)} module orders of the base fit the {len(indices)} cloneofsimo "
                              f"{component} modules (targets {sorted(targets)}); exactly one must")
        for i, module in enumerate(fitting[0]):
            factors = {"up": tensors[f"{component}:{i}:up"], "down": tensors[f"{component}:{i}:down"]}
            modules[module] = SourceModule(module, "lora", factors, 1.0)
    return SourceAdapter(path, "cloneofsimo", modules, len(tensors))


def _cloneofsimo_walk(namespace: Namespace, prefix: str, targets: set[str]) -> list[str]:
    """cloneofsimo's ``_find_modules_v2``: each nn.Linear below a module whose class is a target, in walk order."""
    found: list[str] = []
    for path, class_name, _ in namespace.order:
        if path.startswith(prefix) and class_name in targets:
            found += [p for p, _, linear in namespace.order if linear and p.startswith(path + ".") and p not in found]
    return found


def _ff_before_attn2(order: list[str]) -> list[str]:
    """The same modules with each transformer block's ``ff`` moved before ``attn2`` (diffusers < 0.12's order)."""
    def key(item: tuple[int, str]) -> tuple:
        index, path = item
        m = re.match(r"^(.*\.transformer_blocks\.\d+)\.(attn1|attn2|ff)\.", path)
        return (m[1], CLONEOFSIMO_FF_FIRST.index(m[2])) if m else (path, 0)

    blocks: dict[str, list[tuple[int, str]]] = {}
    for index, path in enumerate(order):
        blocks.setdefault(key((index, path))[0], []).append((index, path))
    return [path for items in blocks.values() for _, path in sorted(items, key=lambda item: (key(item)[1], item[0]))]


def _fits(tensors: Mapping[str, torch.Tensor], component: str, index: int, shape: tuple[int, ...]) -> bool:
    up, down = tensors.get(f"{component}:{index}:up"), tensors.get(f"{component}:{index}:down")
    return (up is not None and down is not None and len(shape) == 2
            and tuple(up.shape) == (shape[0], down.shape[0]) and tuple(down.shape) == (down.shape[0], shape[1]))


def _unique(orders: tuple[list[str], ...]) -> list[list[str]]:
    unique: list[list[str]] = []
    for order in orders:
        if order not in unique:
            unique.append(order)
    return unique
