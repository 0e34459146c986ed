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
from .inpaint import InpaintArea, control_tensor, fill, inpaint_area
from .passes import (VAE_SCALE_FACTOR, HiresFix, HiresSize, crop_latents, hires_prompts, hires_size, second_pass,
                     upscale_image, upscale_latents)
from .prompts import Chunk, apply_emphasis, plan_prompt
from .schedulers import make_scheduler, step_kwargs
from .settings import GenerationSettings, check_inputs, check_mask, full_prompt, output_size

LATENT_CHANNELS = 4  # SD1.5 VAE

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
        control_images: Sequence[np.ndarray | None] | None = None, mask: np.ndarray | None = None,
    ) -> GenerationResult:
        """Generate ``settings.num_samples`` images, from ``image`` (HxWxC uint8 RGB) or from nothing.

        Each unit's map is made from its image in ``control_images`` (``None`` or missing:
        ``image``) by its preprocessor (``canny``, ``none`` for a finished map: depth, pose,
        hed, ..., or ``inpaint``); ``control_image`` is the one unit's image of the one-unit form.
        ``image`` may be ``None`` unless ``settings.img2img_strength`` is set; with no image
        at all the size is ``settings.width`` x ``settings.height``. See :meth:`prepare_control`.

        ``mask`` (HxW or HxWxC uint8, white = inpaint): inpaint ``image`` there, as set by
        ``settings.inpaint`` (:mod:`loramgr.pipeline.inpaint`); ``img2img_strength`` ``None``
        starts from pure noise, as diffusers' inpaint pipelines at strength 1. ``settings.hires``
        adds a second pass (:mod:`loramgr.pipeline.passes`) to a text-to-image generation.

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
        check_mask(mask, image, units, settings)
        with self.runner.hold() as adapter_set:
            result = self._generate(image, sources, units, settings, progress, release, mask, adapter_set)
        result.adapter_set = adapter_set
        return result

    def _generate(self, image: np.ndarray | None, sources: list[np.ndarray], units: tuple[ControlUnit, ...],
                  settings: GenerationSettings, progress: ProgressHook | None, release: bool,
                  mask: np.ndarray | None, adapter_set=None) -> GenerationResult:
        clock = _Stopwatch(self.runner.device)
        generator = torch.Generator("cpu").manual_seed(settings.seed)

        # 2. Encode prompt: the conditional and unconditional embeddings, N rows each (and the second pass's)
        cond, uncond = self.encode_prompt(settings, adapter_set)
        second_embeds = None
        if settings.hires is not None:
            prompts = hires_prompts(settings)
            same = prompts == {"prompt": settings.prompt, "n_prompt": settings.n_prompt}
            second_embeds = (cond, uncond) if same else self.encode_prompt(replace(settings, **prompts), adapter_set)
        self._done_with(TEXT_ENCODER, release)
        clock.lap("encode_prompt")

        # 3. Prepare control maps and scales (inpainting: the masked area at the output size first)
        area = None
        if mask is not None:
            resized = resize_image(HWC3(image), settings.resolution)
            area = inpaint_area(image, resized, mask, settings.inpaint, self.area_size(resized, settings))
            sources = [area.source(s) for s in sources]
        resized, maps = self.prepare_control(image if area is None else area.image, sources, units, settings,
                                             size=None if area is None else area.image.shape[:2])
        ready = self.ready_units(units, maps, settings, area)
        clock.lap("prepare_control")

        # 4. Prepare timesteps (and the second pass's: errors come before any denoising)
        scheduler = make_scheduler(settings.scheduler, self.scheduler_config, settings.schedule, settings.seed)
        strength = settings.img2img_strength or (1.0 if area is not None else None)
        timesteps = self.prepare_timesteps(scheduler, replace(settings, img2img_strength=strength))
        height, width = self.output_shape(resized, maps, settings)
        second = None if settings.hires is None else self.plan_second_pass(settings, (height, width))
        steps = _Steps(progress, len(timesteps) + (0 if second is None else len(second.timesteps)))

        # 5. Prepare latents
        inpainting = None
        if area is None:
            latents = self.prepare_latents(scheduler, timesteps, resized, (height, width), settings, generator)
        else:
            latents, inpainting = self.prepare_inpaint_latents(scheduler, timesteps, area, settings, strength,
                                                               generator)
        if second is None or second.hires.latent:
            self._done_with(VAE_ENCODER, release)
        clock.lap("prepare_latents")

        # 6. Denoise (inpainting: the image's latents kept outside the mask after every step)
        latents = self.denoise(scheduler, timesteps, latents, cond, uncond, ready, settings, generator, steps,
                               inpainting)
        clock.lap("denoise")

        # 7. Hires fix: upscale, then an image-to-image second pass at the target size
        if second is not None:
            latents = self.second_pass(second, latents, sources, units, second_embeds, steps, clock)
            self._done_with(VAE_ENCODER, release)
        for graph in (UNET, CONTROLNET):
            self._done_with(graph, release)

        # 8. Decode (inpainting: the original pixels pasted back outside the mask)
        images = self.decode_latents(latents)
        if area is not None:
            images = [area.paste(i) for i in images]
        clock.lap("decode")
        timesteps = [*timesteps, *(second.timesteps if second is not None else ())]
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
                    vectors[row, position] = torch.tensor(np.asarray(vector), dtype=torch.float32)
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
                        settings: GenerationSettings, *, size: tuple[int, int] | None = None,
                        ) -> tuple[np.ndarray | None, list[np.ndarray]]:
        """The resized input image (``None`` without one) and each unit's HWC3 map at the output size.

        The output size comes from ``image`` when there is one, else from the first unit's
        image, else from ``settings.width`` x ``settings.height``: short side ``resolution``,
        both sides multiples of 64 (``resize_image``). Each map is made from its unit's image
        by its preprocessor and, when its size differs, brought to the output size with
        bilinear interpolation, as ControlNet's annotator demos do; a map already at the
        output size is used as is. ``size``: the output size fixed by the caller (the
        inpainted area, the hires fix's second pass); ``image`` is then already at it.
        """
        resized = image if image is None or size is not None else resize_image(HWC3(image), settings.resolution)
        maps: list[np.ndarray] = []
        for unit, source in zip(units, sources):
            if unit.preprocessor == "canny":
                the_map = detect_edges(source, settings.resolution, unit.low_threshold, unit.high_threshold)[1]
            else:
                the_map = HWC3(source)
            maps.append(the_map)
        if size is None:
            size = resized.shape[:2] if resized is not None else (
                output_size(*maps[0].shape[:2], settings.resolution) if maps else (settings.height, settings.width))
        maps = [m if m.shape[:2] == tuple(size) else cv2.resize(m, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
                for m in maps]
        return resized, maps

    def ready_units(self, units: Sequence[ControlUnit], maps: list[np.ndarray], settings: GenerationSettings,
                    area: InpaintArea | None = None) -> list[_Unit]:
        """Each unit with its control image tensor and residual scales.

        An ``inpaint`` unit's tensor is -1 where ``area.mask`` is over 0.5; its map (what is
        shown) is black there.
        """
        ready = []
        for k, (unit, the_map) in enumerate(zip(units, maps)):
            tensor = self.image_to_tensor(the_map)
            if unit.preprocessor == "inpaint":
                tensor = control_tensor(tensor, area.mask)
                maps[k] = np.where((area.mask > 127)[..., None], 0, the_map).astype(np.uint8)
            ready.append(_Unit(unit, tensor, unit.scales(settings.control_schedule)))
        return ready

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
        """HxWx3 (or NxHxWx3) uint8 to ``[1 (N), 3, H, W]`` float32 in [0, 1], made as diffusers'
        ``pil_to_numpy`` and ``numpy_to_pt`` make it.

        The strides matter: torch's CPU convolutions sum in another order for other
        layouts, and the VAE encoder then differs from diffusers' by ~1e-5.
        """
        array = (image if image.ndim == 4 else image[None]).astype(np.float32) / 255.0
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
        # torch.cat as diffusers, not repeat: it keeps the encoder's memory layout, which the UNet inherits
        init_latents = torch.cat([self.encode_image(image, generator)] * n)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        return scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(n))

    def encode_image(self, image: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        """Scaled VAE samples ``[1 (N), 4, H/8, W/8]`` of an HxWx3 (NxHxWx3) uint8 image: ``mean + std * randn``,
        one draw of the latents' shape (diffusers' ``retrieve_latents``)."""
        mean, std = self.runner.vae_encode(2.0 * self.image_to_tensor(image) - 1.0)
        sample = mean + std * randn_tensor(mean.shape, generator=generator, device=self.runner.device, dtype=mean.dtype)
        return self.vae_scaling_factor * sample

    def prepare_inpaint_latents(self, scheduler: SchedulerMixin, timesteps: torch.Tensor, area: InpaintArea,
                                settings: GenerationSettings, strength: float, generator: torch.Generator,
                                ) -> tuple[torch.Tensor, _Inpainting]:
        """Initial latents of an inpainting and what its steps blend with, in diffusers' order of draws.

        diffusers' ``StableDiffusion[ControlNet]InpaintPipeline`` (4-channel UNet): the image's VAE
        sample, the noise, then a VAE sample of the masked image, which only 9-channel UNets use
        (its draw is made here, so later draws match); strength 1 starts from pure noise, else from
        the image's latents noised to the first timestep. ``settings.inpaint.fill``: A1111's
        ``fill`` paints the masked pixels before encoding, ``latent_noise`` / ``latent_nothing``
        put the noise / zeros in the masked latents (A1111's ``init_latent``).
        """
        inpaint = settings.inpaint
        image = fill(area.image, area.mask) if inpaint.fill == "fill" else area.image
        n = settings.num_samples
        image_latents = self.encode_image(image, generator).repeat(n, 1, 1, 1)
        noise = randn_tensor(image_latents.shape, generator=generator, device=self.runner.device, dtype=torch.float32)
        randn_tensor(image_latents[:1].shape, generator=generator, device=self.runner.device, dtype=torch.float32)
        mask = area.latent_mask().to(self.runner.device)
        if inpaint.fill == "latent_noise":
            image_latents = image_latents * (1 - mask) + noise * mask
        elif inpaint.fill == "latent_nothing":
            image_latents = image_latents * (1 - mask)
        if strength == 1.0:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(n))
        return latents, _Inpainting(mask, image_latents, noise)

    def area_size(self, resized: np.ndarray, settings: GenerationSettings) -> tuple[int, int]:
        """(height, width) an inpainted region is generated at: ``width`` x ``height`` when set, else the output size."""
        if settings.width is not None and settings.height is not None:
            return settings.height, settings.width
        return resized.shape[:2]

    def denoise(self, scheduler: SchedulerMixin, timesteps: torch.Tensor, latents: torch.Tensor, cond: torch.Tensor,
                uncond: torch.Tensor, ready: list[_Unit], settings: GenerationSettings, generator: torch.Generator,
                steps: _Steps, inpainting: _Inpainting | None = None) -> torch.Tensor:
        """The denoising loop: each step's guided prediction, the scheduler's step, the inpainting blend."""
        extra_step_kwargs = step_kwargs(scheduler, generator, settings.eta)
        for i, t in enumerate(timesteps):
            acting = [u for u in ready if u.unit.acts(i, len(timesteps), settings.control_window)]
            noise_pred = self.predict(scheduler, latents, t, cond, uncond, acting, settings)
            latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
            if inpainting is not None:
                latents = inpainting.blend(scheduler, latents, timesteps, i)
            steps.done()
        return latents

    def plan_second_pass(self, settings: GenerationSettings, first: tuple[int, int]) -> _SecondPass:
        """The hires fix's sizes, settings, scheduler and timesteps for a first pass of ``first`` (height, width)."""
        size = hires_size(*first, settings.hires)
        second = second_pass(settings, size)
        scheduler = make_scheduler(second.scheduler, self.scheduler_config, second.schedule, second.seed)
        return _SecondPass(settings.hires, size, second, scheduler, self.prepare_timesteps(scheduler, second))

    def second_pass(self, plan: _SecondPass, latents: torch.Tensor, sources: Sequence[np.ndarray],
                    units: Sequence[ControlUnit], embeds: tuple[torch.Tensor, torch.Tensor], steps: _Steps,
                    clock: _Stopwatch) -> torch.Tensor:
        """Upscale the first pass, then denoise it again at the target size (A1111's ``sample_hr_pass``).

        Its random draws come from a generator seeded anew with the seed, as A1111 draws the
        second pass's noise from the seeds again: a latent upscale draws the noise only, an image
        upscale first the VAE samples of the upscaled images (diffusers' img2img order).
        """
        settings, size, hires = plan.settings, plan.size, plan.hires
        generator = torch.Generator("cpu").manual_seed(settings.seed)
        if hires.latent:
            init = upscale_latents(latents, size, hires.upscaler)
        else:
            upscaled = [upscale_image(i, size, hires.upscaler) for i in self.decode_latents(latents)]
            init = crop_latents(self.encode_image(np.stack(upscaled), generator), size)
        clock.lap("upscale")
        _, maps = self.prepare_control(None, sources, units, settings, size=size.target)
        ready = self.ready_units(units, maps, settings)
        noise = randn_tensor(init.shape, generator=generator, device=self.runner.device, dtype=torch.float32)
        latents = plan.scheduler.add_noise(init, noise, plan.timesteps[:1].repeat(init.shape[0]))
        clock.lap("prepare_latents")
        latents = self.denoise(plan.scheduler, plan.timesteps, latents, *embeds, ready, settings, generator, steps)
        clock.lap("denoise")
        return latents

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


@dataclass
class _Inpainting:
    """What an inpainting's steps blend with: the latent mask (1: denoised), the image's latents, the noise."""

    mask: torch.Tensor
    image_latents: torch.Tensor
    noise: torch.Tensor

    def blend(self, scheduler: SchedulerMixin, latents: torch.Tensor, timesteps: torch.Tensor, i: int) -> torch.Tensor:
        """diffusers' 4-channel inpainting step: outside the mask, the image's latents noised to the next
        timestep (after the last step: as they are)."""
        proper = self.image_latents
        if i < len(timesteps) - 1:
            proper = scheduler.add_noise(proper, self.noise, timesteps[i + 1:i + 2])
        return (1 - self.mask) * proper + self.mask * latents


@dataclass
class _SecondPass:
    """The hires fix's second pass, planned before the first one runs."""

    hires: HiresFix
    size: HiresSize
    settings: GenerationSettings
    scheduler: SchedulerMixin
    timesteps: torch.Tensor


class _Steps:
    """Counts UNet evaluations over both passes for the progress hook."""

    def __init__(self, progress: ProgressHook | None, total: int):
        self.progress, self.total, self.completed = progress, total, 0

    def done(self) -> None:
        self.completed += 1
        if self.progress is not None:
            self.progress(self.completed, self.total)


class _Stopwatch:
    """Seconds per phase (summed over both passes); waits for CUDA so GPU backends are timed, not just queued."""

    def __init__(self, device: torch.device):
        self.device = device
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self._last
        self._last = now
