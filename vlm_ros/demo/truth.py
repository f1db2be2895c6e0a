"""A demo scene's ground truth as plain data: what the synthetic camera publishes with a frame.

ROS-free. ``ground_truth(scene)`` holds everything a viewer or a test checks the node against:
the caption the demo model was trained to give for ``data.CAPTION_PROMPT``, the action the
rule gives (``data.action_for``, what ``data.ACTION_INSTRUCTION`` asks), the expected answer of
each question type in its first phrasing, and the boxes. The synthetic camera adds the frame's
stamp and indices and publishes it as JSON (docs/NODE.md, "The synthetic camera").
"""

from __future__ import annotations

from typing import Any

from vlm_ros.demo import data
from vlm_ros.demo.world import Scene


def expected_answers(scene: Scene) -> dict[str, str]:
    """Question -> the answer the demo model was trained to give for ``scene``."""
    answers = {
        data.CAPTION_PROMPT: data.caption(scene),
        data.ACTION_INSTRUCTION: data.action_for(scene),
        data.PHRASINGS["clear"][0]: data.path_clear(scene),
        data.PHRASINGS["colour"][0]: data.obstacle_colour(scene),
        data.PHRASINGS["count"][0]: str(len(scene.boxes)),
    }
    for box in scene.boxes:
        answers[data.PHRASINGS["where"][0].format(c=box.colour)] = box.lane
    return answers


def ground_truth(scene: Scene) -> dict[str, Any]:
    """The scene's truth: seed, caption, action, expected answers and boxes (JSON-ready)."""
    return {
        "seed": scene.seed,
        "caption": data.caption(scene),
        "action": data.action_for(scene),
        "answers": expected_answers(scene),
        "boxes": [
            {"colour": b.colour, "lane": b.lane, "distance": b.distance} for b in scene.boxes
        ],
    }
