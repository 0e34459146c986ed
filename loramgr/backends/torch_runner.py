"""The reference runner: a base's four graphs as the torch modules they are exported from.

It runs the very wrappers of :mod:`loramgr.models.fused` that the ONNX export traces,
on diffusers / transformers modules, so "pipeline over TorchRunner" equals diffusers'
own pipeline and is the "diffusers torch" side of every comparison and benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters import AdapterSet, Names
from ..errors import LoramgrError
from ..models.fused import TextEncoder, UNetControlNet, VaeDecoder, VaeEncoder
from .base import AdapterLease

COMPONENTS = ("unet", "controlnet", "vae", "text_encoder")


@dataclass
class TorchTimings:
    """Nothing is opened or swapped by the runner itself: the modules come loaded."""


class TorchRunner(AdapterLease):
    """:class:`~loramgr.backends.base.Runner` over torch modules, on their device and dtype.

    Inputs are moved to the modules' device and floating inputs cast to their dtype
    (fp16 modules work); outputs are float32, as the interface promises. Adapters are
    merged into the modules before they come here (diffusers / PEFT, by the caller), so
    the runner's own adapter set is always the empty one and ``set_adapters`` accepts
    only that.
    """

    def __init__(self, unet_controlnet: UNetControlNet, text_encoder: TextEncoder,
                 vae_decoder: VaeDecoder, vae_encoder: VaeEncoder):
        self.unet_controlnet = unet_controlnet
        self.text_encoder = text_encoder
        self.vae_decoder = vae_decoder
        self.vae_encoder = vae_encoder
        weight = next(unet_controlnet.parameters())
        self.device: torch.device = weight.device
        self.dtype: torch.dtype = weight.dtype
        self.adapter_set = AdapterSet()
        self.timings = TorchTimings()
        self._init_lease()

    @classmethod
    def from_components(cls, components: dict) -> TorchRunner:
        """Wrap diffusers components (``unet``, ``controlnet``, ``vae``, ``text_encoder``).

        Example::

            pipe = StableDiffusionControlNetPipeline.from_pretrained(folder)
            runner = TorchRunner.from_components(pipe.components)
        """
        missing = [name for name in COMPONENTS if components.get(name) is None]
        if missing:
            raise ValueError(f"components lack {', '.join(missing)}; need {', '.join(COMPONENTS)}")
        vae = components["vae"]
        return cls(
            UNetControlNet(components["unet"], components["controlnet"]).eval(),
            TextEncoder(components["text_encoder"]).eval(),
            VaeDecoder(vae).eval(),
            VaeEncoder(vae).eval(),
        )

    def set_adapters(self, adapter_set: AdapterSet) -> float:
        if adapter_set.adapters:
            raise LoramgrError("the torch reference runner applies no adapters: merge them into the modules "
                               "(diffusers / PEFT) before TorchRunner.from_components")
        return 0.0

    def swappable(self) -> Names:
        return {}

    def release(self, graph: str) -> None:
        """The modules belong to the caller: they stay."""

    def close(self) -> None:
        """The modules belong to the caller; nothing to release here."""

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.to(self.device)).float()

    @torch.inference_mode()
    def predict_noise(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        control_scales: torch.Tensor,
    ) -> torch.Tensor:
        noise = self.unet_controlnet(
            self._cast(sample), timestep.to(self.device), self._cast(encoder_hidden_states),
            self._cast(controlnet_cond), self._cast(control_scales),
        )
        return noise.float()

    @torch.inference_mode()
    def vae_decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae_decoder(self._cast(latent)).float()

    @torch.inference_mode()
    def vae_encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.vae_encoder(self._cast(image))
        return mean.float(), std.float()

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.dtype)
