"""Errors that reach the user as one line and exit code 2.

Anything raised as :class:`LoramgrError` is a problem with the user's input (a file,
an argument, a name); the CLI prints ``error: <message>`` and exits with code 2. Any
other exception is a bug in loramgr and keeps its traceback.
"""

from __future__ import annotations

import math
import numbers
import struct
from pathlib import Path


class LoramgrError(Exception):
    """A user-facing error: bad file, bad argument, unknown name."""


class BadFileError(LoramgrError):
    """A file that cannot be used, with the file named in the message."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def finite32(value: float) -> bool:
    """Whether ``value`` stays finite as a float32, the type every weight and scale is computed in.

    ``1e39`` is finite as a Python float but infinite in float32, and renders a black image.
    """
    try:
        # raises for a magnitude float32 cannot hold (rounding as numpy's cast), or an int beyond float
        return math.isfinite(value) and bool(struct.pack("<f", value))
    except OverflowError:
        return False


def check_finite(value: float, what: str) -> float:
    """``value`` if it is a number finite in float32; NaN or infinity as a weight renders a black image."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not finite32(float(value)):
        raise LoramgrError(f"{what}: {value!r} is not a finite number (float32)")
    return float(value)


def parse_weight(text: str, what: str, hint: str = "") -> float:
    """A weight given as text (``NAME:0.8``, ``--default-weight``, metadata): a finite float.

    ``nan``, ``inf`` and numbers too large for a float32 (``1e39``) are refused.
    """
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise LoramgrError(f"{what}: weight {text!r} is not a number{hint}") from None
    if not finite32(value):
        raise LoramgrError(f"{what}: weight {text!r} is not a finite number{hint}")
    return value
