"""Evaluate a model on the demo world's test split, through the public pipeline API.

Questions go through ``Assistant.answer`` (greedy) and are scored by exact match (case and
surrounding spaces ignored); the action goes through ``Assistant.rank`` over world.ACTIONS and
is scored by the chosen candidate. Each test scene is rendered at a camera size picked by its
seed (as in training), and the pipeline pads it to square itself.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from vlm_ros.demo import data, world

RENDER_SIZES = ((96, 72), (128, 96), (160, 120), (320, 240))
CAPTION_TOKENS = data.CAPTION_MAX_NEW_TOKENS  # what the node gives captions (test_demo checks it)
LABELS = {
    "action": "action (rank)",
    "caption": "caption (whole text)",
    "caption_boxes": "caption after its place sentence",
    "caption_place": "caption: place sentence",
    "caption_colour": "caption: each box's colour (by lane)",
    "caption_lane": "caption: each box's lane (by colour)",
    "caption_distance": "caption: each box's distance (by colour)",
    "caption_path": "caption: path sentence",
}
# Caption parts scored on their own (caption_parts): what a caption can get wrong separately.
CAPTION_PARTS = ("place", "colour", "lane", "distance", "path")
_BOX = re.compile(r"a (\w+) box (near|far) (?:in the (centre)|on the (left|right))")


@dataclass
class Report:
    """Correct / total per question type (and "action"); ``errors`` keeps a few misses."""

    correct: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    errors: list[dict] = field(default_factory=list)

    def add(self, sample: data.Sample, predicted: str) -> None:
        ok = predicted.strip().lower() == sample.answer
        self.total[sample.kind] += 1
        self.correct[sample.kind] += int(ok)
        if not ok and len(self.errors) < 20:
            self.errors.append(
                {
                    "seed": sample.seed,
                    "question": sample.question,
                    "expected": sample.answer,
                    "got": predicted,
                }
            )

    def count(self, kind: str, ok: bool) -> None:
        """One scored item of ``kind`` without an error record (caption parts)."""
        self.total[kind] += 1
        self.correct[kind] += int(ok)

    def accuracy(self) -> dict[str, float]:
        return {k: self.correct[k] / self.total[k] for k in sorted(self.total)}

    def as_dict(self) -> dict:
        return {
            "accuracy": self.accuracy(),
            "correct": dict(self.correct),
            "total": dict(self.total),
            "errors": self.errors,
        }

    def table(self) -> str:
        rows = ["| question type | n | exact match |", "|---|---|---|"]
        for kind, acc in self.accuracy().items():
            label = LABELS.get(kind, kind)
            rows.append(f"| {label} | {self.total[kind]} | {100 * acc:.1f}% |")
        return "\n".join(rows)


def scene_image(seed: int):
    """(scene, RGB image) of ``seed`` at its seed-picked camera size."""
    scene = world.scene_from_seed(seed)
    width, height = RENDER_SIZES[seed % len(RENDER_SIZES)]
    return scene, world.render(scene, width, height)


def evaluate(
    assistant,
    n: int = 500,
    split: str = "test",
    progress: bool = False,
    captions: bool = False,
    questions: bool = True,
) -> Report:
    """Score ``assistant`` on the first ``n`` scenes of ``split``: every question of each (not
    with ``questions=False``), and with ``captions`` the whole caption, exact match (what the
    demo's scene answers show), plus its parts (caption_parts)."""
    report = Report()
    for seed in tqdm(data.split_seeds(split, n), disable=not progress, unit="scene"):
        _, image = scene_image(seed)
        samples = data.samples_for(range(seed, seed + 1), with_captions=captions)
        if not questions:
            samples = [s for s in samples if s.kind == "caption"]
        for sample in samples:
            if sample.kind == "caption":
                text = assistant.answer(image, sample.question, max_new_tokens=CAPTION_TOKENS).text
                report.add(sample, text)
                # the same caption without its first sentence (the place): the boxes and path
                boxes = data.Sample(
                    sample.seed, "caption_boxes", sample.question, _after_place(sample.answer)
                )
                report.add(boxes, _after_place(text.strip().lower()))
                for part, ok in caption_parts(world.scene_from_seed(seed), text):
                    report.count(f"caption_{part}", ok)
                continue
            if sample.kind == "action":
                hint = assistant.rank(image, sample.question, list(world.ACTIONS))
                report.add(sample, hint.chosen)
            else:
                report.add(sample, assistant.answer(image, sample.question, max_new_tokens=8).text)
    return report


def caption_boxes(text: str) -> dict[str, tuple[str, str]]:
    """The boxes a caption names: colour -> (lane, distance) (the last mention wins)."""
    found = _BOX.findall(text.strip().lower())
    return {colour: (centre or side, distance) for colour, distance, centre, side in found}


def caption_parts(scene: world.Scene, text: str) -> list[tuple[str, bool]]:
    """(part, right?) of a generated caption against the scene: its place sentence, and per
    box of the scene its colour (the caption names that colour in the box's lane), its lane
    and its distance (the caption's phrase of the box's colour has the right lane / distance),
    and its path sentence. A box the caption leaves out is wrong on all three."""
    text = text.strip().lower()
    gold = data.caption(scene)
    named = caption_boxes(text)
    by_lane = {lane: colour for colour, (lane, _) in named.items()}
    parts = [("place", text.split(". ", 1)[0] == gold.split(". ", 1)[0])]
    for box in scene.boxes:
        lane, distance = named.get(box.colour, (None, None))
        parts += [
            ("colour", by_lane.get(box.lane) == box.colour),
            ("lane", lane == box.lane),
            ("distance", distance == box.distance),
        ]
    path = gold.rsplit(". ", 1)[-1]
    return parts + [("path", text.rsplit(". ", 1)[-1] == path)]


def _after_place(caption: str) -> str:
    return caption.split(". ", 1)[1] if ". " in caption else ""


def write_report(report: Report, path: str | Path, model: str, n: int) -> None:
    doc = {"model": str(model), "scenes": n, "split": "test", **report.as_dict()}
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
