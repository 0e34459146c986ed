"""Base and ControlNet loading, and the LDM name tables, checked against diffusers' own converters.

Name tables are checked on the full sd15 architecture built on the meta device (names
and shapes, no memory); values on the tiny architecture, which shares the topology.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from diffusers.loaders.single_file_utils import (
    convert_controlnet_checkpoint,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file, save_file

from loramgr.errors import BadFileError
from loramgr.models.architectures import architecture, build_components, randomize_
from loramgr.models.ldm import (
    LDM_CONTROLNET_PREFIX,
    NameTable,
    controlnet_entries,
    diffusers_unet_module_to_ldm,
    ldm_state_dict,
    ldm_unet_module_to_diffusers,
    save_controlnet_original,
    save_single_file,
    to_ldm_state_dict,
)
from loramgr.models.loading import (
    detect_architecture,
    detect_controlnet_architecture,
    load_components,
    load_controlnet,
)

MODULES = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def sd15_meta() -> dict:
    return build_components(architecture("sd15"), device="meta")


@pytest.fixture(scope="module")
def tiny() -> dict:
    """The tiny model with seed 0: the same weights as the ``tiny_folder`` fixture."""
    components = build_components(architecture("tiny"))
    randomize_(components, 0)
    return components


@pytest.fixture(scope="module")
def tiny_files(tiny, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("single")
    files = {suffix: folder / f"tiny{suffix}" for suffix in (".safetensors", ".ckpt")}
    for path in files.values():
        save_single_file(tiny, path)
    return files


def assert_same_weights(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    """Same names, shapes and dtypes; bit-exact values unless on the meta device."""
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].shape == tensor.shape, name
        assert actual[name].dtype == tensor.dtype, name
        if not tensor.is_meta:
            assert torch.equal(actual[name], tensor), name


# Name tables.

EXAMPLES = {
    "input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in",
    "input_blocks.4.0.in_layers.2": "down_blocks.1.resnets.0.conv1",
    "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
    "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks.3.0.skip_connection": "up_blocks.1.resnets.0.conv_shortcut",
    "middle_block.1.transformer_blocks.0.attn1.to_q": "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
    "middle_block.2.emb_layers.1": "mid_block.resnets.1.time_emb_proj",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.2": "conv_out",
}


@pytest.mark.parametrize(("ldm", "diffusers"), EXAMPLES.items())
def test_unet_module_examples(ldm, diffusers):
    assert ldm_unet_module_to_diffusers(ldm) == diffusers
    assert diffusers_unet_module_to_ldm(diffusers) == ldm


@pytest.mark.parametrize("path", ["input_blocks.1", "input_blocks.1.0.in_layers", "input_blocks.12.0", "nope"])
def test_unet_modules_without_counterpart(path):
    assert ldm_unet_module_to_diffusers(path) is None


def test_every_sd15_unet_module_round_trips(sd15_meta):
    unet = sd15_meta["unet"]
    mapped = {}
    for name, module in unet.named_modules():
        ldm = diffusers_unet_module_to_ldm(name)
        if next(module.parameters(recurse=False), None) is not None:
            assert ldm is not None, name
        if ldm is not None:
            assert ldm_unet_module_to_diffusers(ldm) == name
            mapped[ldm] = name
    assert len(mapped) == len(set(mapped.values()))  # one LDM name per module
    assert sum(1 for _ in unet.parameters()) == 686


def test_unet_table_agrees_with_diffusers(sd15_meta):
    """Every parameter, named by our table, lands where ``convert_ldm_unet_checkpoint`` puts it."""
    unet = sd15_meta["unet"]
    params = dict(unet.named_parameters())
    ldm = {"model.diffusion_model." + diffusers_unet_module_to_ldm(name.rsplit(".", 1)[0]) + "."
           + name.rsplit(".", 1)[1]: param for name, param in params.items()}
    converted = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert sorted(converted) == sorted(params)
    assert all(converted[name] is param for name, param in params.items())


def test_controlnet_table_agrees_with_diffusers(sd15_meta):
    controlnet = sd15_meta["controlnet"]
    params = dict(controlnet.named_parameters())
    table = NameTable(controlnet_entries(controlnet.config))
    ldm = to_ldm_state_dict(params, table, LDM_CONTROLNET_PREFIX)
    converted = convert_controlnet_checkpoint(ldm, dict(controlnet.config))
    assert sorted(converted) == sorted(params)
    assert all(converted[name] is param for name, param in params.items())
    assert all(table.to_diffusers(table.to_ldm(name)) == name for name in params)


# Writers: diffusers' converters read back what loramgr writes.


@pytest.mark.parametrize("arch", ["sd15", "tiny"])
def test_ldm_state_dict_converts_back(arch, sd15_meta, tiny):
    components = sd15_meta if arch == "sd15" else tiny
    state = ldm_state_dict(components)
    unet, vae, text_encoder = (components[name] for name in MODULES)
    assert_same_weights(unet.state_dict(), convert_ldm_unet_checkpoint(state, dict(unet.config)))
    assert_same_weights(vae.state_dict(), convert_ldm_vae_checkpoint(state, dict(vae.config)))
    clip = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()}
    assert_same_weights(text_encoder.state_dict(), clip)
    assert len(state) == sum(len(components[name].state_dict()) for name in MODULES)


def test_controlnet_original_converts_back(tiny, tmp_path):
    controlnet = tiny["controlnet"]
    save_controlnet_original(controlnet, tmp_path / "cn.pth")
    state = torch.load(tmp_path / "cn.pth", weights_only=True)
    assert all(key.startswith(LDM_CONTROLNET_PREFIX) for key in state)
    assert {"control_model.zero_convs.11.0.weight", "control_model.middle_block_out.0.weight",
            "control_model.input_hint_block.14.weight", "control_model.time_embed.2.bias"} <= set(state)
    assert_same_weights(controlnet.state_dict(), convert_controlnet_checkpoint(state, dict(controlnet.config)))


# Loading.


def assert_loaded(components: dict, reference: dict, names=MODULES) -> None:
    for name in names:
        module = components[name]
        assert not module.training
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in module.parameters())
        assert_same_weights(reference[name].state_dict(), module.state_dict())


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_round_trip(suffix, tiny_files, tiny):
    components = load_components(tiny_files[suffix])
    assert sorted(components) == ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert_loaded(components, tiny)
    assert type(components["scheduler"]).__name__ == "DDIMScheduler"
    tokenizer = components["tokenizer"]
    assert tokenizer("a photo of a cat").input_ids[0] == tokenizer.bos_token_id


def test_fp16_single_file_loads_as_fp32(tiny, tmp_path):
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in ldm_state_dict(tiny).items()}, path)
    unet = load_components(path)["unet"]
    expected = {k: v.half().float() for k, v in tiny["unet"].state_dict().items()}
    assert_same_weights(expected, unet.state_dict())


def test_diffusers_folder(tiny_folder, tiny):
    components = load_components(tiny_folder)
    assert sorted(components) == ["controlnet", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert_loaded(components, tiny, MODULES + ("controlnet",))


CONTROLNET_FORMS = ["original.pth", "original.safetensors", "diffusers.safetensors", "folder", "pipeline"]


@pytest.mark.parametrize("form", CONTROLNET_FORMS)
def test_controlnet_forms(form, tiny, tiny_folder, tmp_path):
    reference = tiny["controlnet"]
    if form.startswith("original"):
        src = tmp_path / form
        save_controlnet_original(reference, src)
    elif form == "diffusers.safetensors":
        src = tmp_path / form
        save_file(reference.state_dict(), src)
    else:
        src = tiny_folder / "controlnet" if form == "folder" else tiny_folder
    assert_loaded({"controlnet": load_controlnet(src)}, tiny, ["controlnet"])


def test_controlnet_with_given_config(tiny, tmp_path):
    save_controlnet_original(tiny["controlnet"], tmp_path / "cn.safetensors")
    model = load_controlnet(tmp_path / "cn.safetensors", config=architecture("tiny").controlnet)
    assert_same_weights(tiny["controlnet"].state_dict(), model.state_dict())


def test_detects_sd15(sd15_meta):
    shapes = {key: tuple(value.shape) for key, value in ldm_state_dict(sd15_meta).items()}
    assert detect_architecture(shapes, Path("x")).name == "sd15"
    controlnet = sd15_meta["controlnet"].state_dict()
    table = NameTable(controlnet_entries(sd15_meta["controlnet"].config))
    original = to_ldm_state_dict(controlnet, table, LDM_CONTROLNET_PREFIX)
    for state in (controlnet, original):
        shapes = {key: tuple(value.shape) for key, value in state.items()}
        assert detect_controlnet_architecture(shapes, Path("x")).name == "sd15"


# Bad input: one BadFileError, naming the file and saying what is wrong.


def _safetensors(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file(state, path)
    return path


def _sd_like(path: Path, cross_attention_dim: int, in_channels: int = 4, extra_key: str | None = None) -> Path:
    """A checkpoint with the shapes another SD UNet has where loramgr looks."""
    return _safetensors(path, {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, in_channels, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
            torch.zeros(320, cross_attention_dim),
        **({extra_key: torch.zeros(1)} if extra_key else {}),
    })


def _truncated(path: Path, source: Path, size: int) -> Path:
    path.write_bytes(source.read_bytes()[:size])
    return path


def _lfs_pointer(path: Path) -> Path:
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123abcd\nsize 4265146304\n")
    return path


def _folder_without(folder: Path, part: str, tmp_path: Path) -> Path:
    copy = shutil.copytree(folder, tmp_path / "copy")
    target = copy / part
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    return copy


def _folder_missing_weight(folder: Path, tmp_path: Path) -> Path:
    copy = shutil.copytree(folder, tmp_path / "copy")
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["conv_in.weight"]
    save_file(state, weights)
    return copy


def _missing_weight(path: Path, tiny: dict) -> Path:
    state = ldm_state_dict(tiny)
    del state["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]
    return _safetensors(path, state)


def _unet_only(path: Path, tiny: dict) -> Path:
    return _safetensors(path, {k: v for k, v in ldm_state_dict(tiny).items() if k.startswith("model.diffusion_model.")})


def _wrong_vocab(path: Path, tiny: dict) -> Path:
    state = ldm_state_dict(tiny)
    state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(600, 32)
    return _safetensors(path, state)


def _controlnet_file(path: Path, tiny: dict) -> Path:
    save_controlnet_original(tiny["controlnet"], path)
    return path


def _empty_folder(path: Path) -> Path:
    path.mkdir()
    return path


def make_bad_base(case: str, t: Path, files: dict[str, Path], tiny: dict, folder: Path) -> Path:
    """The file or folder of one bad-input case."""
    return {
        "missing": lambda: t / "nope.safetensors",
        "wrong type": lambda: Path(shutil.copy(files[".ckpt"], t / "model.bin")),
        "lfs pointer": lambda: _lfs_pointer(t / "model.safetensors"),
        "truncated data": lambda: _truncated(t / "cut.safetensors", files[".safetensors"], -1000),
        "truncated header": lambda: _truncated(t / "cut.safetensors", files[".safetensors"], 100),
        "truncated ckpt": lambda: _truncated(t / "cut.ckpt", files[".ckpt"], -1000),
        "sdxl": lambda: _sd_like(t / "xl.safetensors", 2048, extra_key="conditioner.embedders.0.weight"),
        "sdxl by shape": lambda: _sd_like(t / "xl.safetensors", 2048),
        "sd2": lambda: _sd_like(t / "v2.safetensors", 1024),
        "sd2 openclip": lambda: _sd_like(t / "v2.safetensors", 320,
                                         extra_key="cond_stage_model.model.token_embedding.weight"),
        "inpainting": lambda: _sd_like(t / "inpaint.safetensors", 768, in_channels=9),
        "controlnet as base": lambda: _controlnet_file(t / "cn.safetensors", tiny),
        "lora as base": lambda: _safetensors(t / "l.safetensors", {"lora_unet_x.lora_down.weight": torch.ones(1)}),
        "missing weight": lambda: _missing_weight(t / "m.safetensors", tiny),
        "unet only": lambda: _unet_only(t / "u.safetensors", tiny),
        "wrong shape": lambda: _wrong_vocab(t / "w.safetensors", tiny),
        "empty folder": lambda: _empty_folder(t / "empty"),
        "folder without vae": lambda: _folder_without(folder, "vae", t),
        "folder without weights": lambda: _folder_without(folder, "unet/diffusion_pytorch_model.safetensors", t),
        "folder missing a weight": lambda: _folder_missing_weight(folder, t),
        "lfs pointer in folder": lambda: _lfs_pointer(
            shutil.copytree(folder, t / "copy") / "text_encoder" / "model.safetensors").parents[1],
    }[case]()


BAD_BASES = {
    "missing": "no such file or folder",
    "wrong type": "unsupported file type '.bin'",
    "lfs pointer": "is a Git LFS pointer",
    "truncated data": "truncated safetensors file: its tensors need",
    "truncated header": "truncated or not a safetensors file",
    "truncated ckpt": "not a readable PyTorch checkpoint",
    "sdxl": "looks like an SDXL checkpoint (conditioner.embedders.*)",
    "sdxl by shape": "looks like an SDXL checkpoint (cross-attention dim 2048)",
    "sd2": "looks like an SD2.x checkpoint (cross-attention dim 1024)",
    "sd2 openclip": "looks like an SD2.x checkpoint (OpenCLIP text encoder)",
    "inpainting": "unknown architecture (UNet conv_in [320, 9, 3, 3], cross-attention dim 768)",
    "controlnet as base": "is a ControlNet",
    "lora as base": "no Stable Diffusion UNet",
    "missing weight": "incomplete tiny checkpoint: 1 of 900 tensors missing, "
                      "e.g. model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
    "unet only": "incomplete tiny checkpoint: 216 of 900 tensors missing, "
                 "e.g. first_stage_model.encoder.conv_in.weight",
    "wrong shape": "1 tensors have the wrong shape for tiny, e.g. cond_stage_model.transformer.text_model.embeddings"
                   ".token_embedding.weight [600, 32] (expected [520, 32])",
    "empty folder": "diffusers folder without unet/",
    "folder without vae": "diffusers folder without vae/",
    "folder without weights": "no diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin",
    "folder missing a weight": "incomplete unet weights: 1 missing, e.g. conv_in.weight",
    "lfs pointer in folder": "is a Git LFS pointer",
}


@pytest.mark.parametrize("case", BAD_BASES)
def test_bad_base(case, tmp_path, tiny_files, tiny, tiny_folder):
    with pytest.raises(BadFileError, match=re.escape(BAD_BASES[case])):
        load_components(make_bad_base(case, tmp_path, tiny_files, tiny, tiny_folder))


def make_bad_controlnet(case: str, t: Path) -> Path:
    to_k = f"{LDM_CONTROLNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    return {
        "missing": lambda: t / "nope.pth",
        "wrong type": lambda: _safetensors(t / "cn.onnx", {"a": torch.zeros(1)}),
        "lfs pointer": lambda: _lfs_pointer(t / "cn.pth"),
        "not a checkpoint": lambda: _truncated(t / "cn.pth", _lfs_pointer(t / "x.txt"), 20),
        "no controlnet keys": lambda: _safetensors(t / "x.safetensors", {"a.weight": torch.zeros(1)}),
        "sdxl": lambda: _safetensors(t / "x.safetensors", {to_k: torch.zeros(8, 2048)}),
        "empty folder": lambda: _empty_folder(t / "empty"),
    }[case]()


BAD_CONTROLNETS = {
    "missing": "no such file or folder",
    "wrong type": "unsupported file type '.onnx'",
    "lfs pointer": "is a Git LFS pointer",
    "not a checkpoint": "not a readable PyTorch checkpoint",
    "no controlnet keys": "no ControlNet weights",
    "sdxl": "looks like an SDXL ControlNet",
    "empty folder": "neither a ControlNet folder",
}


@pytest.mark.parametrize("case", BAD_CONTROLNETS)
def test_bad_controlnet(case, tmp_path):
    with pytest.raises(BadFileError, match=re.escape(BAD_CONTROLNETS[case])):
        load_controlnet(make_bad_controlnet(case, tmp_path))


def test_bad_file_message_is_one_line(tmp_path):
    with pytest.raises(BadFileError) as info:
        load_components(_truncated(tmp_path / "cut.safetensors", _lfs_pointer(tmp_path / "p.txt"), 3))
    assert str(info.value).startswith(str(tmp_path / "cut.safetensors") + ": ")
    assert "\n" not in str(info.value)

