"""The two architectures loramgr can build by itself: ``tiny`` and ``sd15``.

No model hub is reachable from where loramgr is developed and tested, so loramgr
builds Stable Diffusion 1.5 + ControlNet itself: ``sd15`` is the real architecture
(UNet 860M, ControlNet 361M, CLIP ViT-L text encoder, VAE) with random weights, for
benchmarks (speed does not depend on weight values); ``tiny`` keeps SD1.5's block
topology (4 down blocks of 2 layers, 13 ControlNet residuals, 8x VAE) with few
channels, so every name mapping that works on ``tiny`` works on SD1.5.

Random weights are drawn with a deliberately large standard deviation: diffusers'
default init makes the tiny pipeline output a near-constant grey image, which would
hide bugs; std 0.1 (UNet, ControlNet, text encoder) and 0.3 (VAE) with norm weights
around 1 gives full-range images that react to every input.

The tokenizer written beside them (:mod:`loramgr.models.tokenizer`) is CLIP ViT-L/14's
real one for ``sd15``, and a byte-level one for ``tiny`` (whose 520 embeddings cannot hold
CLIP's ids).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

ARCHITECTURES = ("tiny", "sd15")


@dataclass(frozen=True)
class ArchitectureConfig:
    """diffusers / transformers config dicts for every component."""

    name: str
    unet: dict
    controlnet: dict
    vae: dict
    text_encoder: dict
    vocab_size: int
    scheduler: dict = field(
        default_factory=lambda: {
            "_class_name": "DDIMScheduler",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
            "num_train_timesteps": 1000,
            "prediction_type": "epsilon",
        }
    )


_SD_BLOCKS = {
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "layers_per_block": 2,
}
_UP_BLOCKS = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
_VAE_BLOCKS = {
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "in_channels": 3,
    "out_channels": 3,
}


def _config(name: str) -> ArchitectureConfig:
    if name == "sd15":
        channels, heads, xdim, groups = [320, 640, 1280, 1280], 8, 768, 32
        cond_channels = [16, 32, 96, 256]
        vae = {**_VAE_BLOCKS, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
               "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215}
        te = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
              "num_attention_heads": 12, "projection_dim": 768, "hidden_act": "quick_gelu"}
        vocab, sample_size = 49408, 64
    elif name == "tiny":
        channels, heads, xdim, groups = [32, 32, 64, 64], 4, 32, 8
        cond_channels = [8, 8, 16, 16]
        vae = {**_VAE_BLOCKS, "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1,
               "norm_num_groups": 8, "sample_size": 128, "scaling_factor": 0.18215}
        te = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "projection_dim": 32, "hidden_act": "quick_gelu"}
        vocab, sample_size = 520, 16
    else:
        raise ValueError(f"unknown architecture {name!r}; choose one of {ARCHITECTURES}")
    common = {**_SD_BLOCKS, "block_out_channels": channels, "attention_head_dim": heads,
              "cross_attention_dim": xdim, "norm_num_groups": groups, "in_channels": 4}
    unet = {**common, "up_block_types": _UP_BLOCKS, "out_channels": 4, "sample_size": sample_size}
    controlnet = {**common, "conditioning_embedding_out_channels": cond_channels}
    text_encoder = {**te, "vocab_size": vocab, "max_position_embeddings": 77,
                    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    return ArchitectureConfig(name, unet, controlnet, vae, text_encoder, vocab)


def architecture(name: str) -> ArchitectureConfig:
    """The config of a built-in architecture (``tiny`` or ``sd15``)."""
    return _config(name)


def build_components(arch: ArchitectureConfig, device: str | torch.device = "cpu") -> dict:
    """Instantiate every component with diffusers' default init (use ``meta`` for names only)."""
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        components = {
            "unet": UNet2DConditionModel(**arch.unet),
            "controlnet": ControlNetModel(**arch.controlnet),
            "vae": AutoencoderKL(**arch.vae),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**arch.text_encoder)),
        }
    components["scheduler"] = DDIMScheduler.from_config(arch.scheduler)
    for module in ("unet", "controlnet", "vae", "text_encoder"):
        components[module].eval().requires_grad_(False)
    return components


_INIT_STD = {"unet": 0.1, "controlnet": 0.1, "text_encoder": 0.1, "vae": 0.3}


def randomize_(components: dict, seed: int) -> None:
    """Redraw every parameter: N(0, std) for weights and biases, 1 + N(0, 0.1) for norms.

    Every tensor is drawn fresh from one seeded generator, so no two parameters are
    equal (the exporter would otherwise be free to merge them) and a seed names a model.
    """
    gen = torch.Generator().manual_seed(seed)
    for module_name, std in _INIT_STD.items():
        if module_name not in components:
            continue
        module = components[module_name]
        norm_params = {
            f"{path}.{p}" if path else p
            for path, sub in module.named_modules()
            if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm))
            for p, _ in sub.named_parameters(recurse=False)
        }
        for name, param in module.named_parameters():
            draw = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name in norm_params and name.endswith("weight"):
                value = 1.0 + 0.1 * draw
            elif name.startswith("controlnet_cond_embedding") and name.endswith("weight"):
                # The control image enters through a small conv stack; with std 0.1 its signal
                # dies out (the output ignores the edges). 2/sqrt(fan_in) keeps it alive.
                value = 2.0 / param[0].numel() ** 0.5 * draw
            elif "embedding" in name and module_name == "text_encoder":
                value = draw  # token/position embeddings are unit-scale in CLIP
            else:
                value = std * draw
            param.data.copy_(value.to(param.dtype))


def save_pipeline_folder(components: dict, arch: ArchitectureConfig, folder: Path) -> None:
    """Save ``components`` as a diffusers folder: the SD pipeline plus ``controlnet/``.

    The layout is what ``StableDiffusionControlNetPipeline.from_pretrained`` reads, so
    the reference implementation can load the very files loramgr exports.
    """
    from diffusers import StableDiffusionControlNetPipeline
    from transformers import CLIPTokenizer

    from loramgr.models.tokenizer import write_tokenizer

    write_tokenizer(folder / "tokenizer", arch)
    pipe = StableDiffusionControlNetPipeline(
        vae=components["vae"], text_encoder=components["text_encoder"],
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"), unet=components["unet"],
        controlnet=components["controlnet"], scheduler=components["scheduler"],
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def build_random_folder(arch_name: str, seed: int, folder: Path) -> None:
    """Build ``arch_name`` with seeded random weights and save it as a diffusers folder."""
    arch = architecture(arch_name)
    components = build_components(arch)
    randomize_(components, seed)
    save_pipeline_folder(components, arch, folder)
