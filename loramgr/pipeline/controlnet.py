"""The canny ControlNet pipeline over any backend: ControlNet's ``process()`` in diffusers' phases.

Every random draw (initial noise, VAE sampling, img2img noise, DDIM / ancestral step
noise) comes from one CPU ``torch.Generator`` in diffusers' order, so an image made
here over :class:`~loramgr.backends.torch_runner.TorchRunner` matches diffusers'
``StableDiffusionControlNet[Img2Img]Pipeline`` with the same weights and seed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import torch
from diffusers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..backends.base import Runner
from ..errors import LoramgrError
from ..manifest import FUSED, TEXT_ENCODER, VAE_ENCODER
from .canny import HWC3, detect_edges, resize_image
from .control import control_scales
from .schedulers import make_scheduler, step_kwargs
from .settings import GenerationSettings, check_inputs, full_prompt, output_size

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 4  # SD1.5 VAE
VAE_SCALE_FACTOR = 8  # image size / latent size

# ``progress(completed, total)``, called after every UNet evaluation (Heun makes two per step).
ProgressHook = Callable[[int, int], None]


@dataclass
class GenerationResult:
    """What one call produced: ``num_samples`` HxWx3 uint8 RGB images and the HWC3 edge map.

    ``timings`` holds seconds per phase (``encode_prompt``, ``prepare_control``,
    ``prepare_latents``, ``denoise``, ``decode``); ``timesteps`` the ones denoised.
    """

    images: list[np.ndarray]
    edge_map: np.ndarray
    settings: GenerationSettings
    timesteps: list[float]
    timings: dict[str, float] = field(default_factory=dict)
    adapter_set: object = None  # the runner's AdapterSet every graph call of this generation ran with


class ControlNetPipeline:
    """Canny-conditioned SD1.5 generation over a :class:`Runner`.

    Args:
        runner: the backend (torch, ONNX Runtime, TensorRT).
        tokenizer: the base's ``CLIPTokenizer``.
        scheduler_config: the base's ``scheduler_config.json`` as a dict.
        vae_scaling_factor: the VAE's ``scaling_factor`` (0.18215 for SD1.5).

    Example::

        pipe = ControlNetPipeline(runner, tokenizer, scheduler_config, 0.18215)
        result = pipe(load_image("bird.png"), GenerationSettings(prompt="a bird", seed=1))
    """

    def __init__(self, runner: Runner, tokenizer, scheduler_config: dict, vae_scaling_factor: float):
        self.runner = runner
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.vae_scaling_factor = vae_scaling_factor

    def __call__(
        self, image: np.ndarray | None, settings: GenerationSettings, progress: ProgressHook | None = None,
        control_image: np.ndarray | None = None, release: bool = False,
    ) -> GenerationResult:
        """Generate ``settings.num_samples`` images from ``image`` (HxWxC uint8 RGB).

        ``control_image``: the image the control map is made from, when it is not
        ``image`` (``settings.preprocessor``: ``canny`` runs the annotator on it, ``none``
        takes it as a finished map: depth, pose, hed, ...). ``image`` may then be ``None``
        unless ``settings.img2img_strength`` is set. See :meth:`prepare_control` for sizes.

        The whole generation holds the runner's adapter set (``runner.hold()``): a swap
        asked for meanwhile waits for the last decode, so every image comes from one set.

        ``release``: hand each graph back (``runner.release``) once this generation is done
        with it (the text encoder after the prompt, the UNet+ControlNet after the last
        step), as the last generation of a one-shot run does: only the weights in use are
        resident. A later generation opens them again.
        """
        # 1. Check inputs
        if image is None and control_image is None:
            raise LoramgrError("no input: give an image or a control image")
        if image is None and settings.img2img_strength is not None:
            raise LoramgrError("img2img_strength needs an input image besides the control image")
        for given in (image, control_image):
            if given is not None:
                check_inputs(given, settings)
        with self.runner.hold() as adapter_set:
            result = self._generate(image, control_image, settings, progress, release)
        result.adapter_set = adapter_set
        return result

    def _generate(self, image: np.ndarray | None, control_image: np.ndarray | None, settings: GenerationSettings,
                  progress: ProgressHook | None, release: bool) -> GenerationResult:
        clock = _Stopwatch(self.runner.device)
        generator = torch.Generator("cpu").manual_seed(settings.seed)
        n = settings.num_samples

        # 2. Encode prompt: [uncond] * N + [cond] * N, classifier-free guidance in one batch
        prompt_embeds = self.encode_prompt(settings)
        self._done_with(TEXT_ENCODER, release)
        clock.lap("encode_prompt")

        # 3. Prepare control image and scales
        resized, edge_map = self.prepare_control(image, control_image, settings)
        control = self.image_to_tensor(edge_map).expand(2 * n, -1, -1, -1)
        scales = control_scales(n, settings.strength, settings.guess_mode, settings.control_schedule)
        scales = scales.to(self.runner.device)
        clock.lap("prepare_control")

        # 4. Prepare timesteps
        scheduler = make_scheduler(settings.scheduler, self.scheduler_config, settings.schedule, settings.seed)
        timesteps = self.prepare_timesteps(scheduler, settings)

        # 5. Prepare latents
        latents = self.prepare_latents(scheduler, timesteps, edge_map if resized is None else resized, settings,
                                       generator)
        self._done_with(VAE_ENCODER, release)
        clock.lap("prepare_latents")

        # 6. Denoise
        extra_step_kwargs = step_kwargs(scheduler, generator, settings.eta)
        for i, t in enumerate(timesteps):
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = self.runner.predict_noise(
                model_input, t.to(torch.float32).expand(2 * n), prompt_embeds, control, scales
            )
            noise_uncond, noise_cond = noise_pred.chunk(2)
            noise_pred = noise_uncond + settings.scale * (noise_cond - noise_uncond)
            latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
            if progress is not None:
                progress(i + 1, len(timesteps))
        self._done_with(FUSED, release)
        clock.lap("denoise")

        # 7. Decode
        images = self.decode_latents(latents)
        clock.lap("decode")
        return GenerationResult(images, edge_map, replace(settings), [float(t) for t in timesteps], clock.timings)

    def _done_with(self, graph: str, release: bool) -> None:
        if release:
            self.runner.release(graph)

    def prepare_control(self, image: np.ndarray | None, control_image: np.ndarray | None,
                        settings: GenerationSettings) -> tuple[np.ndarray | None, np.ndarray]:
        """The resized input image (``None`` without one) and the HWC3 map the ControlNet sees.

        The output size comes from ``image`` when there is one, else from the control
        image: short side ``resolution``, both sides multiples of 64 (``resize_image``).
        The map is made from ``control_image`` (else ``image``) by the preprocessor and,
        when its size differs, brought to the output size with bilinear interpolation, as
        ControlNet's annotator demos do; a map already at the output size is used as is.
        """
        source = image if control_image is None else control_image
        if settings.preprocessor == "canny":
            resized_source, edge_map = detect_edges(source, settings.resolution, settings.low_threshold,
                                                    settings.high_threshold)
        else:
            resized_source, edge_map = None, HWC3(source)
        if image is None:
            resized = None
            size = output_size(*edge_map.shape[:2], settings.resolution)
        else:
            resized = resized_source if control_image is None and resized_source is not None \
                else resize_image(HWC3(image), settings.resolution)
            size = resized.shape[:2]
        if edge_map.shape[:2] != size:
            edge_map = cv2.resize(edge_map, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        return resized, edge_map

    def encode_prompt(self, settings: GenerationSettings) -> torch.Tensor:
        """``[2N, 77, D]`` embeddings of ``n_prompt`` (N rows) then ``prompt, a_prompt`` (N rows)."""
        texts = {"n_prompt": settings.n_prompt, "prompt, a_prompt": full_prompt(settings)}
        max_length = self.tokenizer.model_max_length
        for what, text in texts.items():
            ids = self.tokenizer(text).input_ids
            if len(ids) > max_length:
                removed = self.tokenizer.decode(ids[max_length - 1 : -1])
                logger.warning(
                    "%s is longer than CLIP's %d tokens; this part was truncated: %r", what, max_length, removed
                )
        input_ids = self.tokenizer(
            list(texts.values()), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids
        embeds = self.runner.encode_text(input_ids.to(self.runner.device))
        return embeds.repeat_interleave(settings.num_samples, dim=0)

    def image_to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 to ``[1, 3, H, W]`` float32 in [0, 1], made as diffusers' ``pil_to_numpy``
        and ``numpy_to_pt`` make it.

        The strides matter: torch's CPU convolutions sum in another order for other
        layouts, and the VAE encoder then differs from diffusers' by ~1e-5.
        """
        array = image[None].astype(np.float32) / 255.0
        return torch.from_numpy(array.transpose(0, 3, 1, 2)).to(self.runner.device)

    def prepare_timesteps(self, scheduler: SchedulerMixin, settings: GenerationSettings) -> torch.Tensor:
        """All timesteps, or for img2img the last ``int(steps * img2img_strength)`` (diffusers' ``get_timesteps``)."""
        try:
            scheduler.set_timesteps(settings.steps, device=self.runner.device)
        except ValueError as exc:  # e.g. PNDM with PRK steps needs steps >= 4
            raise LoramgrError(
                f"scheduler {settings.scheduler!r} cannot make steps={settings.steps} with this base's "
                f"scheduler config ({exc}); use more steps or another scheduler"
            ) from exc
        if settings.img2img_strength is None:
            return scheduler.timesteps
        t_start = settings.steps - min(int(settings.steps * settings.img2img_strength), settings.steps)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        return scheduler.timesteps[t_start * scheduler.order :]

    def prepare_latents(
        self,
        scheduler: SchedulerMixin,
        timesteps: torch.Tensor,
        image: np.ndarray,
        settings: GenerationSettings,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Initial latents, drawing from ``generator`` in diffusers' order.

        Text-to-image: ``randn * init_noise_sigma``. Image-to-image: a VAE sample of
        ``image`` (``mean + std * randn``, batch 1, repeated N times), scaled, then noised
        to the first timestep with a second ``randn`` ([N, ...]).
        """
        n, device = settings.num_samples, self.runner.device
        height, width = image.shape[:2]  # the resized input image, or the control map without one
        shape = (n, LATENT_CHANNELS, height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR)
        if settings.img2img_strength is None:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
            return noise * scheduler.init_noise_sigma
        mean, std = self.runner.vae_encode(2.0 * self.image_to_tensor(image) - 1.0)
        sample = mean + std * randn_tensor(mean.shape, generator=generator, device=device, dtype=mean.dtype)
        # torch.cat as diffusers, not repeat: it keeps the encoder's memory layout, which the UNet inherits
        init_latents = torch.cat([self.vae_scaling_factor * sample] * n)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        return scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(n))

    def decode_latents(self, latents: torch.Tensor) -> list[np.ndarray]:
        """Latents to HxWx3 uint8 images, rounded as diffusers' ``numpy_to_pil``."""
        image = self.runner.vae_decode(latents / self.vae_scaling_factor)
        image = (image * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        return list((image * 255).round().astype(np.uint8))


class _Stopwatch:
    """Seconds per phase; waits for CUDA so GPU backends are timed, not just queued."""

    def __init__(self, device: torch.device):
        self.device = device
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[phase] = now - self._last
        self._last = now
