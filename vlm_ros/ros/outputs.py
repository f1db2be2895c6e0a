"""Core results -> the node's output messages: one mapping for rclpy and the bag typestore.

ROS-free (no rclpy, no generated module): the caller passes the message classes in
``MessageTypes``, the node rclpy's generated ones (vlm_ros.ros.node_messages.RCLPY_TYPES),
eval-bag a rosbags typestore's (vlm_ros.bag.evaluate), so a field added to SceneAnswer,
ActionHint or StageLatency is filled in one place for both. Every output copies the source
image's header, so consumers can compute the true image-to-output latency.

Probabilities are float32 in both (the message field is ``float32[]``): computed once here as a
numpy float32 array, then handed over in the container each library stores that field in
(``array.array('f')`` for rclpy, which refuses numpy arrays; the array itself for rosbags,
which needs one), so a live node and a replay carry identical numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlm_ros.types import TIMING_NAMES, ActionHint, Answer


@dataclass(frozen=True)
class MessageTypes:
    """The classes to build (keyword-constructed, as both libraries' message classes are)."""

    scene_answer: Callable[..., Any]
    action_hint: Callable[..., Any]
    stage_latency: Callable[..., Any]
    float32s: Callable[[np.ndarray], Any] = lambda values: values


def stage_latency(
    types: MessageTypes, stages_ms: Mapping[str, float], queue_ms: float, e2e_ms: float
) -> Any:
    """StageLatency: the core's stages, the queue wait, and image stamp -> output, in ms."""
    stages = {f"{s}_ms": float(stages_ms.get(s, 0.0)) for s in TIMING_NAMES}
    return types.stage_latency(queue_ms=float(queue_ms), image_to_output_ms=float(e2e_ms), **stages)


def scene_answer(
    types: MessageTypes,
    header: Any,
    camera: str,
    question: str,
    ans: Answer,
    latency: Any,
    misses: tuple[str, ...],
) -> Any:
    return types.scene_answer(
        header=header,
        camera=camera,
        question=question,
        answer=ans.text,
        num_tokens=len(ans.token_ids),
        stop_reason=ans.stop_reason,
        latency=latency,
        within_budget=not misses,
        budget_misses=list(misses),
    )


def action_hint(
    types: MessageTypes,
    header: Any,
    camera: str,
    instruction: str,
    hint: ActionHint,
    latency: Any,
    misses: tuple[str, ...],
) -> Any:
    probabilities = np.asarray(hint.probabilities, dtype=np.float32)
    return types.action_hint(
        header=header,
        camera=camera,
        instruction=instruction,
        action=hint.chosen,
        confidence=float(probabilities[hint.best_index]),
        candidates=list(hint.actions),
        probabilities=types.float32s(probabilities),
        latency=latency,
        within_budget=not misses,
        budget_misses=list(misses),
    )
