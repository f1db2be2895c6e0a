"""sensor_msgs/Image and CompressedImage *fields* -> numpy RGB uint8 (H, W, 3), without ROS.

The node, the rosbag evaluator and tests all pass plain fields (encoding, height, width, step,
data), so this module never imports rclpy or cv_bridge (not installable from PyPI for ROS 2).

Every result is RGB uint8 HxWx3, C-contiguous, whatever came in: mono8 is replicated to three
channels and alpha is dropped. One output shape keeps the core, the bag evaluator and the tests
on a single path; the extra copy is tiny next to a model forward pass.

YUV 4:2:2 follows ROS's names (sensor_msgs/image_encodings.hpp): ``yuv422`` and ``uyvy`` are
UYVY (U0 Y0 V0 Y1), ``yuv422_yuy2`` and ``yuyv`` are YUYV (Y0 U0 Y1 V0). The colour conversion is
BT.601 limited range, as OpenCV's COLOR_YUV2RGB_UYVY/_YUY2 (what cv_bridge uses).

Every refusal raises ImageFormatError (an InputError) whose ``reason`` is one of REASONS, so a
node can count rejected frames per reason and its message names the problem.

Size is checked before any pixel is touched: a raw image's declared height x width, and a
compressed image's dimensions read from its header (Pillow's ``Image.open`` is lazy: it parses
the header and decodes nothing until ``convert``/``load``). A 65 KB PNG may declare 8192x8192
pixels (200 MB decoded); it is refused as ``too_large`` in about a millisecond, with no
allocation. Pillow's own decompression-bomb guard (warning above ``Image.MAX_IMAGE_PIXELS``, an
error above twice that) fires inside ``Image.open``; both are refused as ``too_large`` too.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlm_ros.config import ImageLimits
from vlm_ros.errors import InputError

# encoding -> bytes per pixel; 8-bit encodings only, so is_bigendian never matters.
CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
YUV422 = {"yuv422": "uyvy", "uyvy": "uyvy", "yuv422_yuy2": "yuyv", "yuyv": "yuyv"}
ENCODINGS = (*CHANNELS, *YUV422)
COMPRESSED_FORMATS = ("jpeg", "jpg", "png")
REASONS = (
    "unknown_encoding",
    "zero_size",
    "truncated",
    "bad_step",
    "decode_failed",
    "too_small",
    "too_large",
)
# 16 megapixels: a 4096x4096 (or 12 MP 4000x3000) camera fits; one decoded frame is <= 48 MB RGB.
MAX_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class SizeLimits:
    """What a frame's declared size must satisfy before it is converted: the core's side
    limits (so the core never refuses a converted frame for its size) plus a total-pixel cap
    (``max_pixels``; the core has none, and a side limit alone lets 8192x8192 through)."""

    min_side: int = 1
    max_side: int = 1 << 30
    max_pixels: int = MAX_PIXELS

    @classmethod
    def of(cls, core: ImageLimits, max_pixels: int = MAX_PIXELS) -> SizeLimits:
        return cls(core.min_side, core.max_side, max_pixels)

    def check(self, what: str, height: int, width: int) -> None:
        """ImageFormatError (too_small/too_large) naming the size and the limit it breaks."""
        if height * width > self.max_pixels:
            raise ImageFormatError(
                "too_large",
                f"{what} image is too large: {height}x{width} = {height * width} pixels, "
                f"at most {self.max_pixels} allowed (refused before decoding)",
            )
        if max(height, width) > self.max_side:
            raise ImageFormatError(
                "too_large",
                f"{what} image is too large: {height}x{width}, each side at most "
                f"{self.max_side} pixels",
            )
        if min(height, width) < self.min_side:
            raise ImageFormatError(
                "too_small",
                f"{what} image is too small: {height}x{width}, each side at least "
                f"{self.min_side} pixels",
            )


class ImageFormatError(InputError):
    """An image message that cannot be converted; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def image_from_msg(msg, limits: SizeLimits = SizeLimits()) -> np.ndarray:
    """A sensor_msgs Image or CompressedImage (rclpy message or rosbags dataclass: anything with
    their fields; a ``format`` field means compressed) -> RGB uint8 (H, W, 3). The one converter
    of the node and of eval-bag, so both refuse the same frames for the same reasons."""
    if hasattr(msg, "format"):
        return image_from_compressed(msg.format, msg.data, limits)
    fields = (msg.encoding, msg.height, msg.width, msg.step, msg.data, msg.is_bigendian)
    return image_from_raw(*fields, limits=limits)


def image_from_raw(
    encoding: str,
    height: int,
    width: int,
    step: int,
    data,
    is_bigendian: int = 0,
    limits: SizeLimits = SizeLimits(),
) -> np.ndarray:
    """sensor_msgs/Image fields -> RGB uint8 (H, W, 3). ``data`` is bytes, bytearray,
    array.array('B') (what rclpy gives), a memoryview or a uint8 numpy array.
    ``is_bigendian`` is accepted for field parity; every supported encoding is 8-bit."""
    del is_bigendian
    enc = encoding.strip().lower()
    if enc not in CHANNELS and enc not in YUV422:
        raise ImageFormatError(
            "unknown_encoding",
            f"unsupported image encoding {encoding!r}; supported: {', '.join(ENCODINGS)}",
        )
    bpp = 2 if enc in YUV422 else CHANNELS[enc]
    if height > 0 and width > 0:
        limits.check(enc, height, width)
    rows = _rows(enc, height, width, step, bpp, _as_bytes(data))  # (H, W*bpp)
    if enc in YUV422:
        return _yuv422_to_rgb(rows.reshape(height, width // 2, 4), YUV422[enc])
    pixels = rows.reshape(height, width, bpp)
    return _to_rgb(pixels, enc)


def _as_bytes(data) -> np.ndarray:
    """Any buffer of bytes as a flat uint8 array, without copying where possible."""
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8) if data.dtype == np.uint8 else data.astype(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:  # a list of ints (e.g. a message built by hand)
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def _rows(enc: str, height: int, width: int, step: int, bpp: int, flat: np.ndarray) -> np.ndarray:
    """Check the geometry against the data and return the (H, W*bpp) pixel rows, dropping any
    row padding (step > width*bpp)."""
    if height <= 0 or width <= 0:
        raise ImageFormatError("zero_size", f"{enc} image has zero size: {height}x{width}")
    if enc in YUV422 and width % 2:
        raise ImageFormatError("bad_step", f"{enc} image width must be even, got {width}")
    row = width * bpp
    if step < row:
        raise ImageFormatError(
            "bad_step",
            f"{enc} image step {step} is smaller than width*bytes_per_pixel = {width}*{bpp}",
        )
    need = step * (height - 1) + row  # the last row's padding may be absent
    if flat.size < need:
        raise ImageFormatError(
            "truncated",
            f"{enc} image data is truncated: {flat.size} bytes for {height}x{width} "
            f"(step {step}) needs {need}",
        )
    if step == row:
        return flat[: height * row].reshape(height, row)
    return np.lib.stride_tricks.as_strided(flat, shape=(height, row), strides=(step, 1))


def _to_rgb(pixels: np.ndarray, enc: str) -> np.ndarray:
    """(H, W, C) in ``enc`` channel order -> a fresh contiguous RGB (H, W, 3) array."""
    if enc == "mono8":
        return np.repeat(pixels, 3, axis=2)
    if enc in ("bgr8", "bgra8"):
        return np.ascontiguousarray(pixels[:, :, 2::-1])
    return np.ascontiguousarray(pixels[:, :, :3])


def _yuv422_to_rgb(quads: np.ndarray, order: str) -> np.ndarray:
    """(H, W/2, 4) macropixels -> RGB (H, W, 3), BT.601 limited range (OpenCV's coefficients)."""
    q = quads.astype(np.float32)
    if order == "uyvy":
        u, y0, v, y1 = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    else:  # yuyv
        y0, u, y1, v = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    height, half = u.shape
    y = np.stack([y0, y1], axis=-1).reshape(height, half * 2) - 16.0
    u = np.repeat(u - 128.0, 2, axis=1)
    v = np.repeat(v - 128.0, 2, axis=1)
    r = 1.164 * y + 1.596 * v
    g = 1.164 * y - 0.391 * u - 0.813 * v
    b = 1.164 * y + 2.018 * u
    rgb = np.stack([r, g, b], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def image_from_compressed(format: str, data, limits: SizeLimits = SizeLimits()) -> np.ndarray:  # noqa: A002
    """sensor_msgs/CompressedImage fields -> RGB uint8 (H, W, 3), decoded with Pillow after the
    header's size passed ``limits``.

    ``format`` is what image_transport writes ("jpeg", "png", "bgr8; jpeg compressed bgr8", ...);
    an empty format is sniffed from the data. compressedDepth and other codecs are refused."""
    fmt = format.strip().lower()
    if fmt and ("compresseddepth" in fmt or not any(f in fmt for f in COMPRESSED_FORMATS)):
        raise ImageFormatError(
            "unknown_encoding",
            f"unsupported compressed format {format!r}; supported: jpeg, png",
        )
    raw = _as_bytes(data)
    if raw.size == 0:
        raise ImageFormatError("zero_size", f"compressed image ({format or 'no format'}) is empty")
    return decode(io.BytesIO(raw.tobytes()), format or "compressed", limits, ("JPEG", "PNG"))


def decode(
    source, what: str, limits: SizeLimits = SizeLimits(), formats: tuple[str, ...] | None = None
) -> np.ndarray:
    """An encoded image (file path or binary stream) -> RGB uint8 (H, W, 3), refused from its
    header when its size breaks ``limits`` (nothing decoded) or its format is not in ``formats``
    (None: any Pillow reads). Every failure is an ImageFormatError naming ``what``."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (instead of raising) between MAX_IMAGE_PIXELS and twice that
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageFormatError(
            "too_large", f"{what} image is too large (Pillow's decompression-bomb guard): {exc}"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageFormatError("decode_failed", f"cannot decode {what} image: {exc}") from exc
    with image:
        if formats is not None and image.format not in formats:
            raise ImageFormatError(
                "unknown_encoding", f"{what} data is {image.format}, not {' or '.join(formats)}"
            )
        width, height = image.size
        if height <= 0 or width <= 0:
            raise ImageFormatError("zero_size", f"{what} image has zero size: {height}x{width}")
        limits.check(what, height, width)
        try:
            rgb = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageFormatError("decode_failed", f"cannot decode {what} image: {exc}") from exc
    if rgb.size == 0:
        raise ImageFormatError("zero_size", f"{what} image decoded to zero size")
    return rgb
