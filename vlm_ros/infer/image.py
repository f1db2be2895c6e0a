"""Image checks and colour conversion without torch: what the local preprocessor and the remote
backend (which only encodes the frame for the wire) both need. ``preprocess`` re-exports them."""

from __future__ import annotations

import numpy as np

from vlm_ros.config import ImageLimits
from vlm_ros.errors import InputError

COLOR_ORDERS = ("rgb", "bgr")


def _describe(image: object) -> str:
    shape = getattr(image, "shape", None)
    dtype = getattr(image, "dtype", None)
    if shape is None:
        return f"type {type(image).__name__}"
    return f"shape {tuple(shape)}, dtype {dtype}"


def validate_image(image: object, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Refuse anything but a uint8 HxW, HxWx1, HxWx3 or HxWx4 array of sane size.

    A robot must never feed the model a half-decoded frame without noticing, so every refusal
    names the problem and what was received.
    """
    if not isinstance(image, np.ndarray):
        raise InputError(f"image must be a numpy uint8 array, got {_describe(image)}")
    if image.dtype != np.uint8:
        raise InputError(f"image must have dtype uint8, got {_describe(image)}")
    if image.ndim not in (2, 3):
        raise InputError(
            "image must be HxW (gray), HxWx3 (RGB/BGR) or HxWx4 (RGBA/BGRA), "
            f"got {_describe(image)}"
        )
    if image.size == 0:
        raise InputError(f"image is empty (a zero-sized dimension), got {_describe(image)}")
    if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
        raise InputError(
            f"image must have 1, 3 or 4 channels, got {image.shape[2]} ({_describe(image)})"
        )
    height, width = image.shape[:2]
    if min(height, width) < limits.min_side:
        raise InputError(
            f"image is too small: {height}x{width}, each side must be at least "
            f"{limits.min_side} pixels ({_describe(image)})"
        )
    if max(height, width) > limits.max_side:
        raise InputError(
            f"image is too large: {height}x{width}, each side must be at most "
            f"{limits.max_side} pixels ({_describe(image)})"
        )
    return image


def to_rgb(image: np.ndarray, color_order: str = "rgb") -> np.ndarray:
    """HxW / HxWx1 / HxWx3 / HxWx4 uint8 -> contiguous HxWx3 RGB uint8.

    Gray is replicated to three channels and alpha is dropped, as PIL's ``convert("RGB")`` does
    in the references (they open files with ``Image.open(f).convert("RGB")``; alpha is not
    composited). ``color_order`` says how 3/4-channel arrays are laid out (OpenCV/ROS bgr8).
    """
    if color_order not in COLOR_ORDERS:
        raise InputError(f"color_order must be 'rgb' or 'bgr', got {color_order!r}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=2))
    rgb = image[:, :, :3]
    if color_order == "bgr":
        rgb = rgb[:, :, ::-1]
    return np.ascontiguousarray(rgb)
