"""Synthetic adapter files for tests/test_formats.py, each written in one format's own spelling.

These writers are deliberately naive (string formatting, no lookup tables) so they stay
independent of the name resolution in ``loramgr.formats`` that they test.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def base_namespace(components: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The base namespace loramgr uses: ``unet.*``, ``controlnet.*``, ``text_model.*`` (see conftest)."""
    weights = {}
    for prefix, name in (("unet.", "unet"), ("controlnet.", "controlnet"), ("text_model.", "text_encoder")):
        weights.update({prefix + n: p.detach() for n, p in components[name].named_parameters()})
    return weights


def kohya_name(component: str, module: str) -> str:
    """``("unet", "down_blocks.0.x")`` -> ``lora_unet_down_blocks_0_x``; text modules get ``text_model_``."""
    if component == "text_encoder" and not module.startswith("text_model."):
        module = "text_model." + module
    return KOHYA_PREFIX[component] + module.replace(".", "_")


def save(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=dict(metadata or {}))
    return path


def lora_factors(gen: torch.Generator, shape: tuple[int, ...], rank: int, std: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya-layout (up, down): linear [out, r] / [r, in]; conv [out, r, 1, 1] / [r, in, kh, kw]."""
    out, fan_in, *kernel = shape
    up = std * torch.randn(out, rank, *(1,) * len(kernel), generator=gen)
    down = std * torch.randn(rank, fan_in, *kernel, generator=gen)
    return up, down


def cloneofsimo_walk(model: torch.nn.Module, targets: set[str]) -> list[str]:
    """cloneofsimo's ``_find_modules_v2`` order: every Linear below a module of a target class."""
    names = []
    for ancestor_name, ancestor in model.named_modules():
        if type(ancestor).__name__ in targets:
            names += [f"{ancestor_name}.{n}" for n, m in ancestor.named_modules() if isinstance(m, torch.nn.Linear)]
    return names


def cloneofsimo_file(path: Path, component: str, targets: list[str], factors: list[tuple[torch.Tensor, torch.Tensor]],
                     embeddings: Mapping[str, torch.Tensor] | None = None) -> Path:
    """``save_safeloras_with_embeds`` layout: ``<component>:<i>:up/down``, targets and ranks in metadata."""
    embeddings = dict(embeddings or {})
    tensors, metadata = embeddings, {component: json.dumps(targets), **{token: "<embed>" for token in embeddings}}
    for i, (up, down) in enumerate(factors):
        tensors[f"{component}:{i}:up"], tensors[f"{component}:{i}:down"] = up, down
        metadata[f"{component}:{i}:rank"] = str(down.shape[0])
    return save(path, tensors, metadata)


def peft_layers(model: torch.nn.Module, config) -> dict[str, torch.nn.Module]:
    """Inject a PEFT adapter (LoRA, LoHa, LoKr) and return its layers by module name."""
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    inject_adapter_in_model(config, model)
    return {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def peft_factors(layer: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A LyCORIS layer's factors (``hada_*`` / ``lokr_*``) as PEFT holds them, adapter ``default``."""
    return {name: getattr(layer, name)["default"].detach().clone()
            for name in dir(layer) if name.startswith(prefix) and isinstance(getattr(layer, name), torch.nn.ParameterDict)
            and "default" in getattr(layer, name)}


def lycoris_file(path: Path, layers: dict, part_prefix: str, alpha: float) -> Path:
    """PEFT LoHa/LoKr factors under kohya UNet names, as LyCORIS saves them."""
    tensors = {}
    for module, layer in layers.items():
        name = kohya_name("unet", module)
        tensors |= {f"{name}.{k}": v for k, v in peft_factors(layer, part_prefix).items()}
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return save(path, tensors)


# ---------------------------------------------------------------- textual-inversion embeddings

def a1111_embedding(path: Path, vectors: torch.Tensor, *, step: int | None = 1000, checkpoint: str | None = "abc123",
                    checkpoint_name: str | None = "base-v1") -> Path:
    """A1111's ``Embedding.save``: ``string_to_param {"*": [n, D]}`` and the training record, pickled."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem, "step": step,
                "sd_checkpoint": checkpoint, "sd_checkpoint_name": checkpoint_name}, path)
    return path


def a1111_embedding_needing_code(path: Path, vectors: torch.Tensor) -> Path:
    """An A1111 file of torch 1.11 days: ``string_to_param`` pickled as an ``nn.ParameterDict`` module."""
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors)})
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params, "name": path.stem, "step": 10}, path)
    return path


def diffusers_embedding(path: Path, token: str, vector: torch.Tensor) -> Path:
    """diffusers' textual-inversion training output, ``{token: [D]}``: ``.bin`` pickled, else safetensors."""
    if path.suffix == ".bin":
        torch.save({token: vector}, path)
        return path
    return save(path, {token: vector})


def kohya_embedding(path: Path, vectors: torch.Tensor) -> Path:
    """kohya's ``train_textual_inversion.py`` output: ``{"emb_params": [n, D]}``."""
    return save(path, {"emb_params": vectors})


def sdxl_embedding(path: Path, vectors_l: torch.Tensor, vectors_g: torch.Tensor) -> Path:
    return save(path, {"clip_l": vectors_l, "clip_g": vectors_g})


def bundle_embeddings(lora: Mapping[str, torch.Tensor], a1111: Mapping[str, torch.Tensor] | None = None,
                      kohya: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A LoRA's tensors plus bundled embeddings as kohya's ``networks/lora.py`` / A1111 spell them."""
    tensors = dict(lora)
    tensors |= {f"bundle_emb.{name}.string_to_param.*": v for name, v in (a1111 or {}).items()}
    tensors |= {f"bundle_emb.{name}.emb_params": v for name, v in (kohya or {}).items()}
    return tensors
