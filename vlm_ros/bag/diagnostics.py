"""/diagnostics for a replay, judged by the node's own rule (serving.latency.LatencyMonitor).

The replay's outputs and frame counts are fed to a LatencyMonitor in virtual-time order, and it
reports once per virtual second and once at the end, as the node's diagnostics timer does. The
last DiagnosticArray carries the final counters and the run's settings; the report reads frames
dropped from there, as it does from a live recording of the node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlm_ros.bag.io import OutMessage
from vlm_ros.ros import names
from vlm_ros.serving.latency import ERROR, OK, Budgets, LatencyMonitor

# eval-bag's own status (the report finds the run's settings by this name, whatever the node)
RUN_STATUS_NAME = f"{names.NODE_NAME}: eval-bag run"
DIAGNOSTIC_ARRAY = "diagnostic_msgs/msg/DiagnosticArray"
FRAME_COUNTERS = ("frames_received", "frames_processed", "frames_dropped", "frames_rejected")


@dataclass(frozen=True)
class Sample:
    """One published output: when (virtual ns), its stage ms and its image->output ms."""

    done_ns: int
    stages_ms: dict[str, float]
    image_to_output_ms: float


def _status(
    ts, level: int, name: str, hardware_id: str, message: str, values: Sequence[tuple[str, str]]
) -> Any:
    kv = ts.types["diagnostic_msgs/msg/KeyValue"]
    return ts.types["diagnostic_msgs/msg/DiagnosticStatus"](
        level=level,
        name=name,
        message=message,
        hardware_id=hardware_id,
        values=[kv(key=k, value=v) for k, v in values],
    )


def _array(ts, t_ns: int, statuses: list) -> Any:
    stamp = ts.types["builtin_interfaces/msg/Time"](
        sec=t_ns // 1_000_000_000, nanosec=t_ns % 1_000_000_000
    )
    header = ts.types["std_msgs/msg/Header"](stamp=stamp, frame_id="")
    return ts.types[DIAGNOSTIC_ARRAY](header=header, status=statuses)


def _timeline(
    samples: Sequence[Sample], events: Sequence[tuple[int, str]]
) -> list[tuple[int, Any]]:
    """Outputs and counter increments merged in virtual-time order."""
    merged = [(s.done_ns, s) for s in samples] + [(t, f"frames_{name}") for t, name in events]
    return sorted(merged, key=lambda item: item[0])


def diagnostic_messages(
    ts,
    samples: Sequence[Sample],
    events: Sequence[tuple[int, str]],
    budgets: Budgets,
    run_info: dict[str, str],
    read_errors: Sequence[str],
    topic: str,
    period_s: float = 1.0,
    node: tuple[str, str] = (names.NODE_NAME, ""),
) -> list[OutMessage]:
    """/diagnostics every ``period_s`` of virtual time and a final one with the run's settings,
    named as the live node ``node`` (name, namespace) names its status."""
    status_name, hardware_id = names.latency_status(node[0]), names.fully_qualified(*node)
    timeline = _timeline(samples, events)
    if not timeline:
        return []
    monitor = LatencyMonitor(budgets)
    for name in FRAME_COUNTERS:  # published from the start, zeros included
        monitor.count(name, 0)
    period = max(int(period_s * 1e9), 1)
    end = timeline[-1][0]
    ticks = [*range(timeline[0][0] + period, end, period), end]
    out, i = [], 0
    for tick in ticks:
        while i < len(timeline) and timeline[i][0] <= tick:
            item = timeline[i][1]
            if isinstance(item, Sample):
                monitor.record(item.stages_ms, item.image_to_output_ms)
            else:
                monitor.count(item)
            i += 1
        report = monitor.report()
        values = report.key_values(budgets.as_dict())
        statuses = [_status(ts, report.level, status_name, hardware_id, report.message, values)]
        if tick == end:
            level = ERROR if read_errors else OK
            message = read_errors[0] if read_errors else "complete"
            run = list(run_info.items())
            statuses.append(_status(ts, level, RUN_STATUS_NAME, hardware_id, message, run))
        out.append(OutMessage(topic, DIAGNOSTIC_ARRAY, tick, _array(ts, tick, statuses)))
    return out
