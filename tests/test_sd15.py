"""The full-size SD1.5 architecture (slow: minutes on 2 cores, ~16 GB peak; `pytest -m slow`)."""

from __future__ import annotations

import numpy as np
import pytest

from loramgr.convert import convert_adapter
from loramgr.manifest import CONTROLNET, TEXT_ENCODER, UNET, Manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd15_workspace(tmp_path_factory):
    from loramgr.export import export_base
    from loramgr.workspace import Workspace

    ws = Workspace.resolve(tmp_path_factory.mktemp("sd15"))
    export_base(ws, "sd15", arch="sd15", seed=0)
    return ws


def test_weight_map_covers_all_parameters(sd15_workspace, sd15_param_shapes):
    manifest = Manifest.load(sd15_workspace.base_dir("sd15"))
    shapes = {p: e.torch_shape for g in (UNET, CONTROLNET, TEXT_ENCODER) for p, e in manifest.graphs[g].weights.items()}
    assert shapes == sd15_param_shapes
    counts = {g: sum(int(np.prod(e.torch_shape)) for e in manifest.graphs[g].weights.values()) for g in (UNET, CONTROLNET, TEXT_ENCODER)}
    assert counts[UNET] == 859_520_964 and counts[CONTROLNET] == 361_279_120
    assert counts[TEXT_ENCODER] == 123_060_480


@pytest.mark.parametrize("name", [
    "sd15_cloneofsimo_analog_svd_r4", "sd15_kohya_lycoris_lokr_r4",
    "sd15_old_processor_catundchat", "sd15_unet_prefix_lora_down_timohavdk",
])
def test_real_files_convert_with_every_key(sd15_workspace, name, testdata):
    
    report = convert_adapter(sd15_workspace, testdata / f"{name}.safetensors", base="sd15")
    assert report.keys_used == report.keys_total and not report.unknown_keys
    assert report.size_bytes <= 1.1 * report.source_bytes


def test_base_carries_clips_tokenizer(sd15_workspace):
    """--arch sd15 exports CLIP ViT-L/14's real tokenizer (the one SD1.5's text encoder learned)."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(sd15_workspace.base_dir("sd15") / "tokenizer", local_files_only=True)
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
