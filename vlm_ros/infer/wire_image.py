"""A frame as it crosses the network to a remote server: RGB uint8 -> JPEG or PNG bytes -> a
``data:`` URL (the OpenAI chat-completions ``image_url`` form). No torch.

JPEG is lossy (``quality`` 1-95, Pillow's scale; 4:2:0 chroma subsampling, Pillow's default),
so a remote answer on a JPEG frame can differ from a local one; PNG is lossless: the server
decodes exactly the pixels the robot had, and greedy answers match token for token.
bench/frame_encoding.py measures the bytes and milliseconds of each at 720p and 1080p.
"""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vlm_ros.config import ImageEncoding

MIME = {"jpeg": "image/jpeg", "png": "image/png"}
PNG_COMPRESS_LEVEL = 1  # zlib level: 6 (Pillow's default) costs ~3x the time for ~10% fewer bytes


@dataclass(frozen=True)
class EncodedFrame:
    """One encoded frame: its bytes, MIME type and what encoding took (ms, wall clock)."""

    data: bytes
    mime: str
    encode_ms: float

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


def encode_frame(rgb: np.ndarray, encoding: ImageEncoding, jpeg_quality: int = 90) -> EncodedFrame:
    """HxWx3 RGB uint8 -> EncodedFrame (``encoding`` is checked by RemoteConfig)."""
    start = time.perf_counter()
    buffer = io.BytesIO()
    image = Image.fromarray(rgb, "RGB")
    if encoding == "png":
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        image.save(buffer, format="JPEG", quality=jpeg_quality)
    ms = (time.perf_counter() - start) * 1000.0
    return EncodedFrame(buffer.getvalue(), MIME[encoding], ms)
