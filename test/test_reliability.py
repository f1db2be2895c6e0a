"""Reliability suite (issue 15 items 1, 2, 5, 6): the node as `vlm-ros node` runs it, in a
process of its own on the demo model, with real rclpy clients and cameras in other processes
(vlm_ros.ros.soak_clients) over real DDS.

* every request gets a response: 200 concurrent Asks from 20 client processes, 50 concurrent
  Describe goals from 5; each an answer or a refusal naming why, none lost;
* camera frames from another process: 1280x720 rgb8 and 1920x1080 bgr8 at 30 Hz, best effort
  and reliable publishers, >= 95% reach the node; /diagnostics warns about a silent camera;
* names: outputs, logs and Ask use the resolved (namespaced, remapped) camera topic;
* shutdown: SIGINT -> exit 0 well inside launch's 5 s with the last log line kept, also while
  a full-size random-weight LLaVA-Phi is loaded (slow; the model is built in bfloat16, 6 GB).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from ros_helpers import wait_for

pytestmark = pytest.mark.ros

ROOT = Path(__file__).resolve().parents[1]
NS = f"rel{os.getpid()}"
CAMERA = f"/{NS}/front/image_raw"  # remapped onto the node's default /camera/image_raw
SERVICE = f"/{NS}/vlm_assistant/ask"
ACTION = f"/{NS}/vlm_assistant/describe"
SHUTDOWN_LIMIT_S = 3.0  # launch escalates to SIGTERM after 5 s


def env(ros, **extra) -> dict:
    return dict(os.environ, ROS_DOMAIN_ID=str(ros.domain), PYTHONUNBUFFERED="1", **extra)


def camera_env(ros) -> dict:
    """What docs/NODE.md tells a camera driver in another process to set."""
    from vlm_ros.ros.transport import PROFILE_VARIABLE, profile_path

    return env(ros, **{PROFILE_VARIABLE: str(profile_path())})


def spawn(ros, role: str, *args: str, environ: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "vlm_ros.ros.soak_clients", role, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environ or env(ros), cwd=ROOT)  # fmt: skip


def collect(proc: subprocess.Popen, timeout: float) -> dict:
    """A client's result. A hang or crash before it fails the test with the client's stacks.
    One after it, in rclpy's teardown, leaves the tally standing, as the soak counts it; it is
    not the node's, and a warning (in pytest's summary) says what it was, with the stacks."""
    from vlm_ros.ros import soak_clients

    out, err, hung = soak_clients.finish(proc, timeout)
    result, teardown = soak_clients.read_result(out, proc.returncode, hung)
    if result is None:  # faulthandler's header and first (crashing) thread lead, then the last
        said = f"did not finish in {timeout} s" if hung else f"no result (exit {proc.returncode})"
        raise AssertionError(f"client {said}:\n{out[-1000:]}\n{err[:2500]}\n...\n{err[-1500:]}")
    assert "error" not in result, result["error"]
    if teardown:
        warnings.warn(f"a client {teardown} after its tally:\n{err[-3000:]}", stacklevel=2)
    return result


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (rclpy's handler shuts its context down; SIGINT is ignored in background jobs),
    then SIGKILL after 10 s. A participant that leaves is unmatched at once; a killed one stays
    matched in its peers until its lease runs out."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_node(ros, log: Path, *ros_args: str, command=None) -> subprocess.Popen:
    command = command or [sys.executable, "-m", "vlm_ros", "node", "--namespace", NS,
                          "--camera-topic", CAMERA, "--ros-args"]  # fmt: skip
    params = ["-p", "threads:=1", "-p", "max_new_tokens:=8", "-p", "hint_rate_hz:=0.0",
              "-p", "scene_rate_hz:=1.0", "-p", "diagnostics_period_s:=0.5"]  # fmt: skip
    out = open(log, "w")
    return subprocess.Popen([*command, *params, *ros_args], stdout=out, stderr=subprocess.STDOUT,
                            env=env(ros), cwd=ROOT)  # fmt: skip


def stop_node(proc: subprocess.Popen, log: Path) -> tuple[int, float]:
    """SIGINT; the exit status and the seconds it took."""
    t = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"no exit 15 s after SIGINT:\n{log.read_text()[-3000:]}") from None
    return rc, time.monotonic() - t


def ask_once(ros, probe, service: str = SERVICE, camera: str = "", timeout: float = 30.0):
    """One Ask answered within ``timeout``. A request sent just after discovery can lose its
    response (the server's response writer not yet matched to this client's reader, a DDS
    race that a loaded host widens), so an unanswered request is sent again every 15 s, as a
    robot's client would; a node that never answers still fails after ``timeout``."""
    from vlm_ros.srv import Ask

    client = probe.create_client(Ask, service)
    wait_for(client.service_is_ready, 60, what=f"service {service}")
    end = time.monotonic() + timeout
    while True:
        future = client.call_async(Ask.Request(question="Is the path ahead clear?", camera=camera))
        wait = min(15.0, end - time.monotonic())
        try:
            wait_for(future.done, wait, what="ask response")
            return future.result()
        except AssertionError:
            client.remove_pending_request(future)
            if time.monotonic() + 0.1 >= end:
                raise


class Diagnostics:
    """The node's /diagnostics, as a probe node hears it."""

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

    def counter(self, key: str) -> int:
        status = self.latest(": latency")
        values = {kv.key: kv.value for kv in status.values} if status else {}
        return int(values.get(key, 0))


@pytest.fixture(scope="module")
def node(ros, tmp_path_factory):
    """`vlm-ros node` on the demo model, namespaced and remapped; active and answering."""
    log = tmp_path_factory.mktemp("reliability") / "node.log"
    proc = start_node(ros, log)
    probe = ros.client_node(f"{NS}_probe")
    diag = Diagnostics(probe, f"/{NS}/vlm_assistant")
    try:
        wait_for(lambda: diag.latest(": latency") or proc.poll() is not None, 120,
                 what="the node active (diagnostics)")  # fmt: skip
        assert proc.poll() is None, log.read_text()[-3000:]
        yield proc, log, probe, diag
    finally:
        if proc.poll() is None:
            rc, _ = stop_node(proc, log)
            assert rc == 0, log.read_text()[-3000:]


def small_camera(ros, seconds: float, rate: float = 10.0) -> subprocess.Popen:
    args = ["--topic", CAMERA, "--width", "320", "--height", "240", "--rate", str(rate),
            "--duration", str(seconds), "--name", f"{NS}_smallcam"]  # fmt: skip
    return spawn(ros, "camera", *args)


def test_200_concurrent_asks_from_20_processes_all_get_a_response(ros, node, tmp_path):
    from vlm_ros.ros import soak_clients

    _, log, _, diag = node
    camera = small_camera(ros, 90)
    wait_for(lambda: diag.counter("frames_received") > 0, 60, what="camera frames")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    args = ["--service", SERVICE, "--count", "10", "--timeout", "60", "--barrier", str(barrier)]
    clients = [spawn(ros, "ask", *args, "--name", f"{NS}_ask{i}") for i in range(20)]
    start = soak_clients.release(
        barrier, 20, 180
    )  # all 20 processes up and matched: burst together
    results = [collect(c, 120) for c in clients]
    stop(camera)
    late = [r["ready"] - start for r in results if r["ready"] > start]
    assert not late, f"clients ready after the burst began (s): {late}: a test timing problem"
    sent = sum(r["sent"] for r in results)
    answered = sum(r["answered"] for r in results)
    refused = sum(r["refused"] for r in results)
    lost = sum(r["lost"] for r in results)
    reasons = {}
    for r in results:
        for k, v in r["refused_by_reason"].items():
            reasons[k] = reasons.get(k, 0) + v
    # a lost one names its client and what the node logged about replies it could not send
    unsent = [line for line in log.read_text().splitlines() if "failed to send" in line]
    per_client = [(r["handshake_tries"], r["sent"], r["answered"], r["refused"], r["lost"])
                  for r in results]  # fmt: skip
    assert sent == 200 and lost == 0 and answered + refused == 200, (
        answered, reasons, lost, per_client, unsent[-5:])  # fmt: skip
    assert answered >= 1, reasons
    assert set(reasons) <= {"queue_full"}, reasons  # every refusal names why
    refusal_ms = sorted(ms for r in results for ms in r["refusal_ms"])
    assert refusal_ms[len(refusal_ms) // 2] < 5000, refusal_ms  # refused at once, not after a wait
    assert "refused so far" in log.read_text()  # refusals are logged with their count


def test_50_concurrent_describe_goals_all_get_a_goal_response(ros, node, tmp_path):
    from vlm_ros.ros import soak_clients

    diag = node[3]
    camera = small_camera(ros, 60)
    wait_for(lambda: diag.counter("frames_received") > 0, 60, what="camera frames")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    args = ["--service", ACTION, "--count", "10", "--timeout", "60", "--barrier", str(barrier)]
    clients = [spawn(ros, "describe", *args, "--name", f"{NS}_describe{i}") for i in range(5)]
    start = soak_clients.release(barrier, 5, 180)
    results = [collect(c, 150) for c in clients]
    stop(camera)
    late = [r["ready"] - start for r in results if r["ready"] > start]
    assert not late, f"clients ready after the burst began (s): {late}: a test timing problem"
    assert sum(r["goal_responses"] for r in results) == 50, results
    assert sum(r["lost"] for r in results) == 0
    outcomes = {}
    for r in results:
        for k, v in r["results"].items():
            outcomes[k] = outcomes.get(k, 0) + v
    assert outcomes.get("succeeded", 0) >= 1 and "no_result" not in outcomes, outcomes
    assert set(outcomes) <= {"succeeded", "queue_full"}, outcomes
    # the tally counts each goal's outcome, as Ask's does: every goal answered or refused
    assert sum(r["answered"] for r in results) == outcomes["succeeded"], results
    assert sum(r["refused"] for r in results) == outcomes.get("queue_full", 0), results
    assert sum(r["answered"] + r["refused"] for r in results) == 50, results


@pytest.mark.parametrize(
    "width,height,encoding,reliable",
    [(1280, 720, "rgb8", False), (1280, 720, "rgb8", True),
     (1920, 1080, "bgr8", False), (1920, 1080, "bgr8", True)],
)  # fmt: skip
def test_camera_frames_from_another_process_reach_the_node(
    ros, node, width, height, encoding, reliable
):
    """A second attempt is allowed: other work on the 2 shared CI cores (load average 35 was
    seen) can starve the receiving process for longer than DDS buffers 1080p frames. Both
    counts are in the failure message; without the profile it is 0-8 of 150 (docs/NODE.md)."""
    _, _, _, diag = node
    args = ["--topic", CAMERA, "--width", str(width), "--height", str(height), "--encoding",
            encoding, "--rate", "30", "--duration", "5", "--name", f"{NS}_cam{width}",
            *(["--reliable"] if reliable else [])]  # fmt: skip
    counts = []
    for _attempt in range(2):
        before = diag.counter("frames_received")
        result = collect(spawn(ros, "camera", *args, environ=camera_env(ros)), 90)
        time.sleep(1.5)  # the next diagnostics carry the counts
        counts.append(diag.counter("frames_received") - before)
        assert result["published"] == 150
        if counts[-1] >= 0.95 * 150:
            break
    assert counts[-1] >= 0.95 * 150, f"frames of 150 that reached the node, per attempt: {counts}"


def test_outputs_logs_and_ask_use_the_resolved_camera_topic(ros, node):
    from vlm_ros.msg import SceneAnswer

    _, log, probe, _ = node
    got = []
    probe.create_subscription(SceneAnswer, f"/{NS}/vlm_assistant/scene_answer", got.append, 10)
    camera = small_camera(ros, 30)
    try:
        wait_for(lambda: got, 30, what="a scene answer")
        assert got[-1].camera == CAMERA
        for name in (CAMERA, CAMERA.lstrip("/"), "/camera/image_raw", ""):
            response = ask_once(ros, probe, camera=name)
            assert response.success, (name, response.error_message)
        response = ask_once(ros, probe, camera="/elsewhere/image_raw")
        assert not response.success and CAMERA in response.error_message
    finally:
        stop(camera)
    text = log.read_text()
    assert f"active: cameras ['{CAMERA} (best_effort, keep_last 5)']" in text, text[-2000:]
    assert "fastdds_large_frames.xml" in text  # the transport it chose, logged


# A server answering a client whose reply reader it has not matched: the client's reply reader
# asks for transient-local durability, which the volatile reply writer cannot offer, so the two
# never match while the request side does. rmw_fastrtps then waits the reply writer's
# max_blocking_time before it drops the reply; the script prints that wait in seconds.
UNMATCHED_REPLY = """
import threading, time
import rclpy
from rclpy.executors import MultiThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile
from vlm_ros.srv import Ask

rclpy.init()
server, client_node = rclpy.create_node("reply_server"), rclpy.create_node("reply_client")
service = server.create_service(Ask, "reply_wait", lambda req, resp: resp)
send, waits = service.send_response, []

def timed(response, header):
    start = time.monotonic()
    send(response, header)
    waits.append(time.monotonic() - start)

service.send_response = timed  # the executor sends the reply through this attribute
qos = QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL)
client = client_node.create_client(Ask, "reply_wait", qos_profile=qos)
executor = MultiThreadedExecutor()
executor.add_node(server)
executor.add_node(client_node)
spinner = threading.Thread(target=executor.spin)
spinner.start()
end = time.monotonic() + 30
while server.count_clients("reply_wait") == 0 and time.monotonic() < end:
    time.sleep(0.05)
time.sleep(1.0)  # the request side matched both ways
client.call_async(Ask.Request())
while not waits and time.monotonic() < end:
    time.sleep(0.01)
print(waits[0] if waits else "none", flush=True)
executor.shutdown()  # in order: a thread still spinning at exit aborts the process
spinner.join()
server.destroy_node()
client_node.destroy_node()
rclpy.shutdown()
"""


def test_the_profile_gives_service_replies_a_second_to_match(ros):
    """config/fastdds_large_frames.xml's "service" data_writer profile: a reply waits up to 1 s
    (not Fast DDS's 100 ms) for its client's reader to match before it is dropped."""
    from vlm_ros.ros.transport import PROFILE_VARIABLE, profile_path

    def wait_s(profile: str | None) -> float:
        environ = env(ros)
        environ.pop(PROFILE_VARIABLE, None)
        if profile:
            environ[PROFILE_VARIABLE] = profile
        out = subprocess.run([sys.executable, "-c", UNMATCHED_REPLY], capture_output=True,
                             text=True, env=environ, cwd=ROOT, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        assert "client will not receive response" in out.stderr  # rmw dropped it, as expected
        return float(out.stdout.strip().splitlines()[-1])

    with_profile, default = wait_s(str(profile_path())), wait_s(None)
    assert with_profile >= 0.95, with_profile
    assert default < 0.95, default  # Fast DDS's own 100 ms: the profile is what changed it


def test_diagnostics_warn_when_a_matched_camera_sends_nothing(ros, node):
    from sensor_msgs.msg import Image

    _, _, probe, diag = node
    silent = probe.create_publisher(Image, CAMERA, 1)  # matched, never publishes
    try:
        time.sleep(1.0)

        def warned():
            status = diag.latest(f"camera {CAMERA}")
            return status if status is not None and status.level == b"\x01" else None

        status = wait_for(warned, 15, what="a camera WARN")
        assert "publisher(s) matched" in status.message and "no frame" in status.message
        assert "fastdds_large_frames.xml" in status.message  # the hint
        camera = small_camera(ros, 10)
        wait_for(lambda: diag.latest(f"camera {CAMERA}").level == b"\x00", 15,
                 what="the camera status back to OK once frames arrive")  # fmt: skip
        stop(camera)
    finally:
        probe.destroy_publisher(silent)


def test_sigint_exits_promptly_with_the_demo_model(ros, tmp_path):
    log = tmp_path / "demo.log"
    ns = f"{NS}d"
    command = [sys.executable, "-m", "vlm_ros", "node", "--demo", "--namespace", ns,
               "--camera-topic", f"/{ns}/cam", "--ros-args"]  # fmt: skip
    proc = start_node(ros, log, command=command)
    probe = ros.client_node(f"{ns}_probe")
    try:
        from vlm_ros.msg import SceneAnswer

        got = []
        probe.create_subscription(SceneAnswer, f"/{ns}/vlm_assistant/scene_answer", got.append, 5)
        wait_for(lambda: got or proc.poll() is not None, 120, what="a scene answer")
        rc, seconds = stop_node(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 0 and seconds < SHUTDOWN_LIMIT_S, (rc, seconds, text[-2000:])
    assert "shut down in" in text.splitlines()[-1]  # the last log line made it out


@pytest.mark.slow
def test_full_size_model_refuses_while_loading_and_exits_promptly(ros, tmp_path):
    """A full-size random-weight LLaVA-Phi (CLIP ViT-L/14-336 + Phi-2, bfloat16): while it is
    built the node refuses at once with "loading model"; loaded, SIGINT still exits fast."""
    log = tmp_path / "full.log"
    ns = f"{NS}f"
    command = [sys.executable, str(ROOT / "test" / "preset_node.py"), "llava-phi-full",
               "bfloat16", "--ros-args", "-r", f"__ns:=/{ns}"]  # fmt: skip
    proc = start_node(ros, log, command=command)
    probe = ros.client_node(f"{ns}_probe")
    service = f"/{ns}/vlm_assistant/ask"
    try:
        t = time.monotonic()
        # the reply's text shows it came while the model loaded (minutes): the timeout is only
        # for DDS on a loaded CI machine (a 10 s one was once missed there)
        response = ask_once(ros, probe, service=service, timeout=60)
        assert not response.success and "loading model" in response.error_message, response
        wait_for(lambda: "active: cameras" in log.read_text() or proc.poll() is not None, 900,
                 what="the full-size model loaded, the node active")  # fmt: skip
        assert proc.poll() is None, log.read_text()[-3000:]
        load_s = time.monotonic() - t
        response = ask_once(ros, probe, service=service, timeout=10)
        assert not response.success and "no frame" in response.error_message, response
        rc, seconds = stop_node(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 0 and seconds < SHUTDOWN_LIMIT_S, (rc, seconds, load_s, text[-2000:])
    assert "shut down in" in text.splitlines()[-1]


@pytest.mark.slow
def test_soak_command_writes_the_figures(ros, tmp_path):
    """`vlm-ros soak` for 20 s (two bursts): the JSON has every figure, nothing was lost.
    15 Ask client processes instead of the default 20: the option is honoured."""
    out = tmp_path / "soak.json"
    command = [sys.executable, "-m", "vlm_ros", "soak", "--duration", "20", "--burst-period",
               "10", "--ask-clients", "15", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(command, env=env(ros), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    ask, describe = figures["requests"]["ask"], figures["requests"]["describe"]
    assert not ask["client_errors"] and not describe["client_errors"], (ask, describe)
    assert figures["clients"] == {"ask": 15, "describe": 5, "requests_a_burst_each": 10}
    assert ask["sent"] == 300 and ask["lost"] == 0 and ask["answered"] >= 2, ask
    assert ask["answered"] + ask["refused"] == 300 and not ask["client_errors"], ask
    assert describe["goal_responses"] == 100 and describe["lost"] == 0, describe
    assert describe["answered"] + describe["refused"] == 100, describe  # the goals' outcomes
    assert describe["answered"] == describe["results"].get("succeeded", 0), describe
    # 3 s query timeout + 5 s grace; late answers are counted (0 on a quiet machine), not lost
    assert (figures["promise_s"], figures["client_wait_s"]) == (8.0, 38.0), figures
    assert 0 <= ask["late"] <= 300 and 0 <= describe["late"] <= 100, (ask, describe)
    frames = figures["frames"]
    # Delivery itself is asserted alone (test_camera_frames_...): here 20 bursting clients, two
    # cameras and the node share 2 cores, so frames wait in the executor and some are replaced.
    accounted = sum(frames.get(k, 0) for k in ("frames_processed", "frames_dropped",
                                                "frames_rejected"))  # fmt: skip
    assert 0 < accounted <= frames["frames_received"] <= frames["published"], frames
    assert frames["frames_received"] - accounted <= 2, frames  # at most the latest per camera
    assert frames["frames_processed"] > 0 and frames["frames_dropped"] > 0, frames
    assert figures["ask_latency_ms"]["answered"]["p95"] > 0
    assert set(figures["rss_mb"]) == {"start", "max", "end"}
    assert figures["shutdown"]["exit_status"] == 0 and figures["shutdown"]["seconds"] < 3.0


def test_soak_help_states_the_client_defaults_it_uses(ros):
    """`vlm-ros soak --help` names the client counts and burst size without importing rclpy
    at argument parsing, so it repeats ros/soak.py's constants: they must agree."""
    import argparse

    from vlm_ros.commands import soak as command
    from vlm_ros.ros import soak

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions}
    per_burst = f"{soak.PER_BURST} "
    assert helps["ask_clients"].endswith(f"({soak.ASK_CLIENTS})"), helps["ask_clients"]
    assert helps["describe_clients"].endswith(f"({soak.DESCRIBE_CLIENTS})")
    assert per_burst in helps["ask_clients"] and per_burst in helps["describe_clients"]
