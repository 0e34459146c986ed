"""Per-base generation defaults (loramgr.defaults): the size a base was built for, a negative prompt its tokenizer holds.

The reference for the sizes is each architecture's diffusers config (UNet ``sample_size`` x
the VAE's 2**(blocks - 1)); for the prompt, the tokenizers' own token counts.
"""

from __future__ import annotations

import dataclasses

from loramgr.bases import OpenBase
from loramgr.defaults import PER_BASE, BaseDefaults, base_defaults, defaults_for, fitting_prompt
from loramgr.models.architectures import architecture
from loramgr.models.tokenizer import write_clip_tokenizer
from loramgr.pipeline.settings import GenerationSettings

STANDARD = GenerationSettings(prompt="x")


def _configs(arch: str) -> dict:
    a = architecture(arch)
    return {"unet": a.unet, "vae": a.vae, "controlnet": a.controlnet, "text_encoder": a.text_encoder}


def test_sd15_keeps_controlnets_defaults(tmp_path):
    """SD1.5 with CLIP ViT-L/14's tokenizer: 512 px and the whole negative prompt (30 tokens), as before."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert len(tokenizer(STANDARD.n_prompt).input_ids) <= 77
    assert defaults_for(_configs("sd15"), tokenizer) == BaseDefaults(512, STANDARD.n_prompt)


def test_tiny_gets_its_size_and_a_negative_prompt_that_fits(tiny_workspace):
    from transformers import CLIPTokenizer

    base = OpenBase.resolve(tiny_workspace, "tiny")
    defaults = base_defaults(base)
    assert defaults.resolution == 128 == base.manifest.configs["unet"]["sample_size"] * 8
    tokenizer = CLIPTokenizer.from_pretrained(base.dir / "tokenizer", local_files_only=True)
    count = lambda text: len(tokenizer(text).input_ids)  # noqa: E731 - with BOS and EOS, as the pipeline counts
    assert count(STANDARD.n_prompt) > 77  # the standard one is cut on tiny: why the default is the base's
    assert count(defaults.n_prompt) <= 77
    # the longest run of whole items from the start: one item more would not fit
    items = STANDARD.n_prompt.split(", ")
    kept = defaults.n_prompt.split(", ")
    assert kept == items[: len(kept)] and count(", ".join(items[: len(kept) + 1])) > 77


def test_settings_fill_only_what_is_not_given():
    defaults = BaseDefaults(128, "lowres")
    assert defaults.settings(prompt="a") == dataclasses.replace(STANDARD, prompt="a", resolution=128, n_prompt="lowres")
    given = defaults.settings(prompt="a", resolution=320, n_prompt="", steps=3)
    assert (given.resolution, given.n_prompt, given.steps) == (320, "", 3)
    assert set(defaults.as_dict()) == {f.name for f in dataclasses.fields(GenerationSettings)} - {"prompt"}
    assert {k: defaults.as_dict()[k] for k in PER_BASE} == {"resolution": 128, "n_prompt": "lowres"}


def test_fitting_prompt_cuts_between_items():
    assert fitting_prompt("a, bb, ccc", len, 5) == "a, bb"
    assert fitting_prompt("a, bb, ccc", len, 100) == "a, bb, ccc"
    assert fitting_prompt("abcdef", len, 3) == ""
