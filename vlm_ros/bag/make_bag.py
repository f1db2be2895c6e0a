"""Synthetic camera bags: a moving test pattern at a chosen rate, size, encoding and storage.

Tests and demos need camera input without a camera. Each frame's header stamp and the bag's
receive (log) time are the same instant, as if recorded with zero transport delay, so a replay's
image->answer latency is the assistant's own. The pattern moves so consecutive frames differ
(and a dropped frame is visibly a different picture from the one answered).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from vlm_ros.bag.io import OutMessage, write_bag
from vlm_ros.bag.types import ros1_typestore, typestore
from vlm_ros.errors import InputError

RAW_ENCODINGS = ("rgb8", "bgr8", "mono8")
COMPRESSED_FORMATS = ("jpeg", "png")
ENCODINGS = RAW_ENCODINGS + COMPRESSED_FORMATS
DEFAULT_TOPIC = "/camera/image_raw"

# (index, seconds since start, width, height) -> HxWx3 uint8 RGB
FrameSource = Callable[[int, float, int, int], np.ndarray]


@dataclass(frozen=True)
class BagSpec:
    """What make-bag writes. ``start_ns`` None means "now", so bags look recent in viewers."""

    out: str
    rate_hz: float = 15.0
    width: int = 320
    height: int = 240
    encoding: str = "rgb8"
    duration_s: float = 3.0
    storage: str = "mcap"
    topic: str | None = None  # None: /camera/image_raw, plus /compressed for jpeg/png
    frame_id: str = "camera"
    start_ns: int | None = None
    source: str = "pattern"  # "pattern" | "scenes"
    # log (receive) time = stamp + this: the camera-to-recorder delay a live bag has
    transport_delay_ms: float = 0.0

    @property
    def compressed(self) -> bool:
        return self.encoding in COMPRESSED_FORMATS

    @property
    def frame_count(self) -> int:
        return max(1, int(round(self.rate_hz * self.duration_s)))

    @property
    def topic_name(self) -> str:
        if self.topic:
            return self.topic
        return DEFAULT_TOPIC + ("/compressed" if self.compressed else "")


def pattern_frame(index: int, t: float, width: int, height: int) -> np.ndarray:
    """Colour bars scrolling right at 40 px/s with a white square bouncing across them."""
    x = (np.arange(width) + int(40 * t)) % width
    bar = (x * 8 // max(width, 1)) % 8  # 8 bars, like SMPTE bars
    palette = np.array(
        [
            [255, 255, 255],
            [255, 255, 0],
            [0, 255, 255],
            [0, 255, 0],
            [255, 0, 255],
            [255, 0, 0],
            [0, 0, 255],
            [0, 0, 0],
        ],
        dtype=np.uint8,
    )
    img = np.repeat(palette[bar][None, :, :], height, axis=0)  # (H, W, 3)
    side = max(4, min(width, height) // 6)
    span_x, span_y = max(width - side, 1), max(height - side, 1)
    px = int(abs((index * 7) % (2 * span_x) - span_x))
    py = int(abs((index * 5) % (2 * span_y) - span_y))
    img[py : py + side, px : px + side] = 255
    return img


def scene_source() -> FrameSource:
    """Rendered scenes of the demo world (``vlm_ros.demo.world.render_frame(index, w, h)``, the
    synthetic camera's hook), so a bag shows the model the kind of picture it was trained on."""
    try:
        from vlm_ros.demo import world
    except ImportError:
        raise InputError("--scenes needs vlm_ros.demo.world, which is not installed") from None
    render = getattr(world, "render_frame", None)
    if render is None:
        raise InputError("vlm_ros.demo.world has no render_frame(index, width, height)")
    return lambda index, t, width, height: render(index, width, height)


def frame_source(name: str) -> FrameSource:
    """The picture generator named by ``--source`` (pattern) or ``--scenes``."""
    if name == "pattern":
        return pattern_frame
    if name == "scenes":
        return scene_source()
    raise InputError(f"unknown frame source {name!r}; expected pattern or scenes")


def _stamp(ts, stamp_ns: int):
    """builtin_interfaces/Time from nanoseconds (same type in the ROS 1 and ROS 2 stores)."""
    time_cls = ts.types["builtin_interfaces/msg/Time"]
    return time_cls(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)


def _header(ts, stamp_ns: int, frame_id: str, seq: int):
    header_cls = ts.types["std_msgs/msg/Header"]
    fields = header_cls.__dataclass_fields__
    kwargs = {"stamp": _stamp(ts, stamp_ns), "frame_id": frame_id}
    if "seq" in fields:  # ROS 1 headers carry a sequence number
        kwargs["seq"] = seq
    return header_cls(**kwargs)


def raw_image(ts, header, rgb: np.ndarray, encoding: str):
    """sensor_msgs/Image of ``rgb`` in ``encoding`` (rgb8 | bgr8 | mono8; others verbatim as rgb8
    bytes, so tests can make bags with an encoding the reader must refuse)."""
    if encoding == "bgr8":
        pixels = rgb[:, :, ::-1]
    elif encoding == "mono8":
        pixels = (rgb.astype(np.uint16) @ np.array([77, 150, 29], dtype=np.uint16) >> 8).astype(
            np.uint8
        )
    else:
        pixels = rgb
    pixels = np.ascontiguousarray(pixels)
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    return ts.types["sensor_msgs/msg/Image"](
        header=header,
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=0,
        step=width * channels,
        data=pixels.reshape(-1).view(np.uint8),
    )


def compressed_image(ts, header, rgb: np.ndarray, fmt: str):
    """sensor_msgs/CompressedImage with the ``format`` string image_transport writes."""
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="JPEG" if fmt == "jpeg" else "PNG", quality=85)
    data = np.frombuffer(buf.getvalue(), dtype=np.uint8)
    return ts.types["sensor_msgs/msg/CompressedImage"](
        header=header, format=f"rgb8; {fmt} compressed rgb8", data=data
    )


def image_message(ts, stamp_ns: int, frame_id: str, seq: int, rgb: np.ndarray, encoding: str):
    """(message type, message) for one frame in ``encoding``."""
    header = _header(ts, stamp_ns, frame_id, seq)
    if encoding in COMPRESSED_FORMATS:
        return "sensor_msgs/msg/CompressedImage", compressed_image(ts, header, rgb, encoding)
    return "sensor_msgs/msg/Image", raw_image(ts, header, rgb, encoding)


def build_messages(spec: BagSpec) -> list[OutMessage]:
    """Every frame of the bag, stamped at ``start + i / rate`` and logged (received)
    ``transport_delay_ms`` later, as a recorder behind a real camera driver sees it."""
    if spec.encoding not in ENCODINGS:
        raise InputError(
            f"unsupported encoding {spec.encoding!r}; expected one of {', '.join(ENCODINGS)}"
        )
    if spec.rate_hz <= 0 or spec.duration_s <= 0 or spec.width < 8 or spec.height < 8:
        raise InputError("rate and duration must be > 0 and the size at least 8x8")
    if not 0 <= spec.transport_delay_ms < 60_000:
        raise InputError(f"transport delay must be 0 to 60000 ms, got {spec.transport_delay_ms}")
    delay_ns = int(round(spec.transport_delay_ms * 1e6))
    ts = ros1_typestore() if spec.storage == "ros1" else typestore()
    source = frame_source(spec.source)
    start = spec.start_ns if spec.start_ns is not None else time.time_ns()
    period_ns = int(round(1e9 / spec.rate_hz))
    out = []
    for i in range(spec.frame_count):
        stamp = start + i * period_ns
        rgb = source(i, i * period_ns / 1e9, spec.width, spec.height)
        msgtype, msg = image_message(ts, stamp, spec.frame_id, i, rgb, spec.encoding)
        out.append(OutMessage(spec.topic_name, msgtype, stamp + delay_ns, msg))
    return out


def make_bag(spec: BagSpec) -> Path:
    """Write the synthetic camera bag described by ``spec``; returns its path."""
    return write_bag(spec.out, build_messages(spec), storage=spec.storage)
