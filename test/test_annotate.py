"""The watchable demo without ROS: held-scene views, their ground truth, the periodic tick plan,
and the annotated image (drawing, saving, the latest-only renderer)."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from vlm_ros.demo import data, truth, world
from vlm_ros.ros import annotate
from vlm_ros.serving.ticks import TickPlan

CANDIDATES = ("continue", "slow_down", "stop", "turn_left", "turn_right")


# ---- held scenes ------------------------------------------------------------------------------


def test_views_of_a_held_scene_differ_in_pixels_not_in_content():
    scene = world.scene_for_frame(5)
    base = world.render(scene, 320, 240)
    views = [world.render(scene, 320, 240, view) for view in range(1, 6)]
    assert np.array_equal(base, world.render_frame(5, 320, 240))  # view 0: the scene's image
    assert np.array_equal(views[0], world.render(scene, 320, 240, 1))  # deterministic
    for view in views:
        assert view.shape == base.shape and view.dtype == np.uint8
        assert not np.array_equal(view, base)
    assert len({v.tobytes() for v in views}) == len(views)  # fresh noise / shift each view
    # the same scene: far closer to its own views than to another scene
    other = world.render(world.scene_for_frame(6), 320, 240).astype(float)
    mean = lambda a, b: np.abs(a.astype(float) - b).mean()  # noqa: E731
    assert max(mean(v, base) for v in views) < mean(base, other) / 2
    # the obstacle stays put: a near centre box covers the image centre in every view
    for index in range(200):
        scene = world.scene_for_frame(index)
        box = scene.box_in("centre")
        if box is not None and box.distance == "near":
            colour = np.array(world.COLOURS[box.colour], dtype=float) * scene.light
            for view in (0, 1, 2, 3):
                centre = world.render(scene, 320, 240, view)[185:195, 155:165].astype(float)
                assert np.abs(centre.mean(axis=(0, 1)) - colour).max() < 60, (index, view)
            return
    raise AssertionError("no near centre box in 200 scenes")


def test_ground_truth_is_the_data_rules_and_json_ready():
    for index in range(20):
        scene = world.scene_for_frame(index)
        facts = json.loads(json.dumps(truth.ground_truth(scene)))
        assert facts["seed"] == scene.seed
        assert facts["caption"] == data.caption(scene)
        assert facts["action"] == data.action_for(scene)
        answers = facts["answers"]
        assert answers[data.CAPTION_PROMPT] == facts["caption"]
        assert answers[data.ACTION_INSTRUCTION] == facts["action"]
        assert answers["Is the path ahead clear?"] == data.path_clear(scene)
        assert (
            answers["How many boxes are there?"]
            == str(len(scene.boxes))
            == str(len(facts["boxes"]))
        )
        for box in scene.boxes:
            assert answers[f"Where is the {box.colour} box?"] == box.lane


# ---- one timer for both periodic kinds ----------------------------------------------------------


def ticks(plan: TickPlan, n: int, jitter: float = 0.0) -> list[tuple[str, ...]]:
    rng = np.random.default_rng(0)
    return [
        plan.due(i * plan.period + rng.uniform(-jitter, jitter) * plan.period)
        for i in range(1, n + 1)
    ]


def test_equal_rates_run_every_tick_together():
    plan = TickPlan({"scene": 1.0, "hint": 1.0})
    assert plan.period == 1.0
    assert ticks(plan, 20, jitter=0.1) == [("scene", "hint")] * 20


@pytest.mark.parametrize("scene_hz, hint_hz", [(1.0, 2.0), (0.25, 1.0), (0.3, 1.0), (2.0, 0.5)])
def test_slower_kind_rides_on_the_faster_timer_at_its_own_rate(scene_hz, hint_hz):
    """Over 40 s: each kind at its own rate, and the slower one always with the faster."""
    plan = TickPlan({"scene": scene_hz, "hint": hint_hz})
    assert plan.period == 1.0 / max(scene_hz, hint_hz)
    got = ticks(plan, int(round(40 / plan.period)), jitter=0.1)
    assert sum("scene" in d for d in got) == pytest.approx(40 * scene_hz, abs=1)
    assert sum("hint" in d for d in got) == pytest.approx(40 * hint_hz, abs=1)
    assert sum(len(d) == 2 for d in got) == pytest.approx(40 * min(scene_hz, hint_hz), abs=1)


def test_a_rate_of_zero_has_no_ticks_and_a_stall_does_not_burst():
    assert TickPlan({"scene": 0.0, "hint": 0.0}).period is None
    assert TickPlan({"scene": 0.0, "hint": 0.0}).due(5.0) == ()
    only = TickPlan({"scene": 0.0, "hint": 2.0})
    assert only.kinds == ("hint",) and only.due(0.5) == ("hint",)
    plan = TickPlan({"scene": 0.5, "hint": 1.0})
    assert plan.due(1.0) == ("scene", "hint")
    assert plan.due(30.0) == ("scene", "hint")  # after a 29 s stall: once, not 14 times
    assert plan.due(31.0) == ("hint",)
    assert plan.due(32.0) == ("scene", "hint")


# ---- the annotated image ----------------------------------------------------------------------


def overlay(**changes) -> annotate.Overlay:
    fields = dict(
        camera="/camera/image_raw",
        stamp_s=12.5,
        answer="a room. no boxes.",
        answer_ms=420.0,
        action="continue",
        candidates=CANDIDATES,
        probabilities=(0.9, 0.04, 0.02, 0.02, 0.02),
        hint_ms=80.0,
    )
    fields.update(changes)
    return annotate.Overlay(**fields)


def test_draw_shows_the_frame_scaled_with_a_panel_of_outputs():
    frame = world.render(world.scene_for_frame(1), 320, 240)
    image = annotate.draw(frame, overlay())
    assert image.dtype == np.uint8 and image.shape[1] == 640 and image.shape[0] > 480
    # the frame is there, scaled 2x by nearest neighbour (away from the stamp in the corner)
    assert np.array_equal(image[100:480:2, ::2][:, :320], frame[50:240])
    panel = image[480:]
    # each output changes the picture: a negative control for "drawn"
    for change in (
        dict(answer="a corridor. the path is blocked."),
        dict(action="stop"),
        dict(probabilities=(0.1, 0.1, 0.6, 0.1, 0.1)),
        dict(hint_ms=999.0),
    ):
        other = annotate.draw(frame, overlay(**change))
        assert not np.array_equal(other[480:], panel), change
    long = annotate.draw(frame, overlay(answer="word " * 2000))
    assert long.shape[0] < image.shape[0] + 6 * 40  # at most MAX_ANSWER_LINES of answer
    empty = annotate.draw(frame, annotate.Overlay("/camera/image_raw", 0.0))
    assert empty.shape[1] == 640  # nothing published yet: still drawable
    big = annotate.draw(np.zeros((720, 1280, 3), np.uint8), overlay())
    assert big.shape[1] == 1280  # wide frames are not scaled
    with pytest.raises(ValueError, match="RGB uint8"):
        annotate.draw(np.zeros((10, 10), np.uint8), overlay())


def test_jpeg_decodes_to_the_drawn_image():
    image = annotate.draw(world.render(world.scene_for_frame(2), 160, 120), overlay())
    decoded = np.asarray(Image.open(io.BytesIO(annotate.jpeg(image))).convert("RGB"))
    assert decoded.shape == image.shape
    assert np.abs(decoded.astype(int) - image).mean() < 6


def test_saver_is_rate_limited_keeps_a_rolling_window_and_files_decode(tmp_path):
    saver = annotate.Saver(tmp_path / "frames", period_s=1.0, keep=3)
    image = annotate.draw(world.render(world.scene_for_frame(3), 160, 120), overlay())
    written = [saver.save(image, 100.0 + i, now=float(i) * 0.5) for i in range(12)]
    assert sum(p is not None for p in written) == 6  # every other offer: 1 per second
    files = sorted((tmp_path / "frames").glob("annotated_*.png"))
    assert files == [p for p in written if p is not None][-3:]  # the newest 3
    for path in files:
        assert np.array_equal(np.asarray(Image.open(path)), image)
    assert not list((tmp_path / "frames").glob("*.tmp"))
    with pytest.raises(ValueError):
        annotate.Saver(tmp_path, keep=0)


def test_renderer_draws_the_newest_item_and_survives_a_failure():
    seen, gate = [], threading.Event()

    def render(item):
        gate.wait(5)
        if item == "bad":
            raise RuntimeError("boom")
        seen.append(item)

    renderer = annotate.Renderer(render)
    try:
        renderer.offer("bad")
        time.sleep(0.2)  # the thread took "bad" and waits at the gate
        for item in ("a", "b", "c"):
            renderer.offer(item)  # a and b are replaced before the thread is free
        gate.set()
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == ["c"] and renderer.replaced == 2
        assert renderer.failed == 1 and "boom" in renderer.last_error
    finally:
        renderer.stop()
