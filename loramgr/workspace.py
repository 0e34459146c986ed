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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import LoramgrError

ENV_HOME = "LORAMGR_HOME"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# Temporary entries of atomic writes: ".<target name>.<pid>-<random>.tmp" (older loramgr: ".<target name>.<random>.tmp").
_TMP_RE = re.compile(r"\.(?P<target>.+)\.(?:(?P<pid>\d+)-)?[A-Za-z0-9_]+\.tmp")
# A temporary entry without a writer's pid (written by an older loramgr) is stale after this long.
_UNOWNED_TMP_AGE_S = 3600


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
    """Names become file names, so they are restricted to a safe alphabet (the whole name: no trailing newline)."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise LoramgrError(
            f"invalid {what} name {name!r}: use letters, digits, '_', '-', '.' (not first), at most 100 characters"
        )
    return name


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (``os.umask`` sets it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries: give them the mode any other tool would."""
    os.chmod(path, mode & ~_umask())


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's live process, or a pid we cannot judge: not ours to delete
    return True


def stale_temp_reason(entry: Path) -> str | None:
    """Why ``entry`` (a ``.NAME.*.tmp`` temporary of an atomic write) is left over, or ``None`` if it is not.

    A temporary is stale when the process that wrote it no longer runs (killed during
    an export or convert); one without a recorded pid (older loramgr) when it is more
    than an hour old. An entry of a running writer is never stale.
    """
    match = _TMP_RE.fullmatch(entry.name)
    if match is None:
        return None
    if match["pid"] is not None:
        pid = int(match["pid"])
        return None if _pid_alive(pid) else f"left by an interrupted write (process {pid} no longer runs)"
    try:
        age = time.time() - entry.lstat().st_mtime
    except OSError:
        return None
    return f"left by an interrupted write ({age / 3600:.0f} h old)" if age > _UNOWNED_TMP_AGE_S else None


def stale_temps(folder: Path, target_name: str | None = None) -> list[tuple[Path, str]]:
    """Stale temporaries in ``folder`` (of ``target_name`` only, if given), with the reason."""
    if not folder.is_dir():
        return []
    prefix = f".{target_name}." if target_name is not None else "."
    found = []
    for entry in sorted(folder.iterdir()):
        if not entry.name.startswith(prefix) or not entry.name.endswith(".tmp"):
            continue
        match = _TMP_RE.fullmatch(entry.name)
        if match is None or (target_name is not None and match["target"] != target_name):
            continue
        reason = stale_temp_reason(entry)
        if reason is not None:
            found.append((entry, reason))
    return found


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def clean_stale_temps(target: Path) -> list[Path]:
    """Delete what interrupted writes of ``target`` left next to it; return what was deleted."""
    removed = []
    for entry, _ in stale_temps(target.parent, target.name):
        _remove(entry)
        removed.append(entry)
    return removed


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}-"


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success.

    What an interrupted earlier write of ``target`` left behind is deleted first; the
    file gets the mode the umask gives any new file (not mkstemp's 0600).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        honour_umask(tmp_path, 0o666)
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; it replaces ``target`` on success.

    An existing ``target`` is moved aside first and deleted only after the rename, so a
    failure at any point leaves either the old folder or nothing, never a mix. What an
    interrupted earlier write left behind is deleted first; the folder gets the mode
    the umask gives any new folder (not mkdtemp's 0700).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))
    old = target.with_name(f".{target.name}.old")
    try:
        honour_umask(tmp, 0o777)
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
