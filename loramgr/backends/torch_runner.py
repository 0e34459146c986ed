"""The reference runner: a base's graphs as the torch modules they are exported from.

It runs the very wrappers of :mod:`loramgr.models.graphs` that the ONNX export traces,
on diffusers / transformers modules, so "pipeline over TorchRunner" equals diffusers'
own pipeline and is the "diffusers torch" side of every comparison and benchmark.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..adapters import BASE_CONTROLNET, AdapterSet, Names
from ..errors import LoramgrError
from ..models.graphs import ControlNetResiduals, TextEncoder, UNetWithResiduals, VaeDecoder, VaeEncoder
from .base import AdapterLease, text_feeds

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
    only that. ControlNets are named: ``None`` is the base's own, others are the
    ``controlnets`` given to :meth:`from_components`.
    """

    def __init__(self, unet: UNetWithResiduals, controlnets: Mapping[str | None, ControlNetResiduals],
                 text_encoder: TextEncoder, vae_decoder: VaeDecoder, vae_encoder: VaeEncoder):
        self.unet = unet
        self.controlnets = dict(controlnets)
        self.text_encoder = text_encoder
        self.vae_decoder = vae_decoder
        self.vae_encoder = vae_encoder
        weight = next(unet.parameters())
        self.device: torch.device = weight.device
        self.dtype: torch.dtype = weight.dtype
        self.adapter_set = AdapterSet()
        self.timings = TorchTimings()
        self._init_lease()

    @classmethod
    def from_components(cls, components: dict, controlnets: Mapping[str, torch.nn.Module] | None = None) -> TorchRunner:
        """Wrap diffusers components (``unet``, ``controlnet``, ``vae``, ``text_encoder``).

        ``controlnets``: more ControlNet modules, by the name units give them.

        Example::

            pipe = StableDiffusionControlNetPipeline.from_pretrained(folder)
            runner = TorchRunner.from_components(pipe.components, {"hed": hed_controlnet})
        """
        missing = [name for name in COMPONENTS if components.get(name) is None]
        if missing:
            raise ValueError(f"components lack {', '.join(missing)}; need {', '.join(COMPONENTS)}")
        vae = components["vae"]
        wrapped = {None: ControlNetResiduals(components["controlnet"]).eval()}
        wrapped.update({name: ControlNetResiduals(m).eval() for name, m in (controlnets or {}).items()})
        return cls(UNetWithResiduals(components["unet"]).eval(), wrapped,
                   TextEncoder(components["text_encoder"]).eval(), VaeDecoder(vae).eval(), VaeEncoder(vae).eval())

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
    def encode_text(self, input_ids: torch.Tensor, token_vectors: torch.Tensor | None = None,
                    token_mask: torch.Tensor | None = None) -> torch.Tensor:
        width = self.text_encoder.text_model.config.hidden_size
        feeds = text_feeds(input_ids.to(self.device), token_vectors, token_mask, width)
        return self.text_encoder(*(t.to(self.device) for t in feeds.values())).float()

    @torch.inference_mode()
    def control_residuals(self, controlnet: str | None, sample: torch.Tensor, timestep: torch.Tensor,
                          encoder_hidden_states: torch.Tensor, controlnet_cond: torch.Tensor) -> list[torch.Tensor]:
        key = None if controlnet == BASE_CONTROLNET else controlnet
        if key not in self.controlnets:
            raise LoramgrError(f"ControlNet {controlnet!r} was not given to this TorchRunner")
        out = self.controlnets[key](self._cast(sample), timestep.to(self.device),
                                    self._cast(encoder_hidden_states), self._cast(controlnet_cond))
        return [r.float() for r in out]

    @torch.inference_mode()
    def predict_noise(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                      residuals: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        unet = self.unet.unet
        args = {} if residuals is None else {
            "down_block_additional_residuals": [self._cast(r) for r in residuals[:-1]],
            "mid_block_additional_residual": self._cast(residuals[-1])}
        noise = unet(self._cast(sample), timestep.to(self.device), encoder_hidden_states=self._cast(encoder_hidden_states),
                     return_dict=False, **args)[0]
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
