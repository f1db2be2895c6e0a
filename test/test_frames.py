"""vlm_ros.serving.frames.FrameStore without ROS: the one frame accounting of the node and the
replay. received == processed + dropped + rejected + held, whatever happens."""

from __future__ import annotations

import threading
import traceback
from collections import Counter

import pytest

from vlm_ros.errors import ContextOverflowError, InputError
from vlm_ros.serving.frames import FrameStore, StaleFrameError, rejection_reason


class Refused(InputError):
    def __init__(self, reason: str):
        super().__init__(f"refused: {reason}")
        self.reason = reason


def store() -> tuple[FrameStore, Counter]:
    counts: Counter = Counter()
    return FrameStore(lambda name, at: counts.update([name])), counts


def balanced(s: FrameStore, c: Counter) -> bool:
    return c["received"] == c["processed"] + c["dropped"] + c["rejected"] + s.held()


def test_replaced_untaken_frames_are_dropped_taken_ones_are_not():
    s, c = store()
    s.put("cam", "m1", 0.0)
    s.put("cam", "m2", 1.0)  # m1 never taken: dropped
    frame = s.fresh("cam", now=1.0, max_age=0, take=True)
    s.put("cam", "m3", 2.0)  # m2 was taken: not dropped
    assert frame.msg == "m2" and c["dropped"] == 1 and c["received"] == 3
    s.settle(frame, None, 3.0)
    assert c["processed"] == 1 and s.held() == 1 and balanced(s, c)


def test_conversion_runs_once_and_a_failure_is_remembered():
    s, c = store()
    calls = []

    def convert(msg):
        calls.append(msg)
        raise Refused("too_large")

    s.put("cam", "bomb", 0.0)
    frame = s.fresh("cam", 0.0, 0, take=True)
    depths = []
    for _ in range(3):  # three jobs on the same frame: one decode attempt
        with pytest.raises(Refused):
            s.image(frame, convert)
        try:  # again, for the traceback (pytest.raises hands back one of its own)
            s.image(frame, convert)
        except Refused as exc:
            depths.append(len(traceback.extract_tb(exc.__traceback__)))
        assert s.settle(frame, Refused("too_large"), 1.0) in ("too_large", None)
    assert calls == ["bomb"]
    # each raise has a traceback of its own: a kept exception raised again would lengthen its
    # traceback, holding every earlier caller's frames (and their jobs' camera frames)
    assert depths[0] == depths[1] == depths[2], depths
    assert c["rejected"] == 1 and c["rejected_too_large"] == 1 and c["processed"] == 0
    assert balanced(s, c)

    s.put("cam", "ok", 2.0)
    good = s.fresh("cam", 2.0, 0, take=True)
    assert s.image(good, str.upper) == "OK" and s.image(good, lambda m: 1 / 0) == "OK"


def test_verdicts_by_reason_and_only_the_first_settle_counts():
    assert rejection_reason(None) is None
    assert rejection_reason(RuntimeError("model failure")) is None  # processed; failed elsewhere
    assert rejection_reason(ContextOverflowError("long")) == "context_overflow"
    assert rejection_reason(Refused("too_small")) == "too_small"
    assert rejection_reason(InputError("odd")) == "invalid_input"
    s, c = store()
    for i, outcome in enumerate([ContextOverflowError("x"), None, Refused("truncated")]):
        s.put("cam", i, float(i))
        frame = s.fresh("cam", float(i), 0, take=True)
        s.settle(frame, outcome, float(i))
        s.settle(frame, None, float(i))  # a second job on the frame changes nothing
    assert c["rejected_context_overflow"] == c["rejected_truncated"] == 1
    assert (c["rejected"], c["processed"]) == (2, 1) and s.held() == 0 and balanced(s, c)


def test_missing_and_stale_frames_are_refused_by_name_without_taking():
    s, _ = store()
    with pytest.raises(StaleFrameError, match="no frame received yet on /cam"):
        s.fresh("/cam", 0.0, 1.0)
    s.put("/cam", "m", 10.0)
    with pytest.raises(StaleFrameError, match=r"stale: 1500 ms old \(max_frame_age_ms 1000\)"):
        s.fresh("/cam", 11.5, 1.0, take=True)
    assert not s.latest("/cam").taken
    assert s.fresh("/cam", 11.5, 0, take=True).taken  # 0: no age limit


def test_take_untaken_and_clear():
    s, c = store()
    assert s.take_untaken("cam") is None
    s.put("cam", "a", 0.0)
    assert s.take_untaken("cam").msg == "a" and s.take_untaken("cam") is None
    s.clear()
    assert s.latest("cam") is None and s.held() == 0


def test_concurrent_puts_and_takes_stay_balanced():
    """Camera callbacks and worker jobs on several threads: the counts always add up."""
    lock = threading.Lock()
    counts: Counter = Counter()

    def safe(name, at):
        with lock:
            counts.update([name])

    s = FrameStore(safe)

    def camera(name):
        for i in range(2000):
            s.put(name, i, float(i))

    def worker(name):
        for _ in range(1000):
            try:
                frame = s.fresh(name, 0.0, 0, take=True)
            except StaleFrameError:
                continue
            s.settle(frame, None if frame.seq % 3 else Refused("truncated"), 0.0)

    threads = [threading.Thread(target=f, args=(n,)) for n in ("a", "b") for f in (camera, worker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts["received"] == 4000 and counts["processed"] > 0
    assert balanced(s, counts)
