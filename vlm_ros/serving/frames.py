"""The latest frame of each camera, and the accounting of every frame received. ROS-free.

One class serves the live node (camera callbacks ``put``, worker jobs ``take``) and the offline
replay (vlm_ros.bag.replay, on the bag's virtual clock), so both count frames by the same rule:

* a frame is **received** when it is stored, and **dropped** when a newer frame of the same
  camera replaces it before any job took it;
* a frame is **taken** when the first job starts on it; it is converted to pixels once, however
  many jobs use it, and a failed conversion is remembered (never retried per job);
* a taken frame gets one **verdict**, from the first job that settles it: **rejected** (with a
  reason, counted as ``rejected`` and ``rejected_<reason>``) when its conversion failed or the
  core refused it (an image too small or too large, a prompt that overflows the context), else
  **processed**. Later jobs on the same frame never change the count.

So ``received == processed + dropped + rejected + held``, where ``held`` is the frames taken but
not yet settled plus the latest untaken frame of each camera (see ``held``).

Counts go to a sink ``count(name, at)``: the node prefixes ``frames_`` and feeds its
LatencyMonitor; the replay records the virtual time ``at`` of each event. ``at`` is whatever
clock the caller uses (monotonic seconds in the node, bag nanoseconds in the replay).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlm_ros.errors import ContextOverflowError, InputError

Count = Callable[[str, float], None]


class StaleFrameError(InputError):
    """No frame of the camera yet, or the latest one is older than allowed."""


PROCESSED, REJECTED = "processed", "rejected"


@dataclass(eq=False)
class Frame:
    """One stored message. ``image``/``error`` are set by ``FrameStore.image`` (once);
    ``taken``/``verdict`` under the store's lock."""

    camera: str
    msg: Any
    received: float  # the caller's clock at ``put``
    seq: int
    taken: bool = False
    verdict: str | None = None  # PROCESSED or REJECTED, once settled
    image: Any = None
    error: BaseException | None = None


def rejection_reason(exc: BaseException | None) -> str | None:
    """The reason a frame is rejected for ``exc``, or None when ``exc`` says nothing against the
    frame (success, a cancel, a model failure: the frame was processed). Image converters give
    their errors a ``reason`` attribute (vlm_ros.ros.imaging.ImageFormatError)."""
    if exc is None or not isinstance(exc, InputError):
        return None
    if isinstance(exc, ContextOverflowError):
        return "context_overflow"
    return str(getattr(exc, "reason", "") or "invalid_input")


class FrameStore:
    """Latest frame per camera plus the counts above; thread-safe (one lock for the table)."""

    def __init__(self, count: Count):
        self._count = count
        self._frames: dict[str, Frame] = {}
        self._lock = threading.Lock()  # the table and every frame's taken/verdict
        self._convert_lock = threading.Lock()  # one conversion at a time, never under _lock
        self._seq = itertools.count(1)

    def put(self, camera: str, msg: Any, at: float) -> Frame:
        """Store ``msg`` as the camera's latest frame; the one it replaces is dropped unless a
        job took it. Cheap: nothing is converted here (a camera callback calls it)."""
        frame = Frame(camera, msg, at, next(self._seq))
        with self._lock:
            old = self._frames.get(camera)
            self._frames[camera] = frame
        self._count("received", at)
        if old is not None and not old.taken:
            self._count("dropped", at)
        return frame

    def latest(self, camera: str) -> Frame | None:
        with self._lock:
            return self._frames.get(camera)

    def fresh(
        self, camera: str, now: float, max_age: float, take: bool = False, label: str = ""
    ) -> Frame:
        """The camera's latest frame if it is at most ``max_age`` old (0: no limit), marked taken
        when ``take``; InputError naming the camera (as ``label``, e.g. the node's resolved
        topic, when given) when there is none or it is too old. Ages are in the caller's clock
        units; the message says milliseconds for seconds clocks."""
        name = label or camera
        with self._lock:
            frame = self._frames.get(camera)
            if frame is None:
                raise StaleFrameError(f"no frame received yet on {name}")
            age = now - frame.received
            if max_age > 0 and age > max_age:
                raise StaleFrameError(
                    f"latest frame on {name} is stale: {age * 1000:.0f} ms old "
                    f"(max_frame_age_ms {max_age * 1000:.0f})"
                )
            frame.taken = frame.taken or take
        return frame

    def take_untaken(self, camera: str) -> Frame | None:
        """The camera's latest frame if no job took it yet, now taken; else None."""
        with self._lock:
            frame = self._frames.get(camera)
            if frame is None or frame.taken:
                return None
            frame.taken = True
        return frame

    def image(self, frame: Frame, convert: Callable[[Any], Any]) -> Any:
        """``convert(frame.msg)``, run once per frame; a failure is remembered and raised again
        to every later job without converting (a hostile image costs its decode once)."""
        with self._convert_lock:
            if frame.image is None and frame.error is None:
                try:
                    frame.image = convert(frame.msg)
                except Exception as exc:
                    frame.error = exc
        if frame.error is not None:
            # a fresh traceback each time: raising a kept exception again lengthens the one it
            # has, and that one holds the earlier callers' frames (each with its job's frame)
            raise frame.error.with_traceback(None)
        return frame.image

    def settle(self, frame: Frame, exc: BaseException | None, at: float) -> str | None:
        """Give ``frame`` its verdict from a finished job's outcome (``exc`` None: success);
        returns the rejection reason when this call rejected it, else None. Only the first
        settle counts."""
        reason = rejection_reason(exc)
        with self._lock:
            if frame.verdict is not None:
                return None
            frame.verdict = PROCESSED if reason is None else REJECTED
        if reason is None:
            self._count(PROCESSED, at)
            return None
        self._count(REJECTED, at)
        self._count(f"{REJECTED}_{reason}", at)
        return reason

    def held(self) -> int:
        """Frames counted as received but not (yet) processed, dropped or rejected: the latest
        untaken frame of each camera plus latest frames taken but not settled."""
        with self._lock:
            return sum(f.verdict is None for f in self._frames.values())

    def clear(self) -> None:
        with self._lock:
            self._frames.clear()
