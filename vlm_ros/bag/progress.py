"""A one-line progress bar for eval-bag: frames done, drops, the current rate and the ETA.

A replay can take minutes (a 5 s 720p bag took 81 s on 2 cores) and printed nothing. The bar
redraws one terminal line at most a few times a second, on stderr, and only on a terminal: piped
into a file or a CI log it stays silent (the closing summary is printed either way).

While the replay runs, drops are *read - processed - rejected*: a frame waiting for the model
counts as dropped until the model takes it, so the live figure can be one above the final count.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")
REDRAW_S = 0.25
WIDTH = 24


def duration(seconds: float) -> str:
    """``1h02m``, ``3m07s``, ``42s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Counts frames read (``track``) and served (``served``/``rejected``) and redraws the line.

    ``enabled=None`` means "when ``stream`` is a terminal". ``total`` None (a salvaged bag with
    no message count): no percentage and no ETA.
    """

    def __init__(
        self,
        total: int | None,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        clock=time.monotonic,
    ):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.clock = total, clock
        self.read = self.processed = self.rejected = 0
        self.started = clock()
        self._drawn_at: float | None = None
        self.drawn = 0  # lines drawn (tests)

    def track(self, frames: Iterable[T]) -> Iterator[T]:
        """``frames`` unchanged, counting each one as read."""
        for frame in frames:
            self.read += 1
            self._maybe_draw()
            yield frame

    def served(self, ok: bool) -> None:
        if ok:
            self.processed += 1
        else:
            self.rejected += 1
        self._maybe_draw()

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.read / elapsed
        dropped = max(self.read - self.processed - self.rejected, 0)
        done = f"{self.read}"
        bar = ""
        if self.total:
            fraction = min(self.read / self.total, 1.0)
            filled = int(fraction * WIDTH)
            bar = f"[{'#' * filled}{'.' * (WIDTH - filled)}] {fraction:4.0%} "
            done = f"{self.read}/{self.total}"
        eta = ""
        if self.total and rate > 0:
            eta = f" | ETA {duration(max(self.total - self.read, 0) / rate)}"
        return (
            f"{bar}{done} frames | {self.processed} processed, {dropped} dropped, "
            f"{self.rejected} rejected | {rate:.1f} frames/s{eta}"
        )

    def _maybe_draw(self) -> None:
        now = self.clock()
        if not self.enabled or (self._drawn_at is not None and now - self._drawn_at < REDRAW_S):
            return
        self._drawn_at = now
        self.drawn += 1
        self.stream.write("\r\x1b[K" + self.line())
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line (nothing when disabled)."""
        if self.enabled:
            self._drawn_at = None
            self._maybe_draw()
            self.stream.write("\n")
            self.stream.flush()
