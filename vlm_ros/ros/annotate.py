"""The annotated image: a camera frame with the node's latest outputs drawn on it. ROS-free.

``draw(pixels, overlay)`` scales the frame up to at least DISPLAY_WIDTH pixels wide (nearest
neighbour, so sensor pixels stay visible) and adds a panel below it: the latest scene answer,
the action hint with a bar per candidate's probability, and each output's image->output
latency. An output computed on an earlier frame than the one shown is marked so. Drawing uses
Pillow (a core dependency already; OpenCV would be one more large dependency for a few lines
of text).

``Renderer`` runs the drawing on a thread of its own with a one-slot mailbox (a newer frame
replaces one not yet drawn), so neither the executor nor the inference worker waits for it.
``Saver`` writes drawn frames to a folder as PNG, at most one per ``period_s``, keeping the
newest ``keep`` files (``vlm-ros node --save-annotated DIR``).
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DISPLAY_WIDTH = 640  # frames narrower than this are scaled up by a whole factor
MAX_BARS = 8  # candidates drawn as bars (the most probable ones, in candidate order)
MAX_ANSWER_LINES = 6  # a longer answer is cut, ending in "..."
JPEG_QUALITY = 85
# image_transport's "compressed" convention: original encoding; codec, decoded pixel order
COMPRESSED_FORMAT = "rgb8; jpeg compressed bgr8"
PANEL = (24, 24, 28)  # colours (RGB)
TEXT = (240, 240, 240)
DIM = (150, 150, 150)
CHOSEN = (60, 200, 90)
BAR = (90, 110, 140)
SAVE_PREFIX = "annotated_"


@dataclass(frozen=True)
class Overlay:
    """What is drawn on a frame: the latest outputs of its camera. ``*_ms`` is each output's
    image->output latency; ``*_same_frame`` whether it was computed on the frame shown."""

    camera: str
    stamp_s: float  # the frame's header stamp, seconds
    answer: str | None = None
    answer_ms: float = 0.0
    answer_same_frame: bool = True
    action: str | None = None
    candidates: tuple[str, ...] = ()
    probabilities: tuple[float, ...] = ()
    hint_ms: float = 0.0
    hint_same_frame: bool = True


def draw(pixels: np.ndarray, overlay: Overlay) -> np.ndarray:
    """RGB uint8 HxWx3 frame -> the annotated RGB uint8 image (wider, with a panel below)."""
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 HxWx3 frame, got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    scale = max(1, -(-DISPLAY_WIDTH // width))  # ceil
    frame = Image.fromarray(pixels).resize((width * scale, height * scale), Image.NEAREST)
    font = _font(max(12, frame.width // 40))
    line = _line_height(font)
    text = _panel_text(overlay, frame.width, font)
    bars = _bars(overlay)
    panel_h = line * (len(text) + len(bars)) + line // 2
    out = Image.new("RGB", (frame.width, frame.height + panel_h), PANEL)
    out.paste(frame, (0, 0))
    pen = ImageDraw.Draw(out)
    pen.text(
        (4, 2),
        f"{overlay.camera}  t={overlay.stamp_s:.3f}",
        font=font,
        fill=TEXT,
        stroke_width=2,
        stroke_fill=(0, 0, 0),
    )
    y = frame.height + line // 4
    for words, colour in text:
        pen.text((8, y), words, font=font, fill=colour)
        y += line
    _draw_bars(pen, bars, overlay.action, y, frame.width, line, font)
    return np.asarray(out)


def _panel_text(overlay: Overlay, width: int, font) -> list[tuple[str, tuple[int, int, int]]]:
    """Lines (text, colour) of the answer and hint, the answer wrapped to ``width``."""
    lines = []
    if overlay.answer is not None:
        note = "" if overlay.answer_same_frame else ", earlier frame"
        head = f"scene [{overlay.answer_ms:.0f} ms image->output{note}]: "
        parts = _wrap(head + overlay.answer, width - 16, font)
        if len(parts) > MAX_ANSWER_LINES:
            parts = [*parts[: MAX_ANSWER_LINES - 1], parts[MAX_ANSWER_LINES - 1] + " ..."]
        lines += [(part, TEXT) for part in parts]
    else:
        lines.append(("scene: (no answer yet)", DIM))
    if overlay.action is not None:
        note = "" if overlay.hint_same_frame else ", earlier frame"
        lines.append(
            (f"hint: {overlay.action} [{overlay.hint_ms:.0f} ms image->output{note}]", CHOSEN)
        )
    else:
        lines.append(("hint: (none yet)", DIM))
    return lines


def _bars(overlay: Overlay) -> list[tuple[str, float]]:
    """(candidate, probability) of the MAX_BARS most probable, in candidate order."""
    pairs = list(zip(overlay.candidates, overlay.probabilities, strict=True))
    keep = set(sorted(range(len(pairs)), key=lambda i: -pairs[i][1])[:MAX_BARS])
    return [p for i, p in enumerate(pairs) if i in keep]


def _draw_bars(pen, bars, chosen, y: int, width: int, line: int, font) -> None:
    label_w = max((pen.textlength(name, font=font) for name, _ in bars), default=0) + 16
    span = max(width - label_w - 80, 10)
    for name, p in bars:
        colour = CHOSEN if name == chosen else BAR
        pen.text((8, y), name, font=font, fill=TEXT if name == chosen else DIM)
        x0 = int(label_w)
        pen.rectangle((x0, y + line // 5, x0 + int(span * p), y + line - line // 5), fill=colour)
        pen.text((x0 + int(span * p) + 6, y), f"{p:.2f}", font=font, fill=TEXT)
        y += line


def _wrap(text: str, width: float, font) -> list[str]:
    """Greedy word wrap to ``width`` pixels."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}" if current else word
        if current and probe.textlength(trial, font=font) > width:
            lines.append(current)
            trial = word
        current = trial
    return [*lines, current] if current else lines


def _font(size: int):
    """Pillow's built-in font at ``size`` (Pillow >= 10.1); older Pillow, as an apt-installed
    one on Ubuntu 22.04 may be, has only the fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag|")
    return int((bottom - top) * 1.5) + 2


def jpeg(image: np.ndarray) -> bytes:
    """The annotated image as JPEG bytes (CompressedImage data)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


class Saver:
    """Writes annotated images as PNG into ``folder``: at most one per ``period_s`` (others are
    skipped), keeping the newest ``keep`` files of this saver (older ones are deleted)."""

    def __init__(self, folder: str | Path, period_s: float = 1.0, keep: int = 20):
        if period_s < 0 or keep < 1:
            raise ValueError(f"period_s must be >= 0 and keep >= 1, got {period_s}, {keep}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.period_s, self.keep = period_s, keep
        self._last = -float("inf")
        self._written: list[Path] = sorted(self.folder.glob(f"{SAVE_PREFIX}*.png"))
        self.saved = 0

    def due(self, now: float | None = None) -> bool:
        """Whether a frame offered now would be written (cheap; no drawing needed to ask)."""
        now = time.monotonic() if now is None else now
        return now - self._last >= self.period_s

    def save(self, image: np.ndarray, stamp_s: float, now: float | None = None) -> Path | None:
        """Write ``image`` unless one was written less than ``period_s`` ago; returns the path."""
        now = time.monotonic() if now is None else now
        if not self.due(now):
            return None
        self._last = now
        path = self.folder / f"{SAVE_PREFIX}{stamp_s:017.6f}.png"
        tmp = path.with_suffix(".tmp")
        Image.fromarray(image).save(tmp, format="PNG")
        tmp.replace(path)  # a reader never sees a half-written file
        self._written.append(path)
        self.saved += 1
        while len(self._written) > self.keep:
            self._written.pop(0).unlink(missing_ok=True)
        return path


class Renderer:
    """A thread that calls ``render(item)`` for the newest item offered; an item not yet taken
    is replaced by a newer one (counted in ``replaced``). ``offer`` never blocks."""

    def __init__(self, render: Callable[[object], None], name: str = "annotate"):
        self._render = render
        self._item: object = None
        self._cond = threading.Condition()
        self._stopping = False
        self.rendered = self.replaced = self.failed = 0
        self.last_error = ""
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def offer(self, item: object) -> None:
        with self._cond:
            if self._item is not None:
                self.replaced += 1
            self._item = item
            self._cond.notify()

    def stop(self, timeout: float = 1.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._item is None and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                item, self._item = self._item, None
            try:
                self._render(item)
                self.rendered += 1
            except Exception as exc:  # drawing must never take the node down; counted, kept
                self.failed += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
