"""Shared fixtures: the tiny architecture built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Real LoRA files downloaded from public hubs (see SOURCES.md in that folder). They are not in
# this repository; CI sets LORAMGR_TESTDATA, and a checkout beside the project's shared/ folder
# finds them there.
_SIBLING_TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "loras"


@pytest.fixture(scope="session")
def testdata() -> Path:
    """The folder of real LoRA files, or a skip that says how to provide it."""
    folder = Path(os.environ.get("LORAMGR_TESTDATA") or _SIBLING_TESTDATA)
    if not (folder / "SOURCES.md").is_file():
        pytest.skip(f"real LoRA files not found in {folder}: set LORAMGR_TESTDATA to a folder holding "
                    "the files listed in docs/testdata.md")
    return folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A diffusers folder (SD pipeline + controlnet/) of the tiny architecture, seed 0."""
    from loramgr.models.architectures import build_random_folder

    folder = tmp_path_factory.mktemp("tiny") / "tiny-seed0"
    build_random_folder("tiny", 0, folder)
    return folder


@pytest.fixture(scope="session")
def sd15_param_shapes() -> dict[str, tuple[int, ...]]:
    """Every parameter name -> shape of the sd15 base namespace, built on the meta device (no memory)."""
    from loramgr.models.architectures import architecture, build_components

    comps = build_components(architecture("sd15"), device="meta")
    shapes = {}
    # The text encoder graph names its weights "text_model." + CLIPTextModel's names (see models/fused.py).
    for prefix, module in (("unet.", comps["unet"]), ("controlnet.", comps["controlnet"]),
                           ("text_model.", comps["text_encoder"])):
        shapes.update({prefix + n: tuple(p.shape) for n, p in module.named_parameters()})
    return shapes


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory):
    """A workspace with the tiny base (random, seed 0) exported as ``tiny``."""
    from loramgr.export import export_base
    from loramgr.workspace import Workspace

    ws = Workspace.resolve(tmp_path_factory.mktemp("ws"))
    export_base(ws, "tiny", arch="tiny", seed=0)
    return ws


@pytest.fixture(scope="session")
def input_png(tmp_path_factory) -> Path:
    """loramgr's 64 px sample picture as a PNG file: the ``--image`` of CLI runs."""
    from PIL import Image

    from loramgr.samples import sample_image

    path = tmp_path_factory.mktemp("img") / "in.png"
    Image.fromarray(sample_image(64)).save(path)
    return path


@pytest.fixture(scope="module")
def reference(tiny_folder):
    """diffusers' own ControlNet pipeline on the tiny folder (one per test module: modules may change it;
    a module needing another reference defines its own ``reference``)."""
    from reference_pipelines import reference_pipeline

    return reference_pipeline(tiny_folder)


@pytest.fixture(scope="module")
def pipe(reference):
    """loramgr's pipeline over diffusers' own modules (the torch reference runner): the same weights as
    ``reference``, so a difference between the two is the pipeline's."""
    from loramgr.backends.torch_runner import TorchRunner
    from loramgr.pipeline.controlnet import ControlNetPipeline

    return ControlNetPipeline(TorchRunner.from_components(reference.components), reference.tokenizer,
                              reference.scheduler.config, reference.vae.config.scaling_factor)
