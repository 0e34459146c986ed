"""Content checks of files written once and read many times: sizes on every open, sha256 before first use.

A base's data files are GBs, so their sha256 is computed once per file *identity* and
remembered in a small JSON cache (:class:`VerifiedFiles`): a file whose size, mtime,
ctime and inode are those recorded with a matching digest is not read again. Any write
to the file changes its mtime and ctime, and a copy changes its inode, so a changed file
is hashed again. A missing, unreadable or stale cache only costs a re-hash; a cache that
cannot be written (a read-only base) means the file is hashed at every open.
docs/base-layout.md describes what is checked and when.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import BadFileError
from .workspace import atomic_path

CHUNK = 1 << 24  # 16 MiB reads
PROGRESS_FROM = 256 << 20  # files from this size on show a progress bar while hashed

# (bytes done, bytes total) while a file is hashed
HashProgress = Callable[[int, int], None]


def sha256_with_progress(path: Path, on_progress: HashProgress | None = None) -> str:
    """Hex sha256 of ``path``, reporting progress every 16 MiB."""
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
            done += len(block)
            if on_progress:
                on_progress(done, total)
    return digest.hexdigest()


def _identity(stat: os.stat_result) -> dict[str, int]:
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}


class VerifiedFiles:
    """A JSON file of files whose content was found to match their recorded sha256.

    Keys are paths relative to the cache's folder; each entry holds the file's identity
    (size, mtime_ns, ctime_ns, inode) and the digest it was checked against.
    """

    def __init__(self, path: Path):
        self.path = path
        self.entries = self._read()

    def _read(self) -> dict[str, dict]:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or damaged: everything is hashed again
            return {}
        return raw if isinstance(raw, dict) else {}

    def _key(self, path: Path) -> str:
        return path.relative_to(self.path.parent).as_posix()

    def is_verified(self, path: Path, stat: os.stat_result, sha256: str) -> bool:
        entry = self.entries.get(self._key(path))
        return entry == {**_identity(stat), "sha256": sha256}

    def check(self, path: Path, sha256: str, fix: str, *, progress: bool = True) -> bool:
        """Refuse ``path`` unless its content has ``sha256``; True when it had to be hashed.

        ``fix`` says what to do about a mismatch (``re-export the base``); ``progress``: a
        bar on stderr while a large file is hashed.
        """
        stat = path.stat()
        if self.is_verified(path, stat, sha256):
            return False
        try:
            with _hash_bar(path, stat.st_size, progress) as on_progress:
                actual = sha256_with_progress(path, on_progress)
        except OSError as exc:
            raise BadFileError(path, f"cannot be read ({exc.strerror or type(exc).__name__}): {fix}") from None
        if actual != sha256:
            raise BadFileError(path, f"content changed since it was written (sha256 {actual[:12]}, recorded "
                                     f"{sha256[:12]}): the file is damaged, {fix}")
        if _identity(path.stat()) == _identity(stat):  # not written to while it was read
            self.entries[self._key(path)] = {**_identity(stat), "sha256": sha256}
        return True

    def save(self) -> None:
        """Write the cache atomically; a folder that cannot be written is left alone (hashed next time)."""
        try:
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
        except OSError:
            pass


@contextlib.contextmanager
def _hash_bar(path: Path, size: int, enabled: bool) -> Iterator[HashProgress | None]:
    """A transient bar on stderr for a file of ``PROGRESS_FROM`` bytes or more (an sd15 data file takes seconds)."""
    if not enabled or size < PROGRESS_FROM:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from .console import err

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task(f"checking {path.parent.name}/{path.name} (first use)", total=size)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def check_size(path: Path, size: int | None, fix: str, *, at_least: int = 0) -> None:
    """Refuse a missing file, one whose size is not ``size``, or (no size recorded) one under ``at_least`` bytes."""
    try:
        actual = path.stat().st_size
    except (FileNotFoundError, NotADirectoryError):
        raise BadFileError(path, f"missing: {fix}") from None
    except OSError as exc:
        raise BadFileError(path, f"cannot be read ({exc.strerror or type(exc).__name__}): {fix}") from None
    if size is not None and actual != size:
        how = "truncated" if actual < size else "damaged"
        raise BadFileError(path, f"is {actual:,} bytes, {size:,} were written ({how} file): {fix}")
    if actual < at_least:
        raise BadFileError(path, f"is {actual:,} bytes, its tensors need {at_least:,} (truncated file): {fix}")
