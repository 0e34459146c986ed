"""The checks against diffusers' own pipeline, on the reference as torch modules.

The export holds one ControlNet and no embedding, so what it cannot hold is checked on the
reference's torch model (:class:`TorchReference`: the LoRAs merged, every ControlNet loaded by
diffusers, the embeddings loaded by ``load_textual_inversion``) with diffusers' code:

* ``units``: loramgr's pipeline over the injected runner, one unit per ControlNet of the set
  (strengths, windows and maps that differ) and the embeddings' triggers in the prompt, against
  ``StableDiffusionControlNetPipeline`` with a ``MultiControlNetModel`` of the same ControlNets
  (``controlnet_conditioning_scale``, ``control_guidance_start/end``);
* ``conditioning``: loramgr's ``encode_prompt`` of a prompt naming the triggers against diffusers'
  ``encode_prompt`` of the same text (diffusers expands multi-vector tokens itself).

docs/verify.md, "Several ControlNets" and "Embeddings".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter_file import AdapterFile
from ..adapters import AdapterSet, is_controlnet
from ..errors import LoramgrError
from ..manifest import Manifest
from ..pipeline.control import ControlUnit
from ..pipeline.settings import GenerationSettings
from .compare import ImageDiff, OutputDiff, image_diff, output_diff
from .embeddings import load_embeddings
from .reference import AdapterReference, Step, build_reference, diffusers_pipeline, load_source_model


@dataclass
class TorchReference:
    """The reference as torch modules: what diffusers' pipeline runs."""

    components: dict  # the LoRAs merged (if asked); tokenizer and text encoder with the embeddings loaded
    controlnets: dict[str, torch.nn.Module]  # by the name a unit gives (``canny``: the base's own)
    token_rows: dict[str, torch.Tensor]  # trigger -> [n, D] rows diffusers put into the token table
    records: dict[str, AdapterReference]  # the ControlNets (and LoRAs, if merged) by name
    embedding_records: list[AdapterReference]


def build_torch_reference(base_dir: Path, manifest: Manifest, adapter_set: AdapterSet, embeddings: Sequence[AdapterFile],
                          sources: Mapping[str, tuple[Path, str]], route: str, *, loras: bool,
                          on_step: Step | None = None) -> TorchReference:
    """The base's source model with every ControlNet of ``adapter_set`` loaded, its LoRAs merged as for
    the export when ``loras`` (what diffusers' pipeline needs; the weight checks do not), and
    ``embeddings`` (and those the LoRAs bundle) loaded by diffusers."""
    if on_step:
        on_step("loading the base's source model (torch reference)")
    components = load_source_model(base_dir, manifest)
    applied = adapter_set if loras else AdapterSet(tuple((a, w) for a, w in adapter_set.adapters if is_controlnet(a)))
    records, controlnets = build_reference(components, applied, sources, route, on_step)
    rows, embedding_records = load_embeddings(components, adapter_set, embeddings, sources, on_step)
    return TorchReference(components, controlnets, rows, {r.name: r for r in records}, embedding_records)


def units_for(names: Sequence[str]) -> tuple[ControlUnit, ...]:
    """One unit per ControlNet, each with its own strength (1, 0.8, 0.64, ...), window and map, so a
    unit that took another's ControlNet, scale, window or map changes the image: even units act at
    every step on the picture's canny edges, odd ones from 25% to 75% of the steps on the picture
    itself (preprocessor ``none``)."""
    return tuple(ControlUnit(name, preprocessor="none" if k % 2 else "canny", strength=0.8**k,
                             start=0.25 if k % 2 else 0.0, end=0.75 if k % 2 else 1.0) for k, name in enumerate(names))


def pipeline_prompt(prompt: str, triggers: Sequence[str]) -> str:
    """The prompt of the checks against diffusers: ``prompt``, then every trigger."""
    return ", ".join([prompt, *triggers])


def check_prompts(texts: Mapping[str, str], tokenizer, embeddings: bool) -> None:
    """Refuse a prompt diffusers reads otherwise than loramgr: over one CLIP window (diffusers cuts it),
    or, with ``embeddings`` to place, using the a1111 syntax (emphasis, ``BREAK``).

    loramgr's ``plain`` syntax places no embedding (docs/prompts.md), so a prompt with triggers
    is planned with the a1111 syntax: on a prompt that uses none of it, both tokenize alike.
    """
    from ..pipeline.prompts import plan_prompt

    for what, text in texts.items():
        plain = plan_prompt(text, tokenizer, syntax="plain", what=what)
        if not embeddings:
            continue
        a1111 = plan_prompt(text, tokenizer, {}, what=what)
        if [c.ids for c in a1111.chunks] != [c.ids for c in plain.chunks] or any(
                w != 1.0 for c in a1111.chunks for w in c.weights):
            raise LoramgrError(f"{what} {text!r}: loramgr's a1111 syntax reads it otherwise than diffusers (emphasis "
                               "or BREAK); the checks of embeddings against diffusers need a prompt without them")


def _settings(prompt: str, negative: str, triggers: Sequence[str], **fields) -> GenerationSettings:
    """loramgr's settings for a prompt diffusers reads alike: no added prompt, the a1111 syntax only
    where embeddings must be placed (:func:`check_prompts`)."""
    return GenerationSettings(prompt=prompt, a_prompt="", n_prompt=negative,
                              prompt_syntax="a1111" if triggers else "plain", **fields)


def compare_units(pipeline, reference: TorchReference, units: Sequence[ControlUnit], prompt: str, negative: str,
                  triggers: Sequence[str], image_size: int, steps: int, seed: int, min_psnr_db: float) -> ImageDiff:
    """loramgr's ``pipeline`` with ``units`` on the sample picture against diffusers' ControlNet pipeline
    on ``reference`` with the same ControlNets, scales, windows and maps, prompt and seed (DDIM)."""
    from diffusers import DDIMScheduler, MultiControlNetModel
    from PIL import Image

    from ..samples import sample_image

    settings = _settings(prompt, negative, triggers, resolution=image_size, steps=steps, seed=seed, scheduler="ddim",
                         units=tuple(units))
    made = pipeline(sample_image(image_size), settings)
    modules = [reference.controlnets[unit.controlnet] for unit in units]
    several = len(modules) > 1
    pipe = diffusers_pipeline(reference.components, MultiControlNetModel(modules) if several else modules[0],
                              DDIMScheduler.from_config(reference.components["scheduler"].config))
    maps = [Image.fromarray(m) for m in made.control_maps]
    height, width = made.images[0].shape[:2]
    with torch.no_grad():
        theirs = pipe(
            prompt=prompt, negative_prompt=negative, image=maps if several else maps[0], height=height, width=width,
            num_inference_steps=steps, guidance_scale=settings.scale, generator=torch.Generator("cpu").manual_seed(seed),
            controlnet_conditioning_scale=[u.strength for u in units] if several else units[0].strength,
            control_guidance_start=[u.start for u in units], control_guidance_end=[u.end for u in units],
            output_type="np",
        ).images
    return image_diff(made.images[0], (theirs[0] * 255).round().astype("uint8"), steps, min_psnr_db)


def compare_conditioning(pipeline, adapter_set: AdapterSet, reference: TorchReference, prompt: str, negative: str,
                         triggers: Sequence[str], rtol: float) -> OutputDiff:
    """loramgr's text conditioning of ``prompt`` (its embeddings placed by loramgr) against diffusers'
    ``encode_prompt`` of the same text on ``reference`` (the tokens ``load_textual_inversion`` added)."""
    ours, _ = pipeline.encode_prompt(_settings(prompt, negative, triggers), adapter_set)
    with torch.no_grad():
        theirs, _ = diffusers_pipeline(reference.components).encode_prompt(
            prompt, torch.device("cpu"), 1, True, negative_prompt=negative)
    return output_diff(f"conditioning of {prompt!r}", ours.cpu(), theirs, rtol)
