"""Client processes of the reliability suite and `vlm-ros soak`: real rclpy clients and cameras.

Each role runs in a process of its own (``python -m vlm_ros.ros.soak_clients ROLE ...``), as a
robot's other nodes would, and prints one JSON object on stdout when done:

* ``ask``: every ``period`` seconds from ``start`` (a time.time() shared by all processes, so
  twenty of them burst together), fire ``count`` Ask calls at once on a default-QoS client;
  report each call's outcome (answered, refused with a reason, lost = no response within
  ``timeout``) and latency, and how many came after the node's ``promise`` (late).
* ``describe``: the same with Describe goals; a goal response (accepted or rejected) is
  awaited, then an accepted goal's result. The tally counts the goal's outcome: answered (its
  result succeeded), refused (a rejected goal, or a result that failed, by reason) or lost (no
  goal response, or an accepted goal without a result within ``timeout``); late is counted
  at the goal response.
* ``camera``: publish sensor_msgs/Image frames (rgb8/bgr8, any size) at ``rate`` Hz, best
  effort or reliable, optionally every ``bad_every``-th frame a bad one (truncated, unknown
  encoding, zero size, in turn); report how many were published.

Before its first burst every ask and describe client completes one handshake round trip the
node refuses at once (_handshake): its requests are then known to reach the node and its
replies to come back. Each prints its result before rclpy's teardown, which is bounded
(_teardown); read_result() reads a finished client's result and says if its teardown went wrong.

Refusal reasons are read from the node's one-line error messages (REASONS).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import rclpy
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

from vlm_ros.action import Describe
from vlm_ros.srv import Ask

# substring of the node's error message -> reason (first match wins)
REASONS = (
    ("queue is full", "queue_full"),
    ("evicted", "queue_full"),
    ("loading model", "loading"),
    ("is not active", "not_active"),
    ("no frame received", "no_frame"),
    ("is stale", "stale_frame"),
    ("bad image", "bad_image"),
    ("expired in the queue", "expired"),
    ("no answer within", "timeout"),
    ("overloaded", "server_busy"),  # backend remote: the server's 503
    ("draining", "server_busy"),
    ("server unreachable", "server_unreachable"),
)
BAD_FRAMES = ("truncated", "unknown_encoding", "zero_size")
SETTLE_S = 1.0  # after the server is found, before the first request (see _settle)
# The handshake's requests name this camera: the node refuses them at once, before its queue,
# so a round trip proves both directions matched without costing the node any work.
HANDSHAKE_CAMERA = "vlm_ros_soak_handshake"
HANDSHAKE_TRY_S = 3.0  # a handshake request unanswered this long is sent again
STACKS_SIGNAL = signal.SIGUSR1  # a client writes every thread's stack to stderr on it
TEARDOWN_S = 10.0  # rclpy's teardown after the tally; longer is a hang (see _teardown)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str | None, bool]:
    """Wait for a client process: (stdout, stderr or None when not piped, hung). One still
    running after ``timeout`` s is sent STACKS_SIGNAL first, so its stderr says where each of
    its threads waits, then killed; what it printed before is kept (a client prints its result
    before tearing rclpy down, so a hang in the teardown still gives its tally)."""
    try:
        out, err = proc.communicate(timeout=timeout)
        return out, err, False
    except subprocess.TimeoutExpired:
        proc.send_signal(STACKS_SIGNAL)
        try:
            out, err = proc.communicate(timeout=2.0)  # it may exit on its own meanwhile
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return out, err, True


def reason(error_message: str) -> str:
    """The refusal reason named by one of the node's error messages ("other" if none)."""
    for needle, name in REASONS:
        if needle in error_message:
            return name
    return "other"


class Tally:
    """Outcomes of requests: answered / refused by reason / lost, and answer latencies."""

    def __init__(self):
        self.sent = 0
        self.answered = 0
        self.refused: Counter[str] = Counter()
        self.lost = 0
        self.late = 0  # responses after the node's promise (still responses: not lost)
        self.answer_ms: list[float] = []
        self.refusal_ms: list[float] = []

    def as_dict(self) -> dict:
        return {
            "sent": self.sent, "answered": self.answered, "refused": sum(self.refused.values()),
            "refused_by_reason": dict(self.refused), "lost": self.lost, "late": self.late,
            "answer_ms": [round(x, 1) for x in self.answer_ms],
            "refusal_ms": [round(x, 1) for x in self.refusal_ms],
        }  # fmt: skip


def _spin_until(executor, done, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not done() and time.monotonic() < end:
        executor.spin_once(timeout_sec=0.05)


def _burst_times(start: float, period: float, duration: float) -> list[float]:
    """time.time() of each burst: start, start + period, ... before start + duration."""
    n = max(1, int(duration // period)) if period > 0 else 1
    return [start + i * period for i in range(n)]


def _wait_until(executor, when: float) -> None:
    while time.time() < when:
        executor.spin_once(timeout_sec=min(0.05, max(0.0, when - time.time())))


def _handshake(executor, attempt, args: argparse.Namespace) -> int | None:
    """Round trips until one completes; returns how many were tried (None: none completed in
    ``args.wait``). Why: wait_for_service / wait_for_server see only this client's side of the
    discovery. Until the server has matched this client too, a request can miss the server's
    reader, and a reply waits max_blocking_time (config/fastdds_large_frames.xml) and is then
    dropped. On a loaded host this lagged past the settle time and the reply writer's 1 s (1
    of 200 burst replies lost in a CI run). A robot's clients are long-lived; the first call
    of a new one is where this race lives, so every client has made one before it is counted.
    ``attempt(seconds)`` sends one request and spins until its response or the time is up."""
    end, tries = time.monotonic() + args.wait, 0
    while time.monotonic() < end:
        tries += 1
        if attempt(min(HANDSHAKE_TRY_S, end - time.monotonic())):
            return tries
    return None


def ask_role(args: argparse.Namespace, node, executor) -> dict:
    client = node.create_client(Ask, args.service)  # default QoS, as a user's client has
    if not client.wait_for_service(timeout_sec=args.wait):
        return {"error": f"service {args.service} not available after {args.wait} s"}

    def attempt(seconds: float) -> bool:
        future = client.call_async(Ask.Request(question=args.question, camera=HANDSHAKE_CAMERA))
        _spin_until(executor, future.done, seconds)
        if not future.done():
            client.remove_pending_request(future)
        return future.done()

    ready, handshake = _settle(executor, args, attempt)
    if handshake is None:
        return {"error": f"no handshake response from {args.service} in {args.wait} s"}
    tally = Tally()
    for when in _burst_times(args.start, args.period, args.duration):
        _wait_until(executor, when)
        sent = time.monotonic()
        request = Ask.Request(question=args.question, camera=args.camera)
        futures = [client.call_async(request) for _ in range(args.count)]
        tally.sent += len(futures)
        arrived = _await_all(executor, futures, sent, args, tally)
        for f, ms in zip(futures, arrived, strict=True):
            if ms is None:
                client.remove_pending_request(f)
                continue
            response = f.result()
            if response.success:
                tally.answered += 1
                tally.answer_ms.append(ms)
            else:
                tally.refused[reason(response.error_message)] += 1
                tally.refusal_ms.append(ms)
    return {**tally.as_dict(), "ready": ready, "handshake_tries": handshake}


def _await_all(executor, futures: list, sent: float, args, tally: Tally) -> list[float | None]:
    """Spin until every future is done or ``args.timeout`` passed; returns each one's arrival
    in ms after ``sent`` (None: lost, counted in ``tally``), counting those after the node's
    ``args.promise`` as late in ``tally``."""
    arrived: list[float | None] = [None] * len(futures)

    def all_done() -> bool:
        for i, f in enumerate(futures):
            if arrived[i] is None and f.done():
                arrived[i] = (time.monotonic() - sent) * 1000.0
        return all(ms is not None for ms in arrived)

    _spin_until(executor, all_done, args.timeout)
    tally.lost += sum(ms is None for ms in arrived)
    if args.promise:
        tally.late += sum(ms is not None and ms > args.promise * 1000.0 for ms in arrived)
    return arrived


def _settle(executor, args: argparse.Namespace, attempt) -> tuple[float, int | None]:
    """After wait_for_service: give the server time to discover this client's response reader
    too (discovery is not symmetric). A request sent before that is answered into the void:
    rmw_fastrtps waits the reply writer's max_blocking_time for the match (100 ms by default; 1 s
    with the node's config/fastdds_large_frames.xml), then drops the response ("failed to send
    response (timeout)"). Then one completed round trip (_handshake) proves the match. Then,
    with ``--barrier DIR``, say ready (DIR/ready-NAME) and wait for DIR/go, which holds the
    time.time() of the first burst (args.start is set from it). Returns time.time() when ready
    and the handshake's tries (None: it failed, and this client is not ready)."""
    _wait_until(executor, time.time() + SETTLE_S)
    handshake = _handshake(executor, attempt, args)
    ready = time.time()
    if handshake is None:
        return ready, None
    if args.barrier:
        barrier = Path(args.barrier)
        (barrier / f"ready-{args.name}").write_text(str(ready))
        go = barrier / "go"
        end = time.monotonic() + args.wait
        while not go.is_file() and time.monotonic() < end:
            executor.spin_once(timeout_sec=0.05)
        if go.is_file():
            args.start = float(go.read_text())
    return ready, handshake


def release(barrier: Path, clients: int, timeout: float, lead_s: float = 2.0) -> float:
    """The other side of --barrier: wait until ``clients`` processes are ready, then start
    them all ``lead_s`` from now; returns that start time (time.time())."""
    end = time.monotonic() + timeout
    while len(list(barrier.glob("ready-*"))) < clients and time.monotonic() < end:
        time.sleep(0.1)
    start = time.time() + lead_s
    tmp = barrier / "go.tmp"
    tmp.write_text(repr(start))
    tmp.rename(barrier / "go")  # atomic: a client never reads half a number
    return start


def describe_role(args: argparse.Namespace, node, executor) -> dict:
    client = ActionClient(node, Describe, args.service)
    if not client.wait_for_server(timeout_sec=args.wait):
        return {"error": f"action {args.service} not available after {args.wait} s"}

    def attempt(seconds: float) -> bool:  # the goal service, then the result service
        end = time.monotonic() + seconds
        goal = Describe.Goal(question=args.question, camera=HANDSHAKE_CAMERA, max_new_tokens=1)
        sent = client.send_goal_async(goal)
        _spin_until(executor, sent.done, seconds)
        if not sent.done():
            return False
        if not sent.result().accepted:  # not active (yet): the result service is unproven
            _spin_until(executor, lambda: False, max(0.0, end - time.monotonic()))
            return False
        result = sent.result().get_result_async()
        _spin_until(executor, result.done, max(0.0, end - time.monotonic()))
        return result.done()

    ready, handshake = _settle(executor, args, attempt)
    if handshake is None:
        return {"error": f"no handshake result from {args.service} in {args.wait} s"}
    tally, accepted, rejected, results = Tally(), 0, 0, Counter()
    for when in _burst_times(args.start, args.period, args.duration):
        _wait_until(executor, when)
        goal = Describe.Goal(question=args.question, camera=args.camera, max_new_tokens=4)
        sent = time.monotonic()
        goals = [client.send_goal_async(goal) for _ in range(args.count)]
        tally.sent += len(goals)
        _await_all(executor, goals, sent, args, tally)
        handles = [g.result() for g in goals if g.done()]
        refused_goals = sum(not h.accepted for h in handles)
        accepted += len(handles) - refused_goals
        rejected += refused_goals
        if refused_goals:
            tally.refused["rejected"] += refused_goals
        pending = [h.get_result_async() for h in handles if h.accepted]
        _spin_until(executor, lambda p=pending: all(r.done() for r in p), args.timeout)
        for r in pending:
            if not r.done():
                results["no_result"] += 1
                tally.lost += 1
            elif r.result().result.success:
                results["succeeded"] += 1
                tally.answered += 1
            else:
                why = reason(r.result().result.error_message)
                results[why] += 1
                tally.refused[why] += 1
    out = {**tally.as_dict(), "ready": ready, "handshake_tries": handshake}
    out.update(goal_responses=accepted + rejected, accepted=accepted, rejected=rejected,
               results=dict(results))  # fmt: skip
    return out


def frame(width: int, height: int, encoding: str, seed: int) -> Image:
    """A noise frame of the given size and encoding (rgb8/bgr8)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image(height=height, width=width, encoding=encoding, step=width * 3,
                 data=pixels.tobytes())  # fmt: skip


def bad_frame(kind: str) -> Image:
    """One of BAD_FRAMES: a frame the node must refuse (counted by reason) and survive."""
    if kind == "truncated":
        return Image(height=480, width=640, encoding="rgb8", step=1920, data=bytes(1000))
    if kind == "unknown_encoding":
        return Image(height=4, width=4, encoding="32FC1", step=16, data=bytes(64))
    return Image(height=0, width=0, encoding="rgb8", step=0, data=b"")


def camera_role(args: argparse.Namespace, node, _executor) -> dict:
    reliability = ReliabilityPolicy.RELIABLE if args.reliable else ReliabilityPolicy.BEST_EFFORT
    qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=reliability)
    pub = node.create_publisher(Image, args.topic, qos)
    end = time.monotonic() + args.wait
    while rclpy.ok() and pub.get_subscription_count() == 0 and time.monotonic() < end:
        time.sleep(0.05)
    if not rclpy.ok():
        return {"error": "stopped (SIGTERM/SIGINT) before a subscription appeared"}
    if pub.get_subscription_count() == 0:
        return {"error": f"no subscription on {args.topic} after {args.wait} s"}
    good = [frame(args.width, args.height, args.encoding, i) for i in range(4)]
    published, bad = 0, Counter()
    start = max(time.time(), args.start)
    while time.time() < start:
        time.sleep(0.01)
    t0 = time.monotonic()
    total = int(args.duration * args.rate)
    for i in range(total):
        if not rclpy.ok():  # SIGTERM/SIGINT: rclpy shut the context down; leave cleanly
            break
        if args.bad_every and i % args.bad_every == args.bad_every - 1:
            kind = BAD_FRAMES[(i // args.bad_every) % len(BAD_FRAMES)]
            msg = bad_frame(kind)
            bad[kind] += 1
        else:
            msg = good[i % len(good)]
        msg.header.stamp = node.get_clock().now().to_msg()
        msg.header.frame_id = f"frame{i}"
        try:
            pub.publish(msg)
        except Exception:
            if rclpy.ok():
                raise
            break  # the context went down between the check and the publish
        published += 1
        time.sleep(max(0.0, t0 + (i + 1) / args.rate - time.monotonic()))
    if rclpy.ok():
        time.sleep(0.5)  # let the last frames leave before the participant goes
    return {"published": published, "bad": dict(bad), "good": published - sum(bad.values())}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlm_ros.ros.soak_clients")
    p.add_argument("role", choices=("ask", "describe", "camera"))
    p.add_argument("--name", default="soak_client", help="node name")
    p.add_argument("--service", default="/vlm_assistant/ask", help="Ask service / Describe action")
    p.add_argument("--camera", default="", help="camera named in requests")
    p.add_argument("--question", default="Is the path ahead clear?")
    p.add_argument("--count", type=int, default=10, help="requests per burst")
    p.add_argument("--start", type=float, default=0.0, help="time.time() of the first burst")
    p.add_argument("--barrier", default="", help="folder: say ready, wait for go (release())")
    p.add_argument("--period", type=float, default=0.0, help="seconds between bursts")
    p.add_argument("--duration", type=float, default=0.0, help="seconds of bursts / frames")
    p.add_argument("--timeout", type=float, default=60.0, help="wait per burst for responses")
    p.add_argument("--promise", type=float, default=0.0,
                   help="seconds the node promises a response in (later: late)")  # fmt: skip
    p.add_argument("--wait", type=float, default=60.0, help="wait for the server / subscriber")
    p.add_argument("--topic", default="/camera/image_raw")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--encoding", default="rgb8", choices=("rgb8", "bgr8"))
    p.add_argument("--rate", type=float, default=30.0)
    p.add_argument("--reliable", action="store_true", help="reliable publisher (else best effort)")
    p.add_argument("--bad-every", type=int, default=0, help="every Nth frame a bad one")
    return p


ROLES = {"ask": ask_role, "describe": describe_role, "camera": camera_role}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    faulthandler.enable()  # a native crash says where it happened (stderr: the tests show it)
    faulthandler.register(STACKS_SIGNAL, all_threads=True)  # a hang too (finish())
    rclpy.init()
    node = rclpy.create_node(args.name)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        out = ROLES[args.role](args, node, executor)
        print(json.dumps(out), flush=True)  # final: written before the teardown
    finally:
        _teardown(node, executor)
    return 0 if "error" not in out else 1


def _teardown(node, executor) -> None:
    """In order: executor, node, context (a context shut down under live ones can crash).
    Bounded: rclpy's destroy_node once spun for minutes on a loaded host, after the tally (a
    reliability run, 1 of 60 on 2 cores beside two busy loops). Past TEARDOWN_S faulthandler's
    own thread (it needs no GIL, which a hang in C++ may hold) writes every thread's stack to
    stderr and exits 1, so the caller keeps the tally and names the hang (read_result())."""
    faulthandler.dump_traceback_later(TEARDOWN_S, exit=True)
    executor.shutdown()
    node.destroy_node()
    rclpy.try_shutdown()
    faulthandler.cancel_dump_traceback_later()


def read_result(out: str, returncode: int | None, hung: bool) -> tuple[dict | None, str]:
    """A finished client's printed result and what went wrong after it ("" if nothing).
    The result is printed before rclpy's teardown, so a client that hung or failed in the
    teardown (killed by finish(), or stopped by _teardown's watchdog) still has its tally;
    None: it printed none (it crashed or hung before the end)."""
    lines = out.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        return None, ""
    result = json.loads(lines[-1])
    if hung:
        return result, "hung in its teardown (killed)"
    if returncode != (1 if "error" in result else 0):
        return result, f"exit {returncode} in its teardown (a hang past {TEARDOWN_S:.0f} s: 1)"
    return result, ""


if __name__ == "__main__":
    sys.exit(main())
