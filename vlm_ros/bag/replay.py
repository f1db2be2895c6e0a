"""The node's frame handling on a virtual clock: which recorded frames the model would take.

The live node keeps only the latest frame per camera; its one worker takes that frame when it is
free, and every frame that arrives while it is busy replaces the previous one (which is then
dropped, never answered). Replaying a bag we cannot sleep through its timeline, so time is
virtual: the clock is the bag's receive (log) times, and each inference occupies the model for
the real time it measurably took. A frame is taken at ``max(its arrival, model free)``.

Dropped has the live node's definition: a frame received and then replaced by a newer frame
before any work used it. It is counted when the newer frame arrives. A frame the model took and
refused is rejected, not dropped; the last frame of the bag is always taken. The node's timers
(``scene_rate_hz``, ``hint_rate_hz``) can also leave a frame unused while the model is idle,
and the node counts that as dropped too. The replay does not pace its work, so it only drops
frames that arrive while the model is busy.

``--rate max`` instead runs every frame, each as if the model were free when it arrived, so the
latencies are the pipeline's own (no queueing) and nothing is dropped.

Frames are stored and counted by vlm_ros.serving.frames.FrameStore, the class the live node uses,
so "dropped", "processed" and "rejected" (with its reasons) cannot drift between the two.

Pure logic, no model and no rosbags, so the dropping rule is tested with a fake clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from vlm_ros.serving.frames import FrameStore

RATES = ("recorded", "max")
CAMERA = "camera"  # the replay reads one camera topic: one slot in the store

F = TypeVar("F")
COUNTERS = ("received", "processed", "dropped", "rejected")


@dataclass
class Counters:
    """Frame accounting. received == processed + dropped + rejected once a replay ends;
    dropped: replaced by a newer frame before the model took it (the node's definition).
    The sink of a FrameStore (``count``), with the virtual time of every count."""

    received: int = 0
    processed: int = 0
    dropped: int = 0
    rejected: int = 0  # taken by the model but refused (bad encoding, bad image)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    # (virtual time ns, counter name) of every increment, for diagnostics over time
    events: list[tuple[int, str]] = field(default_factory=list)

    def count(self, name: str, at_ns: float) -> None:
        if name.startswith("rejected_"):
            reason = name.removeprefix("rejected_")
            self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + 1
        else:
            setattr(self, name, getattr(self, name) + 1)
        self.events.append((int(at_ns), name))

    def at(self, t_ns: int) -> dict[str, int]:
        """The counters as they stood at virtual time ``t_ns``."""
        out = dict.fromkeys(COUNTERS, 0)
        for when, name in self.events:
            if when <= t_ns and name in out:
                out[name] += 1
        return out

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}


@dataclass(frozen=True)
class Arrival(Generic[F]):
    """A frame and its arrival time (the bag's receive time, ns)."""

    frame: F
    arrival_ns: int


# process(frame, arrival_ns, start_ns) -> (end_ns, error); a refused frame still occupied the
# model until end_ns (converting it took time), so it returns end_ns too. ``error`` is None
# when the frame was served, else the InputError that refused it (its reason is counted).
Process = Callable[[F, int, int], tuple[int, BaseException | None]]


def replay(arrivals: Iterable[Arrival[F]], process: Process, rate: str = "recorded") -> Counters:
    """Feed ``arrivals`` (in arrival order) to ``process`` as the node would; returns the counters.

    ``process(frame, arrival_ns, start_ns)`` runs the model and returns ``(end_ns, error)``:
    the virtual time the model is free again (start + measured busy time) and None when the
    frame was served, else the refusal (counted as rejected, by its reason).
    """
    if rate not in RATES:
        raise ValueError(f"rate must be one of {RATES}, got {rate!r}")
    counters = Counters()
    store = FrameStore(counters.count)
    run = _max_rate if rate == "max" else _recorded_rate
    run(arrivals, process, store)
    return counters


def _serve(process: Process, store: FrameStore, start_ns: int) -> int | None:
    """Run the model on the store's untaken frame from ``start_ns``; its end, or None when
    there was nothing to take."""
    frame = store.take_untaken(CAMERA)
    if frame is None:
        return None
    end_ns, error = process(frame.msg, int(frame.received), start_ns)
    store.settle(frame, error, end_ns)
    return end_ns


def _max_rate(arrivals: Iterable[Arrival], process: Process, store: FrameStore) -> None:
    for item in arrivals:
        store.put(CAMERA, item.frame, item.arrival_ns)
        _serve(process, store, item.arrival_ns)


def _recorded_rate(arrivals: Iterable[Arrival], process: Process, store: FrameStore) -> None:
    free_ns: int | None = None  # when the model is free again; None: never used yet
    for item in arrivals:
        if free_ns is not None and free_ns <= item.arrival_ns:
            # the frame that waited while the model was busy, taken the moment it was free
            end_ns = _serve(process, store, free_ns)
            free_ns = free_ns if end_ns is None else end_ns
        store.put(CAMERA, item.frame, item.arrival_ns)  # an untaken one before it is dropped
        if free_ns is None or free_ns <= item.arrival_ns:
            free_ns = _serve(process, store, item.arrival_ns)
    if free_ns is not None:
        _serve(process, store, free_ns)
