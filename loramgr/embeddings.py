"""The workspace's textual-inversion embeddings, as prompts use them: every ``embedding`` ``.lora``
by its trigger (the adapter's name).

Files are read again only when their size or modification time changes, so an embedding
converted while the server runs is usable by the next prompt. A file that cannot be read, or
whose vectors do not have the base's text width, is skipped and reported, never fatal: a
prompt that does not name it is not affected (A1111 lists such files as "skipped").

Example::

    library = EmbeddingLibrary(workspace, text_width=768)
    plan = plan_prompt(prompt, tokenizer, bundled | library.vectors())   # the workspace's win ties
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from .adapter_file import load_adapter, read_metadata
from .errors import LoramgrError
from .workspace import Workspace


@dataclass(frozen=True)
class _Read:
    stamp: tuple[int, int]  # size, mtime_ns
    vectors: np.ndarray | None  # None: not an embedding, or skipped
    problem: str | None = None


class EmbeddingLibrary:
    """Embedding ``.lora`` files of ``workspace`` whose vectors are ``text_width`` wide."""

    def __init__(self, workspace: Workspace, text_width: int):
        self.workspace = workspace
        self.text_width = text_width
        self._files: dict[str, _Read] = {}
        self._lock = threading.Lock()

    def vectors(self) -> dict[str, np.ndarray]:
        """Trigger -> ``[n, D]`` vectors of every usable embedding, files re-read where they changed."""
        with self._lock:
            self._refresh()
            return {name: read.vectors for name, read in self._files.items() if read.vectors is not None}

    def skipped(self) -> dict[str, str]:
        """Files left out, name -> reason (as of the last :meth:`vectors`): embeddings of another
        width, and ``.lora`` files that cannot be read (which may be embeddings)."""
        with self._lock:
            return {name: read.problem for name, read in self._files.items() if read.problem is not None}

    def _refresh(self) -> None:
        current = {}
        for name in self.workspace.adapter_names():
            path = self.workspace.adapter_path(name)
            try:
                st = path.stat()
            except OSError:  # removed since it was listed
                continue
            stamp = (st.st_size, st.st_mtime_ns)
            known = self._files.get(name)
            current[name] = known if known is not None and known.stamp == stamp else self._read(name, stamp)
        self._files = current

    def _read(self, name: str, stamp: tuple[int, int]) -> _Read:
        path = self.workspace.adapter_path(name)
        try:
            if read_metadata(path).get("loramgr.kind") != "embedding":
                return _Read(stamp, None)
            vectors = load_adapter(path).embeddings[name]
        except (LoramgrError, OSError) as exc:
            return _Read(stamp, None, str(exc).splitlines()[0])
        if vectors.shape[1] != self.text_width:
            return _Read(stamp, None, f"{path}: vectors of width {vectors.shape[1]}, the base's text width is "
                                      f"{self.text_width}")
        return _Read(stamp, vectors)
