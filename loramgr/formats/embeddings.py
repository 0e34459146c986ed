"""Textual-inversion embeddings: standalone files, and the ones LoRA files bundle.

The layouts A1111's ``textual_inversion.py`` and ``Lora/networks.py`` read:

- A1111 ``.pt``: ``{"string_to_param": {"*": [n, D]}, "name", "step", "sd_checkpoint",
  "sd_checkpoint_name", ...}``;
- a file of one tensor: diffusers' ``learned_embeds.bin`` / ``.safetensors`` (``{token: [D]}``),
  kohya's ``{"emb_params": [n, D]}``; a folder holding ``learned_embeds.*`` is read as that file;
- bundled in a LoRA: kohya / A1111 ``bundle_emb.NAME.string_to_param.*`` and
  ``bundle_emb.NAME.emb_params``; cloneofsimo's token keys (``<s1>``), marked ``<embed>`` in the
  file's metadata.

SDXL embeddings (``clip_l`` + ``clip_g``) are refused: loramgr's bases have one text encoder.
Pickles are read by torch's safe loader only (:func:`.files.load_torch_safely`). Whether the
vectors fit a base (its text width) is the caller's check; :func:`check_vectors` does the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from loramgr.errors import BadFileError
from loramgr.filechecks import check_head, load_safetensors, looks_like_safetensors, safetensors_shapes

from .files import PICKLE_PROTO, ZIP_MAGIC, WeightFile, load_torch_safely

MAX_VECTORS = 75  # a prompt chunk's tokens: an embedding never straddles two chunks
LEARNED_EMBEDS = ("learned_embeds.safetensors", "learned_embeds.bin")  # a diffusers concept folder
SDXL_KEYS = ("clip_l", "clip_g")
_BUNDLED = re.compile(r"^bundle_emb\.(?P<name>[^.]+)\.(?P<part>.+)$")  # A1111 cuts the name at the first dot
CLONEOFSIMO_MARK = "<embed>"


@dataclass(frozen=True)
class Embedding:
    """The vectors of one textual-inversion file and what A1111 reports about it."""

    vectors: torch.Tensor  # [n, D] float32
    format: str  # textual-inversion-a1111 | textual-inversion-kohya | textual-inversion-diffusers
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None


def read_embedding(path: str | Path) -> Embedding | None:
    """The embedding ``path`` holds, or None when it holds something else (a LoRA, a ControlNet).

    Raises:
        BadFileError: an unreadable file, a pickle that needs code, an SDXL embedding, vectors
            of a shape no prompt can hold, NaN or infinity.

    Example::

        embedding = read_embedding("EasyNegative.safetensors")
        embedding.vectors.shape   # torch.Size([8, 768])
    """
    path = Path(path)
    if path.is_dir():
        found = next((path / name for name in LEARNED_EMBEDS if (path / name).is_file()), None)
        return None if found is None else read_embedding(found)
    if not path.is_file():
        raise BadFileError(path, "no such file or folder")
    head = check_head(path)
    if looks_like_safetensors(head):
        shapes = safetensors_shapes(path)
        _refuse_sdxl(path, shapes)
        if len(shapes) != 1:
            return None
        tensors, _ = load_safetensors(path)
        return _single(path, tensors)
    if not (head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_PROTO)):
        return None
    data = load_torch_safely(path, mmap=head.startswith(ZIP_MAGIC))  # mapped: a 1.4 GB ControlNet is not read
    if not isinstance(data, dict):
        return None
    _refuse_sdxl(path, data)
    if "string_to_param" in data:
        terms = data["string_to_param"]
        if not isinstance(terms, dict) or len(terms) != 1:
            count = len(terms) if isinstance(terms, dict) else type(terms).__name__
            raise BadFileError(path, f"string_to_param holds {count} terms; an A1111 embedding has one")
        (vectors,) = terms.values()
        return Embedding(check_vectors(path, "string_to_param", vectors), "textual-inversion-a1111",
                         _field(path, data, "step", int), _field(path, data, "sd_checkpoint", str),
                         _field(path, data, "sd_checkpoint_name", str))
    return _single(path, data) if len(data) == 1 else None


def _single(path: Path, data: dict) -> Embedding | None:
    """A file of one tensor: kohya's ``emb_params`` or diffusers' ``{token: vector}``."""
    ((key, vectors),) = data.items()
    if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2):
        return None
    fmt = "textual-inversion-kohya" if key == "emb_params" else "textual-inversion-diffusers"
    return Embedding(check_vectors(path, key, vectors), fmt)


def _field(path: Path, data: dict, key: str, kind: type):
    value = data.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise BadFileError(path, f"field {key!r} is {value!r}, not a {kind.__name__}")
    return value


def _refuse_sdxl(path: Path, data) -> None:
    if any(key in data for key in SDXL_KEYS):
        raise BadFileError(path, "an SDXL embedding (clip_l + clip_g vectors): loramgr's bases have one CLIP text "
                                 "encoder; use an embedding trained for SD 1.x")


def check_vectors(path: Path, key: str, vectors) -> torch.Tensor:
    """``vectors`` as float32 ``[n, D]`` (a ``[D]`` vector is one row), 1 <= n <= 75, all finite."""
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point() or vectors.ndim not in (1, 2):
        what = list(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise BadFileError(path, f"{key}: {what} is not a float tensor of [vectors, width] (an embedding)")
    vectors = vectors.detach().reshape(-1, vectors.shape[-1]).to(torch.float32).contiguous()
    if not 1 <= vectors.shape[0] <= MAX_VECTORS:
        raise BadFileError(path, f"{key}: {vectors.shape[0]} vectors; an embedding has 1 to {MAX_VECTORS} "
                                 "(it must fit one prompt chunk)")
    if not torch.isfinite(vectors).all():
        raise BadFileError(path, f"{key}: the vectors hold NaN or infinite values")
    return vectors


def bundled_embeddings(source: WeightFile) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Embeddings a LoRA file bundles (name -> ``[n, D]``) and the keys they take.

    kohya / A1111: ``bundle_emb.NAME.string_to_param.*`` or ``bundle_emb.NAME.emb_params``
    (A1111's ``create_embedding_from_data`` rules per NAME); cloneofsimo: each key its
    metadata marks ``<embed>`` is a one-vector embedding named by the key (``<s1>``).
    """
    groups: dict[str, dict[str, str]] = {}
    for key in source.tensors:
        if match := _BUNDLED.match(key):
            groups.setdefault(match["name"], {})[match["part"]] = key
    embeddings, used = {}, set()
    for name, parts in groups.items():
        terms = [key for part, key in parts.items() if part.startswith("string_to_param.")]
        _refuse_sdxl(source.path, parts)
        if len(terms) > 1 or (not terms and len(parts) != 1):
            raise BadFileError(source.path, f"bundled embedding {name!r} has {len(parts)} tensors "
                                            f"({', '.join(sorted(parts.values()))}); it is one [vectors, width] tensor")
        key = terms[0] if terms else next(iter(parts.values()))
        embeddings[name] = check_vectors(source.path, key, source.tensors[key])
        used |= set(parts.values())
    for key in source.tensors:
        if source.metadata.get(key) == CLONEOFSIMO_MARK:
            embeddings[key] = check_vectors(source.path, key, source.tensors[key])
            used.add(key)
    return embeddings, used
