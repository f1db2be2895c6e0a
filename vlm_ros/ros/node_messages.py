"""Builders of the node's output messages from core results; no rclpy (generated types only).

Split from vlm_ros/ros/node.py so the node keeps to scheduling and ROS glue. Every output copies the
source image's header, so consumers can compute the true image-to-output latency.
"""

from __future__ import annotations

from collections.abc import Mapping

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

from vlm_ros.msg import ActionHint, SceneAnswer, StageLatency
from vlm_ros.serving.latency import Report
from vlm_ros.types import STAGES, Answer
from vlm_ros.types import ActionHint as Hint


def stage_latency(stages_ms: Mapping[str, float], queue_ms: float, e2e_ms: float) -> StageLatency:
    return StageLatency(queue_ms=float(queue_ms), image_to_output_ms=float(e2e_ms),
                        **{f"{s}_ms": float(stages_ms[s]) for s in STAGES})  # fmt: skip


def scene_answer(header, camera: str, question: str, ans: Answer, latency: StageLatency,
                 misses: tuple[str, ...]) -> SceneAnswer:  # fmt: skip
    return SceneAnswer(
        header=header, camera=camera, question=question, answer=ans.text,
        num_tokens=len(ans.token_ids), stop_reason=ans.stop_reason, latency=latency,
        within_budget=not misses, budget_misses=list(misses),
    )  # fmt: skip


def action_hint(header, camera: str, instruction: str, hint: Hint, latency: StageLatency,
                misses: tuple[str, ...]) -> ActionHint:  # fmt: skip
    return ActionHint(
        header=header, camera=camera, instruction=instruction, action=hint.chosen,
        confidence=float(hint.confidence), candidates=list(hint.actions),
        probabilities=[float(p) for p in hint.probabilities], latency=latency,
        within_budget=not misses, budget_misses=list(misses),
    )  # fmt: skip


def latency_status(name: str, hardware_id: str, report: Report, budgets_ms: Mapping[str, float],
                   extra: Mapping[str, object]) -> DiagnosticStatus:  # fmt: skip
    """One DiagnosticStatus: stage p50/p90/p99/max over the window, counters, budgets, verdict."""
    return DiagnosticStatus(
        level=bytes([report.level]), name=name, message=report.message, hardware_id=hardware_id,
        values=[KeyValue(key=k, value=v) for k, v in report.key_values(budgets_ms, extra)],
    )  # fmt: skip
