"""The node with ``backend: remote`` over real rclpy and DDS, against real HTTP servers on
local sockets (test/wire_server.py: the scriptable fault injector; the project's own
``vlm-ros serve`` is in test_remote_serve.py).

* Ask and Describe answer through the server; Describe's feedback grows with each streamed
  chunk (the server waits for the node's feedback before it sends the next one);
* StageLatency and /diagnostics split encode / network / server_queue from the server's own
  stages, and budgets apply to them;
* the server down at start: the node configures, Ask is refused with "server unreachable at
  URL", /diagnostics is ERROR; the node recovers by itself once the server listens;
* HTTP faults reach the Ask caller as one-line errors, and the node keeps serving.
"""

from __future__ import annotations

import time

import pytest
from net_helpers import free_port
from ros_helpers import FeedbackTopic, start_node, wait_for
from test_node import Camera, ask, image_msg
from wire_server import MODEL, PIECES, VLM, WireServer

pytestmark = pytest.mark.ros


@pytest.fixture
def server():
    srv = WireServer()
    yield srv
    srv.close()


def remote_node(ros, ns: str, url: str, **params):
    values = dict(backend="remote", server_url=url, remote_model=MODEL, image_encoding="png")
    return start_node(ros, "unused-with-backend-remote", ns, **values, **params)


class Diagnostics:
    def __init__(self, probe, hardware_id: str):
        from diagnostic_msgs.msg import DiagnosticArray

        self.hardware_id, self.arrays = hardware_id, []
        probe.create_subscription(DiagnosticArray, "/diagnostics", self.arrays.append, 50)

    def latest(self, name_part: str):
        for array in reversed(self.arrays):
            for st in array.status:
                if st.hardware_id == self.hardware_id and name_part in st.name:
                    return st
        return None

    def values(self, name_part: str) -> dict[str, str]:
        status = self.latest(name_part)
        return {kv.key: kv.value for kv in status.values} if status else {}


def test_remote_node_answers_with_the_latency_split(ros, server):
    from diagnostic_msgs.msg import DiagnosticStatus

    node = remote_node(ros, "rmain", server.url, budget_encode_ms=0.0001)
    camera, probe = Camera(ros, "rmain"), ros.client_node("rmain_probe")
    diag = Diagnostics(probe, node.get_fully_qualified_name())
    camera.send(image_msg(1), node)
    resp = ask(ros, node, probe, hint=True)
    assert resp.success, resp.error_message
    assert resp.answer == "The path is clear." and resp.stop_reason == "eos"
    lat = resp.latency
    assert lat.encode_ms > 0 and lat.server_queue_ms == pytest.approx(VLM["queue_ms"])
    assert lat.vision_ms == pytest.approx(VLM["timings_ms"]["vision"]) and lat.network_ms >= 0
    assert lat.total_ms >= lat.encode_ms
    assert resp.hint.action in resp.hint.candidates and resp.hint.latency.server_queue_ms == 3.0
    assert [p for p, _ in server.requests] == ["/v1/chat/completions", "/v1/rank"]
    # /diagnostics: the server's status, the remote stages in the window, the encode budget
    wait_for(lambda: diag.values(": latency").get("misses_encode") == "2", 15,
             what="misses_encode in /diagnostics")  # fmt: skip
    values = diag.values(": latency")
    assert float(values["encode_p50_ms"]) > 0 and float(values["server_queue_max_ms"]) == 7.0
    wait_for(lambda: diag.values(": server").get("reachable") == "yes", 15, what="server OK")
    status = diag.latest(": server")
    assert status.level == DiagnosticStatus.OK and status.values
    assert diag.values(": server")["action_hints"] == "rank"


def test_describe_feedback_streams_token_by_token(ros, server):
    from rclpy.action import ActionClient

    from vlm_ros.action import Describe

    server.mode = "gated"
    node = remote_node(ros, "rdesc", server.url)
    camera, probe = Camera(ros, "rdesc"), ros.client_node("rdesc_probe")
    camera.send(image_msg(2), node)
    action = f"{node.get_fully_qualified_name()}/describe"
    client = ActionClient(probe, Describe, action)
    assert client.wait_for_server(timeout_sec=10)
    topic = FeedbackTopic(probe, action)  # also the last feedback, if it trails the result
    feedback = []

    def on_feedback(fb) -> None:
        feedback.append(fb.feedback.partial_text)
        server.gate.set()  # the server sends the next chunk only after this

    goal = client.send_goal_async(Describe.Goal(question="q"), feedback_callback=on_feedback)
    handle = wait_for(lambda: goal.done() and goal.result(), what="goal accepted")
    result = handle.get_result_async()
    wait_for(result.done, 60, what="describe result")
    res = result.result().result
    assert res.success, res.error_message
    assert res.answer == "The path is clear."
    assert server.gate_ok == [True] * (len(PIECES) - 1)
    want = ["".join(PIECES[: i + 1]).strip() for i in range(len(PIECES))]
    uuid = bytes(handle.goal_id.uuid)
    wait_for(lambda: len(topic.texts(uuid)) >= len(want), 60, what="the last feedback")
    assert topic.texts(uuid) == want
    assert feedback == want[: len(feedback)]  # the callback's, up to the result


def test_server_down_at_start_then_up(ros):
    """Also the periodic scene answers: failed (counted, the latency status ERROR) while the
    server is down, published again once it is up."""
    from diagnostic_msgs.msg import DiagnosticStatus

    from vlm_ros.msg import SceneAnswer

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    node = remote_node(ros, "rdown", url, connect_timeout_s=1.0, diagnostics_period_s=0.3,
                       scene_rate_hz=4.0, max_frame_age_ms=0.0)  # fmt: skip
    camera, probe = Camera(ros, "rdown"), ros.client_node("rdown_probe")
    scenes: list = []
    probe.create_subscription(
        SceneAnswer, f"{node.get_fully_qualified_name()}/scene_answer", scenes.append, 10
    )
    diag = Diagnostics(probe, node.get_fully_qualified_name())
    camera.send(image_msg(3), node)
    resp = ask(ros, node, probe)
    assert not resp.success and f"server unreachable at {url}" in resp.error_message
    wait_for(lambda: (s := diag.latest(": server")) and s.level == DiagnosticStatus.ERROR, 15,
             what="server status ERROR")  # fmt: skip
    assert diag.values(": server")["reachable"] == "no"
    wait_for(lambda: int(diag.values(": latency").get("failed", 0)) > 0, 15, what="failed > 0")
    assert not scenes
    srv = WireServer(port=port)
    try:
        wait_for(lambda: (s := diag.latest(": server")) and s.level == DiagnosticStatus.OK, 15,
                 what="server status OK again")  # fmt: skip
        camera.send(image_msg(4), node)
        resp = ask(ros, node, probe)
        assert resp.success and resp.answer == "The path is clear.", resp.error_message
        camera.send(image_msg(5), node)
        wait_for(lambda: scenes, 15, what="a scene answer once the server is up")
        assert scenes[-1].answer == "The path is clear."
    finally:
        srv.close()


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        ("e500", "HTTP 500 internal_error"),
        ("e503", "overloaded"),
        ("truncated", "truncated"),
        ("malformed", "malformed stream event"),
        ("stall", "request_timeout_s"),
    ],
)
def test_http_faults_reach_the_caller_and_the_node_keeps_serving(ros, server, mode, words):
    ns = f"rfault{mode}"
    node = remote_node(ros, ns, server.url, request_timeout_s=2.0)
    camera, probe = Camera(ros, ns), ros.client_node(f"{ns}_probe")
    camera.send(image_msg(5), node)
    server.mode, server.stall_s = mode, 10.0
    start = time.monotonic()
    resp = ask(ros, node, probe, timeout=30.0)
    assert not resp.success and words in resp.error_message and server.url in resp.error_message
    assert time.monotonic() - start < 25.0  # bounded by request_timeout_s, not the stall
    server.mode = "ok"
    camera.send(image_msg(6), node)
    resp = ask(ros, node, probe)
    assert resp.success, resp.error_message
