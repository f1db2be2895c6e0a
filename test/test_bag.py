"""Rosbag tooling: make-bag, eval-bag (replay as the node would) and report, on generated bags.

Small frames (64x48) and 2-token answers keep the file fast on 2 cores; one tiny demo model is
loaded once for the whole module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rosbags")

from vlm_ros.bag import BagError  # noqa: E402
from vlm_ros.bag.evaluate import EvalSettings, evaluate  # noqa: E402
from vlm_ros.bag.io import open_reader  # noqa: E402
from vlm_ros.bag.make_bag import BagSpec, build_messages, make_bag, pattern_frame  # noqa: E402
from vlm_ros.bag.replay import Arrival, replay  # noqa: E402
from vlm_ros.cli import main as cli  # noqa: E402

START_NS = 1_700_000_000_000_000_000
W, H = 64, 48


def camera_bag(tmp_path: Path, name: str, **kw) -> Path:
    spec = BagSpec(out=str(tmp_path / name), width=W, height=H, start_ns=START_NS, **kw)
    return make_bag(spec)


@pytest.fixture(scope="module")
def assistant():
    from vlm_ros.pipeline import Assistant

    a = Assistant.load("demo")
    yield a
    a.close()


def settings(bag: Path, out: Path, **kw) -> EvalSettings:
    # no warm-up runs: the module's model is warm after its first use, and test time is short
    base = dict(bag=str(bag), out_dir=str(out), max_new_tokens=2, candidates=("stop", "go"))
    base["warmup"] = 0
    base.update(kw)
    return EvalSettings(**base)


def read_bag(path: Path) -> list[tuple[str, str, int, object]]:
    """(topic, msgtype, log ns, message) straight from rosbags, independent of our report code."""
    from rosbags.highlevel import AnyReader

    with AnyReader([path]) as reader:
        return [
            (c.topic, c.msgtype, ts, reader.deserialize(raw, c.msgtype))
            for c, ts, raw in reader.messages()
        ]


def stamp(msg) -> int:
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


# ---- make-bag ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "storage,encoding",
    [
        ("mcap", "rgb8"),
        ("sqlite3", "jpeg"),
        ("mcap", "png"),
        ("sqlite3", "bgr8"),
        ("ros1", "mono8"),
    ],
)
def test_make_bag_round_trip(tmp_path, storage, encoding):
    name = "cam.bag" if storage == "ros1" else "cam"
    bag = camera_bag(tmp_path, name, storage=storage, encoding=encoding, rate_hz=10, duration_s=0.5)
    with open_reader(bag) as reader:
        frames = [(ts, reader.deserialize(raw, c.msgtype), c) for c, ts, raw in reader.messages()]
    assert len(frames) == 5
    assert [ts for ts, _, _ in frames] == [START_NS + i * 100_000_000 for i in range(5)]
    assert all(stamp(m) == ts for ts, m, _ in frames)  # header stamp == bag receive time
    compressed = encoding in ("jpeg", "png")
    assert frames[0][2].topic == "/camera/image_raw" + ("/compressed" if compressed else "")
    if encoding == "rgb8":
        m = frames[1][1]
        assert np.array_equal(np.asarray(m.data).reshape(H, W, 3), pattern_frame(1, 0.1, W, H))


def test_pattern_moves():
    assert not np.array_equal(pattern_frame(0, 0.0, W, H), pattern_frame(1, 1 / 15, W, H))


# ---- the node's dropping rule -----------------------------------------------------------------


def test_recorded_rate_keeps_only_latest_frame():
    taken = []

    def busy_35(frame, arrival, start):  # a model needing 35 ms for a 10 ms camera
        taken.append((frame, start))
        return start + 35, True

    c = replay([Arrival(i, i * 10) for i in range(10)], busy_35, "recorded")
    # frame 0 at 0; 1,2 superseded by 3, taken when free at 35; 4,5 by 6 at 70; 7,8 by 9 at 105
    assert taken == [(0, 0), (3, 35), (6, 70), (9, 105)]
    assert (c.received, c.processed, c.dropped) == (10, 4, 6)
    taken.clear()
    c = replay([Arrival(i, i * 10) for i in range(10)], busy_35, "max")
    assert [f for f, _ in taken] == list(range(10)) and c.dropped == 0
    assert [s for _, s in taken] == [i * 10 for i in range(10)]  # each as if the model were free


# ---- eval-bag end to end ----------------------------------------------------------------------


def test_eval_bag_max_rate_report_equals_bag(tmp_path, assistant):
    bag = camera_bag(tmp_path, "cam", storage="mcap", encoding="rgb8", rate_hz=10, duration_s=0.5)
    result = evaluate(
        settings(bag, tmp_path / "out", rate="max", budgets_ms={"total": 1e6, "vision": 1e-3}),
        assistant=assistant,
    )
    c = result.counters
    assert (c.received, c.processed, c.dropped, c.rejected) == (5, 5, 0, 0)

    msgs = read_bag(result.out_bag)
    types = {(t, mt) for t, mt, _, _ in msgs}
    assert ("/vlm_assistant/scene_answer", "vlm_ros/msg/SceneAnswer") in types
    assert ("/vlm_assistant/action_hint", "vlm_ros/msg/ActionHint") in types
    assert ("/diagnostics", "diagnostic_msgs/msg/DiagnosticArray") in types
    answers = [m for t, _, _, m in msgs if t == "/vlm_assistant/scene_answer"]
    hints = [(ts, m) for t, _, ts, m in msgs if t == "/vlm_assistant/action_hint"]
    assert len(answers) == len(hints) == 5
    assert sorted(stamp(m) for m in answers) == [START_NS + i * 100_000_000 for i in range(5)]
    assert all(m.header.frame_id == "camera" and m.camera == "/camera/image_raw" for m in answers)
    assert all(
        abs(sum(m.probabilities) - 1) < 1e-4 and m.action in ("stop", "go") for _, m in hints
    )
    assert all(m.budget_misses == ["vision"] and not m.within_budget for m in answers)

    report = json.loads((result.report_dir / "report.json").read_text())
    hint_report = report["topics"]["/vlm_assistant/action_hint"]
    e2e = [(ts - stamp(m)) / 1e6 for ts, m in hints]  # answer time - image stamp, from the bag
    assert hint_report["image_to_answer_ms"]["p90"] == pytest.approx(float(np.percentile(e2e, 90)))
    assert hint_report["image_to_answer_ms"]["max"] == pytest.approx(max(e2e))
    totals = [float(m.latency.total_ms) for m in answers]
    scene = report["topics"]["/vlm_assistant/scene_answer"]["latency_ms"]["total"]
    assert scene["p50"] == pytest.approx(float(np.percentile(totals, 50)))
    assert scene["p99"] == pytest.approx(float(np.percentile(totals, 99)))
    assert report["topics"]["/vlm_assistant/scene_answer"]["budget_misses"] == {"vision": 5}
    assert report["frames"] == {"received": 5, "processed": 5, "dropped": 0, "rejected": 0}
    assert report["run"]["rate"] == "max"
    for png in ("latency_over_time.png", "stage_cdf.png"):
        assert (result.report_dir / png).stat().st_size > 1000

    # `vlm-ros report` on the output bag gives the same numbers, also from its lone .mcap file
    lone = tmp_path / "copied.mcap"
    lone.write_bytes(next(result.out_bag.glob("*.mcap")).read_bytes())
    assert cli(["report", str(lone), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["topics"] == report["topics"] and again["frames"] == report["frames"]


def test_eval_bag_recorded_rate_drops_like_the_node(tmp_path, assistant):
    # a 200 Hz camera: frames 5 ms apart, far faster than any inference here
    bag = camera_bag(
        tmp_path, "cam", storage="sqlite3", encoding="jpeg", rate_hz=200, duration_s=0.1
    )
    result = evaluate(settings(bag, tmp_path / "out", hint=False), assistant=assistant)
    c = result.counters
    assert c.received == 20 and c.dropped > 0 and c.rejected == 0
    assert c.processed + c.dropped == c.received
    answers = [
        (ts, m) for t, _, ts, m in read_bag(result.out_bag) if t == "/vlm_assistant/scene_answer"
    ]
    assert len(answers) == c.processed
    # the model is serial: each answer is started after the previous one was published
    done = [ts for ts, _ in answers]
    starts = [ts - int((m.latency.total_ms) * 1e6) for ts, m in answers]
    assert all(
        s >= d - 2_000_000 for s, d in zip(starts[1:], done[:-1], strict=True)
    )  # 2 ms: conversion slack
    report = json.loads((result.report_dir / "report.json").read_text())
    assert report["frames"]["dropped"] == c.dropped


def test_eval_bag_ros1_input_via_cli(tmp_path, capsys):
    bag = camera_bag(
        tmp_path, "cam.bag", storage="ros1", encoding="bgr8", rate_hz=10, duration_s=0.2
    )
    args = f"eval-bag {bag} --out {tmp_path / 'out'} --max-new-tokens 2 --rate max --no-hint"
    rc = cli([*args.split(), "--warmup", "0", "--budget", "total=100000"])
    assert rc == 0
    assert "2 read, 2 processed, 0 dropped" in capsys.readouterr().out
    assert (tmp_path / "out" / "report.md").read_text().count("scene_answer") >= 1


# ---- errors: one line, exit 2, a report of what was read ---------------------------------------


def run_cli_error(args, capsys) -> str:
    rc = cli(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_truncated_sqlite_bag(tmp_path, capsys):
    bag = camera_bag(tmp_path, "cam", storage="sqlite3", rate_hz=10, duration_s=0.5)
    truncate(next(bag.glob("*.db3")))
    err = run_cli_error(["eval-bag", str(bag), "--out", str(tmp_path / "out")], capsys)
    assert "cannot open bag" in err and "malformed" in err


def test_truncated_mcap_reports_what_was_read(tmp_path, capsys, assistant):
    # 320x240 rgb8 frames fill rosbags' 1 MiB chunks every 5 frames, so cutting the file at 60%
    # leaves whole chunks before the damage, as a killed recorder does
    spec = BagSpec(
        out=str(tmp_path / "cam"),
        width=320,
        height=240,
        start_ns=START_NS,
        rate_hz=10,
        duration_s=1.0,
    )
    bag = make_bag(spec)
    truncate(next(bag.glob("*.mcap")), 0.6)
    with pytest.raises(BagError, match="damaged after") as info:
        evaluate(settings(bag, tmp_path / "out", rate="max", hint=False), assistant=assistant)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    n = report["frames"]["received"]
    assert 0 < n < 10 and report["frames"]["processed"] == n
    assert "truncated" in report["run"]["read_error"]
    assert info.value.partial_report.endswith("report.md")
    assert "Partial report" in (tmp_path / "out" / "report.md").read_text()


def test_missing_topic_lists_topics(tmp_path, capsys):
    bag = camera_bag(tmp_path, "cam", storage="mcap", rate_hz=10, duration_s=0.2)
    err = run_cli_error(
        ["eval-bag", str(bag), "--out", str(tmp_path / "o"), "--topic", "/front/image"], capsys
    )
    assert (
        "/front/image is not in the bag" in err
        and "/camera/image_raw (sensor_msgs/msg/Image, 2 msgs)" in err
    )
    err = run_cli_error(["report", str(bag)], capsys)  # a camera bag has no outputs to report
    assert "no SceneAnswer/ActionHint messages" in err and "/camera/image_raw" in err


def test_unsupported_encoding(tmp_path, capsys):
    from vlm_ros.bag.io import write_bag

    msgs = build_messages(
        BagSpec(out="", width=W, height=H, rate_hz=10, duration_s=0.2, start_ns=START_NS)
    )
    for m in msgs:
        m.msg.encoding = "bayer_rggb8"
    bag = write_bag(tmp_path / "bayer", msgs, storage="mcap")
    err = run_cli_error(["eval-bag", str(bag), "--out", str(tmp_path / "o")], capsys)
    assert "bayer_rggb8" in err and "/camera/image_raw" in err
    assert not (tmp_path / "o").exists()  # refused before loading the model or writing anything


def test_not_a_bag(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("hello")
    assert "not a bag" in run_cli_error(["report", str(tmp_path / "x.txt")], capsys)
    (tmp_path / "x.mcap").write_text("hello")
    assert "cannot open bag" in run_cli_error(["report", str(tmp_path / "x.mcap")], capsys)
    assert "bag not found" in run_cli_error(["report", str(tmp_path / "nope")], capsys)


def test_make_bag_cli(tmp_path, capsys):
    out = tmp_path / "cam"
    rc = cli(
        [
            "make-bag",
            str(out),
            "--rate",
            "20",
            "--size",
            "32x24",
            "--encoding",
            "png",
            "--duration",
            "0.25",
            "--storage",
            "sqlite3",
        ]
    )
    assert rc == 0 and "wrote 5 frames" in capsys.readouterr().out
    with open_reader(out) as reader:
        assert reader.topics["/camera/image_raw/compressed"].msgcount == 5


def test_budget_flags_and_params_file(tmp_path, capsys):
    from vlm_ros.bag.budgets import load_budgets, parse_budget_flags

    assert parse_budget_flags(["total=500", "vision_ms=80"]) == {"total": 500.0, "vision": 80.0}
    params = tmp_path / "p.yaml"
    params.write_text("/**:\n  ros__parameters:\n    budget_total_ms: 400.0\n    camera: x\n")
    assert load_budgets(params) == {"total": 400.0}
    assert "bad budget" in run_cli_error(["report", "x", "--budget", "warp=3"], capsys)


def test_report_of_a_live_style_recording(tmp_path):
    """A bag as `ros2 bag record` writes it (sqlite3, camera + outputs + the node's diagnostics):
    answer time is the receive (log) time, so image->answer = log time - header stamp."""
    from vlm_ros.bag.io import OutMessage, write_bag
    from vlm_ros.bag.report import build_report, write_report
    from vlm_ros.bag.types import typestore

    ts = typestore()
    T = ts.types
    msgs = build_messages(
        BagSpec(out="", width=W, height=H, rate_hz=10, duration_s=0.5, start_ns=START_NS)
    )
    delays_ms = [120.0, 80.0, 200.0, 90.0, 150.0]
    for i, (cam, delay) in enumerate(zip(list(msgs), delays_ms, strict=True)):
        lat = T["vlm_ros/msg/StageLatency"](
            queue_ms=1.0,
            preprocess_ms=2.0,
            vision_ms=10.0 + i,
            projector_ms=1.0,
            prefill_ms=20.0,
            decode_ms=30.0,
            total_ms=63.0 + i,
            image_to_output_ms=delay - 1.0,
        )
        missed = delay >= 150
        ans = T["vlm_ros/msg/SceneAnswer"](
            header=cam.msg.header, camera="/camera/image_raw", question="q", answer="a",
            num_tokens=1, stop_reason="eos", latency=lat, within_budget=not missed,
            budget_misses=["image_to_output"] if missed else [])  # fmt: skip
        msgs.append(OutMessage("/vlm_assistant/scene_answer", "vlm_ros/msg/SceneAnswer",
                               cam.log_ns + int(delay * 1e6), ans))  # fmt: skip
    kv = T["diagnostic_msgs/msg/KeyValue"]
    status = T["diagnostic_msgs/msg/DiagnosticStatus"](
        level=1,
        name="vlm_assistant: latency",
        message="",
        hardware_id="",
        values=[
            kv(key="frames_dropped", value="7"),
            kv(key="budget_image_to_output_ms", value="150"),
        ],
    )
    diag = T["diagnostic_msgs/msg/DiagnosticArray"](header=msgs[0].msg.header, status=[status])
    msgs.append(
        OutMessage("/diagnostics", "diagnostic_msgs/msg/DiagnosticArray", START_NS + 10**9, diag)
    )
    bag = write_bag(tmp_path / "live", msgs, storage="sqlite3")

    report = build_report(bag)
    s = report["topics"]["/vlm_assistant/scene_answer"]
    assert s["image_to_answer_ms"]["p50"] == pytest.approx(float(np.percentile(delays_ms, 50)))
    assert s["image_to_answer_ms"]["max"] == pytest.approx(200.0)
    assert s["latency_ms"]["vision"]["p90"] == pytest.approx(
        float(np.percentile([10, 11, 12, 13, 14], 90))
    )
    assert s["budget_misses"] == {"image_to_output": 2} and s["within_budget"] == 3
    assert report["frames"] == {"dropped": 7} and report["budgets_ms"] == {"image_to_output": 150.0}
    write_report(report, tmp_path / "r")
    assert "| image_to_answer | 120.0 |" in (tmp_path / "r" / "report.md").read_text()


def test_make_bag_scenes_uses_the_demo_world(tmp_path):
    pytest.importorskip("vlm_ros.demo.world")
    from vlm_ros.demo.world import render_frame

    bag = camera_bag(tmp_path, "scenes", source="scenes", rate_hz=10, duration_s=0.2)
    with open_reader(bag) as reader:
        msgs = [reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages()]
    assert np.array_equal(np.asarray(msgs[1].data).reshape(H, W, 3), render_frame(1, W, H))
