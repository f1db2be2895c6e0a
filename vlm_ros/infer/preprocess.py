"""Image validation and the families' preprocessing: numpy uint8 image -> pixel tensor.

Follows the reference pipelines step for step (shared/facts/model-formats.md): RGB, optional
pad-to-square centred on the family's pad colour (LLaVA's ``expand2square``), then the CLIP
processor (shortest edge -> size, PIL bicubic, centre crop) or the SigLIP one (direct size x size
PIL bicubic), rescale 1/255, normalise. The arithmetic mirrors transformers' PIL image processors
(float64 rescale cast to float32, float32 normalise) so pixels agree with them bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vlm_ros.config import ImageLimits
from vlm_ros.errors import InputError
from vlm_ros.model.families import ImageProcessing

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


def expand_to_square(rgb: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
    """Centre the image on a square canvas of ``fill`` (LLaVA's expand2square offsets:
    ``(long - short) // 2`` before the image, the remainder after)."""
    height, width = rgb.shape[:2]
    if height == width:
        return rgb
    side = max(height, width)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = np.asarray(fill, dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = rgb
    return canvas


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the shortest edge to ``size``; the long edge is truncated
    with ``int()``, as transformers' ``get_resize_output_image_size`` does."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """Crop size x size with transformers' offsets ``(dim - size) // 2`` (never pads: the
    shortest edge already equals ``size``)."""
    height, width = rgb.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return rgb[top : top + size, left : left + size]


def resize(rgb: np.ndarray, processing: ImageProcessing) -> np.ndarray:
    """Resize (and crop for CLIP) with PIL bicubic on uint8, like the references -> SxSx3 uint8."""
    size = processing.size
    crop = processing.mode == "shortest_edge_crop"  # else "resize" (ImageProcessing checks)
    height, width = shortest_edge_size(rgb.shape[0], rgb.shape[1], size) if crop else (size, size)
    if (height, width) != rgb.shape[:2]:
        resized = Image.fromarray(rgb).resize((width, height), Image.Resampling.BICUBIC)
        rgb = np.asarray(resized)
    if crop:
        rgb = center_crop(rgb, size)
    return rgb


def normalise(rgb: np.ndarray, processing: ImageProcessing) -> torch.Tensor:
    """SxSx3 uint8 -> [1, 3, S, S] float32: x / 255 (float64, then float32), (x - mean) / std."""
    scaled = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(processing.mean, dtype=np.float32)
    std = np.asarray(processing.std, dtype=np.float32)
    chw = ((scaled - mean) / std).transpose(2, 0, 1)  # [3, S, S]
    return torch.from_numpy(np.ascontiguousarray(chw)).unsqueeze(0)


def preprocess(
    image: object,
    processing: ImageProcessing,
    color_order: str = "rgb",
    limits: ImageLimits = ImageLimits(),
) -> torch.Tensor:
    """Validate, convert to RGB, pad to square if the family does, resize/crop, normalise.

    image: HxW, HxWx1, HxWx3 or HxWx4 uint8 -> pixel values [1, 3, S, S] float32 (CPU).
    """
    rgb = to_rgb(validate_image(image, limits), color_order)  # [H, W, 3] uint8
    if processing.pad_to_square:
        rgb = expand_to_square(rgb, processing.pad_color)  # [L, L, 3], L = max(H, W)
    return normalise(resize(rgb, processing), processing)
