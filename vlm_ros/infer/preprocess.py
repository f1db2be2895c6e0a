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
from vlm_ros.infer.image import COLOR_ORDERS, to_rgb, validate_image  # noqa: F401 (re-exported)
from vlm_ros.model.families import ImageProcessing


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
