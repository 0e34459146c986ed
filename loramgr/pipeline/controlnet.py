"""The ControlNet pipeline over any backend: ControlNet's ``process()`` in diffusers' phases.

Every random draw (initial noise, VAE sampling, img2img noise, DDIM / ancestral step
noise) comes from one CPU ``torch.Generator`` in diffusers' order, so an image made
here over :class:`~loramgr.backends.torch_runner.TorchRunner` matches diffusers'
``StableDiffusion[ControlNet][Img2Img]Pipeline`` with the same weights and seed.

ControlNet units (:mod:`loramgr.pipeline.control`): any number, each its own ControlNet
and map, summed into the UNet's residuals at the steps they act at; a step no unit acts
at runs the UNet alone. Classifier-free guidance runs the two halves in one batch of 2N
when the prompt and the negative prompt encode to the same length, as two calls of N
when they do not (A1111 pads neither), and not at all for ``scale <= 1``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import torch
from diffusers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..backends.base import Runner
from ..errors import LoramgrError
from ..manifest import CONTROLNET, TEXT_ENCODER, UNET, VAE_ENCODER
from .canny import HWC3, detect_edges, resize_image
from .control import ControlUnit
from .prompts import Chunk, apply_emphasis, plan_prompt
from .schedulers import make_scheduler, step_kwargs
from .settings import GenerationSettings, check_inputs, full_prompt, output_size

LATENT_CHANNELS = 4  # SD1.5 VAE
VAE_SCALE_FACTOR = 8  # image size / latent size

# ``progress(completed, total)``, called after every UNet evaluation (Heun makes two per step).
ProgressHook = Callable[[int, int], None]


@dataclass
class GenerationResult:
    """What one call produced: ``num_samples`` HxWx3 uint8 RGB images and each unit's HWC3 control map.

    ``timings`` holds seconds per phase (``encode_prompt``, ``prepare_control``,
    ``prepare_latents``, ``denoise``, ``decode``); ``timesteps`` the ones denoised.
    """

    images: list[np.ndarray]
    control_maps: list[np.ndarray]
    settings: GenerationSettings
    timesteps: list[float]
    timings: dict[str, float] = field(default_factory=dict)
    adapter_set: object = None  # the runner's AdapterSet every graph call of this generation ran with

    @property
    def edge_map(self) -> np.ndarray | None:
        """The first unit's control map (``None`` without units)."""
        return self.control_maps[0] if self.control_maps else None


@dataclass
class _Unit:
    """A unit made ready for the loop: its settings, control image tensor and residual scales."""

    unit: ControlUnit
    image: torch.Tensor  # [1, 3, H, W] in [0, 1]
    scales: torch.Tensor  # [13]


class ControlNetPipeline:
    """SD1.5 generation with ControlNet units over a :class:`Runner`.

    Args:
        runner: the backend (torch, ONNX Runtime, TensorRT).
        tokenizer: the base's ``CLIPTokenizer``.
        scheduler_config: the base's ``scheduler_config.json`` as a dict.
        vae_scaling_factor: the VAE's ``scaling_factor`` (0.18215 for SD1.5).
        embeddings: returns the workspace's textual-inversion vectors by trigger (e.g.
            :meth:`loramgr.embeddings.EmbeddingLibrary.vectors`); ``None``: only those bundled in LoRAs.

    Example::

        pipe = ControlNetPipeline(runner, tokenizer, scheduler_config, 0.18215)
        result = pipe(load_image("bird.png"), GenerationSettings(prompt="a bird", seed=1))
    """

    def __init__(self, runner: Runner, tokenizer, scheduler_config: dict, vae_scaling_factor: float,
                 embeddings: Callable[[], Mapping[str, np.ndarray]] | None = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.vae_scaling_factor = vae_scaling_factor
        self.embeddings = embeddings  # the workspace's textual-inversion vectors by trigger, read per call

    def __call__(
        self, image: np.ndarray | None, settings: GenerationSettings, progress: ProgressHook | None = None,
        control_image: np.ndarray | None = None, release: bool = False,
        control_images: Sequence[np.ndarray | None] | None = None,
    ) -> GenerationResult:
        """Generate ``settings.num_samples`` images, from ``image`` (HxWxC uint8 RGB) or from nothing.

        Each unit's map is made from its image in ``control_images`` (``None`` or missing:
        ``image``) by its preprocessor (``canny``, or ``none`` for a finished map: depth,
        pose, hed, ...); ``control_image`` is the one unit's image of the one-unit form.
        ``image`` may be ``None`` unless ``settings.img2img_strength`` is set; with no image
        at all the size is ``settings.width`` x ``settings.height``. See :meth:`prepare_control`.

        The whole generation holds the runner's adapter set (``runner.hold()``): a swap
        asked for meanwhile waits for the last decode, so every image comes from one set.

        ``release``: hand each graph back (``runner.release``) once this generation is done
        with it (the text encoder after the prompt, the UNet and ControlNets after the last
        step), as the last generation of a one-shot run does: only the weights in use are
        resident. A later generation opens them again.
        """
        # 1. Check inputs
        units = settings.control_units()
        if control_images is None:
            control_images = [control_image] if control_image is not None else []
        elif control_image is not None:
            raise LoramgrError("give control_image (one unit) or control_images (one per unit), not both")
        if len(control_images) > len(units):
            raise LoramgrError(f"{len(control_images)} control images for {len(units)} ControlNet units")
        sources = [control_images[i] if i < len(control_images) and control_images[i] is not None else image
                   for i in range(len(units))]
        if image is None and settings.img2img_strength is not None:
            raise LoramgrError("img2img_strength needs an input image besides the control images")
        missing = [i for i, source in enumerate(sources) if source is None]
        if missing:
            raise LoramgrError(f"ControlNet unit {missing[0]} has no image: give it one, or an input image")
        given = [i for i in (image, *control_images) if i is not None]
        if not given and (settings.width is None or settings.height is None):
            raise LoramgrError("no input: give an image, a control image, or a width and height")
        for each in given or [None]:
            check_inputs(each, settings)
        with self.runner.hold() as adapter_set:
            result = self._generate(image, sources, units, settings, progress, release, adapter_set)
        result.adapter_set = adapter_set
        return result

    def _generate(self, image: np.ndarray | None, sources: list[np.ndarray], units: tuple[ControlUnit, ...],
                  settings: GenerationSettings, progress: ProgressHook | None, release: bool,
                  adapter_set) -> GenerationResult:
        clock = _Stopwatch(self.runner.device)
        generator = torch.Generator("cpu").manual_seed(settings.seed)

        # 2. Encode prompt: the conditional and unconditional embeddings, N rows each
        cond, uncond = self.encode_prompt(settings, adapter_set)
        self._done_with(TEXT_ENCODER, release)
        clock.lap("encode_prompt")

        # 3. Prepare control maps and scales
        resized, maps = self.prepare_control(image, sources, units, settings)
        ready = [_Unit(unit, self.image_to_tensor(m), unit.scales(settings.control_schedule))
                 for unit, m in zip(units, maps)]
        clock.lap("prepare_control")

        # 4. Prepare timesteps
        scheduler = make_scheduler(settings.scheduler, self.scheduler_config)
        timesteps = self.prepare_timesteps(scheduler, settings)

        # 5. Prepare latents
        height, width = self.output_shape(resized, maps, settings)
        latents = self.prepare_latents(scheduler, timesteps, resized, (height, width), settings, generator)
        self._done_with(VAE_ENCODER, release)
        clock.lap("prepare_latents")

        # 6. Denoise
        extra_step_kwargs = step_kwargs(scheduler, generator, settings.eta)
        for i, t in enumerate(timesteps):
            acting = [u for u in ready if u.unit.acts(i, len(timesteps), settings.control_window)]
            noise_pred = self.predict(scheduler, latents, t, cond, uncond, acting, settings)
            latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
            if progress is not None:
                progress(i + 1, len(timesteps))
        for graph in (UNET, CONTROLNET):
            self._done_with(graph, release)
        clock.lap("denoise")

        # 7. Decode
        images = self.decode_latents(latents)
        clock.lap("decode")
        return GenerationResult(images, maps, replace(settings), [float(t) for t in timesteps], clock.timings)

    def _done_with(self, graph: str, release: bool) -> None:
        if release:
            self.runner.release(graph)

    # -- phases ------------------------------------------------------------------------------

    def encode_prompt(self, settings: GenerationSettings, adapter_set=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``([N, T, D], [N, T', D])``: the embeddings of ``prompt, a_prompt`` and of ``n_prompt``.

        Each prompt is planned (:func:`~loramgr.pipeline.prompts.plan_prompt`: A1111's syntax or
        the text as it is), its chunks encoded in one text-encoder call with the textual-inversion
        vectors in place, ``settings.clip_skip`` picks the layer (A1111's ``CLIP_stop_at_last_layers``),
        emphasis is applied per chunk, and the chunks are joined along the token axis. Embeddings:
        the workspace's (:attr:`embeddings`) and those bundled in the LoRAs of ``adapter_set``; the
        workspace's win a tie, as in A1111.
        """
        vectors = {} if adapter_set is None else {
            name: v for adapter, _ in adapter_set.adapters for name, v in getattr(adapter, "embeddings", {}).items()}
        if self.embeddings is not None:
            vectors.update(self.embeddings())
        encoded = []
        for what, text in (("prompt", full_prompt(settings)), ("n_prompt", settings.n_prompt)):
            plan = plan_prompt(text, self.tokenizer, vectors, syntax=settings.prompt_syntax,
                               max_tokens=settings.max_prompt_tokens, what=what)
            encoded.append(self._encode_chunks(plan.chunks, settings))
        n = settings.num_samples
        cond, uncond = encoded
        return cond.repeat_interleave(n, dim=0), uncond.repeat_interleave(n, dim=0)

    def _encode_chunks(self, chunks: list[Chunk], settings: GenerationSettings) -> torch.Tensor:
        """``[1, 77 * len(chunks), D]``: every chunk through the text encoder, emphasis applied, joined."""
        device = self.runner.device
        ids = torch.tensor([c.ids for c in chunks], dtype=torch.int64, device=device)
        vectors = mask = None
        if any(c.vectors for c in chunks):
            width = next(iter(next(c for c in chunks if c.vectors).vectors.values())).shape[-1]
            vectors = torch.zeros(len(chunks), ids.shape[1], width)
            mask = torch.zeros(len(chunks), ids.shape[1])
            for row, chunk in enumerate(chunks):
                for position, vector in chunk.vectors.items():
                    vectors[row, position] = torch.from_numpy(np.asarray(vector, dtype=np.float32))
                    mask[row, position] = 1.0
            vectors, mask = vectors.to(device), mask.to(device)
        states = self.runner.encode_text(ids, vectors, mask)
        if not 1 <= settings.clip_skip <= states.shape[0]:
            raise LoramgrError(f"clip_skip must be in [1, {states.shape[0]}] for this base's text encoder "
                               f"({states.shape[0]} layers), got {settings.clip_skip}")
        hidden = states[settings.clip_skip - 1]
        if settings.prompt_syntax == "a1111":
            hidden = apply_emphasis(hidden, torch.tensor([c.weights for c in chunks]))
        return hidden.reshape(1, -1, hidden.shape[-1])

    def prepare_control(self, image: np.ndarray | None, sources: Sequence[np.ndarray], units: Sequence[ControlUnit],
                        settings: GenerationSettings) -> tuple[np.ndarray | None, list[np.ndarray]]:
        """The resized input image (``None`` without one) and each unit's HWC3 map at the output size.

        The output size comes from ``image`` when there is one, else from the first unit's
        image, else from ``settings.width`` x ``settings.height``: short side ``resolution``,
        both sides multiples of 64 (``resize_image``). Each map is made from its unit's image
        by its preprocessor and, when its size differs, brought to the output size with
        bilinear interpolation, as ControlNet's annotator demos do; a map already at the
        output size is used as is.
        """
        resized = None if image is None else resize_image(HWC3(image), settings.resolution)
        maps: list[np.ndarray] = []
        for unit, source in zip(units, sources):
            if unit.preprocessor == "canny":
                the_map = detect_edges(source, settings.resolution, unit.low_threshold, unit.high_threshold)[1]
            else:
                the_map = HWC3(source)
            maps.append(the_map)
        size = resized.shape[:2] if resized is not None else (
            output_size(*maps[0].shape[:2], settings.resolution) if maps else (settings.height, settings.width))
        maps = [m if m.shape[:2] == tuple(size) else cv2.resize(m, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
                for m in maps]
        return resized, maps

    @staticmethod
    def output_shape(resized: np.ndarray | None, maps: Sequence[np.ndarray],
                     settings: GenerationSettings) -> tuple[int, int]:
        """(height, width) of the output: the input image's, else the maps', else the settings'."""
        if resized is not None:
            return resized.shape[:2]
        if maps:
            return maps[0].shape[:2]
        return settings.height, settings.width

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
        image: np.ndarray | None,
        size: tuple[int, int],
        settings: GenerationSettings,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Initial latents, drawing from ``generator`` in diffusers' order.

        Text-to-image: ``randn * init_noise_sigma``. Image-to-image: a VAE sample of
        ``image`` (``mean + std * randn``, batch 1, repeated N times), scaled, then noised
        to the first timestep with a second ``randn`` ([N, ...]).
        """
        n, device = settings.num_samples, self.runner.device
        height, width = size
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

    def predict(self, scheduler: SchedulerMixin, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                uncond: torch.Tensor, acting: list[_Unit], settings: GenerationSettings) -> torch.Tensor:
        """The guided noise prediction of one step.

        Guidance off (``scale <= 1``): the conditional half alone. Prompt and negative prompt
        of one length: one batch ``[uncond] * N + [cond] * N``; else two calls (A1111 pads
        neither, so neither is padded here).
        """
        if not settings.guidance:
            return self.model(scheduler.scale_model_input(latents, t), t, cond, acting, halves=(True,))
        if cond.shape[1] == uncond.shape[1]:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_uncond, noise_cond = self.model(model_input, t, torch.cat([uncond, cond]), acting,
                                                  halves=(False, True)).chunk(2)
        else:
            model_input = scheduler.scale_model_input(latents, t)
            noise_uncond = self.model(model_input, t, uncond, acting, halves=(False,))
            noise_cond = self.model(model_input, t, cond, acting, halves=(True,))
        return noise_uncond + settings.scale * (noise_cond - noise_uncond)

    def model(self, sample: torch.Tensor, t: torch.Tensor, context: torch.Tensor, acting: list[_Unit],
              halves: tuple[bool, ...]) -> torch.Tensor:
        """The UNet on ``sample`` with the summed residuals of the ``acting`` units.

        ``halves``: whether each block of N rows is conditional. A unit in mode ``control``
        acts on the conditional rows only (its ControlNet runs on those rows, zeros
        elsewhere: diffusers' guess mode).
        """
        rows = sample.shape[0] // len(halves)
        timestep = t.to(torch.float32).expand(sample.shape[0])
        residuals = None
        for ready in acting:
            takes = [conditional or ready.unit.mode != "control" for conditional in halves]
            if not any(takes):
                continue
            first, last = takes.index(True), len(takes) - takes[::-1].index(True)
            part = slice(first * rows, last * rows)
            count = part.stop - part.start
            out = self.runner.control_residuals(
                ready.unit.controlnet, sample[part], timestep[part], context[part],
                ready.image.expand(count, -1, -1, -1))
            scaled = [r * s for r, s in zip(out, ready.scales.tolist())]
            if count != sample.shape[0]:
                scaled = [torch.cat([torch.zeros_like(r)] * first + [r] + [torch.zeros_like(r)] * (len(halves) - last))
                          for r in scaled]
            residuals = scaled if residuals is None else [a + b for a, b in zip(residuals, scaled)]
        return self.runner.predict_noise(sample, timestep, context, residuals)

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
