"""Images in and out of JSON: base64 images in the formats A1111 reads, with size and pixel limits.

Decoding follows :func:`loramgr.pipeline.images.load_image` exactly (RGB, or RGBA when the
image has alpha), so an uploaded PNG gives the same array as ``loramgr run --image`` on
the same file, and therefore the same image. The formats are those A1111's API clients
send: PNG, JPEG (and MPO, the multi-picture JPEG of phone cameras), WebP (aaa1111 sends
lossless WebP), BMP and GIF; of an animation the first frame is taken. The byte limit is
checked before base64 decoding and the pixel limit on the header, before any pixel is
decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .catalog import CatalogError

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # JPEG opens MPO too
Image.init()  # registers WebP: Image.open(formats=...) itself loads only BMP, GIF, JPEG, PNG and PPM
FORMAT_NAMES = "PNG, JPEG, WebP, BMP or GIF"


def decode_image(data: str, field: str, max_bytes: int, max_pixels: int, *, exif_orientation: bool = False
                 ) -> np.ndarray:
    """A base64 image (or ``data:image/...;base64,`` URL) as an HxWx3/4 uint8 array.

    ``exif_orientation``: turn the image as its EXIF orientation says (A1111 does, through
    ``ImageOps.exif_transpose``; ``loramgr run --image`` does not). Raises
    :class:`CatalogError`: 413 when the bytes or pixels exceed the limits, 422 when it is
    not base64 or not an image of :data:`FORMATS` that decodes.
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
                width, height = image.size  # from the header: nothing is decoded yet
                if width * height > max_pixels:
                    raise CatalogError(413, field, f"image of {width}x{height} pixels exceeds the limit of "
                                                   f"{max_pixels:,} pixels")
                frame = ImageOps.exif_transpose(image) if exif_orientation else image
                has_alpha = "A" in frame.getbands() or "transparency" in frame.info
                array = np.asarray(frame.convert("RGBA" if has_alpha else "RGB")).copy()
    except CatalogError:
        raise
    except UnidentifiedImageError:
        raise CatalogError(422, field, f"not a {FORMAT_NAMES} image (its bytes are none of these)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # PIL's own header check
        raise CatalogError(413, field, f"image exceeds the limit of {max_pixels:,} pixels ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise CatalogError(422, field, f"not a readable {FORMAT_NAMES} image ({type(exc).__name__}: {exc})") from None
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise CatalogError(422, field, f"empty image (shape {array.shape})")
    return array


def encode_png(image: np.ndarray) -> str:
    """Base64 of the PNG that :func:`loramgr.pipeline.outputs.save_result` writes for ``image``."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
