"""Text about the demo world: captions, question-answer pairs, the action rule, and the splits.

Question types (answers are one short word, exact-match evaluated):
    colour  "What colour is the obstacle ahead?"      red|green|blue|yellow|none (centre-lane box)
    clear   "Is the path ahead clear?"                yes|no (no box in the centre lane)
    where   "Where is the red box?"                   left|centre|right (only colours present)
    count   "How many boxes are there?"               0|1|2|3
    action  ACTION_INSTRUCTION                        one of world.ACTIONS (see action_for)

Splits never share a scene: a scene is its seed, and each split owns a disjoint seed range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlm_ros.demo.world import ACTIONS, COLOURS, LANES, Scene, scene_from_seed

ACTION_INSTRUCTION = "What should the robot do?"
CAPTION_PROMPT = "Describe the scene."  # the captions' question (stage 1), the demo's scene prompt
# max_new_tokens for captions (config/demo.yaml, `vlm-ros node --demo`): the longest caption of
# the world is 35 tokens of the demo tokenizer (3 boxes and a doorway), plus <|endoftext|> to stop
# on eos: 36; 48 leaves a third spare. test_demo checks every shipped config against it.
CAPTION_MAX_NEW_TOKENS = 48
QUESTION_TYPES = ("colour", "clear", "where", "count")
SPLITS = {"train": 0, "val": 1_000_000, "test": 2_000_000}  # first seed of each split
SPLIT_SIZE = 1_000_000  # seeds per split: ranges never overlap
PHRASINGS = {
    "colour": (
        "What colour is the obstacle ahead?",
        "What color is the obstacle in front of the robot?",
    ),
    "clear": ("Is the path ahead clear?", "Is the way forward clear?"),
    "where": (
        "Where is the {c} box?",
        "Is the {c} box on the left, in the centre or on the right?",
    ),
    "count": ("How many boxes are there?", "How many boxes can you see?"),
}


@dataclass(frozen=True)
class Sample:
    """One training/eval item: the scene's seed, the question, its gold answer and its type."""

    seed: int
    kind: str  # a QUESTION_TYPES entry, "action" or "caption"
    question: str
    answer: str


def split_seeds(split: str, n: int, start: int = 0) -> range:
    """Seeds of the first ``n`` scenes of ``split`` (after skipping ``start``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if start + n > SPLIT_SIZE:
        raise ValueError(f"split {split} holds {SPLIT_SIZE} scenes, asked for {start + n}")
    first = SPLITS[split] + start
    return range(first, first + n)


# ---- ground truth -> answers -------------------------------------------------------------------


def action_for(scene: Scene) -> str:
    """The documented action rule (a lane is occupied when it holds a box, near or far):
    centre lane empty -> continue; centre box far -> slow_down; centre box near -> turn_left if
    the left lane is empty, else turn_right if the right lane is empty, else stop."""
    centre = scene.box_in("centre")
    if centre is None:
        return "continue"
    if centre.distance == "far":
        return "slow_down"
    if scene.box_in("left") is None:
        return "turn_left"
    if scene.box_in("right") is None:
        return "turn_right"
    return "stop"


def obstacle_colour(scene: Scene) -> str:
    centre = scene.box_in("centre")
    return centre.colour if centre else "none"


def path_clear(scene: Scene) -> str:
    return "yes" if scene.box_in("centre") is None else "no"


def caption(scene: Scene) -> str:
    """A full description (stage-1 alignment text): place, boxes left to right, path state."""
    place = "a corridor" if scene.corridor else "a room"
    door = " with a doorway" if scene.doorway is not None else ""
    parts = [f"{place}{door}."]
    boxes = sorted(scene.boxes, key=lambda b: LANES.index(b.lane))
    if not boxes:
        parts.append("no boxes.")
    for b in boxes:
        where = "in the centre" if b.lane == "centre" else f"on the {b.lane}"
        parts.append(f"a {b.colour} box {b.distance} {where}.")
    parts.append("the path is clear." if path_clear(scene) == "yes" else "the path is blocked.")
    return " ".join(parts)


# ---- samples ------------------------------------------------------------------------------------


def questions(scene: Scene, rng: np.random.Generator, every_box: bool = False) -> list[Sample]:
    """One question of each type (random phrasing, random present colour) plus the action.
    ``every_box`` asks "where" about every box instead of one (training: the colour-to-lane
    binding is the hardest skill, and one fixed box per scene would show it a third as often)."""
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    out = [
        Sample(scene.seed, "colour", pick(PHRASINGS["colour"]), obstacle_colour(scene)),
        Sample(scene.seed, "clear", pick(PHRASINGS["clear"]), path_clear(scene)),
        Sample(scene.seed, "count", pick(PHRASINGS["count"]), str(len(scene.boxes))),
    ]
    asked = scene.boxes if every_box else (pick(scene.boxes),) if scene.boxes else ()
    for box in asked:
        q = pick(PHRASINGS["where"]).format(c=box.colour)
        out.append(Sample(scene.seed, "where", q, box.lane))
    out.append(Sample(scene.seed, "action", ACTION_INSTRUCTION, action_for(scene)))
    return out


def samples_for(seeds: range, with_captions: bool = False, every_box: bool = False) -> list[Sample]:
    """All questions (and optionally the caption) of the scenes ``seeds``, deterministic."""
    out = []
    for seed in seeds:
        scene = scene_from_seed(seed)
        rng = np.random.default_rng(seed + 13)
        if with_captions:
            out.append(Sample(seed, "caption", CAPTION_PROMPT, caption(scene)))
        out.extend(questions(scene, rng, every_box))
    return out


def corpus(seeds: range) -> list[str]:
    """World text for the tokenizer and the decoder's language pretraining: every question
    and answer, captions, the action names and colours."""
    lines = [s.question + " " + s.answer for s in samples_for(seeds, with_captions=True)]
    lines += [" ".join(ACTIONS), " ".join(COLOURS), " ".join(LANES), "0 1 2 3 yes no none"]
    return lines
