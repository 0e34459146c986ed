"""Errors that reach the user as one line and exit code 2.

Anything raised as :class:`LoramgrError` is a problem with the user's input (a file,
an argument, a name); the CLI prints ``error: <message>`` and exits with code 2. Any
other exception is a bug in loramgr and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class LoramgrError(Exception):
    """A user-facing error: bad file, bad argument, unknown name."""


class BadFileError(LoramgrError):
    """A file that cannot be used, with the file named in the message."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")
