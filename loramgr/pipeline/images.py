"""Reading the input image a user names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import BadFileError


def load_image(path: str | Path) -> np.ndarray:
    """An image file as HxWx3 (RGB) or HxWx4 (RGBA, kept for HWC3's compositing) uint8.

    Raises :class:`BadFileError` for a missing file or one PIL cannot decode.
    """
    path = Path(path)
    if not path.is_file():
        raise BadFileError(path, "no such image file")
    try:
        with Image.open(path) as image:
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            return np.asarray(image.convert("RGBA" if has_alpha else "RGB")).copy()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise BadFileError(path, f"not a readable image ({exc})") from exc
