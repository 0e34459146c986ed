"""Errors that reach the user as one line and exit code 2.

Anything raised as :class:`LoramgrError` is a problem with the user's input (a file,
an argument, a name); the CLI prints ``error: <message>`` and exits with code 2. Any
other exception is a bug in loramgr and keeps its traceback.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path


class LoramgrError(Exception):
    """A user-facing error: bad file, bad argument, unknown name."""


class BadFileError(LoramgrError):
    """A file that cannot be used, with the file named in the message."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def check_finite(value: float, what: str) -> float:
    """``value`` if it is a finite number; NaN or infinity as a weight renders a black image."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise LoramgrError(f"{what}: {value!r} is not a finite number")
    return float(value)


def parse_weight(text: str, what: str, hint: str = "") -> float:
    """A weight given as text (``NAME:0.8``, ``--default-weight``, metadata): a finite float.

    ``nan``, ``inf`` and numbers too large for a float (``1e309``) are refused.
    """
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise LoramgrError(f"{what}: weight {text!r} is not a number{hint}") from None
    if not math.isfinite(value):
        raise LoramgrError(f"{what}: weight {text!r} is not a finite number{hint}")
    return value
