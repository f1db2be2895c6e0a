"""Rosbag tooling: make-bag, eval-bag (replay as the node would) and report, on generated bags.

Small frames (64x48) and 2-token answers keep the file fast on 2 cores; one tiny demo model is
loaded once for the whole module.
"""

from __future__ import annotations

import json
import re
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
from vlm_ros.errors import InputError  # noqa: E402

START_NS = 1_700_000_000_000_000_000
W, H = 64, 48


def camera_bag(tmp_path: Path, name: str, **kw) -> Path:
    spec = BagSpec(out=str(tmp_path / name), width=W, height=H, start_ns=START_NS, **kw)
    return make_bag(spec)


@pytest.fixture(scope="module")
def assistant():
    from vlm_ros.infer.pipeline import Assistant

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
        return start + 35, None

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
    # a 5 kHz camera: frames 0.2 ms apart, far faster than any inference here (at 200 Hz the
    # demo model on a quiet machine kept up with every frame)
    bag = camera_bag(
        tmp_path, "cam", storage="sqlite3", encoding="jpeg", rate_hz=5000, duration_s=0.004
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
    assert "Frames:     received 2, processed 2, dropped 0, rejected 0" in capsys.readouterr().out
    assert (tmp_path / "out" / "report.md").read_text().count("scene_answer") >= 1


def test_eval_bag_outputs_follow_the_node_name_and_namespace(tmp_path, capsys):
    """Under a namespace and a renamed node, eval-bag writes where `ros2 bag record` of that
    live node would find its outputs (names from vlm_ros.ros.names, as the node uses)."""
    bag = camera_bag(tmp_path, "cam", storage="mcap", encoding="rgb8", rate_hz=10, duration_s=0.2)
    args = f"eval-bag {bag} --out {tmp_path / 'out'} --namespace /robot1 --node-name front_vlm"
    fast = "--rate max --max-new-tokens 2 --warmup 0 --candidates a b"
    assert cli([*args.split(), *fast.split()]) == 0
    topics = {t for t, _, _, _ in read_bag(tmp_path / "out" / "output_bag")}
    outputs = {"/robot1/front_vlm/scene_answer", "/robot1/front_vlm/action_hint"}
    assert topics == outputs | {"/diagnostics", "/camera/image_raw/compressed"}  # + its frames
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["topics"]) == outputs
    diags = [m for t, _, _, m in read_bag(tmp_path / "out" / "output_bag") if t == "/diagnostics"]
    status = diags[-1].status[0]  # named as the live node names its own
    assert (status.name, status.hardware_id) == ("front_vlm: latency", "/robot1/front_vlm")
    capsys.readouterr()


# ---- errors: one line, exit 2, a report of what was read ---------------------------------------


def run_cli_error(args, capsys) -> str:
    rc = cli(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


EVAL_FAST = ["--rate", "max", "--no-hint", "--max-new-tokens", "2", "--warmup", "0"]


def truncated_camera_bag(tmp_path: Path, storage: str, fraction: float) -> Path:
    """10 frames, cut at ``fraction`` of the storage file. MCAP: 320x240 rgb8, so rosbags'
    1 MiB chunks hold 5 frames and a cut at 60% leaves whole chunks, as a killed recorder does;
    sqlite3: 64x48, whose rows are looked up one by one."""
    size = {"width": 320, "height": 240} if storage == "mcap" else {"width": W, "height": H}
    spec = BagSpec(
        out=str(tmp_path / f"cam_{storage}"),
        start_ns=START_NS,
        rate_hz=10,
        duration_s=1.0,
        storage=storage,
        **size,
    )
    bag = make_bag(spec)
    truncate(next(bag.glob("*.mcap" if storage == "mcap" else "*.db3")), fraction)
    return bag


@pytest.mark.parametrize("storage,fraction", [("sqlite3", 0.8), ("mcap", 0.6)])
def test_truncated_bag_via_cli_reports_what_was_read(tmp_path, capsys, storage, fraction):
    bag = truncated_camera_bag(tmp_path, storage, fraction)
    out = tmp_path / "out"
    err = run_cli_error(["eval-bag", str(bag), "--out", str(out), *EVAL_FAST], capsys)
    assert "damaged after" in err and "truncated" in err and f"{out / 'report.md'}" in err
    report = json.loads((out / "report.json").read_text())
    n = report["frames"]["received"]
    assert 0 < n < 10 and report["frames"] == {
        "received": n,
        "processed": n,
        "dropped": 0,
        "rejected": 0,
    }
    assert report["topics"]["/vlm_assistant/scene_answer"]["count"] == n
    assert "truncated" in report["run"]["read_error"]
    assert "Partial report" in (out / "report.md").read_text()
    answers = [m for t, _, _, m in read_bag(out / "output_bag") if t.endswith("scene_answer")]
    period = 100_000_000
    assert len(answers) == n and {stamp(m) for m in answers} <= {
        START_NS + i * period for i in range(10)
    }


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_bag_truncated_to_nothing_gets_a_report_of_zero_frames(tmp_path, capsys, storage):
    bag = truncated_camera_bag(tmp_path, storage, 0.05)
    out = tmp_path / "out"
    err = run_cli_error(["eval-bag", str(bag), "--out", str(out), *EVAL_FAST], capsys)
    assert "cannot open bag" in err and "report of what was read" in err
    report = json.loads((out / "report.json").read_text())
    assert report["frames"] == {"received": 0, "processed": 0, "dropped": 0, "rejected": 0}
    assert report["topics"] == {} and report["read_error"] in err
    assert "truncated" in report["read_error"] or "corrupt" in report["read_error"]
    md = (out / "report.md").read_text()
    assert "Partial report" in md and "received 0, processed 0" in md
    assert "Nothing to measure" in md and not (out / "output_bag").exists()


@pytest.mark.parametrize("keep_metadata", [True, False])
def test_sqlite_salvage_returns_only_intact_rows(tmp_path, keep_metadata):
    """What the salvage reads of a cut sqlite3 bag is the frames as written, never a row padded
    with zeros from the cut page; without metadata.yaml (a recorder killed before writing it)
    the rows are found from the table itself."""
    from vlm_ros.bag.io import iter_messages
    from vlm_ros.bag.salvage_sqlite import SqliteSalvageReader

    bag = truncated_camera_bag(tmp_path, "sqlite3", 0.9)
    if not keep_metadata:
        (bag / "metadata.yaml").unlink()
    errors: list[str] = []
    with open_reader(bag) as reader:
        assert isinstance(reader, SqliteSalvageReader)
        msgs = [(ts, m) for _, ts, m in iter_messages(reader, reader.connections, errors.append)]
    assert 0 < len(msgs) < 10 and len(errors) == 1 and "truncated" in errors[0]
    counts = re.search(r"(\d+) of (\d+) messages readable", errors[0])
    read, total = (int(n) for n in counts.groups())
    assert read == len(msgs) and (total == 10 if keep_metadata else len(msgs) <= total <= 10)
    for ts, m in msgs:
        i = (ts - START_NS) // 100_000_000
        assert stamp(m) == ts
        assert np.array_equal(np.asarray(m.data).reshape(H, W, 3), pattern_frame(i, i / 10, W, H))


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
    assert "is not an MCAP file" in run_cli_error(["report", str(tmp_path / "x.mcap")], capsys)
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


def live_style_messages(delays_ms, width=W, height=H, dropped=7) -> list:
    """A camera at 10 Hz plus one SceneAnswer per frame, logged ``delays_ms[i]`` after its image
    (answer time = receive time, as `ros2 bag record` logs it), and the node's /diagnostics.
    Output i has vision 10+i ms, total 63+i ms, and misses image_to_output when its delay
    reaches 150 ms."""
    from vlm_ros.bag.io import OutMessage
    from vlm_ros.bag.types import typestore

    T = typestore().types
    msgs = build_messages(
        BagSpec(
            out="",
            width=width,
            height=height,
            rate_hz=10,
            duration_s=len(delays_ms) / 10,
            start_ns=START_NS,
        )
    )
    for i, (cam, delay) in enumerate(zip(list(msgs), delays_ms, strict=True)):
        lat = T["vlm_ros/msg/StageLatency"](
            queue_ms=1.0,
            preprocess_ms=2.0,
            vision_ms=10.0 + i,
            projector_ms=1.0,
            prefill_ms=20.0,
            decode_ms=30.0,
            encode_ms=0.0,
            network_ms=0.0,
            server_queue_ms=0.0,
            total_ms=63.0 + i,
            image_to_output_ms=delay - 1.0,
        )
        missed = delay >= 150
        ans = T["vlm_ros/msg/SceneAnswer"](
            header=cam.msg.header,
            camera="/camera/image_raw",
            question="q",
            answer="a",
            num_tokens=1,
            stop_reason="eos",
            latency=lat,
            within_budget=not missed,
            budget_misses=["image_to_output"] if missed else [],
        )
        msgs.append(
            OutMessage(
                "/vlm_assistant/scene_answer",
                "vlm_ros/msg/SceneAnswer",
                cam.log_ns + int(delay * 1e6),
                ans,
            )
        )
    kv = T["diagnostic_msgs/msg/KeyValue"]
    status = T["diagnostic_msgs/msg/DiagnosticStatus"](
        level=1,
        name="vlm_assistant: latency",
        message="",
        hardware_id="",
        values=[
            kv(key="frames_dropped", value=str(dropped)),
            kv(key="budget_image_to_output_ms", value="150"),
        ],
    )
    diag = T["diagnostic_msgs/msg/DiagnosticArray"](header=msgs[0].msg.header, status=[status])
    end_ns = START_NS + len(delays_ms) * 100_000_000 + 10**9
    msgs.append(OutMessage("/diagnostics", "diagnostic_msgs/msg/DiagnosticArray", end_ns, diag))
    return msgs


def test_report_of_a_live_style_recording(tmp_path):
    """A bag as `ros2 bag record` writes it (sqlite3, camera + outputs + the node's diagnostics):
    answer time is the receive (log) time, so image->answer = log time - header stamp."""
    from vlm_ros.bag.io import write_bag
    from vlm_ros.bag.report import build_report, write_report

    delays_ms = [120.0, 80.0, 200.0, 90.0, 150.0]
    bag = write_bag(tmp_path / "live", live_style_messages(delays_ms), storage="sqlite3")

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


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_report_of_a_truncated_recording(tmp_path, capsys, storage):
    """`vlm-ros report` on a live recording cut short: exit 2, one line, and a partial report
    whose numbers are those of the outputs that survived, each intact (its delay and vision
    time are the ones written for its frame)."""
    from vlm_ros.bag.io import write_bag
    from vlm_ros.bag.report import build_report

    delays_ms = [100.0 + 7 * i for i in range(10)]
    # 320x240 frames so MCAP's 1 MiB chunks end inside the bag and a cut leaves whole chunks
    msgs = live_style_messages(delays_ms, width=320, height=240)
    bag = write_bag(tmp_path / "live", msgs, storage=storage)
    truncate(next(bag.glob("*.mcap" if storage == "mcap" else "*.db3")), 0.6)

    survivors = build_report(bag)["_outputs"]
    assert 0 < len(survivors) < 10
    for o in survivors:
        i = (o.stamp_ns - START_NS) // 100_000_000
        assert o.image_to_answer_ms == pytest.approx(delays_ms[i], abs=1e-6)
        assert o.latency_ms["vision"] == pytest.approx(10.0 + i)

    out = tmp_path / "r"
    err = run_cli_error(["report", str(bag), "--out", str(out)], capsys)
    assert "could not be read to the end" in err and str(out / "report.md") in err
    report = json.loads((out / "report.json").read_text())
    s = report["topics"]["/vlm_assistant/scene_answer"]
    assert s["count"] == len(survivors) and "truncated" in report["read_error"]
    e2e = [o.image_to_answer_ms for o in survivors]
    assert s["image_to_answer_ms"]["p50"] == pytest.approx(float(np.percentile(e2e, 50)))
    assert s["image_to_answer_ms"]["max"] == pytest.approx(max(e2e))
    assert "Partial report" in (out / "report.md").read_text()

    truncate(next(bag.glob("*.mcap" if storage == "mcap" else "*.db3")), 0.05)
    err = run_cli_error(["report", str(bag), "--out", str(tmp_path / "r0")], capsys)
    assert "cannot open bag" in err and "report of what was read" in err
    nothing = json.loads((tmp_path / "r0" / "report.json").read_text())
    assert nothing["topics"] == {} and nothing["read_error"] in err
    assert "Nothing to measure" in (tmp_path / "r0" / "report.md").read_text()


def test_make_bag_scenes_uses_the_demo_world(tmp_path):
    pytest.importorskip("vlm_ros.demo.world")
    from vlm_ros.demo.world import render_frame

    bag = camera_bag(tmp_path, "scenes", source="scenes", rate_hz=10, duration_s=0.2)
    with open_reader(bag) as reader:
        msgs = [reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages()]
    assert np.array_equal(np.asarray(msgs[1].data).reshape(H, W, 3), render_frame(1, W, H))


# ---- questions, rejected frames, plots, the dropping definition ---------------------------------


def test_load_questions(tmp_path):
    from vlm_ros.bag.evaluate import load_questions
    from vlm_ros.errors import InputError

    f = tmp_path / "q.txt"
    f.write_text("# robot questions\nIs the path clear?\n\n   What colour is the box?  \n  # off\n")
    assert load_questions(f) == ("Is the path clear?", "What colour is the box?")
    f.write_text("# only a comment\n\n")
    with pytest.raises(InputError, match="holds no questions"):
        load_questions(f)


def test_questions_rotate_per_frame_via_cli(tmp_path, capsys):
    bag = camera_bag(tmp_path, "cam", rate_hz=10, duration_s=0.5)
    questions = tmp_path / "q.txt"
    questions.write_text("Is the path clear?\n# skipped\nHow many boxes?\n")
    out = tmp_path / "out"
    fast = [a for a in EVAL_FAST if a != "--no-hint"] + ["--candidates", "stop", "go"]
    rc = cli(
        [
            "eval-bag",
            str(bag),
            "--out",
            str(out),
            "--scene-prompt",
            "Describe.",
            "--questions",
            str(questions),
            *fast,
        ]
    )
    assert rc == 0 and "received 5, processed 5" in capsys.readouterr().out
    msgs = read_bag(out / "output_bag")
    answers = sorted((stamp(m), m.question) for t, _, _, m in msgs if t.endswith("scene_answer"))
    asked = ["Describe.", "Is the path clear?", "How many boxes?"]
    assert [q for _, q in answers] == [asked[i % 3] for i in range(5)]  # one per frame, in turn
    hints = [m for t, _, _, m in msgs if t.endswith("action_hint")]
    assert len(hints) == 5 and all(list(m.candidates) == ["stop", "go"] for m in hints)


def test_frames_rejected_part_way_are_counted_and_the_run_goes_on(tmp_path, assistant):
    from vlm_ros.bag.io import write_bag

    msgs = build_messages(
        BagSpec(out="", width=W, height=H, rate_hz=10, duration_s=0.6, start_ns=START_NS)
    )
    msgs[2].msg.encoding = "bayer_rggb8"  # an encoding the node refuses
    msgs[4].msg.data = msgs[4].msg.data[: W * 3 * 10]  # 10 rows of 48: truncated pixels
    bag = write_bag(tmp_path / "mixed", msgs, storage="mcap")
    result = evaluate(settings(bag, tmp_path / "out", rate="max", hint=False), assistant=assistant)
    c = result.counters
    assert (c.received, c.processed, c.dropped, c.rejected) == (6, 4, 0, 2)
    assert c.rejected_by_reason == {"unknown_encoding": 1, "truncated": 1}  # the node's reasons
    diags = [m for t, _, _, m in read_bag(result.out_bag) if t == "/diagnostics"]
    last = {kv.key: kv.value for kv in diags[-1].status[0].values}
    assert last["frames_rejected_unknown_encoding"] == last["frames_rejected_truncated"] == "1"
    answered = sorted(stamp(m) for t, _, _, m in read_bag(result.out_bag) if "scene" in t)
    assert answered == [START_NS + i * 100_000_000 for i in (0, 1, 3, 5)]
    report = json.loads((result.report_dir / "report.json").read_text())
    assert report["frames"] == {"received": 6, "processed": 4, "dropped": 0, "rejected": 2}
    why = report["run"]["rejected_why"]
    assert "bayer_rggb8" in why and why.count("1x") == 2
    assert "rejected 2" in (result.report_dir / "report.md").read_text()


def test_plots_draw_the_budget_lines():
    from vlm_ros.bag import plots
    from vlm_ros.bag.report import LATENCY_FIELDS, Output

    outputs = [
        Output(
            "/vlm_assistant/scene_answer",
            "SceneAnswer",
            START_NS + (i + 1) * 10**8,
            START_NS + i * 10**8,
            dict.fromkeys(LATENCY_FIELDS, 5.0 + i),
            True,
            (),
        )
        for i in range(4)
    ]
    budgets = {"image_to_output": 150.0, "total": 7.0, "vision": 6.5}
    fig = plots.latency_figure(outputs, budgets, start_ns=START_NS)
    top, bottom = ({ln.get_label(): ln for ln in ax.get_lines()} for ax in fig.axes[:2])
    assert list(top["budget image_to_output (150 ms)"].get_ydata()) == [150.0, 150.0]
    assert list(bottom["budget total (7 ms)"].get_ydata()) == [7.0, 7.0]
    e2e = top["/vlm_assistant/scene_answer image→answer"]
    assert list(e2e.get_ydata()) == pytest.approx([100.0] * 4)  # log time - stamp
    assert list(e2e.get_xdata()) == pytest.approx([0.1, 0.2, 0.3, 0.4])  # bag time, s
    total = bottom["/vlm_assistant/scene_answer inference total"].get_ydata()
    assert list(total) == pytest.approx([5.0, 6.0, 7.0, 8.0])
    for ax in fig.axes[:2]:
        assert ax.get_ylabel().endswith("[ms]")
    assert fig.axes[1].get_xlabel().startswith("bag time [s]")
    plots._pyplot().close(fig)
    fig = plots.latency_figure(outputs, {})
    labels = [ln.get_label() for ax in fig.axes for ln in ax.get_lines()]
    assert not [label for label in labels if label.startswith("budget")]
    plots._pyplot().close(fig)

    fig = plots.cdf_figure(outputs, budgets)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    budget_x = {
        name: [list(ln.get_xdata()) for ln in ax.get_lines() if ln.get_gid() == "budget"]
        for name, ax in panels.items()
    }
    assert budget_x["vision"] == [[6.5, 6.5]] and budget_x["total"] == [[7.0, 7.0]]
    assert budget_x["image_to_answer"] == [[150.0, 150.0]] and budget_x["decode"] == []
    vision = panels["vision"]
    assert vision.get_xlabel() == "vision [ms]" and vision.get_ylabel().startswith("fraction")
    assert all(ax.get_ylabel() for ax in panels.values())
    assert "budget 6.5 ms" in [t.get_text() for t in vision.get_legend().get_texts()]
    assert fig._suptitle is not None and fig._suptitle.get_text()
    plots._pyplot().close(fig)


def test_replay_drops_only_frames_replaced_before_use():
    """dropped = frames replaced by a newer frame before any work used them (the live node's
    definition), checked against a direct reading of it on random timings."""
    rng = np.random.default_rng(5)
    arrivals = np.cumsum(rng.integers(1, 30, size=200)).tolist()
    busy = rng.integers(1, 80, size=200).tolist()
    taken: list[tuple[int, int]] = []

    def process(frame, arrival, start):
        taken.append((frame, start))
        refused = InputError("refused") if frame % 17 == 3 else None
        return start + busy[frame], refused  # a few refused: rejected, not dropped

    c = replay([Arrival(i, t) for i, t in enumerate(arrivals)], process, "recorded")
    # direct reading: when the model frees up it takes the newest frame that arrived while it
    # was busy, else the next frame when it arrives; a frame never taken was replaced
    expected, k, start = [], 0, arrivals[0]
    while True:
        expected.append((k, start))
        free = start + busy[k]
        waiting = [j for j in range(k + 1, len(arrivals)) if arrivals[j] < free]
        if waiting:
            k, start = waiting[-1], free
        elif k + 1 < len(arrivals):
            k, start = k + 1, arrivals[k + 1]
        else:
            break
    assert taken == expected
    never_taken = set(range(len(arrivals))) - {f for f, _ in expected}
    assert c.dropped == len(never_taken) > 0
    assert c.received == c.processed + c.dropped + c.rejected and c.rejected > 0
    # each drop is counted when the newer frame arrives, i.e. at the arrival of frame j + 1
    drop_times = sorted(t for t, name in c.events if name == "dropped")
    assert drop_times == sorted(arrivals[j + 1] for j in never_taken)


# ---- interoperability with ROS 2's own serialisation (rclpy, generated vlm_ros.msg) ------------


@pytest.mark.ros
def test_output_bag_deserialises_with_rclpy(tmp_path, assistant):
    """eval-bag's output as any ROS 2 tool reads it: the raw CDR of each message through
    rclpy.serialization.deserialize_message into the generated vlm_ros.msg classes."""
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.serialization import deserialize_message
    from rosbags.highlevel import AnyReader
    from sensor_msgs.msg import CompressedImage

    from vlm_ros.bag.evaluate import DEFAULT_SCENE_PROMPT
    from vlm_ros.msg import ActionHint, SceneAnswer

    bag = camera_bag(tmp_path, "cam", rate_hz=10, duration_s=0.3)
    budgets = {"total": 1e6, "vision": 1e-3}
    run = settings(bag, tmp_path / "out", rate="max", budgets_ms=budgets)
    result = evaluate(run, assistant=assistant)
    classes = {"vlm_ros/msg/SceneAnswer": SceneAnswer, "vlm_ros/msg/ActionHint": ActionHint,
               "diagnostic_msgs/msg/DiagnosticArray": DiagnosticArray,
               "sensor_msgs/msg/CompressedImage": CompressedImage}  # fmt: skip
    with AnyReader([result.out_bag]) as reader:
        msgs = [
            (c.topic, ts, deserialize_message(bytes(raw), classes[c.msgtype]))
            for c, ts, raw in reader.messages()
        ]
    answers = sorted(
        ((ts, m) for t, ts, m in msgs if t.endswith("scene_answer")), key=lambda a: stamp(a[1])
    )
    hints = sorted(
        ((ts, m) for t, ts, m in msgs if t.endswith("action_hint")), key=lambda a: stamp(a[1])
    )
    assert len(answers) == len(hints) == 3
    frames = [m for t, _, m in msgs if t == "/camera/image_raw/compressed"]
    assert sorted(stamp(m) for m in frames) == sorted(stamp(m) for _, m in answers)
    for i, ((log_ns, ans), (hint_ns, hint)) in enumerate(zip(answers, hints, strict=True)):
        assert stamp(ans) == stamp(hint) == START_NS + i * 100_000_000  # the source frame's
        assert ans.header.frame_id == hint.header.frame_id == "camera"
        expected = assistant.answer(
            pattern_frame(i, i / 10, W, H), DEFAULT_SCENE_PROMPT, max_new_tokens=2
        )
        assert ans.question == DEFAULT_SCENE_PROMPT and ans.answer == expected.text
        assert ans.num_tokens == len(expected.token_ids)
        lat = ans.latency
        assert lat.image_to_output_ms == pytest.approx((log_ns - stamp(ans)) / 1e6, rel=1e-5)
        assert lat.total_ms > 0 and lat.vision_ms > 0 and lat.queue_ms >= 0
        assert list(ans.budget_misses) == ["vision"] and not ans.within_budget
        assert hint.latency.queue_ms >= lat.total_ms  # the hint waits for the answer
        assert hint.latency.image_to_output_ms == pytest.approx(
            (hint_ns - stamp(hint)) / 1e6, rel=1e-5
        )
        assert list(hint.candidates) == ["stop", "go"] and hint.action in hint.candidates
        assert sum(hint.probabilities) == pytest.approx(1.0, abs=1e-5)
        # float32 on both sides: the bag's numbers are the ones rclpy's message holds
        assert hint.confidence == max(hint.probabilities)
    diags = [m for t, _, m in msgs if t == "/diagnostics"]
    last = {s.name: {kv.key: kv.value for kv in s.values} for s in diags[-1].status}
    latency = last["vlm_assistant: latency"]
    assert (latency["frames_received"], latency["frames_processed"]) == ("3", "3")
    assert latency["frames_dropped"] == latency["frames_rejected"] == "0"
    assert float(latency["budget_vision_ms"]) == pytest.approx(1e-3)
    assert latency["misses_vision"] == "6"  # 3 answers and 3 hints, each over 1 µs of vision
    assert last["vlm_assistant: eval-bag run"]["rate"] == "max"
    assert diags[-1].status[-1].level == b"\x00"  # OK: the run read its bag to the end


def rclpy_recording(path: Path, storage: str, delays_ms: list[float]) -> dict:
    """A bag as `ros2 bag record` of the live node writes it: every message is a generated ROS
    type, built by the node's own mapping (vlm_ros.ros.outputs over rclpy's classes) and
    serialised by rclpy; the
    /diagnostics status is the node's latency_status of a LatencyMonitor fed what it published.
    Returns what the report must find."""
    from builtin_interfaces.msg import Time
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.serialization import serialize_message
    from rosbags.rosbag2 import StoragePlugin, Writer
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    from vlm_ros.bag.types import typestore
    from vlm_ros.ros import node_messages, outputs
    from vlm_ros.ros.node_messages import RCLPY_TYPES as T
    from vlm_ros.serving.latency import Budgets, LatencyMonitor
    from vlm_ros.types import ActionHint as Hint
    from vlm_ros.types import Answer, StageTimings

    budgets = {"vision": 12.5, "image_to_output": 150.0}
    monitor = LatencyMonitor(Budgets.from_mapping(budgets))
    out: list[tuple[str, str, int, object]] = []
    for i, delay in enumerate(delays_ms):
        t_ns = START_NS + i * 100_000_000
        header = Header(stamp=Time(sec=t_ns // 10**9, nanosec=t_ns % 10**9), frame_id="camera")
        image = Image(
            header=header,
            height=H,
            width=W,
            encoding="rgb8",
            step=W * 3,
            data=pattern_frame(i, i / 10, W, H).tobytes(),
        )
        out.append(("/camera/image_raw", "sensor_msgs/msg/Image", t_ns, image))
        monitor.count("frames_received")
        if i % 4 == 3:  # replaced by the next frame before any work used it
            monitor.count("frames_dropped")
            continue
        timings = StageTimings(
            preprocess=1.0, vision=10.0 + i, projector=0.5, prefill=20.0, decode=5.0, total=36.5 + i
        )
        monitor.count("frames_processed")
        latency = outputs.stage_latency(T, timings.as_dict(), 0.5, delay)
        log_ns = t_ns + int(delay * 1e6)
        answer = Answer(text=f"answer {i}", token_ids=(1, 2), timings=timings, stop_reason="eos")
        misses = monitor.record(timings.as_dict(), delay)  # once per output, as the node does
        msg = outputs.scene_answer(T, header, "/camera/image_raw", "q", answer, latency, misses)
        out.append(("/vlm_assistant/scene_answer", "vlm_ros/msg/SceneAnswer", log_ns, msg))
        hint = Hint(("stop", "go"), (0.25, 0.75), (-2.0, -1.0), timings)
        misses = monitor.record(timings.as_dict(), delay)
        msg = outputs.action_hint(T, header, "/camera/image_raw", "do?", hint, latency, misses)
        out.append(("/vlm_assistant/action_hint", "vlm_ros/msg/ActionHint", log_ns + 1, msg))
    report = monitor.report()
    status = node_messages.latency_status(
        "vlm_assistant: latency",
        "/vlm_assistant",
        report,
        budgets,
        {"queue_depth": 0, "model": "demo"},
    )
    end_ns = START_NS + len(delays_ms) * 100_000_000
    diag = DiagnosticArray(header=Header(stamp=Time(sec=end_ns // 10**9)), status=[status])
    out.append(("/diagnostics", "diagnostic_msgs/msg/DiagnosticArray", end_ns, diag))

    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=8, storage_plugin=plugin) as writer:
        conns = {}
        for topic, msgtype, log_ns, msg in sorted(out, key=lambda m: m[2]):
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=typestore())
            writer.write(conns[topic], log_ns, bytes(serialize_message(msg)))
    return {"counters": report.counters, "budgets": budgets, "misses": report.misses_by_stage}


@pytest.mark.ros
@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_report_of_an_rclpy_serialised_recording(tmp_path, capsys, storage):
    delays_ms = [120.0, 80.0, 200.0, 95.0, 160.0, 70.0, 110.0, 300.0]
    expect = rclpy_recording(tmp_path / "live", storage, delays_ms)
    kept = [i for i in range(len(delays_ms)) if i % 4 != 3]
    assert cli(["report", str(tmp_path / "live"), "--out", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    node_counts = {k: expect["counters"].get(f"frames_{k}", 0) for k in report["frames"]}
    assert (
        report["frames"]
        == node_counts
        == {"received": 8, "processed": 6, "dropped": 2, "rejected": 0}
    )
    assert report["budgets_ms"] == expect["budgets"]
    for topic, extra_ns in (("scene_answer", 0), ("action_hint", 1)):
        s = report["topics"][f"/vlm_assistant/{topic}"]
        e2e = [delays_ms[i] + extra_ns / 1e6 for i in kept]
        assert s["count"] == len(kept)
        assert s["image_to_answer_ms"]["p50"] == pytest.approx(float(np.percentile(e2e, 50)))
        assert s["image_to_answer_ms"]["max"] == pytest.approx(max(e2e))
        assert s["latency_ms"]["vision"]["p90"] == pytest.approx(
            float(np.percentile([10.0 + i for i in kept], 90))
        )
        assert s["latency_ms"]["image_to_output"]["max"] == pytest.approx(200.0)  # 300: dropped
        # the node's own verdicts, per stage: half of its monitor's count on each topic
        assert s["budget_misses"] == {k: n // 2 for k, n in expect["misses"].items()}
    assert expect["misses"] == {"vision": 6, "image_to_output": 4}  # 12.5/150 ms by construction
