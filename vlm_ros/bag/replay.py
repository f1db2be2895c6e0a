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

Pure logic, no model and no rosbags, so the dropping rule is tested with a fake clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

RATES = ("recorded", "max")

F = TypeVar("F")


@dataclass
class Counters:
    """Frame accounting. received == processed + dropped + rejected once a replay ends;
    dropped: replaced by a newer frame before the model took it (the node's definition)."""

    received: int = 0
    processed: int = 0
    dropped: int = 0
    rejected: int = 0  # taken by the model but refused (bad encoding, bad image)
    # (virtual time ns, counter name) of every increment, for diagnostics over time
    events: list[tuple[int, str]] = field(default_factory=list)

    def count(self, name: str, at_ns: int) -> None:
        setattr(self, name, getattr(self, name) + 1)
        self.events.append((at_ns, name))

    def at(self, t_ns: int) -> dict[str, int]:
        """The counters as they stood at virtual time ``t_ns``."""
        out = dict.fromkeys(("received", "processed", "dropped", "rejected"), 0)
        for when, name in self.events:
            if when <= t_ns:
                out[name] += 1
        return out

    def as_dict(self) -> dict[str, int]:
        return {
            "received": self.received,
            "processed": self.processed,
            "dropped": self.dropped,
            "rejected": self.rejected,
        }


@dataclass(frozen=True)
class Arrival(Generic[F]):
    """A frame and its arrival time (the bag's receive time, ns)."""

    frame: F
    arrival_ns: int


# process(frame, arrival_ns, start_ns) -> (end_ns, served); a refused frame still occupied the
# model until end_ns (converting it took time), so it returns end_ns too.
Process = Callable[[F, int, int], tuple[int, bool]]


def replay(arrivals: Iterable[Arrival[F]], process: Process, rate: str = "recorded") -> Counters:
    """Feed ``arrivals`` (in arrival order) to ``process`` as the node would; returns the counters.

    ``process(frame, arrival_ns, start_ns)`` runs the model and returns ``(end_ns, ok)``:
    the virtual time the model is free again (start + measured busy time) and whether the frame
    was served (False: refused, counted as rejected).
    """
    if rate not in RATES:
        raise ValueError(f"rate must be one of {RATES}, got {rate!r}")
    counters = Counters()
    run = _max_rate if rate == "max" else _recorded_rate
    run(arrivals, process, counters)
    return counters


def _serve(process: Process, item: Arrival, start_ns: int, counters: Counters) -> int:
    end_ns, ok = process(item.frame, item.arrival_ns, start_ns)
    counters.count("processed" if ok else "rejected", end_ns)
    return end_ns


def _max_rate(arrivals: Iterable[Arrival], process: Process, counters: Counters) -> None:
    for item in arrivals:
        counters.count("received", item.arrival_ns)
        _serve(process, item, item.arrival_ns, counters)


def _recorded_rate(arrivals: Iterable[Arrival], process: Process, counters: Counters) -> None:
    free_ns: int | None = None  # when the model is free again; None: never used yet
    pending: Arrival | None = None  # latest frame that arrived while the model was busy
    for item in arrivals:
        counters.count("received", item.arrival_ns)
        if pending is not None and free_ns is not None and free_ns <= item.arrival_ns:
            free_ns = _serve(process, pending, free_ns, counters)  # taken the moment it was free
            pending = None
        if free_ns is None or free_ns <= item.arrival_ns:
            free_ns = _serve(process, item, item.arrival_ns, counters)
            continue
        if pending is not None:
            counters.count(
                "dropped", item.arrival_ns
            )  # superseded by a newer frame before the model got to it
        pending = item
    if pending is not None and free_ns is not None:
        _serve(process, pending, free_ns, counters)
