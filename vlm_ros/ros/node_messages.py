"""The node's side of the message mapping: rclpy's generated classes for vlm_ros.ros.outputs,
and the /diagnostics status. No rclpy import (generated types only).

Split from vlm_ros/ros/node.py so the node keeps to scheduling and ROS glue; the field mapping
itself lives in vlm_ros.ros.outputs, shared with eval-bag's typestore.
"""

from __future__ import annotations

import array
from collections.abc import Mapping

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

from vlm_ros.msg import ActionHint, SceneAnswer, StageLatency
from vlm_ros.ros.outputs import MessageTypes
from vlm_ros.serving.latency import Report

# rclpy stores float32[] as array.array('f') and refuses numpy arrays
RCLPY_TYPES = MessageTypes(
    SceneAnswer, ActionHint, StageLatency, lambda values: array.array("f", values.tobytes())
)


def latency_status(
    name: str,
    hardware_id: str,
    report: Report,
    budgets_ms: Mapping[str, float],
    extra: Mapping[str, object],
) -> DiagnosticStatus:
    """One DiagnosticStatus: stage p50/p90/p99/max over the window, counters, budgets, verdict."""
    values = report.key_values(budgets_ms, extra)
    return DiagnosticStatus(
        level=bytes([report.level]),
        name=name,
        message=report.message,
        hardware_id=hardware_id,
        values=[KeyValue(key=k, value=v) for k, v in values],
    )


def server_status(node: str, hardware_id: str, server) -> DiagnosticStatus:
    """Backend remote: the server's reachability (infer.remote.ServerStatus, kept by its
    background probe and every request). ERROR while unreachable, WARN before the first
    contact or when it does not list the model, OK otherwise; its recent latency (encode,
    network, server_queue, the server's stages) is in the latency status's window."""
    if server.reachable is False:
        level = DiagnosticStatus.ERROR
    elif server.reachable is None or server.model_listed is False:
        level = DiagnosticStatus.WARN
    else:
        level = DiagnosticStatus.OK
    since = server.seconds_since_contact
    values = {
        "url": server.url,
        "model": server.model,
        "reachable": {True: "yes", False: "no", None: "unknown"}[server.reachable],
        "seconds_since_contact": "never" if since is None else f"{since:.1f}",
        "probe_ms": f"{server.probe_ms:.1f}",
        "action_hints": server.ranking,
    }
    return DiagnosticStatus(
        level=level,
        name=f"{node}: server {server.url}",
        message=server.message,
        hardware_id=hardware_id,
        values=[KeyValue(key=k, value=v) for k, v in values.items()],
    )
