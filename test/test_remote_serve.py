"""The remote backend against the project's own server: ``vlm-ros serve --model demo`` (Ray
Serve, CPU, one local Ray cluster started once for this module), over real HTTP.

* RemoteAssistant's greedy answers equal a local ``Assistant.answer`` token for token (PNG on
  the wire: the server decodes the same pixels), and its action-hint probabilities equal the
  local ``Assistant.rank`` within 1e-4;
* the node with ``backend: remote`` (real rclpy and DDS) answers Ask and streams Describe
  feedback equal to the local greedy run, feedback for feedback;
* three node processes (three robots, each with its camera and its Ask clients in processes
  of their own) share the server under a burst: every request is answered or refused naming
  why, none lost.

Ray Serve is the ``serve`` extra; scripts/setup.sh installs it, so under CI a missing ray is
a failure, not a skip.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from net_helpers import free_port
from ros_helpers import FeedbackTopic, start_node, wait_for
from test_node import Camera, ask
from wire_server import http_server_process

if not os.environ.get("CI"):
    pytest.importorskip("ray", reason="Ray Serve (the serve extra) is not installed")

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ("Is the path ahead clear?", "Describe the scene in front of the robot.")
CANDIDATES = ["continue", "slow_down", "stop", "turn_left", "turn_right"]
MAX_NEW = 24


def scene(index: int, width: int = 320, height: int = 240) -> np.ndarray:
    from vlm_ros.demo.world import render_frame

    return np.ascontiguousarray(render_frame(index, width, height)[:, :, :3])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`vlm-ros serve --model demo` in a process of its own; its URL once /v1/models answers."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-m", "vlm_ros", "serve", "--model", "demo", "--replicas", "1",
               "--port", str(port), "--threads", "1", "--device", "cpu"]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with http_server_process(command, log, url, "vlm-ros serve", 420, 90, cwd=ROOT, env=env):
        yield url


@pytest.fixture(scope="module")
def local():
    """The local reference: the demo model in this process, greedy, as the server runs it."""
    import torch

    from vlm_ros.config import RuntimeConfig
    from vlm_ros.infer.pipeline import Assistant

    threads = torch.get_num_threads()
    assistant = Assistant.load("demo", RuntimeConfig(threads=1))
    yield assistant
    assistant.close()
    torch.set_num_threads(threads)


def remote_client(url: str):
    from vlm_ros.config import RemoteConfig
    from vlm_ros.infer.remote import RemoteAssistant

    config = RemoteConfig(server_url=url, image_encoding="png", health_period_s=0.0,
                          request_timeout_s=120.0)  # fmt: skip
    return RemoteAssistant(config, "demo")


def test_remote_answers_equal_local_greedy_token_for_token(served, local):
    with remote_client(served) as remote:
        for index in (1, 7):
            image = scene(index)
            for question in QUESTIONS:
                texts: list[str] = []
                want = local.answer(image, question, max_new_tokens=MAX_NEW)
                got = remote.answer(image, question, max_new_tokens=MAX_NEW, on_text=texts.append)
                assert got.token_ids == want.token_ids, (index, question, got.text, want.text)
                assert (got.text, got.stop_reason) == (want.text, want.stop_reason)
                assert texts and texts[-1] == want.text
                t = got.timings
                assert t.vision > 0 and t.prefill > 0 and t.encode > 0 and t.network > 0
                assert t.total >= t.encode + t.network + t.server_queue


def test_remote_action_hints_equal_local_within_1e4(served, local):
    with remote_client(served) as remote:
        for index in (2, 5):
            want = local.rank(scene(index), "What should the robot do?", CANDIDATES)
            got = remote.rank(scene(index), "What should the robot do?", CANDIDATES)
            assert got.actions == want.actions
            np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-4)
        assert remote.server_status().ranking == "rank"


def test_unknown_model_and_oversized_image_on_the_real_server(served):
    from vlm_ros.config import RemoteConfig
    from vlm_ros.errors import ModelNotFoundError, RemoteInputError
    from vlm_ros.infer.remote import RemoteAssistant

    config = RemoteConfig(server_url=served, image_encoding="png", health_period_s=0.0)
    with RemoteAssistant(config, "llava-13b") as remote:
        with pytest.raises(ModelNotFoundError, match="llava-13b"):
            remote.answer(scene(1), "q", max_new_tokens=2)
    # over the server's 8 MiB: sent anyway (the client's own check lifted), refused with 413
    big = np.random.default_rng(0).integers(0, 256, (2200, 2200, 3), dtype=np.uint8)
    lifted = RemoteConfig(server_url=served, image_encoding="png", health_period_s=0.0,
                          max_image_bytes=1 << 30)  # fmt: skip
    with RemoteAssistant(lifted, "demo") as remote:
        with pytest.raises(RemoteInputError, match="413"):
            remote.answer(big, "q", max_new_tokens=2)


# ---- the node ----------------------------------------------------------------------------------


def image_msg_of(rgb: np.ndarray, i: int):
    from sensor_msgs.msg import Image

    h, w = rgb.shape[:2]
    msg = Image(encoding="rgb8", height=h, width=w, step=w * 3, data=rgb.tobytes())
    msg.header.frame_id = f"scene{i}"
    return msg


@pytest.mark.ros
def test_node_remote_ask_and_describe_equal_local_greedy(ros, served, local):
    from rclpy.action import ActionClient

    from vlm_ros.action import Describe

    node = start_node(ros, "demo", "rserve", backend="remote", server_url=served,
                      image_encoding="png", max_new_tokens=MAX_NEW,
                      query_timeout_s=120.0, request_timeout_s=120.0)  # fmt: skip
    camera, probe = Camera(ros, "rserve"), ros.client_node("rserve_probe")
    image = scene(4)
    camera.send(image_msg_of(image, 4), node)
    want = local.answer(image, QUESTIONS[0], max_new_tokens=MAX_NEW)
    resp = ask(ros, node, probe, question=QUESTIONS[0], timeout=150.0)
    assert resp.success, resp.error_message
    assert (resp.answer, resp.stop_reason) == (want.text, want.stop_reason)
    assert resp.latency.encode_ms > 0 and resp.latency.vision_ms > 0

    expected: list[str] = []
    want = local.answer(image, QUESTIONS[1], max_new_tokens=MAX_NEW, on_text=expected.append)
    camera.send(image_msg_of(image, 4), node)  # the same image again: the first may be stale now
    action = f"{node.get_fully_qualified_name()}/describe"
    client = ActionClient(probe, Describe, action)
    assert client.wait_for_server(timeout_sec=10)
    topic = FeedbackTopic(probe, action)  # also feedback landing after the result
    goal = client.send_goal_async(Describe.Goal(question=QUESTIONS[1]))
    handle = wait_for(lambda: goal.done() and goal.result(), what="goal accepted")
    result = handle.get_result_async()
    wait_for(result.done, 150, what="describe result")
    res = result.result().result
    assert res.success and res.answer == want.text, res.error_message
    # feedback and the result travel on separate topics: on a loaded host feedback can trail
    uuid = bytes(handle.goal_id.uuid)
    wait_for(lambda: len(topic.texts(uuid)) >= len(expected), 60, what="the last feedback")
    feedback = topic.texts(uuid)
    assert feedback == expected  # the same partial texts, in the same order, as local on_text


@pytest.mark.ros
def test_three_robots_share_one_server_under_a_burst(ros, served, tmp_path):
    from test_reliability import Diagnostics, collect, env, spawn

    from vlm_ros.ros import soak_clients

    robots, nodes, cameras = [f"robot{i}_{os.getpid()}" for i in range(3)], [], []
    try:
        for ns in robots:
            params = ["-p", "backend:=remote", "-p", f"server_url:={served}",
                      "-p", "remote_model:=demo", "-p", "scene_rate_hz:=0.0",
                      "-p", "hint_rate_hz:=0.0", "-p", "max_new_tokens:=8",
                      "-p", "queue_size:=3", "-p", "query_timeout_s:=90.0"]  # fmt: skip
            command = [sys.executable, "-m", "vlm_ros", "node", "--namespace", ns,
                       "--camera-topic", f"/{ns}/cam", "--ros-args", *params]  # fmt: skip
            log = open(tmp_path / f"{ns}.log", "w")
            nodes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                          env=env(ros), cwd=ROOT))  # fmt: skip
            cameras.append(spawn(ros, "camera", "--topic", f"/{ns}/cam", "--width", "320",
                                 "--height", "240", "--rate", "5", "--duration", "240",
                                 "--name", f"{ns}_cam"))  # fmt: skip
        probe = ros.client_node(f"burst_probe_{os.getpid()}")
        for ns, proc in zip(robots, nodes, strict=True):  # each node active, with a frame
            diag = Diagnostics(probe, f"/{ns}/vlm_assistant")
            ready = lambda d=diag, p=proc: d.counter("frames_received") > 0 or p.poll() is not None  # noqa: E731
            wait_for(ready, 180, what=f"{ns} active with camera frames")
            assert proc.poll() is None, (tmp_path / f"{ns}.log").read_text()[-3000:]
        barrier = tmp_path / "barrier"
        barrier.mkdir()
        clients = [
            spawn(
                ros,
                "ask",
                "--service",
                f"/{ns}/vlm_assistant/ask",
                "--count",
                "8",
                "--timeout",
                "150",
                "--wait",
                "120",
                "--barrier",
                str(barrier),
                "--name",
                f"{ns}_ask",
            )  # fmt: skip
            for ns in robots
        ]
        soak_clients.release(barrier, len(clients), 240)
        results = [collect(c, 240) for c in clients]
    finally:
        for proc in [*cameras, *nodes]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # SIGINT is ignored in background jobs
        for proc in [*cameras, *nodes]:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    sent = sum(r["sent"] for r in results)
    answered = sum(r["answered"] for r in results)
    refused = sum(r["refused"] for r in results)
    lost = sum(r["lost"] for r in results)
    reasons: dict[str, int] = {}
    for r in results:
        for k, v in r["refused_by_reason"].items():
            reasons[k] = reasons.get(k, 0) + v
    print(f"burst: {sent} sent, {answered} answered, refused {reasons}, {lost} lost")
    assert sent == 24 and lost == 0 and answered + refused == 24, (answered, reasons, lost)
    assert all(r["answered"] >= 1 for r in results), results  # every robot got answers
    assert set(reasons) <= {"queue_full", "server_busy"}, reasons
