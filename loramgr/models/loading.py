"""Loading a base model and ControlNets from what users have on disk, offline.

Sources: a diffusers folder (``StableDiffusionPipeline`` / ``StableDiffusionControlNetPipeline``
layout), an original single-file checkpoint (``.safetensors`` / ``.ckpt``), and ControlNets
as diffusers folders, diffusers ``.safetensors`` or lllyasviel's ``.pth`` / ``.safetensors``.

diffusers converts single files itself, but asks the hub for the matching configs.
No hub is reachable here, so the architecture is recognized from tensor shapes (one
of :func:`~loramgr.models.architectures.architecture`'s) and its configs are written
to a temporary folder that diffusers reads instead.

Files are checked before any library sees them: a Git LFS pointer, a truncated
safetensors file or another architecture's checkpoint is refused with a
:class:`~loramgr.errors.BadFileError` that says what the file is, not a traceback
from deep inside a loader.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from loramgr.errors import BadFileError
from loramgr.filechecks import check_head, check_safetensors, load_safetensors, safetensors_shapes
from loramgr.models.architectures import ARCHITECTURES, ArchitectureConfig, architecture
from loramgr.models.ldm import (
    LDM_CONTROLNET_PREFIX,
    LDM_UNET_PREFIX,
    NameTable,
    controlnet_entries,
    ldm_state_dict,
    to_ldm_state_dict,
)

if TYPE_CHECKING:
    import torch
    from diffusers import ControlNetModel

BASE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
BASE_SUFFIXES = (".safetensors", ".ckpt")
CONTROLNET_SUFFIXES = (".safetensors", ".pth")

# What a diffusers folder must hold, per component: files of which at least one must exist.
_FOLDER_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "controlnet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"),
    "tokenizer": ("vocab.json", "tokenizer.json"),
    "scheduler": ("scheduler_config.json",),
}

Shapes = Mapping[str, tuple[int, ...]]


def load_components(src: Path) -> dict:
    """Load a SD1.5-architecture base: ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``.

    Plus ``controlnet`` where a diffusers folder has ``controlnet/``. Modules are fp32,
    in eval mode, without gradients.

    Example::

        components = load_components(Path("v1-5-pruned-emaonly.safetensors"))
    """
    src = Path(src)
    if src.is_dir():
        components = _load_folder(src)
    else:
        check_weights_file(src, BASE_SUFFIXES, "a diffusers folder, .safetensors or .ckpt checkpoint")
        components = _load_single_file(src)
    for name, module in components.items():
        if name in ("unet", "vae", "text_encoder", "controlnet"):
            components[name] = _prepared(module, src, name)
    return components


def load_controlnet(src: Path, config: dict | None = None) -> ControlNetModel:
    """Load a ControlNet: diffusers folder, diffusers ``.safetensors``, or lllyasviel's ``.pth`` / ``.safetensors``.

    ``config`` is a diffusers ControlNet config; without one, the architecture is
    recognized from the tensor shapes. A pipeline folder with ``controlnet/`` works too.
    """
    from diffusers import ControlNetModel

    src = Path(src)
    if src.is_dir():
        folder = src if (src / "config.json").is_file() else src / "controlnet"
        if not folder.is_dir():
            raise BadFileError(src, "neither a ControlNet folder (config.json) nor a pipeline folder with controlnet/")
        _check_folder_part(folder, "controlnet")
        return _prepared(_from_pretrained(ControlNetModel, folder), src, "controlnet")

    check_weights_file(src, CONTROLNET_SUFFIXES, "a diffusers folder, .safetensors or .pth ControlNet")
    state = _read_state_dict(src)
    original = any(key.startswith(LDM_CONTROLNET_PREFIX) for key in state)
    if original:  # lllyasviel's first files carry the whole SD model next to control_model.*
        state = {key: value for key, value in state.items() if key.startswith(LDM_CONTROLNET_PREFIX)}
    elif "controlnet_cond_embedding.conv_in.weight" not in state:
        raise BadFileError(src, "no ControlNet weights: neither control_model.* (original) "
                                "nor controlnet_cond_embedding.* (diffusers) keys")
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    if config is None:
        config = detect_controlnet_architecture(shapes, src).controlnet
    _check_complete(shapes, _expected_controlnet_shapes(config, original), src, "ControlNet")
    with tempfile.TemporaryDirectory(prefix="loramgr-config-") as folder:
        (Path(folder) / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", **config}))
        model = ControlNetModel.from_single_file(state, config=folder, local_files_only=True)
    return _prepared(model, src, "controlnet")


# Recognizing the architecture from tensor shapes.


def _base_signature(arch: ArchitectureConfig) -> dict[str, tuple[int, ...]]:
    """The UNet shapes that set one architecture apart (width, input channels, cross-attention).

    The rest of the checkpoint is then checked key by key, so a file lacking its VAE
    is reported as incomplete rather than as of unknown architecture.
    """
    unet = arch.unet
    width = unet["block_out_channels"][0]
    return {
        f"{LDM_UNET_PREFIX}input_blocks.0.0.weight": (width, unet["in_channels"], 3, 3),
        f"{LDM_UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
            (width, unet["cross_attention_dim"]),
    }


def _controlnet_signature(arch: ArchitectureConfig) -> dict[str, tuple[int, ...]]:
    """Shape-defining keys of lllyasviel's layout (without ``control_model.``)."""
    cn = arch.controlnet
    width = cn["block_out_channels"][0]
    return {
        "input_blocks.0.0.weight": (width, cn["in_channels"], 3, 3),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (width, cn["cross_attention_dim"]),
        "input_hint_block.0.weight": (cn["conditioning_embedding_out_channels"][0], 3, 3, 3),
    }


def _other_model(cross_attention_dim: int | None) -> str | None:
    return {1024: "an SD2.x", 2048: "an SDXL"}.get(cross_attention_dim)


def _match(shapes: Shapes, signature: Mapping[str, tuple[int, ...]]) -> bool:
    return all(tuple(shapes.get(key, ())) == shape for key, shape in signature.items())


def detect_architecture(shapes: Shapes, path: Path) -> ArchitectureConfig:
    """The built-in architecture of an LDM base checkpoint, or BadFileError saying what it is instead."""
    if any(key.startswith("conditioner.embedders.") for key in shapes):
        raise BadFileError(path, "looks like an SDXL checkpoint (conditioner.embedders.*); only SD1.5 is supported")
    if f"{LDM_UNET_PREFIX}input_blocks.0.0.weight" not in shapes:
        if any(key.startswith(LDM_CONTROLNET_PREFIX) for key in shapes):
            raise BadFileError(path, "is a ControlNet (control_model.*), not a base model checkpoint")
        raise BadFileError(path, f"no Stable Diffusion UNet ({LDM_UNET_PREFIX}*) in this checkpoint")
    for name in ARCHITECTURES:
        arch = architecture(name)
        if _match(shapes, _base_signature(arch)):
            return arch
    to_k = shapes.get(f"{LDM_UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    cross_attention_dim = to_k[1] if to_k else None
    if other := _other_model(cross_attention_dim):
        raise BadFileError(path, f"looks like {other} checkpoint (cross-attention dim {cross_attention_dim}); "
                                 "only SD1.5 is supported")
    if "cond_stage_model.model.token_embedding.weight" in shapes:
        raise BadFileError(path, "looks like an SD2.x checkpoint (OpenCLIP text encoder); only SD1.5 is supported")
    conv_in = tuple(shapes[f"{LDM_UNET_PREFIX}input_blocks.0.0.weight"])
    raise BadFileError(path, f"unknown architecture (UNet conv_in {list(conv_in)}, cross-attention dim "
                             f"{cross_attention_dim}); expected one of {', '.join(ARCHITECTURES)}")


def detect_controlnet_architecture(shapes: Shapes, path: Path) -> ArchitectureConfig:
    """The built-in architecture of a ControlNet state dict, original or diffusers names."""
    for name in ARCHITECTURES:
        arch = architecture(name)
        signature = _controlnet_signature(arch)
        original = {LDM_CONTROLNET_PREFIX + key: shape for key, shape in signature.items()}
        table = NameTable(controlnet_entries(arch.controlnet))
        diffusers = {table.to_diffusers(key): shape for key, shape in signature.items()}
        if _match(shapes, original) or _match(shapes, diffusers):
            return arch
    to_k = shapes.get(f"{LDM_CONTROLNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight") or \
        shapes.get("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")
    cross_attention_dim = to_k[1] if to_k else None
    if other := _other_model(cross_attention_dim):
        raise BadFileError(path, f"looks like {other} ControlNet (cross-attention dim {cross_attention_dim}); "
                                 "only SD1.5 is supported")
    raise BadFileError(path, f"unknown ControlNet architecture (cross-attention dim {cross_attention_dim}); "
                             f"expected one of {', '.join(ARCHITECTURES)}")


@cache
def _expected_base_shapes(arch_name: str) -> dict[str, tuple[int, ...]]:
    """Every LDM key (and its shape) a base checkpoint of ``arch_name`` must hold."""
    from loramgr.models.architectures import build_components

    state = ldm_state_dict(build_components(architecture(arch_name), device="meta"))
    return {key: tuple(value.shape) for key, value in state.items()}


def _expected_controlnet_shapes(config: Mapping, original: bool) -> dict[str, tuple[int, ...]]:
    """Every key (and its shape) of a ControlNet with ``config``: lllyasviel's names or diffusers'."""
    import torch
    from diffusers import ControlNetModel

    with torch.device("meta"):
        state = ControlNetModel(**config).state_dict()
    if original:
        state = to_ldm_state_dict(state, NameTable(controlnet_entries(config)), LDM_CONTROLNET_PREFIX)
    return {key: tuple(value.shape) for key, value in state.items()}


def _check_complete(shapes: Shapes, expected: Shapes, path: Path, what: str) -> None:
    """Refuse missing or mis-shaped tensors, which diffusers would leave on the meta device.

    Extra keys are left to diffusers: real checkpoints carry EMA copies, schedule
    buffers and ``position_ids`` that are no weights of the model.
    """
    missing = [key for key in expected if key not in shapes]
    if missing:
        raise BadFileError(path, f"incomplete {what} checkpoint: {len(missing)} of {len(expected)} tensors "
                                 f"missing, e.g. {missing[0]}")
    wrong = [key for key in expected if tuple(shapes[key]) != tuple(expected[key])]
    if wrong:
        key = wrong[0]
        raise BadFileError(path, f"{len(wrong)} tensors have the wrong shape for {what}, e.g. {key} "
                                 f"{list(shapes[key])} (expected {list(expected[key])})")


# Single files.


def _load_single_file(path: Path) -> dict:
    from diffusers import StableDiffusionPipeline

    shapes = _checkpoint_shapes(path)
    arch = detect_architecture(shapes, path)
    _check_complete(shapes, _expected_base_shapes(arch.name), path, arch.name)
    with tempfile.TemporaryDirectory(prefix="loramgr-config-") as folder:
        _write_pipeline_configs(arch, Path(folder))
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=folder, local_files_only=True, safety_checker=None, feature_extractor=None,
        )
    return {name: pipe.components[name] for name in BASE_COMPONENTS}


def _write_pipeline_configs(arch: ArchitectureConfig, folder: Path) -> None:
    """The config-only diffusers folder ``from_single_file(config=...)`` reads instead of the hub."""
    from transformers import CLIPTextConfig

    from loramgr.models.tokenizer import write_tokenizer

    classes = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
               "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
               "scheduler": ("diffusers", arch.scheduler["_class_name"])}
    index = {"_class_name": "StableDiffusionPipeline", **classes, "safety_checker": [None, None],
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index))
    for name, config in (("unet", arch.unet), ("vae", arch.vae)):
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps({"_class_name": classes[name][1], **config}))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(arch.scheduler))
    CLIPTextConfig(**arch.text_encoder).save_pretrained(folder / "text_encoder")
    write_tokenizer(folder / "tokenizer", arch)


def check_weights_file(path: Path, suffixes: tuple[str, ...], expected: str) -> None:
    """Refuse what no loader can read, before one tries: missing, wrong type, empty, LFS pointer, truncated.

    ``expected`` completes the message, e.g. ``"a .safetensors LoRA"``.
    """
    if not path.exists():
        raise BadFileError(path, "no such file or folder")
    if not path.is_file():
        raise BadFileError(path, f"not a regular file; expected {expected}")
    check_head(path)
    if path.suffix not in suffixes:
        raise BadFileError(path, f"unsupported file type {path.suffix or '(no suffix)'!r}; expected {expected}")
    if path.suffix == ".safetensors":
        check_safetensors(path)


def _checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a checkpoint; a safetensors file is not read beyond its header."""
    if path.suffix == ".safetensors":
        return safetensors_shapes(path)
    return {key: tuple(value.shape) for key, value in _read_state_dict(path).items()}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (memory-mapped where the format allows), unwrapped from ``state_dict``."""
    import zipfile

    import torch

    if path.suffix == ".safetensors":
        return load_safetensors(path)[0]
    try:  # mmap needs the zip format of torch >= 1.6; older pickles load whole
        state = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except Exception as error:  # the unpickler raises many types; each means a file we cannot use
        raise BadFileError(path, f"not a readable PyTorch checkpoint ({_first_line(error)})") from error
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BadFileError(path, f"holds a {type(state).__name__}, not a state dict")
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# Diffusers folders.


def _load_folder(src: Path) -> dict:
    import diffusers
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    parts = BASE_COMPONENTS + (("controlnet",) if (src / "controlnet").is_dir() else ())
    for name in parts:
        _check_folder_part(src / name, name)
    try:
        scheduler_config = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    except ValueError:
        raise BadFileError(src / "scheduler" / "scheduler_config.json", "not a JSON file") from None
    if not isinstance(scheduler_config, dict):
        raise BadFileError(src / "scheduler" / "scheduler_config.json", "not a JSON object")
    scheduler_class = getattr(diffusers, scheduler_config.get("_class_name", ""), None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
        raise BadFileError(src / "scheduler", f"unknown scheduler class {scheduler_config.get('_class_name')!r}")
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "tokenizer": CLIPTokenizer, "scheduler": scheduler_class, "controlnet": ControlNetModel}
    return {name: _from_pretrained(classes[name], src / name) for name in parts}


def _from_pretrained(cls, folder: Path):
    """``cls.from_pretrained(folder)``; a corrupt or refused weights file or a non-JSON config is a BadFileError.

    The loaders raise OSError (unreadable weights, a pickle ``weights_only`` refuses),
    ValueError/JSONDecodeError (configs) or others; each means a folder we cannot use.
    """
    try:
        return cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError, EOFError) as error:
        raise BadFileError(folder, f"cannot be loaded as {cls.__name__} ({_first_line(error)})") from error


def _check_folder_part(folder: Path, name: str) -> None:
    if not folder.is_dir():
        needs = ", ".join(BASE_COMPONENTS)
        raise BadFileError(folder.parent, f"diffusers folder without {name}/ (a base needs {needs})")
    present = [folder / file for file in _FOLDER_FILES[name] if (folder / file).is_file()]
    if not present:
        raise BadFileError(folder, f"no {' or '.join(_FOLDER_FILES[name])} in the {name} folder")
    if name not in ("tokenizer", "scheduler") and not (folder / "config.json").is_file():
        raise BadFileError(folder, f"no config.json in the {name} folder")
    for file in present:
        if file.suffix == ".safetensors":
            check_weights_file(file, (".safetensors",), "safetensors weights")


def _prepared(module: torch.nn.Module, src: Path, name: str) -> torch.nn.Module:
    """fp32, eval mode, no gradients; refuse a module a checkpoint left partly unloaded."""
    missing = [param for param, value in module.named_parameters() if value.is_meta]
    if missing:
        raise BadFileError(src, f"incomplete {name} weights: {len(missing)} missing, e.g. {missing[0]}")
    return module.float().eval().requires_grad_(False)
