"""A1111's prompt conditioning end to end: loramgr's ONNX Runtime pipeline against diffusers' pipeline
fed with the conditioning of tests/a1111_conditioning.py (written from A1111's sources, independent of
loramgr.pipeline.prompts), on the tiny model: emphasis, BREAK, prompts over 75 tokens, embeddings (a
workspace file and one bundled in a LoRA), CLIP skip, and a prompt and negative prompt of different
lengths, which A1111 encodes and predicts apart (no padding): that case runs against a denoising
loop written here from diffusers' modules.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from a1111_conditioning import conditioning
from format_writers import kohya_embedding
from reference_pipelines import reference_pipeline
from loramgr.adapters import AdapterChoice
from loramgr.convert import convert_adapter
from loramgr.errors import LoramgrError
from loramgr.pipeline.canny import detect_edges
from loramgr.pipeline.settings import GenerationSettings
from loramgr.runtime import Generator
from loramgr.samples import sample_image
from loramgr.workspace import Workspace

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

STEPS, SIZE, SEED, SCALE = 4, 64, 5, 6.0
LONG = ", ".join(f"(word{i}:1.{i % 4})" for i in range(30))  # ~ 180 tokens with the byte-level tokenizer


@pytest.fixture(scope="module")
def ws(tiny_workspace, tmp_path_factory) -> Workspace:
    ws = Workspace.resolve(tmp_path_factory.mktemp("conditioning"))
    shutil.copytree(tiny_workspace.base_dir("tiny"), ws.base_dir("tiny"))
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(9))
    source = kohya_embedding(ws.home / "shinyemb.safetensors", vectors)
    convert_adapter(ws, source, base="tiny")
    return ws


@pytest.fixture(scope="module")
def reference(ws):
    return reference_pipeline(ws.base_dir("tiny") / "source", scheduler="ddim")


@pytest.fixture(scope="module")
def generator(ws):
    with Generator.open(ws, "tiny") as generator:
        yield generator


def embedding_vectors(ws) -> dict[str, torch.Tensor]:
    from loramgr.adapter_file import load_adapter

    return {"shinyemb": torch.tensor(load_adapter(ws.adapter_path("shinyemb")).embeddings["shinyemb"])}


def reference_images(reference, cond: torch.Tensor, uncond: torch.Tensor, edges: np.ndarray) -> np.ndarray:
    """diffusers' pipeline with the conditioning given as embeddings, or, when the two lengths differ,
    A1111's rule (the halves predicted apart) as a loop over diffusers' own modules."""
    from PIL import Image

    if cond.shape[1] == uncond.shape[1]:
        out = reference(prompt_embeds=cond, negative_prompt_embeds=uncond, image=Image.fromarray(edges),
                        num_inference_steps=STEPS, guidance_scale=SCALE, height=SIZE, width=SIZE,
                        generator=torch.Generator().manual_seed(SEED), output_type="np").images
        return (out * 255).round().astype(np.uint8)
    from diffusers import DDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    scheduler.set_timesteps(STEPS)
    control = torch.from_numpy(edges[None].astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    generator = torch.Generator().manual_seed(SEED)
    latents = randn_tensor((1, 4, SIZE // 8, SIZE // 8), generator=generator) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            noise = []
            for context in (uncond, cond):
                down, mid = reference.controlnet(model_input, t, encoder_hidden_states=context, controlnet_cond=control,
                                                 conditioning_scale=1.0, return_dict=False)
                noise.append(reference.unet(model_input, t, encoder_hidden_states=context,
                                            down_block_additional_residuals=down, mid_block_additional_residual=mid,
                                            return_dict=False)[0])
            latents = scheduler.step(noise[0] + SCALE * (noise[1] - noise[0]), t, latents, return_dict=False)[0]
        image = reference.vae.decode(latents / reference.vae.config.scaling_factor, return_dict=False)[0]
    return ((image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


CASES = {
    "emphasis": ("a (red:1.3) [bird] ((on)) a \\(branch\\)", "bad, (ugly:1.2)", 1),
    "break and clip skip 2": ("a red bird BREAK on a branch, (at night:0.8)", "blurry BREAK dark", 2),
    "long prompt, short negative": (LONG, "blurry", 1),
    "embedding in both prompts": ("a bird, (shinyemb:1.2), feathers", "shinyemb, blurry", 1),
    "embedding in a long negative": ("a bird", f"shinyemb, {LONG}", 2),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a1111_conditioning_matches_the_reference(ws, reference, generator, case):
    prompt, negative, clip_skip = case
    settings = GenerationSettings(prompt=prompt, a_prompt="", n_prompt=negative, steps=STEPS, resolution=SIZE,
                                  seed=SEED, scale=SCALE, clip_skip=clip_skip)
    image = sample_image(SIZE)
    made = generator.generate(AdapterChoice(), settings, image)
    vectors = embedding_vectors(ws)
    cond = conditioning(reference.text_encoder, reference.tokenizer, prompt, vectors, clip_skip)
    uncond = conditioning(reference.text_encoder, reference.tokenizer, negative, vectors, clip_skip)
    theirs = reference_images(reference, cond, uncond, detect_edges(image, SIZE, 100, 200)[1])
    diff = np.abs(np.stack(made.images).astype(int) - theirs.astype(int))
    assert diff.max() <= 2, f"max diff {diff.max()}, mean {diff.mean():.3f}"
    assert theirs.std() > 30


def test_plain_syntax_takes_the_text_as_it_is(generator):
    """--plain-prompt: parentheses are tokens (the image differs from the A1111 reading), long prompts refused."""
    image = sample_image(SIZE)
    base = GenerationSettings(prompt="a (red:1.5) bird", a_prompt="", n_prompt="blurry", steps=2, resolution=SIZE)
    a1111 = generator.generate(AdapterChoice(), base, image).images[0]
    plain = generator.generate(AdapterChoice(), GenerationSettings(**{**base.__dict__, "prompt_syntax": "plain"}),
                               image).images[0]
    assert np.abs(a1111.astype(int) - plain.astype(int)).mean() > 1
    with pytest.raises(LoramgrError, match="^prompt: .* tokens; with prompt syntax 'plain'"):
        generator.generate(AdapterChoice(), GenerationSettings(prompt="q w e r t y " * 17, a_prompt="", n_prompt="",
                                                               prompt_syntax="plain", steps=1, resolution=SIZE), image)


def test_prompt_over_the_limit_is_refused_naming_the_field(generator):
    image = sample_image(SIZE)
    with pytest.raises(LoramgrError, match="^n_prompt: .* tokens, over the limit of 75 .*--max-prompt-tokens"):
        generator.generate(AdapterChoice(), GenerationSettings(prompt="a bird", n_prompt=LONG, max_prompt_tokens=75,
                                                               steps=1, resolution=SIZE), image)
    with pytest.raises(LoramgrError, match=r"clip_skip must be in \[1, 2\]"):
        generator.generate(AdapterChoice(), GenerationSettings(prompt="a bird", clip_skip=3, steps=1,
                                                               resolution=SIZE), image)
