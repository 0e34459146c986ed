"""ControlNet's canny annotator (``annotator/util.py``, ``annotator/canny``), transcribed.

Kept line for line with the original so edge maps, and therefore images, match what
ControlNet's ``gradio_canny2image.py`` feeds the model.
"""

from __future__ import annotations

import cv2
import numpy as np


def HWC3(x: np.ndarray) -> np.ndarray:  # noqa: N802 - the annotator's name
    """Any uint8 gray / RGB / RGBA image as HxWx3 RGB; alpha is composited over white."""
    if x.dtype != np.uint8:
        raise ValueError(f"HWC3 expects uint8, got {x.dtype}")
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise ValueError(f"HWC3 expects HxW or HxWx{{1,3,4}}, got shape {x.shape}")
    channels = x.shape[2]
    if channels == 3:
        return x
    if channels == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, 0:3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    y = color * alpha + 255.0 * (1.0 - alpha)
    return y.clip(0, 255).astype(np.uint8)


def resize_image(input_image: np.ndarray, resolution: int) -> np.ndarray:
    """Short side to ``resolution``, both sides rounded to multiples of 64.

    LANCZOS4 when enlarging, AREA when shrinking (``k > 1`` decides, as in ControlNet).
    """
    H, W, _ = input_image.shape
    H = float(H)
    W = float(W)
    k = float(resolution) / min(H, W)
    H *= k
    W *= k
    H = int(np.round(H / 64.0)) * 64
    W = int(np.round(W / 64.0)) * 64
    return cv2.resize(input_image, (W, H), interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)


def canny(image: np.ndarray, low_threshold: int, high_threshold: int) -> np.ndarray:
    """``CannyDetector``: OpenCV's Canny, HxW uint8 with edges at 255."""
    return cv2.Canny(image, low_threshold, high_threshold)


def detect_edges(
    input_image: np.ndarray, resolution: int, low_threshold: int, high_threshold: int
) -> tuple[np.ndarray, np.ndarray]:
    """``process()``'s preprocessing: the resized RGB image and its HWC3 edge map (both HxWx3 uint8)."""
    img = resize_image(HWC3(input_image), resolution)
    return img, HWC3(canny(img, low_threshold, high_threshold))
