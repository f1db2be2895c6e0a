"""The vlm_assistant lifecycle node over real rclpy and Fast DDS, with a tiny generated model.

One rclpy context in a domain of its own, one MultiThreadedExecutor spinning in a background
thread; every node gets its own namespace and camera topic so tests never hear each other. The
tiny checkpoint is written once per module.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ros_helpers import CANDIDATES, FeedbackTopic, Ros, start_node, wait_for

pytestmark = pytest.mark.ros


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def executor_alive(ros):
    """A test that killed the spinning executor fails here, not in every later test."""
    yield
    assert ros.thread.is_alive(), "the executor thread died"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from vlm_ros.model.tiny import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llava_phi", "llava_phi"))


def image_msg(
    i: int = 0,
    encoding: str = "rgb8",
    height: int = 48,
    width: int = 64,
    data: bytes | None = None,
    stamp=None,
):
    """A stamped Image with a different pattern per ``i``; frame_id names ``i``."""
    from sensor_msgs.msg import Image

    if data is None:
        rng = np.random.default_rng(i)
        data = rng.integers(0, 256, (height, width, 3), dtype=np.uint8).tobytes()
    msg = Image(encoding=encoding, height=height, width=width, step=width * 3, data=data)
    msg.header.frame_id = f"frame{i}"
    if stamp is not None:
        msg.header.stamp = stamp
    return msg


def compressed_msg(i: int, fmt: str, height: int = 48, width: int = 64):
    """A CompressedImage (``fmt`` jpeg or png) of a different pattern per ``i``."""
    from PIL import Image as Pil
    from sensor_msgs.msg import CompressedImage

    pixels = np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Pil.fromarray(pixels).save(buf, format=fmt.upper())
    msg = CompressedImage(format=fmt, data=buf.getvalue())
    msg.header.frame_id = f"frame{i}"
    return msg


class Camera:
    """A best-effort publisher on the node's camera topic that waits for the subscription."""

    def __init__(self, ros: Ros, ns: str, topic: str = "cam", msg_type=None):
        from sensor_msgs.msg import Image

        from vlm_ros.ros.node import SENSOR_QOS

        self.node = ros.client_node(f"{ns}_camera")
        self.pub = self.node.create_publisher(msg_type or Image, f"/{ns}/{topic}", SENSOR_QOS)
        wait_for(lambda: self.pub.get_subscription_count() > 0, what="camera subscription")

    def send(self, msg, node=None) -> int:
        """Publish until ``node`` has stored this very message (best effort may drop one);
        returns the copies published. A copy still in flight when the next is sent can arrive
        too, and a job may take each: a count per frame is at least 1 and at most this."""
        if msg.header.stamp.sec == 0 and msg.header.stamp.nanosec == 0:
            msg.header.stamp = self.node.get_clock().now().to_msg()
        for copies in range(1, 51):
            self.pub.publish(msg)
            if node is None or stored(node, msg, timeout=0.1):
                return copies
        raise AssertionError("the node never received the frame")


def stored(node, msg, timeout: float) -> bool:
    """Whether ``node`` keeps ``msg`` (same frame_id and stamp) as a latest frame by then."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for cam in node.config.cameras:
            frame = node.frames.latest(cam.topic)
            if frame is None:
                continue
            header = frame.msg.header
            if header.frame_id == msg.header.frame_id and header.stamp == msg.header.stamp:
                return True
        time.sleep(0.01)
    return False


def ask(
    ros: Ros, node, client_node, question="Is the path clear?", hint=False, timeout=15.0, camera=""
):
    """Call the node's ~/ask service and return the response."""
    from vlm_ros.srv import Ask

    client = client_node.create_client(Ask, f"{node.get_fully_qualified_name()}/ask")
    wait_for(client.service_is_ready, what="ask service")
    request = Ask.Request(question=question, want_action_hint=hint, camera=camera)
    future = client.call_async(request)
    wait_for(future.done, timeout, what="ask response")
    return future.result()


@pytest.fixture(scope="module")
def main_node(ros, checkpoint):
    # no frame age limit (test_stale_frame_is_refused tests it): ask() discovers a new client
    # after the frame is sent, which took 1.7 s on a loaded host against the default 1 s
    node = start_node(ros, checkpoint, "main", scene_rate_hz=4.0, hint_rate_hz=4.0,
                      max_frame_age_ms=0.0)  # fmt: skip
    return node, Camera(ros, "main"), ros.client_node("main_probe")


# ---- tests ---------------------------------------------------------------------------------------


def test_periodic_outputs_carry_the_source_header_and_diagnostics_arrive(ros, main_node):
    from diagnostic_msgs.msg import DiagnosticArray

    from vlm_ros.msg import ActionHint, SceneAnswer

    node, camera, probe = main_node
    got: dict[str, list] = {"scene": [], "hint": [], "diag": []}
    base = node.get_fully_qualified_name()
    subs = [
        probe.create_subscription(SceneAnswer, f"{base}/scene_answer", got["scene"].append, 10),
        probe.create_subscription(ActionHint, f"{base}/action_hint", got["hint"].append, 10),
        probe.create_subscription(DiagnosticArray, "/diagnostics", got["diag"].append, 10),
    ]
    sent = {}
    for i in range(40):
        msg = image_msg(i)
        camera.send(msg)
        sent[msg.header.frame_id] = msg.header.stamp
        if got["scene"] and got["hint"] and len(got["diag"]) > 1:
            break
        time.sleep(0.1)
    wait_for(lambda: got["scene"] and got["hint"], what="scene answer and action hint")
    scene, hint = got["scene"][0], got["hint"][0]
    for out in (scene, hint):
        assert sent[out.header.frame_id] == out.header.stamp  # the very image it came from
        assert out.camera == "/main/cam"
        assert out.latency.total_ms > 0 and out.latency.image_to_output_ms > 0
    assert scene.question == node.config.scene_prompt and scene.num_tokens >= 1
    assert list(hint.candidates) == CANDIDATES and abs(sum(hint.probabilities) - 1) < 1e-4
    assert hint.action in CANDIDATES and 0 < hint.confidence <= 1

    def our_status():
        for array in got["diag"]:
            for st in array.status:
                if st.hardware_id == base and "total_p50_ms" in {kv.key for kv in st.values}:
                    return st
        return None

    status = wait_for(our_status, what="diagnostics with stage figures")
    values = {kv.key: kv.value for kv in status.values}
    assert status.name == "vlm_assistant: latency"
    for key in (
        "vision_p90_ms",
        "vision_p99_ms",
        "prefill_p50_ms",
        "image_to_output_p99_ms",
        "frames_received",
        "frames_dropped",
        "frames_rejected",
        "queue_depth",
        "budget_total_ms",
    ):
        assert key in values, key
    assert float(values["total_p50_ms"]) > 0
    del subs  # not destroyed while the executor spins (see vlm_ros.ros.node's docstring)


def test_ask_answers_with_an_action_hint(ros, main_node):
    node, camera, probe = main_node
    msg = image_msg(100)
    camera.send(msg, node)
    resp = ask(ros, node, probe, hint=True)
    assert resp.success, resp.error_message
    assert resp.answer and resp.stop_reason in ("eos", "max_new_tokens")
    assert resp.image_stamp == msg.header.stamp and resp.image_age_ms >= 0
    assert resp.latency.total_ms > 0 and resp.latency.prefill_ms > 0
    assert resp.hint.action in CANDIDATES and resp.hint.header.stamp == msg.header.stamp


def test_describe_streams_partial_text(ros, main_node):
    from rclpy.action import ActionClient

    from vlm_ros.action import Describe

    node, camera, probe = main_node
    camera.send(image_msg(101), node)
    action = f"{node.get_fully_qualified_name()}/describe"
    client = ActionClient(probe, Describe, action)
    assert client.wait_for_server(timeout_sec=10)
    topic = FeedbackTopic(probe, action)  # every feedback, also any landing after the result
    feedback = []
    goal = client.send_goal_async(
        Describe.Goal(max_new_tokens=12), feedback_callback=lambda fb: feedback.append(fb.feedback)
    )
    handle = wait_for(lambda: goal.done() and goal.result(), what="goal accepted")
    result = handle.get_result_async()
    wait_for(result.done, 60, what="describe result")
    res = result.result().result
    assert res.success, res.error_message
    uuid = bytes(handle.goal_id.uuid)
    # the last feedback may trail the result (another topic): wait for it on the topic
    texts = wait_for(lambda: (t := topic.texts(uuid)) and t[-1] == res.answer and t, 60,
                     what="the last feedback, equal to the answer")  # fmt: skip
    tokens = [fb.tokens_generated for u, fb in topic.messages if u == uuid]
    assert tokens == list(range(1, len(tokens) + 1))  # one per token, none lost
    # the ActionClient callback got the same messages, up to the result (rclpy then drops it)
    assert [f.partial_text for f in feedback] == texts[: len(feedback)]


def test_bad_images_are_counted_and_the_node_keeps_serving(ros, main_node):
    node, camera, probe = main_node
    bad = [
        ("unknown_encoding", image_msg(200, encoding="32FC1")),
        ("truncated", image_msg(201, data=bytes(100))),
        ("zero_size", image_msg(202, height=0, width=0, data=b"")),
    ]
    before, copies = node.monitor.counters(), {}
    for reason, msg in bad:
        copies[reason] = camera.send(msg, node)
        resp = ask(ros, node, probe)
        assert not resp.success and f"bad image ({reason})" in resp.error_message
    after = node.monitor.counters()
    for reason, _ in bad:  # once per copy that arrived (1 unless send() had to repeat it)
        key = f"frames_rejected_{reason}"
        assert 1 <= after.get(key, 0) - before.get(key, 0) <= copies[reason], (key, copies)
    camera.send(image_msg(203), node)
    assert ask(ros, node, probe).success


def test_stale_frame_is_refused(ros, checkpoint):
    # 3 s: a fresh frame must be served even on two loaded cores (a new service client per
    # call plus discovery has taken several hundred ms there); then it must go stale.
    node = start_node(ros, checkpoint, "stale", max_frame_age_ms=3000.0)
    probe = ros.client_node("stale_probe")
    resp = ask(ros, node, probe)
    assert not resp.success and "no frame" in resp.error_message
    Camera(ros, "stale").send(image_msg(1), node)
    assert ask(ros, node, probe).success
    time.sleep(3.5)
    resp = ask(ros, node, probe)
    assert not resp.success and "stale" in resp.error_message


# The simulated model delay of slow_node. "At once" and "cancelled" are judged against it, as
# the functional requirement is (refused / stopped without waiting for the model), with most
# of it as margin for a loaded 2-core machine.
SLOW_MS = 3000.0


@pytest.fixture(scope="module")
def slow_node(ros, checkpoint):
    node = start_node(
        ros, checkpoint, "slow", queue_size=1, inference_delay_ms=SLOW_MS, max_frame_age_ms=0.0
    )
    camera = Camera(ros, "slow")
    camera.send(image_msg(1), node)
    return node, camera, ros.client_node("slow_probe")


def test_full_queue_is_refused_at_once(ros, slow_node):
    from vlm_ros.srv import Ask

    node, _, probe = slow_node
    client = probe.create_client(Ask, f"{node.get_fully_qualified_name()}/ask")
    wait_for(client.service_is_ready, what="ask service")
    first = client.call_async(Ask.Request(question="one"))
    wait_for(lambda: node.worker.stats["submitted"] >= 1 and node.worker.depth == 0)
    second = client.call_async(Ask.Request(question="two"))
    wait_for(lambda: node.worker.depth == 1, what="second request queued")
    t = time.monotonic()
    third = client.call_async(Ask.Request(question="three"))
    wait_for(third.done, 5, what="refusal")
    assert time.monotonic() - t < SLOW_MS / 2000  # refused without waiting for the model
    assert not first.done()  # the first request is still in the model: nothing waited for it
    assert not third.result().success and "queue is full" in third.result().error_message
    wait_for(lambda: first.done() and second.done(), 20, what="queued answers")
    assert first.result().success and second.result().success


def test_describe_can_be_cancelled(ros, slow_node):
    from action_msgs.msg import GoalStatus
    from rclpy.action import ActionClient

    from vlm_ros.action import Describe

    node, _, probe = slow_node
    client = ActionClient(probe, Describe, f"{node.get_fully_qualified_name()}/describe")
    assert client.wait_for_server(timeout_sec=10)
    goal = client.send_goal_async(Describe.Goal(question="Describe it."))
    handle = wait_for(lambda: goal.done() and goal.result(), what="goal accepted")
    time.sleep(0.3)  # running on the worker (in the simulated slow model)
    t = time.monotonic()
    wait_for(handle.cancel_goal_async().done, what="cancel response")
    result = handle.get_result_async()
    wait_for(result.done, 5, what="cancelled result")
    assert time.monotonic() - t < 0.8 * SLOW_MS / 1000  # well before the model delay ran out
    assert result.result().status == GoalStatus.STATUS_CANCELED
    assert result.result().result.stop_reason == "cancelled"


def test_a_scene_cut_short_by_exit_is_not_published(ros, checkpoint):
    """The process exits (stop_for_exit, as on Ctrl-C or ros2 launch's SIGINT) while a periodic
    scene answer is being generated: its generation stops at once, and the cut answer (here
    empty) is counted as a skipped periodic output, not published as the camera's scene."""
    from vlm_ros.msg import SceneAnswer

    node = start_node(ros, checkpoint, "exiting", scene_rate_hz=2.0,
                      inference_delay_ms=SLOW_MS, max_frame_age_ms=0.0)  # fmt: skip
    probe = ros.client_node("exiting_probe")
    scenes: list = []
    base = node.get_fully_qualified_name()
    sub = probe.create_subscription(SceneAnswer, f"{base}/scene_answer", scenes.append, 10)
    Camera(ros, "exiting").send(image_msg(1), node)
    wait_for(lambda: node.worker.stats["submitted"] >= 1 and node.worker.depth == 0,
             what="the periodic job running (in the simulated slow model)")  # fmt: skip
    skipped = node.monitor.counters().get("periodic_skipped", 0)
    node.stop_for_exit()
    counted = lambda: node.monitor.counters().get("periodic_skipped", 0) > skipped  # noqa: E731
    wait_for(counted, 0.8 * SLOW_MS / 1000, what="the cut scene answer counted as skipped")
    time.sleep(0.5)  # a publication would have arrived by now
    assert scenes == []
    node.trigger_shutdown()  # then, as the process does (ros.node._stop)
    ros.executor.remove_node(node)
    ros.nodes.remove(node)
    node.destroy_node()
    del sub


def describe_accepted(probe, node) -> bool:
    """Send a Describe goal; whether the node accepted it."""
    from rclpy.action import ActionClient

    from vlm_ros.action import Describe

    client = ActionClient(probe, Describe, f"{node.get_fully_qualified_name()}/describe")
    assert client.wait_for_server(timeout_sec=10)
    goal = client.send_goal_async(Describe.Goal(question="Describe it.", max_new_tokens=2))
    handle = wait_for(lambda: goal.done() and goal.result(), what="goal response")
    if handle.accepted:
        wait_for(handle.get_result_async().done, 15, what="describe result")
    return handle.accepted


def test_lifecycle_transitions_and_failed_configure(ros, checkpoint):
    from lifecycle_msgs.msg import State
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from vlm_ros.msg import SceneAnswer
    from vlm_ros.ros.node import AssistantNode

    node = start_node(ros, checkpoint, "life", scene_rate_hz=5.0)
    probe, camera = ros.client_node("life_probe"), Camera(ros, "life")
    scenes = []
    probe.create_subscription(
        SceneAnswer, f"{node.get_fully_qualified_name()}/scene_answer", scenes.append, 10
    )
    camera.send(image_msg(1), node)
    assert ask(ros, node, probe).success
    wait_for(lambda: scenes, what="a scene answer while active")

    # inactive: Ask refused cleanly, Describe rejected, no input taken, nothing published
    assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
    assert node._active == [] and node.assistant is not None
    time.sleep(0.3)  # an answer already on the wire arrives now
    published, received = len(scenes), node.monitor.counters()["frames_received"]
    resp = ask(ros, node, probe)
    assert not resp.success and "is not active" in resp.error_message, resp.error_message
    assert not describe_accepted(probe, node)
    for i in range(10):  # 1 s of fresh frames at 10 Hz
        msg = image_msg(10 + i)
        msg.header.stamp = camera.node.get_clock().now().to_msg()
        camera.pub.publish(msg)
        time.sleep(0.1)
    assert len(scenes) == published, "published on ~/scene_answer while inactive"
    assert node.monitor.counters()["frames_received"] == received

    # re-activated: serves again
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    camera.send(image_msg(2), node)
    assert ask(ros, node, probe).success
    assert describe_accepted(probe, node)
    wait_for(lambda: len(scenes) > published, what="a scene answer after re-activate")

    assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
    assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
    assert node.assistant is None and node.worker is None
    resp = ask(ros, node, probe)  # unconfigured: the same clean refusal
    assert not resp.success and "is not active" in resp.error_message, resp.error_message
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    camera.send(image_msg(3), node)
    assert ask(ros, node, probe).success

    missing = "/nonexistent/vlm_checkpoint"
    broken = ros.add(
        AssistantNode(
            namespace="broken",
            context=ros.ctx,
            parameter_overrides=[Parameter("model", value=missing)],
        )
    )
    assert broken.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert missing in broken.last_error
    assert broken._state_machine.current_state[0] == State.PRIMARY_STATE_UNCONFIGURED


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_camera_flood_keeps_the_queue_bounded_memory_flat_and_frames_accounted(ros, checkpoint):
    from rclpy.lifecycle import TransitionCallbackReturn

    from vlm_ros.serving.worker import PERIODIC

    node = start_node(
        ros,
        checkpoint,
        "flood",
        queue_size=2,
        inference_delay_ms=100.0,
        scene_rate_hz=10.0,
        hint_rate_hz=10.0,
        max_new_tokens=2,
    )
    camera, probe = Camera(ros, "flood"), ros.client_node("flood_probe")
    big = [image_msg(i, height=480, width=640) for i in range(4)]
    big.insert(0, image_msg(9, height=480, width=640, data=bytes(1000)))  # truncated: rejected
    depths, rss = [], []
    start = time.monotonic()
    for i in range(8 * 30):  # 8 s at 30 Hz
        msg = big[i % len(big)]
        msg.header.stamp = camera.node.get_clock().now().to_msg()
        camera.pub.publish(msg)
        depths.append(node.worker.depth)
        if i % 30 == 29 and i >= 59:  # once a second after a 2 s warm-up
            rss.append(rss_mb())
        time.sleep(max(0.0, start + (i + 1) / 30 - time.monotonic()))
    assert max(depths) <= 2
    growth = [round(r - rss[0], 1) for r in rss]
    # a leak of only the processed frames (~6/s x 0.9 MB) would add ~27 MB over the 5 s sample
    assert max(growth) < 16, f"RSS grew during the flood (MB over the 2 s sample): {growth}"
    resp = ask(ros, node, probe)  # queries still go first
    assert resp.success, resp.error_message
    # The flood's truncated frames are rejected only when a job takes one, which a slow host
    # may never do; this one is taken by the query (or a periodic job before it) for sure.
    camera.send(image_msg(10, height=480, width=640, data=bytes(1000)), node)
    refused = ask(ros, node, probe)
    assert not refused.success and refused.error_message

    # quiet: no more input or periodic work, the last job done
    assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
    wait_for(lambda: node.worker.depth == 0, what="queued periodic jobs gone")
    node.worker.submit(lambda: None, PERIODIC).result(timeout=10)
    c = node.monitor.counters()
    held = node.frames.held()
    assert c["frames_received"] >= 120
    assert c["frames_processed"] >= 5 and c["frames_dropped"] > 0 and c["frames_rejected"] > 0
    assert c.get("periodic_skipped", 0) > 0 and c.get("outputs", 0) >= 5
    accounted = c["frames_processed"] + c["frames_dropped"] + c["frames_rejected"]
    assert held <= 1 and c["frames_received"] == accounted + held, (c, held)


def test_compressed_camera_answers_and_rejects_a_bad_payload(ros, checkpoint):
    from sensor_msgs.msg import CompressedImage

    node = start_node(ros, checkpoint, "comp", cameras=["/comp/cam/compressed"])
    camera = Camera(ros, "comp", "cam/compressed", CompressedImage)
    probe = ros.client_node("comp_probe")
    for i, fmt in enumerate(("jpeg", "png")):
        msg = compressed_msg(i, fmt)
        camera.send(msg, node)
        resp = ask(ros, node, probe, hint=True)
        assert resp.success, f"{fmt}: {resp.error_message}"
        assert resp.answer and resp.image_stamp == msg.header.stamp
        assert resp.hint.header.stamp == msg.header.stamp
    before = node.monitor.counters()
    bad = compressed_msg(2, "jpeg")
    bad.data = bad.data[:200]  # a jpeg cut short: the header parses, the pixels do not
    copies = camera.send(bad, node)
    resp = ask(ros, node, probe)
    assert not resp.success and "bad image (decode_failed)" in resp.error_message, resp
    after = node.monitor.counters()
    for key in ("frames_rejected", "frames_rejected_decode_failed"):  # 1 per copy (send())
        assert 1 <= after.get(key, 0) - before.get(key, 0) <= copies, (key, copies)
    good = compressed_msg(3, "png")
    camera.send(good, node)
    resp = ask(ros, node, probe)
    assert resp.success and resp.image_stamp == good.header.stamp, resp.error_message


def test_synthetic_camera_drives_the_node(ros, checkpoint):
    from rclpy.parameter import Parameter

    from vlm_ros.msg import SceneAnswer
    from vlm_ros.ros.synthetic_camera import SyntheticCamera

    node = start_node(ros, checkpoint, "synth", scene_rate_hz=5.0)
    got = []
    probe = ros.client_node("synth_probe")
    probe.create_subscription(
        SceneAnswer, f"{node.get_fully_qualified_name()}/scene_answer", got.append, 10
    )
    params = [
        Parameter("topic", value="/synth/cam"),
        Parameter("width", value=64),
        Parameter("height", value=48),
        Parameter("use_world", value=False),
    ]
    ros.add(
        SyntheticCamera(
            rate_hz=10.0, context=ros.ctx, namespace="synth", parameter_overrides=params
        )
    )
    wait_for(lambda: got, what="a scene answer from synthetic frames")
    assert got[0].header.frame_id == "camera" and got[0].header.stamp.sec > 0


def test_node_command_builds_ros_arguments(tmp_path):
    import argparse

    from vlm_ros.commands import node as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    params = tmp_path / "p.yaml"
    params.write_text("/**:\n  ros__parameters:\n    model: demo\n")
    args = parser.parse_args(["--demo", "--params-file", str(params), "--ros-args", "-p", "a:=1"])
    assert args.demo
    assert command.ros_arguments(args)[1:] == [
        "--ros-args",
        "--params-file",
        str(params),
        "-p",
        "a:=1",
    ]
    args = parser.parse_args(["--namespace", "robot1", "--camera-topic", "/front/image_raw"])
    remaps = ["-r", "__ns:=/robot1", "-r", "/camera/image_raw:=/front/image_raw"]
    assert command.ros_arguments(args)[1:] == ["--ros-args", *remaps]
    with pytest.raises(OSError, match="does not exist"):
        command.ros_arguments(parser.parse_args(["--params-file", str(tmp_path / "missing")]))


def test_vlm_ros_node_demo_answers_and_exits_cleanly_on_sigint(ros, tmp_path):
    """The plain entry point in a process of its own: demo model + synthetic camera, namespaced
    and remapped so nothing else hears it; SIGINT ends it with status 0."""
    from vlm_ros.msg import SceneAnswer

    ns = f"demo{os.getpid()}"
    probe, got = ros.client_node(f"{ns}_probe"), []
    probe.create_subscription(SceneAnswer, f"/{ns}/vlm_assistant/scene_answer", got.append, 10)
    command = [
        sys.executable,
        "-m",
        "vlm_ros",
        "node",
        "--demo",
        "--namespace",
        ns,
        "--camera-topic",
        f"/{ns}/cam",
        "--camera-rate",
        "5",
        "--ros-args",
        "-p",
        "threads:=1",
        "-p",
        "hint_rate_hz:=0.0",
        "-p",
        "scene_rate_hz:=2",  # an integer for a double, as users type it
        "-p",
        "max_new_tokens:=4",
    ]
    env = dict(os.environ, ROS_DOMAIN_ID=str(ros.domain), PYTHONUNBUFFERED="1")
    log = tmp_path / "node.log"
    # started with SIGINT ignored, as a shell's background job is: the node must still stop
    default = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=Path(__file__).resolve().parents[1],
            )
    finally:
        signal.signal(signal.SIGINT, default)
    try:
        wait_for(lambda: got or proc.poll() is not None, 60, what="a SceneAnswer from the demo")
        assert got, f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert got[0].header.frame_id == "camera" and got[0].header.stamp.sec > 0
        assert probe.count_publishers(f"/{ns}/cam") == 1  # the demo camera, remapped
        assert probe.count_subscribers(f"/{ns}/cam") == 1  # the node, remapped the same way
        t = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            tail = log.read_text()[-3000:]
            raise AssertionError(f"no exit 10 s after SIGINT:\n{tail}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, f"exit status {rc} after SIGINT:\n{log.read_text()[-3000:]}"
    assert time.monotonic() - t < 10
    # the demo asks the demo model what it was trained on, and logs what it published
    from vlm_ros.demo.data import CAPTION_PROMPT

    assert got[0].question == CAPTION_PROMPT
    assert f"scene: {got[0].answer!r}" in log.read_text()
    # first impressions: the node speaks before the heavy imports, then reports the load
    lines = [ln for ln in log.read_text().splitlines() if "vlm_assistant]" in ln]
    steps = [
        "configuring: model 'demo'",
        "importing the model runtime",
        "loading model 'demo'",
        "configured: llava_phi from 'demo' in",
        "active: cameras",
    ]
    found = [next(i for i, ln in enumerate(lines) if step in ln) for step in steps]
    # only the DDS transport line (vlm_ros.ros.transport) may come before "configuring"
    assert found == sorted(found) and all("DDS transport" in ln for ln in lines[: found[0]])


def test_output_topics_resolve_as_the_shared_names_say(ros, main_node):
    """eval-bag derives its topics with vlm_ros.ros.names.resolve; rclpy must agree."""
    from vlm_ros.ros import names

    node, _, _ = main_node
    assert node.get_namespace() == "/main"
    for kind, name in (("scene", names.SCENE_ANSWER), ("hint", names.ACTION_HINT)):
        expected = names.resolve(name, node.get_name(), node.get_namespace())
        assert node._pubs[kind].topic_name == expected == f"/main/vlm_assistant/{name[2:]}"


def counted(before: dict, after: dict) -> dict:
    """Counters that changed between two snapshots, by how much."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def test_hostile_and_core_refused_frames_are_rejected_by_reason_once(ros, checkpoint):
    """A 4x4 frame (the core's minimum side is 8), a frame over max_image_pixels and a 65 KB PNG
    declaring 8192x8192 are each rejected once with their reason, however many jobs ask about
    them, never counted processed or stale; the node keeps answering."""
    from sensor_msgs.msg import CompressedImage

    from vlm_ros.bench.hostile_images import bomb_png

    cams = ["/hostile/cam", "/hostile/cam/compressed"]
    node = start_node(ros, checkpoint, "hostile", cameras=cams, max_image_pixels=2500)
    raw, compressed = (
        Camera(ros, "hostile"),
        Camera(ros, "hostile", "cam/compressed", CompressedImage),
    )
    probe = ros.client_node("hostile_probe")
    bomb = CompressedImage(format="png", data=bomb_png(8192, 8192))
    bomb.header.frame_id = "bomb"
    cases = [
        (raw, cams[0], image_msg(300, height=4, width=4), "too_small"),
        (raw, cams[0], image_msg(301, height=48, width=64), "too_large"),  # 3072 > 2500 pixels
        (compressed, cams[1], bomb, "too_large"),
    ]
    for camera, topic, msg, reason in cases:
        before = node.monitor.counters()
        copies = camera.send(msg, node)
        for _ in range(3):  # three jobs on one frame: one rejection, one conversion attempt
            resp = ask(ros, node, probe, camera=topic)
            assert not resp.success and f"bad image ({reason})" in resp.error_message, resp
        change = counted(before, node.monitor.counters())
        for key in ("frames_rejected", f"frames_rejected_{reason}"):  # per copy, not per job
            assert 1 <= change.get(key, 0) <= copies, (key, copies, change)
        assert "frames_processed" not in change and "frames_stale" not in change, change
    raw.send(image_msg(302, height=40, width=60), node)  # 2400 pixels: served
    assert ask(ros, node, probe, camera=cams[0]).success


def test_context_overflow_is_a_rejected_frame_not_a_stale_one(ros, checkpoint):
    node = start_node(ros, checkpoint, "overflow", max_seq_len=16)
    camera, probe = Camera(ros, "overflow"), ros.client_node("overflow_probe")
    before = node.monitor.counters()
    copies = camera.send(image_msg(400), node)
    resp = ask(ros, node, probe)
    assert not resp.success and "does not fit the context" in resp.error_message
    change = counted(before, node.monitor.counters())
    assert 1 <= change.get("frames_rejected_context_overflow", 0) <= copies, (change, copies)
    assert "frames_processed" not in change and "frames_stale" not in change, change


# ---- parameters: checked at configure, live or refused with the reason on set -----------------


def set_params(probe, node, **values) -> list:
    """SetParameters from another node (rclpy's parameter client, as `ros2 param set` does)."""
    from rclpy.parameter import Parameter
    from rclpy.parameter_client import AsyncParameterClient

    client = AsyncParameterClient(probe, node.get_fully_qualified_name())
    assert client.wait_for_services(timeout_sec=10)
    future = client.set_parameters([Parameter(k, value=v) for k, v in values.items()])
    wait_for(future.done, what="set_parameters response")
    return list(future.result().results)


def test_parameters_apply_live_or_are_refused_with_the_reason(ros, checkpoint):
    from vlm_ros.msg import SceneAnswer

    node = start_node(ros, checkpoint, "live", max_new_tokens=6)  # no periodic work yet
    camera, probe = Camera(ros, "live"), ros.client_node("live_probe")
    scenes: list = []
    topic = f"{node.get_fully_qualified_name()}/scene_answer"
    probe.create_subscription(SceneAnswer, topic, scenes.append, 10)
    live = {
        "scene_rate_hz": 5,
        "scene_prompt": "Describe it.",
        "max_new_tokens": 2,
        "budget_total_ms": 0.001,
    }
    results = set_params(probe, node, **live)  # 5: an integer for a double
    assert all(r.successful for r in results), [r.reason for r in results]
    assert node.config.scene_rate_hz == 5.0 and node.config.budgets.total == 0.001

    def answered_live():
        camera.pub.publish(image_msg(len(scenes), stamp=camera.node.get_clock().now().to_msg()))
        return [m for m in scenes if m.question == "Describe it."]

    got = wait_for(answered_live, 20, what="a scene answer at the live rate and prompt")
    assert got[0].num_tokens <= 2 and "total" in got[0].budget_misses

    refused = [
        ("model", "/other/checkpoint", "model cannot change on a configured node"),
        ("device", "cuda", "device cannot change on a configured node"),
        ("dtype", "float16", "dtype cannot change on a configured node"),
        ("threads", -4, "parameter threads: -4 is not allowed; expected an integer >= 0"),
        ("scene_rate_hz", "fast", "parameter scene_rate_hz: 'fast' is not allowed"),
    ]
    for name, value, words in refused:
        before = node.get_parameter(name).value
        (result,) = set_params(probe, node, **{name: value})
        assert not result.successful and words in result.reason, result.reason
        assert node.get_parameter(name).value == before
    (result,) = set_params(probe, node, model="/other/checkpoint")
    assert "deactivate" in result.reason and "configure" in result.reason  # says how

    (result,) = set_params(probe, node, scene_rate_hz=0.0)  # live: periodic answers stop
    assert result.successful and "scene" not in node._plan.kinds
    time.sleep(0.5)  # an answer already in flight lands now
    count = len(scenes)
    for i in range(5):
        camera.pub.publish(image_msg(900 + i, stamp=camera.node.get_clock().now().to_msg()))
        time.sleep(0.1)
    assert len(scenes) == count


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("max_seq_len", 0, "parameter max_seq_len: 0 is not allowed; expected an integer >= 1"),
        ("threads", -4, "parameter threads: -4 is not allowed; expected an integer >= 0"),
    ],
)
def test_bad_values_fail_configure_in_one_line(ros, checkpoint, name, value, words):
    from lifecycle_msgs.msg import State
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from vlm_ros.ros.node import AssistantNode

    overrides = [Parameter("model", value=checkpoint), Parameter(name, value=value)]
    node = ros.add(
        AssistantNode(namespace=f"bad_{name}", context=ros.ctx, parameter_overrides=overrides)
    )
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert words in node.last_error and "\n" not in node.last_error
    assert node._state_machine.current_state[0] == State.PRIMARY_STATE_UNCONFIGURED
    assert node.assistant is None


def test_device_errors_name_the_parameter_not_a_cli_flag(ros, checkpoint):
    """Under ros2 launch there is no --device flag: the hint says device:=cpu."""
    import torch
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from vlm_ros.ros.node import AssistantNode

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: device cuda loads instead of failing")
    overrides = [Parameter("model", value=checkpoint), Parameter("device", value="cuda")]
    node = ros.add(
        AssistantNode(namespace="nocuda", context=ros.ctx, parameter_overrides=overrides)
    )
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert "the device parameter (device:=cpu)" in node.last_error, node.last_error
    assert "--device" not in node.last_error


def test_vlm_ros_node_demo_gives_captions_their_budget():
    from vlm_ros.demo.data import CAPTION_MAX_NEW_TOKENS, CAPTION_PROMPT
    from vlm_ros.ros.node import DEMO_OVERRIDES

    assert DEMO_OVERRIDES["max_new_tokens"] == CAPTION_MAX_NEW_TOKENS  # not the default 32
    assert DEMO_OVERRIDES["scene_prompt"] == CAPTION_PROMPT


def test_a_finished_request_leaves_no_reference_cycle_holding_its_frame():
    """The job's done callbacks (kept by the Future after they ran) hold the Waiting entry, and
    it held the job: a cycle holding the job's result, and with it the camera frame, until
    Python's cycle collector ran (6 MB an answered Ask with a 1080p camera; +800 MB RSS over
    10 000 Asks in one run, docs/NODE.md). Claimed, the entry drops the job: with the
    collector off, the result is freed as soon as the last plain reference goes."""
    import concurrent.futures
    import gc
    import threading
    import types
    import weakref

    from vlm_ros.ros.node import AssistantNode, Waiting

    class Payload:  # stands for the Result and its frame
        pass

    class Done:  # the rclpy Future the request coroutine awaits
        def set_result(self, value):
            self.value = value

    waits, lock = set(), threading.Lock()
    host = types.SimpleNamespace(_waits=waits, _waits_lock=lock)
    host._claim = types.MethodType(AssistantNode._claim, host)
    gc.disable()
    try:
        job, payload = concurrent.futures.Future(), Payload()
        alive = weakref.ref(payload)
        waiting = Waiting(job, Done(), give_up=0.0)
        waits.add(waiting)
        job.add_done_callback(lambda j: AssistantNode._job_finished(host, waiting, j))
        job.set_result(payload)
        assert waiting.job is None and waiting.done.value is payload and not waits
        del payload, job
        waiting.done = None  # the coroutine has taken its result
        assert alive() is None
    finally:
        gc.enable()


def test_a_failed_request_leaves_no_reference_cycle_holding_its_frame(ros, checkpoint):
    """A failure carries its traceback, and the traceback keeps its frames' locals: the
    worker's frame held the job (job -> Future -> exception -> traceback -> frame -> job), and
    the Ask coroutine's frames held its Futures the same way. Each such cycle kept the failed
    request's Result, with its camera frame, until Python's cycle collector ran. With the
    collector off, no Result of a failed Ask may outlive its response."""
    import gc

    from vlm_ros.ros.node import Result

    node = start_node(ros, checkpoint, "failcycle", max_frame_age_ms=0.0)  # CI: 4 Asks > 1 s
    probe = ros.client_node("failcycle_probe")
    Camera(ros, "failcycle").send(image_msg(1), node)
    assert ask(ros, node, probe).success

    def results() -> int:  # this node's only: the module's other nodes keep answering
        return sum(type(o) is Result and "failcycle" in o.frame.camera for o in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        before = results()
        for _ in range(4):
            resp = ask(ros, node, probe, question=" ")  # refused in the worker: a failed job
            assert not resp.success and "question is empty" in resp.error_message
        wait_for(lambda: node.worker.stats["failed"] >= 4, what="four failed jobs")
        # <=: the warm-up answer's Result may still be counted in ``before``
        assert results() <= before, "a failed request's Result (and frame) is held by a cycle"
    finally:
        gc.enable()


def test_an_unexpected_failure_is_logged_with_its_traceback_then_dropped():
    """A bug in the model path answers the caller in one line, logs where it happened, and
    then lets go of the traceback (and with it the request's frames; see the test above)."""
    import types

    from vlm_ros.ros.node import AssistantNode

    logged: list[str] = []
    logger = types.SimpleNamespace(error=logged.append)
    host = types.SimpleNamespace(config=None, get_logger=lambda: logger, _count=lambda _name: 1)

    def model_step():
        raise RuntimeError("shape mismatch")

    try:
        try:
            model_step()
        except RuntimeError as inner:
            raise ValueError("decode failed") from inner
    except ValueError as exc:
        failure = exc
    text = AssistantNode._refused(host, "Ask", failure)
    assert text == "inference failed: ValueError: decode failed"
    assert len(logged) == 1 and logged[0].startswith(f"Ask: {text}\nTraceback")
    assert "model_step" in logged[0] and "RuntimeError: shape mismatch" in logged[0]
    assert failure.__traceback__ is None and failure.__cause__.__traceback__ is None


def test_rejected_frames_of_periodic_jobs_are_freed_without_the_cycle_collector(ros, checkpoint):
    """A frame that fails to convert keeps its error, and a periodic job's failure reached its
    done callback with a traceback through frames holding that frame: each rejected frame (a
    full camera message) stayed in a cycle until Python's cycle collector ran. With the
    collector off, rejected frames must not pile up."""
    import gc

    from vlm_ros.serving.frames import Frame

    node = start_node(ros, checkpoint, "badcycle", scene_rate_hz=10.0, max_frame_age_ms=0.0)
    camera = Camera(ros, "badcycle")

    def frames() -> int:  # this node's only: other nodes of the module keep theirs
        return sum(type(o) is Frame and "badcycle" in o.camera for o in gc.get_objects())

    def rejected() -> int:
        return node.monitor.counters().get("frames_rejected_truncated", 0)

    camera.send(image_msg(1), node)
    gc.collect()
    gc.disable()
    try:
        before = frames()
        for i in range(6):
            count = rejected()
            camera.send(image_msg(100 + i, data=bytes(100)), node)  # truncated: rejected
            wait_for(lambda c=count: rejected() > c, what=f"bad frame {i} rejected")
        camera.send(image_msg(2), node)  # the last bad frame is no longer the latest
        wait_for(lambda: node.monitor.counters().get("frames_processed", 0) > 0)
        time.sleep(0.5)
        assert frames() <= before + 2, f"{frames() - before} more Frames alive (cycles)"
    finally:
        gc.enable()
