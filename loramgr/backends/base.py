"""The one interface every backend implements, so the pipeline never knows which runs.

Tensors cross this interface as ``torch.Tensor`` (CPU or CUDA): the schedulers the
pipeline uses are diffusers' torch schedulers, and a GPU backend can keep latents on
the device (ONNX Runtime IO binding, TensorRT device pointers) without round trips.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Runner(Protocol):
    """What the pipeline needs from a backend: the four graphs of a base.

    Shapes (B = batch, h/w = latent size = image size / 8, D = text width):
      - ``encode_text(input_ids [B,77] int64) -> [B,77,D] float32``
      - ``predict_noise(sample [B,4,h,w], timestep [B], encoder_hidden_states [B,77,D],
        controlnet_cond [B,3,8h,8w] in [0,1], control_scales [B,13]) -> [B,4,h,w]``
      - ``vae_decode(latent [B,4,h,w], already divided by the scaling factor) -> [B,3,8h,8w] in [-1,1]``
      - ``vae_encode(image [B,3,8h,8w] in [-1,1]) -> (mean, std) each [B,4,h,w]``
    """

    device: torch.device

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def predict_noise(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        control_scales: torch.Tensor,
    ) -> torch.Tensor: ...

    def vae_decode(self, latent: torch.Tensor) -> torch.Tensor: ...

    def vae_encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
