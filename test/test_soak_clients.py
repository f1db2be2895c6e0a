"""The soak clients' accounting over real rclpy futures: lost (no response in the wait) and late
(a response after the node's promise) are told apart, and the soak sums both."""

import argparse
import time

import pytest

pytestmark = pytest.mark.ros


def test_await_all_tells_lost_from_late(ros_context):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.task import Future

    from vlm_ros.ros import soak_clients

    node = rclpy.create_node("soak_accounting", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    on_time, late, never = Future(), Future(), Future()
    on_time.set_result("now")  # done before the wait: arrives at ~0 ms
    timer = node.create_timer(1.0, lambda: late.done() or late.set_result("after 1 s"))
    tally = soak_clients.Tally()
    args = argparse.Namespace(timeout=2.5, promise=0.5)
    start = time.monotonic()
    try:
        arrived = soak_clients._await_all(executor, [on_time, late, never], start, args, tally)
    finally:
        timer.cancel()
        executor.shutdown()
        node.destroy_node()
    assert arrived[0] is not None and arrived[0] < 500, arrived
    assert arrived[1] is not None and arrived[1] >= 1000, arrived
    assert arrived[2] is None, arrived
    assert (tally.lost, tally.late) == (1, 1)
    # no promise given: nothing counts as late
    tally = soak_clients.Tally()
    executor = SingleThreadedExecutor(context=ros_context)
    args = argparse.Namespace(timeout=0.1, promise=0.0)
    soak_clients._await_all(executor, [on_time, late], start, args, tally)
    assert (tally.lost, tally.late) == (0, 0)


def test_soak_sums_late_and_lost_per_kind():
    from vlm_ros.ros import soak

    clients = [
        {"sent": 10, "answered": 2, "refused": 7, "lost": 1, "late": 3,
         "refused_by_reason": {"queue_full": 7}},
        {"sent": 10, "answered": 1, "refused": 9, "lost": 0, "late": 2,
         "refused_by_reason": {"queue_full": 8, "bad_image": 1}},
        {"error": "service not available"},
    ]  # fmt: skip
    out = soak.requests(clients, 10)
    assert (out["sent"], out["answered"], out["refused"], out["lost"], out["late"]) == (
        20, 3, 16, 1, 5)  # fmt: skip
    assert out["refused_by_reason"] == {"queue_full": 15, "bad_image": 1}
    assert out["client_errors"] == ["service not available"]
    assert out["clients_hung_at_exit"] == []


HANGS_AFTER_ITS_RESULT = """
import faulthandler, json, sys, threading, time
from vlm_ros.ros.soak_clients import STACKS_SIGNAL
faulthandler.register(STACKS_SIGNAL, all_threads=True)
print(json.dumps({"sent": 10, "answered": 10, "refused": 0, "lost": 0, "late": 0,
                  "refused_by_reason": {}, "answer_ms": [], "refusal_ms": []}), flush=True)
def stuck_in_teardown():
    time.sleep(600)
stuck_in_teardown()
"""


@pytest.mark.parametrize("prints_first", [True, False])
def test_a_hung_client_gives_its_stacks_and_keeps_its_tally(tmp_path, prints_first):
    """A client still running at the soak's end is asked for its threads' stacks, then killed;
    a result it printed before hanging still counts, marked hung_at_exit (it hung in teardown,
    after its requests); without one, every request of it counts as lost."""
    import subprocess
    import sys

    from vlm_ros.ros import soak, soak_clients

    script = HANGS_AFTER_ITS_RESULT if prints_first else HANGS_AFTER_ITS_RESULT.split("print(")[
        0] + "time.sleep(600)\n"  # fmt: skip
    stderr = open(tmp_path / "client.err", "w")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=stderr,
                            text=True)  # fmt: skip
    proc.stderr_path = stderr.name
    time.sleep(3.0)  # imported, registered and (maybe) printed
    start = time.monotonic()
    result = soak.Soak._result(proc, timeout=1.0)
    assert time.monotonic() - start < 10.0 and proc.poll() is not None  # killed, not waited on
    stacks = (tmp_path / "client.err").read_text()
    assert "most recent call first" in stacks, stacks  # faulthandler's dump: where it waits
    assert ("stuck_in_teardown" in stacks) == prints_first, stacks
    out = soak.requests([result], 10)
    if prints_first:
        assert result["hung_at_exit"] == stderr.name and "error" not in result
        assert (out["sent"], out["answered"], out["lost"]) == (10, 10, 0)
        assert out["clients_hung_at_exit"] == [stderr.name] and out["client_errors"] == []
    else:
        assert result["error"].startswith("did not finish") and stderr.name in result["error"]
        assert out["client_errors"] == [result["error"]]
    # the same wait, as the reliability tests use it: stdout kept, hung said
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('x', flush=True); "
                             "time.sleep(600)"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    out_text, _, hung = soak_clients.finish(proc, 2.0)
    assert hung and out_text.strip() == "x" and proc.poll() is not None


TEARDOWN_HOLDS_THE_GIL = """
import json, re, rclpy
from rclpy.executors import SingleThreadedExecutor
from vlm_ros.ros import soak_clients
soak_clients.TEARDOWN_S = 2.0
rclpy.init()
node = rclpy.create_node("teardown_hang")
executor = SingleThreadedExecutor()
executor.add_node(node)
print(json.dumps({"sent": 10, "answered": 4, "refused": 6, "lost": 0, "late": 0,
                  "refused_by_reason": {"queue_full": 6}, "answer_ms": [], "refusal_ms": []}),
      flush=True)
def destroy_node():  # stands in for rclpy's spin: a C loop that never lets go of the GIL
    re.match(r"(a+)+$", "a" * 64 + "b")
node.destroy_node = destroy_node
soak_clients._teardown(node, executor)
"""


def test_a_teardown_that_hangs_holding_the_gil_is_stopped_and_its_tally_kept(tmp_path):
    """_teardown's watchdog is faulthandler's own thread: it fires while the hang holds the
    GIL (catastrophic regex backtracking, hours in C), writes the stacks and exits 1 within
    TEARDOWN_S; read_result() keeps the printed result and says what happened, as the soak and the
    reliability tests read it. A clean client and an error result say nothing more."""
    import subprocess
    import sys

    from vlm_ros.ros import soak, soak_clients

    stderr = open(tmp_path / "client.err", "w")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", TEARDOWN_HOLDS_THE_GIL],
                            stdout=subprocess.PIPE, stderr=stderr, text=True)  # fmt: skip
    proc.stderr_path = stderr.name
    result = soak.Soak._result(proc, timeout=60.0)
    assert time.monotonic() - start < 45.0 and proc.returncode == 1
    stacks = (tmp_path / "client.err").read_text()
    assert "Timeout (0:00:02)!" in stacks and "destroy_node" in stacks, stacks
    assert result["hung_at_exit"] == stderr.name and result["answered"] == 4, result
    assert soak.requests([result], 10)["clients_hung_at_exit"] == [stderr.name]
    line = '{"sent": 1}\n'
    assert soak_clients.read_result(line, 1, False) == ({"sent": 1}, "exit 1 in its teardown "
                                                  "(a hang past 10 s: 1)")  # fmt: skip
    assert soak_clients.read_result(line, 0, False) == ({"sent": 1}, "")
    assert soak_clients.read_result('{"error": "no server"}', 1, False)[1] == ""
    assert soak_clients.read_result(line, -9, True)[1] == "hung in its teardown (killed)"
    assert soak_clients.read_result("", -11, False) == (None, "")


def _figures(**changes) -> dict:
    """A clean soak's figures (the keys the verdict reads), with ``changes`` applied."""
    tally = {"sent": 200, "answered": 12, "refused": 188, "lost": 0, "late": 0,
             "client_errors": [], "clients_hung_at_exit": []}  # fmt: skip
    figures = {
        "requests": {"ask": dict(tally), "describe": dict(tally, sent=50)},
        "frames": {"cameras": [{"topic": "/soak/front/image_raw", "published": 90},
                               {"topic": "/soak/wide/image_raw", "published": 90}]},
        "shutdown": {"exit_status": 0, "seconds": 0.2},
    }  # fmt: skip
    for path, value in changes.items():
        *keys, last = path.split("__")
        target = figures
        for key in keys:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[int(last) if isinstance(target, list) else last] = value
    return figures


@pytest.mark.parametrize(
    ("changes", "said"),
    [({}, None),
     ({"requests__ask__lost": 2}, "2 ask requests lost"),
     ({"requests__describe__late": 1}, None),  # counted in the JSON, not failed
     ({"requests__ask__client_errors": ["exit 1: boom"]}, "a ask client failed: exit 1: boom"),
     ({"requests__ask__clients_hung_at_exit": ["stacks"]}, "1 ask clients hung at exit"),
     ({"frames__cameras__1": {"topic": "/soak/wide/image_raw",
                              "error": "no subscription on /soak/wide/image_raw after 60.0 s"}},
      "camera /soak/wide/image_raw: no subscription"),
     ({"shutdown__exit_status": -9}, "the node exited -9 on SIGINT")],
)  # fmt: skip
def test_the_soak_fails_on_anything_that_was_not_served_or_not_tested(changes, said):
    """The soak's exit status: a lost request, a failed or hung client, a camera that never
    delivered (found by a soak that exited 0 with its 1080p camera never matched), or an
    unclean node exit each fail it, by name; a clean run passes, and so does a late response
    (counted in the JSON: a loaded host's promise, not a lost request)."""
    from vlm_ros.commands.soak import verdict

    problems = verdict(_figures(**changes))
    if said is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith(said), problems
