"""The torch modules that become the base's ONNX graphs.

``UNetControlNet`` is seed 001's wrapper: one ControlNet and the UNet in one module,
so one graph (and one external data file) carries both and every adapter, LoRA or
ControlNet, is a weight swap on it. Unlike the seed, the control scale is an input of
shape ``[batch, 13]``: one scale per ControlNet residual and per sample. That single
input reproduces normal mode (``[strength] * 13`` on every row), guess mode
(``strength * 0.825 ** (12 - i)`` on the conditional rows, zeros on the unconditional
half of the batch) and diffusers' variants, without a second graph.
"""

from __future__ import annotations

import torch

NUM_CONTROL_RESIDUALS = 13  # 12 down-block residuals + 1 mid-block residual (SD1.5 topology)


class UNetControlNet(torch.nn.Module):
    """UNet + ControlNet: ``noise_pred = unet(x, t, ctx, controlnet(x, t, ctx, cond) * scales)``."""

    def __init__(self, unet: torch.nn.Module, controlnet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        control_scales: torch.Tensor,
    ) -> torch.Tensor:
        # Graph inputs and outputs are float32 whatever the weight dtype, so callers never
        # need to know how a base was exported; the casts vanish from fp32 graphs.
        dtype = self.unet.dtype
        sample, encoder_hidden_states = sample.to(dtype), encoder_hidden_states.to(dtype)
        controlnet_cond, control_scales = controlnet_cond.to(dtype), control_scales.to(dtype)
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_cond, conditioning_scale=1.0, return_dict=False,
        )
        scales = control_scales[:, :, None, None, None]  # [B, 13, 1, 1, 1]
        down = [residual * scales[:, i] for i, residual in enumerate(down)]
        mid = mid * scales[:, len(down)]
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states,
            down_block_additional_residuals=down, mid_block_additional_residual=mid,
            return_dict=False,
        )[0].float()


class TextEncoder(torch.nn.Module):
    """CLIP text model returning only ``last_hidden_state`` (what SD1.5 conditions on).

    The attribute is named ``text_model`` so parameters are named as every SD1.5 tool
    knows them (``text_model.encoder.layers.0.self_attn.q_proj.weight``); transformers 5
    dropped that prefix from ``CLIPTextModel`` itself.
    """

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_model = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids, return_dict=False)[0].float()


class VaeDecoder(torch.nn.Module):
    """``vae.decode``: latents (already divided by the scaling factor) to images in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent.to(self.vae.dtype), return_dict=False)[0].float()


class VaeEncoder(torch.nn.Module):
    """``vae.encode``: images in [-1, 1] to the latent distribution's mean and std.

    Sampling stays outside the graph so the pipeline can draw the noise with a seeded
    ``torch.Generator`` exactly as diffusers does.
    """

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(image.to(self.vae.dtype), return_dict=False)[0]
        return dist.mean.float(), dist.std.float()
