"""What a ROS engineer looks at after eval-bag / report: --out checked before any work, frames
in the output bag beside their answers (read back with the independent MCAP reader), progress,
the terminal summary, readable plots, one set of percentiles, clean errors for garbage files,
make-bag's transport delay and the Foxglove layout."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rosbags")

from vlm_ros.bag.evaluate import EvalSettings, evaluate, frame_topic  # noqa: E402
from vlm_ros.bag.make_bag import BagSpec, make_bag, pattern_frame  # noqa: E402
from vlm_ros.bag.output import prepare_out_dir  # noqa: E402
from vlm_ros.bag.progress import Progress, duration  # noqa: E402
from vlm_ros.cli import main as cli  # noqa: E402
from vlm_ros.errors import InputError  # noqa: E402

START_NS = 1_700_000_000_000_000_000
W, H = 64, 48
SCENE = "/vlm_assistant/scene_answer"
HINT = "/vlm_assistant/action_hint"
LAYOUT = Path(__file__).resolve().parents[1] / "config" / "foxglove_eval_layout.json"


@pytest.fixture(scope="module")
def assistant():
    from vlm_ros.infer.pipeline import Assistant

    a = Assistant.load("demo")
    yield a
    a.close()


def camera_bag(tmp_path: Path, name: str = "cam", **kw) -> Path:
    base = dict(width=W, height=H, start_ns=START_NS, rate_hz=10, duration_s=0.4)
    base.update(kw)
    return make_bag(BagSpec(out=str(tmp_path / name), **base))


def settings(bag: Path, out: Path, **kw) -> EvalSettings:
    base = dict(bag=str(bag), out_dir=str(out), max_new_tokens=2, candidates=("stop", "go"))
    base.update(warmup=0, rate="max", **kw)
    return EvalSettings(**base)


def cli_error(args, capsys) -> str:
    rc = cli(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def stamp_of(header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def mcap_messages(bag_dir: Path) -> list[tuple[str, int, object]]:
    """(topic, log ns, decoded message) via mcap + mcap-ros2-support, with the schemas taken
    from the file as Foxglove does: independent of rosbags and of our own reader."""
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    (path,) = bag_dir.glob("*.mcap")
    with open(path, "rb") as fh:
        reader = make_reader(fh, decoder_factories=[DecoderFactory()])
        return [(c.topic, m.log_time, d) for _, c, m, d in reader.iter_decoded_messages()]


# ---- 1. --out is checked before any work ------------------------------------------------------


def test_out_refusals_name_the_problem_in_one_line(tmp_path, capsys):
    existing = tmp_path / "file.txt"
    existing.write_text("x")
    missing_bag = str(tmp_path / "no-such-bag")  # the --out error must come first
    assert "is an existing file" in cli_error(["eval-bag", missing_bag, "--out", str(existing)],
                                              capsys)  # fmt: skip
    assert "cannot write to --out" in cli_error(["eval-bag", missing_bag, "--out", "/proc/x"],
                                                capsys)  # fmt: skip
    err = cli_error(["report", missing_bag, "--out", "/dev/null/sub"], capsys)
    assert "cannot write to --out /dev/null/sub" in err


def test_an_existing_report_is_refused_unless_forced_by_both_commands(tmp_path, capsys, assistant):
    bag = camera_bag(tmp_path)
    out = tmp_path / "out"
    evaluate(settings(bag, out, hint=False), assistant=assistant)
    stale = out / "leftover.png"
    stale.write_bytes(b"old plot")
    err = cli_error(["eval-bag", str(bag), "--out", str(out)], capsys)
    assert "already holds a report" in err and "--force" in err
    err = cli_error(["report", str(out / "output_bag"), "--out", str(out)], capsys)
    assert "already holds a report" in err

    forced = evaluate(settings(bag, out, hint=False, force=True), assistant=assistant)
    assert not stale.exists()  # nothing of the previous run is left to mix with this one
    assert (forced.report_dir / "report.json").exists()
    again = tmp_path / "again"
    assert cli(["report", str(forced.out_bag), "--out", str(again)]) == 0
    assert cli(["report", str(forced.out_bag), "--out", str(again), "--force"]) == 0


def test_prepare_out_dir_accepts_a_new_or_empty_folder(tmp_path):
    assert prepare_out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # the check leaves nothing behind
    (tmp_path / "empty").mkdir()
    assert prepare_out_dir(tmp_path / "empty") == tmp_path / "empty"
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.json").write_text("{}")
    with pytest.raises(InputError, match="already holds a report"):
        prepare_out_dir(tmp_path / "r")


# ---- 2. the output bag shows what the robot saw ------------------------------------------------


def test_output_bag_frames_decode_and_match_their_answers(tmp_path, assistant):
    from PIL import Image

    bag = camera_bag(tmp_path, encoding="rgb8")
    result = evaluate(settings(bag, tmp_path / "out"), assistant=assistant)
    msgs = mcap_messages(result.out_bag)
    topic = frame_topic("/camera/image_raw")
    assert topic == "/camera/image_raw/compressed"
    frames = {stamp_of(m.header): (ts, m) for t, ts, m in msgs if t == topic}
    answers = [m for t, _, m in msgs if t in (SCENE, HINT)]
    assert len(frames) == result.counters.processed == 4
    assert {stamp_of(m.header) for m in answers} == set(frames)  # every answer has its frame
    for i, stamp in enumerate(sorted(frames)):
        log_ns, msg = frames[stamp]
        assert msg.header.frame_id == "camera" and "jpeg" in msg.format
        assert log_ns == stamp  # make-bag logs at the stamp: the frame is at its arrival time
        pixels = np.asarray(Image.open(io.BytesIO(bytes(msg.data))).convert("RGB"))
        assert pixels.shape == (H, W, 3)
        expected = pattern_frame(i, i / 10, W, H).astype(np.int16)
        assert np.abs(pixels.astype(np.int16) - expected).mean() < 12  # JPEG, not another frame
        if i:
            other = pattern_frame(i - 1, (i - 1) / 10, W, H).astype(np.int16)
            assert (
                np.abs(pixels.astype(np.int16) - other).mean()
                > 2 * np.abs(pixels.astype(np.int16) - expected).mean()
            )


def test_compressed_camera_frames_are_kept_as_recorded_and_no_frames_leaves_them_out(
    tmp_path, assistant
):
    bag = camera_bag(tmp_path, encoding="jpeg")
    source = {
        stamp_of(m.header): bytes(m.data)
        for t, _, m in mcap_messages(bag)
        if t == "/camera/image_raw/compressed"
    }
    result = evaluate(settings(bag, tmp_path / "out", hint=False), assistant=assistant)
    kept = {
        stamp_of(m.header): bytes(m.data)
        for t, _, m in mcap_messages(result.out_bag)
        if t == "/camera/image_raw/compressed"
    }
    assert kept and all(kept[s] == source[s] for s in kept)
    bare = evaluate(settings(bag, tmp_path / "bare", hint=False, frames=False), assistant=assistant)
    assert {t for t, _, _ in mcap_messages(bare.out_bag)} == {SCENE, "/diagnostics"}


def test_foxglove_layout_names_what_eval_bag_writes(tmp_path, assistant):
    layout = json.loads(LAYOUT.read_text())
    panels = set(layout["configById"])

    def leaves(node):
        if isinstance(node, str):
            return [node]
        return leaves(node["first"]) + leaves(node["second"])

    assert sorted(leaves(layout["layout"])) == sorted(panels)
    text = json.dumps(layout["configById"])
    result = evaluate(settings(camera_bag(tmp_path), tmp_path / "out"), assistant=assistant)
    written = {t for t, _, _ in mcap_messages(result.out_bag)}
    referenced = {
        t for t in ("/camera/image_raw/compressed", SCENE, HINT) if f'"{t}' in text
    }  # fmt: skip
    assert referenced == {"/camera/image_raw/compressed", SCENE, HINT} and referenced <= written
    for cfg in layout["configById"].values():
        for path in [p["value"] for p in cfg.get("paths", [])] + [cfg.get("topicPath", "")]:
            if "." in path:  # topic.field.field: the field exists in the message definition
                topic, *fields = path.split(".")
                (msg,) = [m for t, _, m in mcap_messages(result.out_bag) if t == topic][:1]
                for name in fields:
                    msg = getattr(msg, name)


# ---- 3. progress and summary -------------------------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_counts_and_estimates():
    now = [0.0]
    stream = FakeTTY()
    bar = Progress(total=10, stream=stream, clock=lambda: now[0])
    frames = bar.track(range(10))
    for i, _ in enumerate(frames):
        now[0] += 0.5  # 2 frames/s
        if i % 2 == 0:
            bar.served(True)
        if i == 3:
            line = bar.line()
            assert "4/10 frames" in line and "2 processed" in line and "2 dropped" in line
            assert "2.0 frames/s" in line and "ETA 3s" in line
    bar.close()
    assert bar.drawn >= 2 and stream.getvalue().endswith("\n")
    assert duration(3 * 3600 + 120) == "3h02m" and duration(187) == "3m07s"


def test_progress_is_silent_off_a_terminal_and_with_quiet(tmp_path, capsys):
    piped = io.StringIO()
    bar = Progress(total=3, stream=piped)
    for _ in bar.track(range(3)):
        bar.served(False)
    bar.close()
    assert piped.getvalue() == "" and bar.drawn == 0
    bag = camera_bag(tmp_path)
    args = ["eval-bag", str(bag), "--out", str(tmp_path / "o"), "--max-new-tokens", "2"]
    assert cli([*args, "--rate", "max", "--no-hint", "--warmup", "0", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "frames/s" not in captured.err
    out = captured.out
    assert "Frames:     received 4, processed 4, dropped 0, rejected 0" in out
    assert f"Topic:      {SCENE} | Type: SceneAnswer | Count: 4" in out
    assert "image_to_answer" in out and "p99" in out


def test_eval_bag_draws_progress_when_asked(tmp_path, assistant, capsys):
    evaluate(settings(camera_bag(tmp_path), tmp_path / "o", hint=False), assistant, progress=True)
    err = capsys.readouterr().err
    assert "4/4 frames" in err and "4 processed" in err and err.endswith("\n")


def test_report_prints_a_summary_with_budgets_and_misses(tmp_path, capsys, assistant):
    bag = camera_bag(tmp_path)
    budgets = {"image_to_output": 1e-3, "total": 1e6}
    result = evaluate(settings(bag, tmp_path / "o", budgets_ms=budgets), assistant=assistant)
    capsys.readouterr()
    assert cli(["report", str(result.out_bag), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("    ")}
    # image->answer is judged against the end-to-end budget: every one of the 4 misses it
    assert rows["image_to_answer"][-2:] == ["0.001", "4"]
    assert rows["total"][-2:] == ["1000000", "0"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| image_to_answer |" in md and "| 0.0 | 4 |" in md


# ---- 4. plots a reviewer can read ------------------------------------------------------------


def test_report_images_are_readable_and_show_frames_with_answers(tmp_path, assistant):
    from PIL import Image

    from vlm_ros.bag.report import build_report

    result = evaluate(settings(camera_bag(tmp_path), tmp_path / "o"), assistant=assistant)
    for name in ("latency_over_time.png", "stage_cdf.png", "frames.png"):
        width, height = Image.open(result.report_dir / name).size
        assert width >= 1100 and height >= 350, (name, width, height)
    report = build_report(result.out_bag)
    thumbs = report["_thumbnails"]
    assert 1 <= len(thumbs) <= 6
    for pixels, answer, hint in thumbs:
        assert pixels.shape == (H, W, 3) and answer and hint.split()[0] in ("stop", "go")
    assert report["bag_start_ns"] == START_NS  # bag time 0 = the first frame's arrival


# ---- 5. one set of percentiles; clean errors; transport delay --------------------------------


def test_diagnostics_report_and_bench_use_one_set_of_percentiles(tmp_path, assistant):
    from vlm_ros.bag.report import stats
    from vlm_ros.bench.measure import percentiles as bench_percentiles
    from vlm_ros.serving.latency import PERCENTILES, percentiles

    values = [5.0, 1.0, 9.0, 2.0, 7.0, 3.0]
    keys = {f"p{q}" for q in PERCENTILES}
    assert keys == {"p50", "p90", "p99"}
    assert {k: stats(values)[k] for k in keys} == percentiles(values)
    assert {k: bench_percentiles(values)[k] for k in keys} == percentiles(values)
    result = evaluate(settings(camera_bag(tmp_path), tmp_path / "o"), assistant=assistant)
    diag_keys = {
        kv.key for t, _, m in mcap_messages(result.out_bag) if t == "/diagnostics"
        for s in m.status for kv in s.values
    }  # fmt: skip
    assert {"total_p50_ms", "total_p90_ms", "total_p99_ms"} <= diag_keys
    assert not {k for k in diag_keys if k.endswith("_p95_ms")}


def test_garbage_bag_and_mcap_files_get_one_clean_line(tmp_path, capsys):
    (tmp_path / "g.bag").write_bytes(bytes(range(256)) * 4)
    err = cli_error(["report", str(tmp_path / "g.bag")], capsys)
    assert "is not a ROS 1 bag" in err and "codec" not in err
    (tmp_path / "g.mcap").write_bytes(b"\x00\x01garbage" * 50)
    err = cli_error(["report", str(tmp_path / "g.mcap")], capsys)
    assert "is not an MCAP file" in err and "(" not in err.split("MCAP file")[1]


def test_make_bag_transport_delay_sets_log_time_after_the_stamp(tmp_path, capsys, assistant):
    out = tmp_path / "delayed"
    args = ["make-bag", str(out), "--size", f"{W}x{H}", "--duration", "0.3", "--rate", "10"]
    assert cli([*args, "--transport-delay-ms", "40"]) == 0
    frames = [(ts, m) for t, ts, m in mcap_messages(out) if t == "/camera/image_raw"]
    assert len(frames) == 3
    assert all(ts - stamp_of(m.header) == 40_000_000 for ts, m in frames)
    result = evaluate(settings(out, tmp_path / "o", hint=False), assistant=assistant)
    report = json.loads((result.report_dir / "report.json").read_text())
    assert report["topics"][SCENE]["image_to_answer_ms"]["p50"] >= 40.0
    assert cli_error([*args, "--transport-delay-ms", "-5"], capsys).count("transport delay") == 1
