"""Sample adapters and a sample image that loramgr synthesizes for the demo and tests.

No real SD1.5 LoRA or ControlNet can be downloaded where loramgr is built, so the demo
writes its own in the formats users bring: kohya-named ``.safetensors`` LoRAs (plain
LoRA and LoCon with 3x3 convs, both with ``.alpha`` and text-encoder modules) and a
diffusers ``ControlNetModel`` of the base's architecture with other random weights.
They are named after the seed's examples (blindbox, moxin, hed).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .workspace import atomic_path

# Modules a kohya LoRA trains in SD1.5 (sd-scripts' UNET_TARGET_REPLACE_MODULE: Transformer2DModel).
_ATTENTION_PARTS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                    "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
_TEXT_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
# LoCon adds the ResNet convs (sd-scripts' UNET_TARGET_REPLACE_MODULE_CONV2D_3X3).
_CONV_PARTS = ("conv1", "conv2")


def _targets(param_shapes: Mapping[str, tuple[int, ...]], locon: bool) -> list[tuple[str, tuple[int, ...]]]:
    chosen = []
    for param, shape in param_shapes.items():
        if not param.endswith(".weight") or param.startswith("controlnet."):
            continue
        module = param.removesuffix(".weight")
        if module.startswith("unet.") and module.endswith(_ATTENTION_PARTS) and "attentions" in module:
            chosen.append((module, shape))
        elif module.startswith("text_model.") and module.endswith(_TEXT_PARTS):
            chosen.append((module, shape))
        elif locon and module.startswith("unet.") and "resnets" in module and module.endswith(_CONV_PARTS):
            chosen.append((module, shape))
    return chosen


def kohya_key(module: str) -> str:
    """``unet.down_blocks.0...to_q`` -> ``lora_unet_down_blocks_0_..._to_q`` (kohya's naming)."""
    if module.startswith("unet."):
        return "lora_unet_" + module.removeprefix("unet.").replace(".", "_")
    return "lora_te_" + module.replace(".", "_")


def write_kohya_lora(path: Path, param_shapes: Mapping[str, tuple[int, ...]], *, seed: int, rank: int = 4,
                     alpha: float = 2.0, locon: bool = False, dtype: torch.dtype = torch.float16,
                     strength: float = 1.0, trigger: str | None = None) -> Path:
    """Write a kohya-format LoRA (or LoCon) for the base described by ``param_shapes``.

    Factors are drawn so that ``scale * up @ down`` has roughly ``strength`` times the
    std of the tiny model's weights: enough to change an image clearly at weight 0.5.
    """
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module, shape in _targets(param_shapes, locon):
        out_features, fan_in = shape[0], int(np.prod(shape[1:]))
        key = kohya_key(module)
        down = torch.randn(rank, *shape[1:], generator=gen) / fan_in ** 0.25
        up = torch.randn(out_features, rank, *([1] * (len(shape) - 2)), generator=gen)
        up *= strength * 0.1 * rank / alpha / (rank * fan_in ** 0.5) ** 0.5
        tensors[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
        tensors[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
    metadata = {"ss_network_module": "lycoris.kohya" if locon else "networks.lora", "ss_network_dim": str(rank),
                "ss_network_alpha": str(alpha)}
    if trigger:
        import json

        metadata["ss_tag_frequency"] = json.dumps({"1_" + trigger: {trigger: 10, "solo": 4}})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def write_controlnet(folder: Path, controlnet_config: dict, *, seed: int) -> Path:
    """Write a diffusers ``ControlNetModel`` folder of the given architecture with random weights."""
    from diffusers import ControlNetModel

    from .models.architectures import randomize_

    model = ControlNetModel(**{k: v for k, v in controlnet_config.items() if not k.startswith("_")})
    randomize_({"controlnet": model}, seed)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def sample_image(size: int = 192) -> np.ndarray:
    """An RGB test picture with clear edges: a sun, a house and a horizon (deterministic)."""
    import cv2

    image = np.full((size, size, 3), (135, 190, 235), np.uint8)
    s = size / 192
    cv2.rectangle(image, (0, int(130 * s)), (size, size), (70, 140, 60), -1)
    cv2.circle(image, (int(150 * s), int(40 * s)), int(22 * s), (250, 220, 60), -1)
    cv2.rectangle(image, (int(40 * s), int(85 * s)), (int(110 * s), int(150 * s)), (180, 80, 60), -1)
    pts = np.array([[int(30 * s), int(88 * s)], [int(75 * s), int(50 * s)], [int(120 * s), int(88 * s)]], np.int32)
    cv2.fillPoly(image, [pts], (120, 50, 40))
    cv2.rectangle(image, (int(65 * s), int(115 * s)), (int(85 * s), int(150 * s)), (60, 40, 30), -1)
    return image
