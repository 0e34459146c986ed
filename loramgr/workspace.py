"""Where loramgr keeps things, and how it writes them.

A workspace has two folders: ``base_models/`` (one folder per exported base) and
``adapters/`` (one ``.lora`` file per adapter). By default both live in the current
directory's repository root (``./``); ``--home DIR`` or ``LORAMGR_HOME`` moves both.

Every file loramgr writes goes through :func:`atomic_path` or :func:`atomic_dir`:
the data is written under a temporary name in the same folder and renamed into place
only when complete, so a failure never leaves a half-written file or base behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import LoramgrError

ENV_HOME = "LORAMGR_HOME"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class Workspace:
    """The two workspace folders; nothing is created until something is written."""

    home: Path

    @classmethod
    def resolve(cls, home: str | Path | None = None) -> "Workspace":
        """``home`` if given, else ``$LORAMGR_HOME``, else the current directory."""
        chosen = home or os.environ.get(ENV_HOME) or Path.cwd()
        return cls(Path(chosen).expanduser().resolve())

    @property
    def base_models(self) -> Path:
        return self.home / "base_models"

    @property
    def adapters(self) -> Path:
        return self.home / "adapters"

    @property
    def cache(self) -> Path:
        """Derived artifacts (merged reference exports, synthesized samples)."""
        return self.home / ".cache"

    def base_dir(self, name: str) -> Path:
        return self.base_models / check_name(name, "base")

    def adapter_path(self, name: str) -> Path:
        return self.adapters / f"{check_name(name, 'adapter')}.lora"

    def base_names(self) -> list[str]:
        if not self.base_models.is_dir():
            return []
        return sorted(p.name for p in self.base_models.iterdir() if (p / "manifest.json").is_file())

    def adapter_names(self) -> list[str]:
        if not self.adapters.is_dir():
            return []
        return sorted(p.stem for p in self.adapters.glob("*.lora") if p.is_file())

    def resolve_base(self, base: str | None = None) -> str:
        """``base`` if given (and present), else the workspace's only base."""
        return resolve_base(self, base)


def resolve_base(workspace: Workspace, base: str | None) -> str:
    """``base`` if given (and present), else the workspace's only base."""
    names = workspace.base_names()
    if base is not None:
        if base not in names:
            raise LoramgrError(f"no base named {base!r} in {workspace.base_models} "
                               f"(bases: {', '.join(names) or 'none; run loramgr export first'})")
        return base
    if len(names) == 1:
        return names[0]
    if not names:
        raise LoramgrError(f"no base in {workspace.base_models}: run `loramgr export` (or `loramgr demo`) first")
    raise LoramgrError(f"{len(names)} bases in {workspace.base_models} ({', '.join(names)}): choose one with --base")


def check_name(name: str, what: str) -> str:
    """Names become file names, so they are restricted to a safe alphabet."""
    if not _NAME_RE.match(name):
        raise LoramgrError(
            f"invalid {what} name {name!r}: use letters, digits, '_', '-', '.' (not first), at most 100 characters"
        )
    return name


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; it replaces ``target`` on success.

    An existing ``target`` is moved aside first and deleted only after the rename, so a
    failure at any point leaves either the old folder or nothing, never a mix.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = target.with_name(f".{target.name}.old")
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks (base data files are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(path: str | Path) -> str:
    """sha256 of a file, or of a folder as its files' relative paths and sha256s, sorted."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()
