"""Images in and out of JSON: base64 PNG/JPEG with size and pixel limits.

Decoding follows :func:`loramgr.pipeline.images.load_image` exactly (RGB, or RGBA when the
image has alpha), so an uploaded PNG gives the same array as ``loramgr run --image`` on
the same file, and therefore the same image.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from .catalog import CatalogError

FORMATS = ("PNG", "JPEG")


def decode_image(data: str, field: str, max_bytes: int, max_pixels: int) -> np.ndarray:
    """A base64 PNG/JPEG (or ``data:image/...;base64,`` URL) as an HxWx3/4 uint8 array.

    Raises :class:`CatalogError`: 413 when the bytes or pixels exceed the limits, 422
    when it is not base64 or not a PNG/JPEG that decodes.
    """
    if data.startswith("data:"):
        header, sep, data = data.partition(",")
        if not sep or ";base64" not in header:
            raise CatalogError(422, field, "a data: URL must be base64 (data:image/png;base64,...)")
    if len(data) > (max_bytes * 4) // 3 + 4:
        raise CatalogError(413, field, f"image larger than the limit of {max_bytes:,} bytes (--max-image-mb)")
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CatalogError(422, field, f"not valid base64 ({exc})") from None
    if len(raw) > max_bytes:
        raise CatalogError(413, field, f"image larger than the limit of {max_bytes:,} bytes (--max-image-mb)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise CatalogError(413, field, f"image of {width}x{height} pixels exceeds the limit of "
                                                   f"{max_pixels:,} pixels")
                has_alpha = "A" in image.getbands() or "transparency" in image.info
                array = np.asarray(image.convert("RGBA" if has_alpha else "RGB")).copy()
    except CatalogError:
        raise
    except UnidentifiedImageError:
        raise CatalogError(422, field, "not a PNG or JPEG image (its bytes are neither)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, OSError,
            ValueError, SyntaxError, EOFError) as exc:
        raise CatalogError(422, field, f"not a readable PNG or JPEG image ({type(exc).__name__}: {exc})") from None
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise CatalogError(422, field, f"empty image (shape {array.shape})")
    return array


def encode_png(image: np.ndarray) -> str:
    """Base64 of the PNG that :func:`loramgr.pipeline.outputs.save_result` writes for ``image``."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
