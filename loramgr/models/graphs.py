"""The torch modules that become the base's ONNX graphs (docs/base-layout.md lists their inputs).

The UNet and the ControlNet are separate graphs, joined by the ControlNet's 13 residuals:

* ``ControlNetResiduals``: one ControlNet's residuals for one control image, unscaled. The
  pipeline scales each unit's residuals per sample and per residual (strength, soft
  weights, the unconditional half left out) and sums the units acting at a step, as
  diffusers' ``MultiControlNetModel`` does; any number of ControlNets, each in its own
  session (a slot), can feed one UNet call.
* ``UNetWithResiduals``: the UNet with the summed residuals as inputs. A step no unit acts
  at runs the UNet alone, with zero residuals: no ControlNet compute.

Both keep their modules under ``unet`` / ``controlnet``, so every weight keeps the name
every SD1.5 tool knows (``unet.down_blocks.0...``, ``controlnet.controlnet_down_blocks.3...``).

``TextEncoder`` takes token ids plus textual-inversion vectors that replace the token
embedding wherever ``token_mask`` is set, and returns every CLIP-skip choice at once, each
through the final layer norm (A1111's ``CLIP_stop_at_last_layers``): the pipeline picks
one, so neither embeddings nor CLIP skip need another graph or a session re-created.
"""

from __future__ import annotations

import torch

NUM_CONTROL_RESIDUALS = 13  # 12 down-block residuals + 1 mid-block residual (SD1.5 topology)
RESIDUALS = tuple(f"down_block_res_{i}" for i in range(NUM_CONTROL_RESIDUALS - 1)) + ("mid_block_res",)


class UNetWithResiduals(torch.nn.Module):
    """``noise_pred = unet(sample, t, ctx, down residuals, mid residual)``."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *residuals: torch.Tensor) -> torch.Tensor:
        # Graph inputs and outputs are float32 whatever the weight dtype, so callers never
        # need to know how a base was exported; the casts vanish from fp32 graphs.
        dtype = self.unet.dtype
        residuals = [r.to(dtype) for r in residuals]
        return self.unet(
            sample.to(dtype), timestep, encoder_hidden_states=encoder_hidden_states.to(dtype),
            down_block_additional_residuals=residuals[:-1], mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0].float()


class ControlNetResiduals(torch.nn.Module):
    """A ControlNet's 13 residuals for ``controlnet_cond`` ([B, 3, H, W] in [0, 1]), unscaled."""

    def __init__(self, controlnet: torch.nn.Module):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dtype = self.controlnet.dtype
        down, mid = self.controlnet(
            sample.to(dtype), timestep, encoder_hidden_states=encoder_hidden_states.to(dtype),
            controlnet_cond=controlnet_cond.to(dtype), conditioning_scale=1.0, return_dict=False,
        )
        return tuple(r.float() for r in (*down, mid))


class TextEncoder(torch.nn.Module):
    """CLIP's text model: ids (+ vectors in place of some token embeddings) to every CLIP-skip output.

    Output ``[L, B, T, D]``: index ``k - 1`` is CLIP skip ``k`` (A1111's
    ``CLIP_stop_at_last_layers``), ``final_layer_norm(hidden_states[-k])``; index 0 is
    the usual ``last_hidden_state``.

    The attribute is named ``text_model`` so parameters are named as every SD1.5 tool
    knows them (``text_model.encoder.layers.0.self_attn.q_proj.weight``); transformers 5
    dropped that prefix from ``CLIPTextModel`` itself.
    """

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_model = text_encoder

    def forward(self, input_ids: torch.Tensor, token_vectors: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        model = self.text_model
        embeddings = model.embeddings
        tokens = embeddings.token_embedding(input_ids)
        tokens = torch.where(token_mask[..., None] > 0.5, token_vectors.to(tokens.dtype), tokens)
        hidden = embeddings(inputs_embeds=tokens)  # + position embeddings
        mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        states = []
        for layer in model.encoder.layers:
            hidden = layer(hidden, mask, is_causal=True)
            states.append(hidden)
        return torch.stack([model.final_layer_norm(s) for s in reversed(states)]).float()


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
