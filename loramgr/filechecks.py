"""Checks of a weight file on disk before anything reads it: one clear error per way a download goes wrong.

Every reader of adapter and checkpoint files (``loramgr.formats`` for adapters,
``loramgr.models`` for bases and ControlNets) goes through here, so an empty file, a
Git LFS pointer, a truncated download or a damaged safetensors header reads the same
wherever it is met: a one-line :class:`~loramgr.errors.BadFileError` naming the file,
with the byte counts that show what is wrong. safetensors files are opened with
``safetensors.safe_open``, which validates the header and every tensor's byte range;
its terse errors are only explained here (the header is read again for the sizes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from loramgr.errors import BadFileError

if TYPE_CHECKING:
    import torch

LFS_MAGIC = b"version https://git-lfs.github.com/spec/"
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
HEAD_BYTES = 64


def check_head(path: Path) -> bytes:
    """The first bytes of a weight file, after refusing an empty file or a Git LFS pointer."""
    size = path.stat().st_size
    if size == 0:
        raise BadFileError(path, "empty file (0 bytes)")
    with path.open("rb") as f:
        head = f.read(HEAD_BYTES)
    if head.startswith(LFS_MAGIC):
        raise BadFileError(path, _lfs_reason(path, size))
    return head


def _lfs_reason(path: Path, size: int) -> str:
    text = path.read_text(errors="replace")
    real = re.search(r"^size (\d+)$", text, re.MULTILINE)
    promised = f" of the real {int(real.group(1)):,}-byte file" if real else ""
    return (f"is a Git LFS pointer ({size} bytes) instead of the weights{promised}; "
            "run `git lfs pull` in the repository it came from, or download the file itself")


def looks_like_safetensors(head: bytes) -> bool:
    """An 8-byte little-endian header length followed by a JSON object."""
    if len(head) < 10:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= MAX_HEADER and head[8:9] == b"{"


@contextmanager
def open_safetensors(path: Path) -> Iterator:
    """``safetensors.safe_open(path, "pt")`` after the checks; every failure is a one-line BadFileError.

    Example::

        with open_safetensors(Path("model.safetensors")) as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    head = check_head(path)
    if not looks_like_safetensors(head):
        raise BadFileError(path, f"not a safetensors file (it starts with {head[:24]!r})")
    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as error:
        raise BadFileError(path, _explain(path, error)) from None
    with handle as f:
        yield f


def _explain(path: Path, error: Exception) -> str:
    """What is wrong with a file safe_open refused, with the byte counts safetensors does not give."""
    reason = str(error).removeprefix("Error while deserializing header: ")
    size = path.stat().st_size
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            return (f"truncated: the file ends inside its {n:,}-byte header after {size:,} bytes "
                    "(truncated or not a safetensors file); download it again")
        try:
            header = json.loads(f.read(n))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return f"corrupt safetensors header ({reason})"
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return (f"truncated: its header describes {expected:,} bytes but the file has {size:,} "
                f"(truncated safetensors file: its tensors need {expected - size:,} bytes more); "
                "the download was cut short, download it again")
    return f"corrupt safetensors file ({reason})"


def check_safetensors(path: Path) -> None:
    """Refuse a safetensors file that cannot be read whole (its header only is read)."""
    with open_safetensors(path):
        pass


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a safetensors file, from its header (no tensor data is read)."""
    with open_safetensors(path) as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file (torch) and its ``__metadata__``."""
    with open_safetensors(path) as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
