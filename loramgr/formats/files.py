"""Reading weight files safely: every way a download goes wrong becomes one clear error.

A file is recognized by its bytes, not its suffix: a safetensors header, a torch zip
archive or a legacy pickle. Git LFS pointers, truncated downloads, HTML pages saved as
``.safetensors`` and pickles that need arbitrary code (``weights_only=True`` refuses
them) are reported as :class:`BadFileError` naming the file (the checks of the bytes on
disk are :mod:`loramgr.filechecks`, shared with the base loaders). Folders are read by their
known layouts (PEFT adapter, diffusers ControlNetModel, diffusers LoRA).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loramgr.errors import BadFileError
from loramgr.filechecks import check_head, load_safetensors, looks_like_safetensors

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = b"\x80"

# (config file or None, weight files in order of preference) for each folder layout.
FOLDER_LAYOUTS: tuple[tuple[str | None, tuple[str, ...]], ...] = (
    ("adapter_config.json", ("adapter_model.safetensors", "adapter_model.bin")),
    ("config.json", (
        "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin",
    )),
    (None, ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")),
)


@dataclass
class WeightFile:
    """The tensors of a file (or folder), its safetensors metadata and its folder config."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict | None = None  # adapter_config.json or a diffusers config.json


def load_weight_file(path: str | Path) -> WeightFile:
    """Read a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` file or an adapter folder.

    Example::

        source = load_weight_file("adapters/my_lora.safetensors")
        print(len(source.tensors), source.metadata.get("ss_network_dim"))
    """
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if not path.is_file():
        raise BadFileError(path, "no such file or folder")
    tensors, metadata = read_tensors(path)
    return WeightFile(path, tensors, metadata)


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and safetensors metadata of one file, recognized by its first bytes."""
    head = check_head(path)  # empty files and Git LFS pointers are refused here
    if looks_like_safetensors(head):
        return load_safetensors(path)
    if head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_PROTO):
        return _read_torch(path, mmap=head.startswith(ZIP_MAGIC)), {}
    raise BadFileError(path, f"not a safetensors or PyTorch weight file (it starts with {head[:24]!r})")


def load_torch_safely(path: Path, mmap: bool = False) -> object:
    """What a PyTorch file holds, read by torch's safe loader (``weights_only=True``) only: a
    pickle that needs code to load is refused, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in str(e):
            # the pickle wants to run code: never loaded, whatever the file promises
            raise BadFileError(path, "refused by torch's safe loader (weights_only=True): the pickle "
                                     "references objects other than tensors; convert it to safetensors") from None
        raise BadFileError(path, f"unreadable PyTorch file, truncated or corrupt ({first})") from None


def _read_torch(path: Path, mmap: bool) -> dict[str, torch.Tensor]:
    """A state dict from torch's zip (memory-mapped: original ControlNet files bundle all of SD) or legacy format."""
    obj = load_torch_safely(path, mmap)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # .ckpt files wrap the weights
    if not isinstance(obj, dict):
        raise BadFileError(path, f"holds a {type(obj).__name__}, not a state dict of named tensors")
    odd = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise BadFileError(path, f"{len(odd)} entries are not named tensors, first: {odd[0]!r}")
    return obj


def _load_folder(folder: Path) -> WeightFile:
    for config_name, weight_names in FOLDER_LAYOUTS:
        if config_name is not None and not (folder / config_name).is_file():
            continue
        for name in weight_names:
            if (folder / name).is_file():
                tensors, metadata = read_tensors(folder / name)
                config = _read_json(folder / config_name) if config_name else None
                return WeightFile(folder, tensors, metadata, config)
    expected = ", ".join(n for _, names in FOLDER_LAYOUTS for n in names[:1])
    raise BadFileError(folder, f"folder holds no adapter weights (looked for {expected} and variants)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise BadFileError(path, f"not valid JSON ({e})") from None
