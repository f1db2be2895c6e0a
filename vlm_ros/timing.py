"""Per-stage wall-clock timing: CUDA events on GPU, ``time.perf_counter`` on CPU.

On CUDA, kernels run asynchronously, so a host clock around a stage measures the launch, not the
work. Events are recorded in the stream instead and read once, after one synchronisation, when
the request is finished (so timing adds no stall between stages).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageTimer:
    """Accumulates milliseconds per named stage; a stage may be entered several times."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self._cpu_ms: dict[str, float] = {}
        self._events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.setdefault(name, []).append((start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                ms = (time.perf_counter() - t0) * 1000.0
                self._cpu_ms[name] = self._cpu_ms.get(name, 0.0) + ms

    def milliseconds(self) -> dict[str, float]:
        """Milliseconds per stage (synchronises the GPU once if events were recorded)."""
        out = dict(self._cpu_ms)
        if self._events:
            torch.cuda.synchronize()
            for name, pairs in self._events.items():
                out[name] = out.get(name, 0.0) + sum(s.elapsed_time(e) for s, e in pairs)
        return out
