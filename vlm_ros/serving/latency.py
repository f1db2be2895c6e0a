"""Latency budgets, a rolling window of stage latencies, frame counters and a verdict. ROS-free.

Used by the node's /diagnostics, the benchmark and the bag report, so all three judge latency by
the same rule. Names follow vlm_ros.types.TIMING_NAMES (the pipeline stages and the remote
backend's encode / network / server_queue) plus ``image_to_output`` (source image stamp to
published output) — the same names as the ``budget_<name>_ms`` parameters and the
``<name>_p50_ms`` / ``<name>_p90_ms`` / ``<name>_p99_ms`` diagnostic keys.

Percentiles: one set (``PERCENTILES``: p50, p90, p99) computed one way (``percentiles``: numpy's
linear interpolation) for /diagnostics, the bag report and the benchmark, so a figure read in one
place means the same in the others.

Verdict rule (``LatencyMonitor.report``), checked over the window of the last N outputs:
  * ERROR: more than ``error_miss_fraction`` (default 0.5) of the windowed outputs missed a budget,
    or inference failed (model error) since the previous report;
  * WARN: any windowed output missed a budget, or frames were dropped or rejected, or requests
    refused, since the previous report;
  * OK otherwise (including "no output yet": an idle node is not broken).
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from vlm_ros.types import REMOTE_STAGES, TIMING_NAMES

E2E = "image_to_output"
PERCENTILES = (50, 90, 99)
NAMES = (*TIMING_NAMES, E2E)
OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels
LEVEL_NAMES = {OK: "OK", WARN: "WARN", ERROR: "ERROR"}


@dataclass(frozen=True)
class Budgets:
    """Budget per stage and end to end, in milliseconds; 0 means "no budget"."""

    preprocess: float = 0.0
    vision: float = 0.0
    projector: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    encode: float = 0.0  # encode, network, server_queue: the remote backend's (types.py)
    network: float = 0.0
    server_queue: float = 0.0
    total: float = 0.0
    image_to_output: float = 0.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, float]) -> Budgets:
        """From ``{"total": 500}`` or ``{"total_ms": 500}``; unknown names raise ValueError so
        a typo in a parameter file is not silently ignored."""
        out = {}
        for key, value in values.items():
            name = key.removesuffix("_ms")
            if name not in NAMES:
                raise ValueError(f"unknown budget {key!r}; expected one of {', '.join(NAMES)}")
            out[name] = float(value)
        return cls(**out)

    def as_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}

    def misses(self, stages_ms: Mapping[str, float], image_to_output_ms: float) -> tuple[str, ...]:
        """Names over budget, in pipeline order (``total`` then ``image_to_output`` last)."""
        values = dict(stages_ms, **{E2E: image_to_output_ms})
        return tuple(
            name
            for name, budget in self.as_dict().items()
            if budget > 0 and values.get(name, 0.0) > budget
        )


def percentiles(values) -> dict[str, float]:
    """``{"p50": .., "p90": .., "p99": ..}`` of ``values`` (numpy's linear interpolation)."""
    arr = np.asarray(list(values), dtype=np.float64)
    return {
        f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(arr, PERCENTILES), strict=True)
    }


@dataclass(frozen=True)
class StageStats:
    """p50/p90/p99/max over the window of one stage, in ms."""

    p50: float
    p90: float
    p99: float
    max: float


@dataclass(frozen=True)
class Report:
    """What /diagnostics publishes: window stats, counters, and the verdict."""

    level: int
    message: str
    stats: dict[str, StageStats]
    window_outputs: int
    window_misses: int
    counters: dict[str, int]
    misses_by_stage: dict[str, int] = field(default_factory=dict)

    def key_values(
        self, budgets_ms: Mapping[str, float], extra: Mapping[str, object] | None = None
    ) -> list[tuple[str, str]]:
        """(key, text) pairs of /diagnostics, in one place for the node and the bag evaluator
        (which rebuilds /diagnostics from recorded outputs): the ALWAYS counters (0 until the
        first event), every other counter, per-stage p50/p90/p99/max over the window, every budget
        (0 = none), budget misses per stage, the window's outputs and misses, then ``extra``."""
        values: dict[str, object] = {key: 0 for key in ALWAYS}
        values.update(self.counters)
        for stage, st in self.stats.items():
            values.update({f"{stage}_{k}_ms": v for k, v in asdict(st).items()})
        values.update({f"budget_{k}_ms": v for k, v in budgets_ms.items()})
        values.update({f"misses_{k}": v for k, v in self.misses_by_stage.items()})
        values.update(window_outputs=self.window_outputs, window_misses=self.window_misses)
        values.update(extra or {})
        return [(k, f"{v:.3f}" if isinstance(v, float) else str(v)) for k, v in values.items()]


# counters /diagnostics always shows, 0 before the first event (the bag report reads them)
ALWAYS = ("frames_received", "frames_processed", "frames_dropped", "frames_rejected")


# counters whose growth since the previous report makes a WARN (ERROR for "failed").
# frames_dropped is not one: a camera faster than the model drops frames by design (only the
# latest is kept); periodic_skipped is the model falling behind its configured rates.
WARN_COUNTERS = ("periodic_skipped", "frames_rejected", "requests_refused")


class LatencyMonitor:
    """Thread-safe: the worker records, a timer reports. Counters are cumulative; ``count``
    takes any name (e.g. ``frames_rejected_truncated``)."""

    def __init__(
        self, budgets: Budgets = Budgets(), window: int = 50, error_miss_fraction: float = 0.5
    ):
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.budgets = budgets
        self.error_miss_fraction = error_miss_fraction
        self._window: deque[tuple[dict[str, float], tuple[str, ...]]] = deque(maxlen=window)
        self._counters: Counter[str] = Counter()
        self._misses: Counter[str] = Counter()
        self._reported: Counter[str] = Counter()
        self._lock = threading.Lock()

    def record(self, stages_ms: Mapping[str, float], image_to_output_ms: float) -> tuple[str, ...]:
        """Add one output; returns its budget misses (for the output message)."""
        misses = self.budgets.misses(stages_ms, image_to_output_ms)
        sample = {name: float(stages_ms.get(name, 0.0)) for name in TIMING_NAMES}
        sample[E2E] = float(image_to_output_ms)
        with self._lock:
            self._window.append((sample, misses))
            self._counters["outputs"] += 1
            self._counters["budget_misses"] += bool(misses)
            self._misses.update(misses)
        return misses

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    def report(self) -> Report:
        """Window stats and the verdict (module docstring); remembers the counters so the next
        report judges only what happened since."""
        with self._lock:
            window = list(self._window)
            counters = dict(self._counters)
            new = Counter(counters)
            new.subtract(self._reported)
            self._reported = Counter(counters)
            misses_by_stage = dict(self._misses)
        stats = _window_stats([s for s, _ in window])
        n_miss = sum(1 for _, m in window if m)
        level, message = self._verdict(len(window), n_miss, new)
        return Report(level, message, stats, len(window), n_miss, counters, misses_by_stage)

    def _verdict(self, n: int, n_miss: int, new: Counter) -> tuple[int, str]:
        if new["failed"] > 0:
            return ERROR, f"{new['failed']} inference failures since the last report"
        if n and n_miss / n > self.error_miss_fraction:
            return ERROR, f"{n_miss}/{n} recent outputs missed their latency budget"
        notes = [f"{n_miss}/{n} recent outputs missed budget"] if n_miss else []
        notes += [f"{new[c]} {c.replace('_', ' ')}" for c in WARN_COUNTERS if new[c] > 0]
        if notes:
            return WARN, "; ".join(notes)
        return OK, "within budget" if n else "no output yet"


def _window_stats(samples: list[dict[str, float]]) -> dict[str, StageStats]:
    """p50/p90/p99/max per name over the samples; the remote backend's stages only where one
    was measured (a local node's /diagnostics keeps its keys)."""
    if not samples:
        return {}
    out = {}
    for name in NAMES:
        if name in REMOTE_STAGES and not any(s[name] for s in samples):
            continue
        values = [s[name] for s in samples]
        out[name] = StageStats(**percentiles(values), max=float(max(values)))
    return out
