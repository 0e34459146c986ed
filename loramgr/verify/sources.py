"""The reference's own reading of an adapter's source file, independent of ``loramgr.formats``.

Verification is only worth something if the reference does not share loramgr's bugs,
so the file the user converted is read again without any of the formats layer: key
spellings are matched against tables written here from the published formats
(docs/verify.md lists them), and module names are resolved by :mod:`.names` against the
*source torch model's* module tree, not against the base's weight map. What comes out
is deliberately raw: the file's factors as they are, plus the scale the format defines;
:mod:`.formulas` turns them into weights.
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
from .names import KOHYA_PREFIXES, TEXT, UNET, Namespace, Resolver, cloneofsimo_orders


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
# Textual-inversion embeddings a LoRA file bundles (docs/verify.md, "Embeddings"): kohya / A1111
# ``bundle_emb.<NAME>.<part>`` (A1111 cuts the name at the first dot), cloneofsimo's ``<token>`` keys
# that the metadata marks ``<embed>``.
BUNDLED_KEY = re.compile(r"^bundle_emb\.(?P<name>[^.]+)\.(?P<part>.+)$")
CLONEOFSIMO_EMBED = "<embed>"
OLD_PROCESSOR = re.compile(r"^(?P<attention>.+?)\.(?:processor\.)?to_(?P<proj>q|k|v|out)_lora\.(?P<part>up|down)\.weight$")
CLONEOFSIMO_KEY = re.compile(r"^(?P<component>unet|text_encoder):(?P<index>\d+):(?P<part>up|down)$")


class SourceError(LoramgrError):
    """The reference cannot read an adapter's source file (it then verifies nothing)."""


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
class BundledEmbedding:
    """A textual-inversion embedding a LoRA file bundles, as the state dict diffusers' loader takes."""

    trigger: str
    spelling: str  # "bundle_emb" (kohya / A1111) | "cloneofsimo token"
    state_dict: dict  # A1111 ``{"string_to_param": {"*": v}, "name"}`` or one tensor ``{key: v}``
    keys: list[str]  # the file's keys it is made of


@dataclass
class SourceAdapter:
    path: Path
    spelling: str  # kohya | kohya-ldm | peft | diffusers | old-processor | old-processor-bare | cloneofsimo
    modules: dict[str, SourceModule]  # by namespace module path
    ignored: list[str] = field(default_factory=list)  # keys no module's change uses
    embeddings: dict[str, BundledEmbedding] = field(default_factory=dict)  # by trigger


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
    embeddings = bundled_embeddings(tensors, metadata)
    tensors = without_embeddings(tensors, embeddings)
    if tensors and all(CLONEOFSIMO_KEY.match(k) for k in tensors):
        return _cloneofsimo(Path(path), tensors, metadata, namespace, embeddings)
    groups: dict[str, dict[str, tuple[str | None, str, torch.Tensor]]] = {}
    spellings, ignored = set(), []
    resolver = Resolver(namespace)
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
    return SourceAdapter(Path(path), _spelling(spellings), modules, sorted(ignored), embeddings)


def bundled_embeddings(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, BundledEmbedding]:
    """The embeddings a LoRA file bundles, by trigger, each as the state dict of the file layout it stands for.

    kohya / A1111 ``bundle_emb.NAME.string_to_param.<term>`` is A1111's ``.pt`` layout, any other
    ``bundle_emb.NAME.<part>`` (kohya's ``emb_params``) a file of that one tensor; a NAME of other
    tensors goes to diffusers as it is (it refuses it, and the report says so).
    """
    groups: dict[str, dict[str, str]] = {}
    for key in tensors:
        if match := BUNDLED_KEY.match(key):
            groups.setdefault(match["name"], {})[match["part"]] = key
    found = {}
    for name, parts in groups.items():
        terms = [key for part, key in parts.items() if part.startswith("string_to_param.")]
        if len(terms) == 1:  # A1111's create_embedding_from_data takes string_to_param's one term
            state = {"string_to_param": {"*": tensors[terms[0]]}, "name": name}
        else:
            state = {part: tensors[key] for part, key in parts.items()}
        found[name] = BundledEmbedding(name, "bundle_emb", state, sorted(parts.values()))
    for key, value in metadata.items():
        if value == CLONEOFSIMO_EMBED and key in tensors:
            found[key] = BundledEmbedding(key, "cloneofsimo token", {key: tensors[key]}, [key])
    return found


def without_embeddings(tensors: Mapping[str, torch.Tensor], embeddings: Mapping[str, BundledEmbedding]
                       ) -> dict[str, torch.Tensor]:
    """``tensors`` less the keys of bundled ``embeddings``: what the LoRA's modules are made of."""
    taken = {key for e in embeddings.values() for key in e.keys}
    return {k: v for k, v in tensors.items() if k not in taken}


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


REQUIRED = {  # factor sets that make a whole change, per kind
    "lora": ({"up", "down"},),
    "loha": ({"w1_a", "w1_b", "w2_a", "w2_b"},),
    "lokr": ({"w1", "w2"}, {"w1_a", "w1_b", "w2"}, {"w1", "w2_a", "w2_b"}, {"w1_a", "w1_b", "w2_a", "w2_b"}),
}


def _module(module: str, parts: dict[str, tuple[str | None, str, torch.Tensor]], shape: tuple[int, ...],
            peft: dict[str | None, dict]) -> SourceModule | None:
    """One module's change, or None when its keys do not make a whole one (they are then ignored)."""
    kinds = {kind for kind, _, _ in parts.values() if kind is not None}
    named = {part: tensor for _, part, tensor in parts.values()}
    if len(kinds) != 1 or len(named) != len(parts) or ("alpha" in named and named["alpha"].numel() != 1):
        return None
    (kind,) = kinds
    factors = {part: tensor for k, part, tensor in parts.values() if k == kind}
    if not any(need <= set(factors) for need in REQUIRED[kind]):
        return None
    alpha = float(named["alpha"]) if "alpha" in named else None
    rank = _rank(kind, factors)
    peft_scale = _peft_scale(peft, module, rank) if kind == "lora" and alpha is None else None
    scale = peft_scale if peft_scale is not None else (alpha / rank if alpha and rank else 1.0)  # kohya: no alpha = rank
    dora = "lycoris" if "dora_scale" in named else "peft" if "magnitude" in named else None
    magnitude = named.get("dora_scale", named.get("magnitude"))
    return SourceModule(module, kind, factors, scale, alpha, dora, magnitude)


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


def _cloneofsimo(path: Path, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str],
                 namespace: Namespace, embeddings: dict[str, BundledEmbedding]) -> SourceAdapter:
    """cloneofsimo/lora (``unet:<n>:up``): modules by position; exactly one candidate order must fit every shape."""
    modules = {}
    for component, prefix in (("unet", UNET), ("text_encoder", TEXT)):
        indices = {int(m["index"]) for k in tensors if (m := CLONEOFSIMO_KEY.match(k)) and m["component"] == component}
        if not indices:
            continue
        if component not in metadata:
            raise SourceError(f"{path}: cloneofsimo file without the {component!r} metadata (its target classes)")
        targets = set(json.loads(metadata[component]))
        fitting = [order for order in cloneofsimo_orders(namespace, prefix, targets)
                   if len(order) == len(indices) and all(_fits(tensors, component, i, namespace.shapes[m])
                                                          for i, m in enumerate(order))]
        if len(fitting) != 1:
            raise SourceError(f"{path}: {len(fitting)} module orders of the base fit the {len(indices)} cloneofsimo "
                              f"{component} modules (targets {sorted(targets)}); exactly one must")
        for i, module in enumerate(fitting[0]):
            factors = {"up": tensors[f"{component}:{i}:up"], "down": tensors[f"{component}:{i}:down"]}
            modules[module] = SourceModule(module, "lora", factors, 1.0)
    return SourceAdapter(path, "cloneofsimo", modules, embeddings=embeddings)


def _fits(tensors: Mapping[str, torch.Tensor], component: str, index: int, shape: tuple[int, ...]) -> bool:
    up, down = tensors.get(f"{component}:{index}:up"), tensors.get(f"{component}:{index}:down")
    return (up is not None and down is not None and len(shape) == 2
            and tuple(up.shape) == (shape[0], down.shape[0]) and tuple(down.shape) == (down.shape[0], shape[1]))
