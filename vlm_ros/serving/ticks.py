"""When the periodic scene answers and action hints run: one timer for both. ROS-free.

The node has two periodic kinds with rates of their own (``scene_rate_hz``, ``hint_rate_hz``).
Two timers would fire a few milliseconds apart when their ticks coincide, and each job would
take the camera's latest frame when it reaches the worker, so a scene answer and a hint "of the
same moment" often described different frames. Instead one timer runs at the faster rate and
each tick says which kinds are due; a kind is due at the tick nearest its own schedule (within
half a tick). Kinds due together go into one job on one frame, so their outputs carry the same
header stamp. A slower rate that is not a whole multiple of the faster one keeps its average
rate, its ticks quantised to the fast timer's (at most half a fast period early or late).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping


class TickPlan:
    """The shared timer's period and, per tick, the kinds due. Rates <= 0 are off."""

    def __init__(self, rates_hz: Mapping[str, float]):
        self.periods = {kind: 1.0 / rate for kind, rate in rates_hz.items() if rate > 0}
        self.period = min(self.periods.values()) if self.periods else None  # None: no timer
        self._next = {kind: -float("inf") for kind in self.periods}  # all due at the first tick
        self._lock = threading.Lock()  # a reentrant timer callback may overlap itself

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds with a rate (the ones a tick can return)."""
        return tuple(self.periods)

    def due(self, now: float) -> tuple[str, ...]:
        """The kinds due at a tick at ``now`` (seconds, monotonic), in the rates' order."""
        if self.period is None:
            return ()
        half = self.period / 2
        with self._lock:
            due = tuple(kind for kind in self.periods if now >= self._next[kind] - half)
            for kind in due:
                # from its own schedule, so the average rate holds; from now after a stall (or
                # at the first tick), so missed ticks are not made up in a burst
                base = self._next[kind] if self._next[kind] >= now - half else now
                self._next[kind] = base + self.periods[kind]
        return due
