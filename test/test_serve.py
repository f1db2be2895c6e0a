"""``vlm-ros serve`` on a real local Ray cluster (CPU, the demo model, 2 replicas), not mocked.

One Ray start for the whole module (slow on 2 cores): the ``server`` fixture starts a head
node with ``ray start --head`` (Ray Client included) and deploys the application once; the
tests that break it (overload, a replica killed mid-stream, the server down and up again, a
deploy through Ray Client) run last, in file order, and each leaves it serving. Answers are compared
with a local ``Assistant`` on the same PNG (lossless: the replica decodes the same RGB array).

Ray Serve is the optional ``serve`` extra; scripts/setup.sh installs it, so under CI (CI=true)
or VLM_ROS_REQUIRE_RAY=1 a missing ray is a failure, not a skip.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from net_helpers import free_port
from PIL import Image

if os.environ.get("CI") == "true" or os.environ.get("VLM_ROS_REQUIRE_RAY") == "1":
    import openai  # noqa: F401  (required: a missing serve extra fails the run)
    import ray
    from ray import serve
else:
    ray = pytest.importorskip("ray", reason="ray[serve] (the serve extra) is not installed")
    serve = pytest.importorskip("ray.serve")
    pytest.importorskip("openai")
import openai

from vlm_ros.config import GenerationConfig, RuntimeConfig
from vlm_ros.demo import world
from vlm_ros.infer.pipeline import Assistant
from vlm_ros.serving import ray_app, wire

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCENES = (2_000_003, 2_000_011)
QUESTIONS = (
    "Describe the scene.",
    "What colour is the obstacle ahead?",
    "Is the path ahead clear?",
)
CANDIDATES = ["continue", "slow_down", "stop", "turn_left", "turn_right"]
LONG = {"max_tokens": 440, "temperature": 100.0}  # near-uniform sampling: ~440 tokens, ~1 s
MAX_IMAGE_BYTES = 64 * 1024
MAX_PIXELS = 200_000
OPTIONS = ray_app.ServeOptions(
    replicas=2,
    threads=1,
    max_queued=2,
    retry_after_s=2.0,
    max_image_bytes=MAX_IMAGE_BYTES,
    max_pixels=MAX_PIXELS,
    health_check_period_s=1.0,
    # Draining must outlast a 440-token stream on a loaded 2-core CI host (one took over 5 s).
    graceful_shutdown_timeout_s=60.0,
)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def messages(question: str, data: bytes) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "text", "text": question},
        {"type": "image_url", "image_url": {"url": data_url(data)}},
    ]}]  # fmt: skip


def scene_png(seed: int) -> bytes:
    return png(world.render(world.scene_from_seed(seed)))


class Reply:
    """An HTTP answer (urllib: the test needs no HTTP client beyond the standard library)."""

    def __init__(self, status_code: int, headers, text: str):
        self.status_code, self.headers, self.text = status_code, headers, text

    def json(self):
        return json.loads(self.text)


class Http:
    def __init__(self, url: str):
        self.url, self.key = url, None

    def request(self, method: str, path: str, body: bytes | None = None):
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.key is not None:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url + path, body, headers, method=method)
        try:
            return urllib.request.urlopen(req, timeout=120)
        except urllib.error.HTTPError as err:
            return err  # a refusal: status, headers and body like a response

    def call(self, method: str, path: str, body: bytes | None = None) -> Reply:
        with self.request(method, path, body) as r:
            return Reply(r.status, r.headers, r.read().decode())

    def get(self, path: str) -> Reply:
        return self.call("GET", path)

    def post(self, path: str, json_body=None, content: bytes | None = None) -> Reply:
        return self.call(
            "POST", path, content if content is not None else json.dumps(json_body).encode()
        )


class Server:
    def __init__(self, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.http = Http(self.url)
        self.ray_client = ""  # ray://HEAD:PORT of the cluster serving it
        self.openai = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def chat(self, question: str, data: bytes, **fields) -> Reply:
        body = {"model": "demo", "messages": messages(question, data), **fields}
        return self.http.post("/v1/chat/completions", body)

    def wait_healthy(self, replicas: int, timeout: float = 180.0) -> None:
        end = time.monotonic() + timeout
        last = None
        while time.monotonic() < end:
            try:
                last = self.http.get("/health")
                if last.status_code == 200 and last.json()["replicas_running"] >= replicas:
                    return
            except (urllib.error.URLError, ConnectionError) as exc:  # down, or coming up
                last = exc
            time.sleep(1.0)
        raise AssertionError(f"not healthy with {replicas} replicas after {timeout} s: {last}")


@pytest.fixture(scope="module")
def local():
    threads = torch.get_num_threads()  # Assistant.load sets the process's torch threads
    with Assistant.load("demo", RuntimeConfig(threads=1)) as assistant:
        yield assistant
    torch.set_num_threads(threads)  # later test modules run as they would alone


def wait_listening(proc: subprocess.Popen, ports: tuple[int, ...], log: Path) -> None:
    end = time.monotonic() + 180
    while time.monotonic() < end:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            for port in ports:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(1.0)
    raise AssertionError(f"`ray start --head` not listening on {ports}: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A head node made as docs/SERVING.md makes one (`ray start --head`: the GCS, and a Ray
    Client server, on ports of its own), joined by its GCS address. Token authentication is off
    for it (RAY_AUTH_MODE=disabled): this process read Ray's auth mode when it imported ray, and
    only a new local cluster switches it on in-process (the token path of Ray Client was run by
    hand, docs/SERVING.md). `--block` keeps the head in the foreground:
    terminating it stops that cluster only (`ray stop` would stop every cluster on the host)."""
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    os.environ.pop("RAY_ADDRESS", None)  # a cluster of this test's own, never another
    os.environ["RAY_AUTH_MODE"] = "disabled"  # for the head and the CLI runs below
    gcs, client = free_port(), free_port()
    tmp = tmp_path_factory.mktemp("ray")
    log = tmp / "head.log"
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
           "--port", str(gcs), "--ray-client-server-port", str(client), "--num-cpus", "4",
           "--include-dashboard", "false", "--disable-usage-stats",
           "--temp-dir", str(tmp)]  # fmt: skip
    with open(log, "w") as out:
        head = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_listening(head, (gcs, client), log)
        ray.init(address=f"127.0.0.1:{gcs}", log_to_driver=False)
        port = free_port()
        ray_app.deploy(OPTIONS, "127.0.0.1", port)
        srv = Server(port)
        srv.ray_client = f"ray://127.0.0.1:{client}"
        srv.wait_healthy(2)
        yield srv
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        head.terminate()  # the head drains and stops its processes
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- the command in the foreground (first: its own cluster, before the module's starts) --------


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_cli_serves_in_the_foreground_and_drains_on_ctrl_c():
    """`vlm-ros serve` with a cluster of its own: prints the URL, answers, and on SIGINT
    deletes the app (replicas drain), stops Ray and exits 0; the port is closed afterwards.
    Started with SIGINT ignored, as a shell starts a background job: the command must still
    stop on it (it did not, before it installed its own handler; SIGTERM takes the same path)."""
    port = free_port()
    cmd = [sys.executable, "-m", "vlm_ros", "serve", "--address", "local", "--port", str(port),
           "--replicas", "1", "--threads", "1"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=ignore_sigint)  # fmt: skip
    lines: list[str] = []
    try:
        for line in proc.stdout:  # the ready line, or the end of the output if it failed
            lines.append(line)
            if "[serve] ready:" in line:
                break
        assert f"ready: http://127.0.0.1:{port}/v1 (model 'demo')" in "".join(lines), lines[-20:]
        srv = Server(port)
        assert (
            srv.chat("Describe the scene.", scene_png(SCENES[0]), max_tokens=4).status_code == 200
        )
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:  # failed: SIGTERM stops Ray's processes too, SIGKILL would not
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, rest[-2000:]
    assert "[serve] draining and stopping" in rest
    with pytest.raises(urllib.error.URLError):
        srv.chat("Describe the scene.", scene_png(SCENES[0]))


# ---- answers equal the local ones ---------------------------------------------------------------


@pytest.mark.parametrize("seed", SCENES)
def test_greedy_answers_equal_local_token_for_token(server, local, seed):
    data = scene_png(seed)
    image = wire.decode_image(data, wire.WireLimits())
    assert np.array_equal(image, world.render(world.scene_from_seed(seed)))  # PNG: lossless
    for question in QUESTIONS:
        want = local.answer(image, question, max_new_tokens=48)
        r = server.chat(question, data, max_tokens=48, temperature=0)
        assert r.status_code == 200, r.text
        body = r.json()
        ext = body["vlm_ros"]
        assert ext["token_ids"] == list(want.token_ids), question
        assert body["choices"][0]["message"]["content"] == want.text
        assert body["choices"][0]["finish_reason"] == "stop" and ext["stop_reason"] == "eos"
        assert body["usage"]["completion_tokens"] == len(want.token_ids)
        assert body["usage"]["prompt_tokens"] == want.prompt_tokens
        assert set(ext["timings_ms"]) == set(wire.STAGES) and ext["timings_ms"]["total"] > 0
        assert 0 <= ext["queue_ms"] <= ext["server_ms"]


def test_rank_probabilities_equal_local(server, local):
    data = scene_png(SCENES[0])
    want = local.rank(wire.decode_image(data, wire.WireLimits()), "What should the robot do?",
                      CANDIDATES)  # fmt: skip
    body = {"model": "demo", "messages": messages("What should the robot do?", data),
            "candidates": CANDIDATES}  # fmt: skip
    r = server.http.post("/v1/rank", body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["object"] == "vlm_ros.rank" and got["candidates"] == CANDIDATES
    np.testing.assert_allclose(got["probabilities"], want.probabilities, atol=1e-4)
    np.testing.assert_allclose(got["log_likelihoods"], want.log_likelihoods, atol=1e-3)
    assert got["vlm_ros"]["timings_ms"]["total"] > 0


def test_openai_client_parses_answers_and_streams(server, local):
    data = scene_png(SCENES[1])
    image = wire.decode_image(data, wire.WireLimits())
    want = local.answer(image, "Describe the scene.", max_new_tokens=48)
    assert [m.id for m in server.openai.models.list().data] == ["demo"]

    done = server.openai.chat.completions.create(
        model="demo", messages=messages("Describe the scene.", data), max_tokens=48, temperature=0
    )
    assert done.object == "chat.completion"
    assert done.choices[0].message.content == want.text
    assert done.choices[0].finish_reason == "stop"
    assert done.model_extra["vlm_ros"]["token_ids"] == list(want.token_ids)

    stream = server.openai.chat.completions.create(
        model="demo", messages=messages("Describe the scene.", data), max_tokens=48,
        temperature=0, stream=True,
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(pieces) == want.text
    assert sum(1 for p in pieces if p) > 3  # streamed token by token, not in one piece
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["vlm_ros"]["token_ids"] == list(want.token_ids)


def test_max_tokens_stop_and_temperature_are_honoured(server, local):
    data = scene_png(SCENES[0])
    image = wire.decode_image(data, wire.WireLimits())
    full = local.answer(image, "Describe the scene.", max_new_tokens=48)

    cut = server.chat("Describe the scene.", data, max_tokens=3).json()
    assert cut["vlm_ros"]["token_ids"] == list(full.token_ids[:3])
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["vlm_ros"]["stop_reason"] == "max_new_tokens"

    stop = "box"
    assert stop in full.text
    stopped = server.chat("Describe the scene.", data, max_tokens=48, stop=[stop, "zzz"]).json()
    assert stopped["choices"][0]["message"]["content"] == full.text[: full.text.index(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["vlm_ros"]["stop_reason"] == "stop"
    assert len(stopped["vlm_ros"]["token_ids"]) < len(full.token_ids)  # the decoder stopped early
    # streamed, the stop string never reaches the client either
    r = server.chat("Describe the scene.", data, max_tokens=48, stop=stop, stream=True)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in sse_events(r.text)[:-1])
    assert text == stopped["choices"][0]["message"]["content"]

    sampling = GenerationConfig(max_new_tokens=30, do_sample=True, temperature=50.0, seed=7)
    sampled = local.answer(image, "Describe the scene.", generation=sampling)
    got = server.chat("Describe the scene.", data, max_tokens=30, temperature=50.0, seed=7).json()
    assert got["vlm_ros"]["token_ids"] == list(sampled.token_ids)
    assert sampled.token_ids != full.token_ids[: len(sampled.token_ids)]  # temperature mattered


def sse_events(text: str) -> list[dict]:
    """The JSON events of an SSE body, checking it ends with [DONE]."""
    lines = [ln for ln in text.split("\n\n") if ln.strip()]
    assert lines[-1] == "data: [DONE]", lines[-1]
    return [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]


def test_bench_clients_count_and_split_every_answer(server):
    """scripts/bench_serve.py's client loop against this server: every request answered once,
    and the latency split (model + queue + serve + http) adds up to the client's latency."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_serve", REPO / "scripts" / "bench_serve.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    body = json.dumps({"model": "demo", "messages": messages(bench.QUESTION, scene_png(SCENES[0])),
                       "max_tokens": 48, "temperature": 0}).encode()  # fmt: skip
    cell = bench.run_clients(f"{server.url}/v1/chat/completions", body, 2, 6)
    assert cell["answered"] == 6 and cell["refused"] == [] and cell["requests_per_s"] > 0
    split = cell["split_ms_p50"]
    assert split["model"] > 0 and split["queue"] >= 0 and split["http"] > 0
    assert sum(split.values()) == pytest.approx(cell["latency_ms"]["p50"], rel=0.5)


# ---- refusals ----------------------------------------------------------------------------------


def test_error_codes_of_the_wire_contract(server):
    data = scene_png(SCENES[0])
    with pytest.raises(openai.NotFoundError) as nf:
        server.openai.chat.completions.create(
            model="llava-13b", messages=messages("Describe the scene.", data)
        )
    assert nf.value.code == "model_not_found" and "llava-13b" in str(nf.value)

    def refused(status: int, code: str, response: Reply) -> str:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code and "\n" not in error["message"]
        return error["message"]

    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    big = png(noise)  # incompressible: ~120 KB > the server's 64 KiB
    assert len(big) > MAX_IMAGE_BYTES
    assert "bytes" in refused(413, "image_too_large", server.chat("Describe the scene.", big))
    huge = png(np.zeros((500, 500, 3), np.uint8))  # tiny file, 250,000 pixels > 200,000
    assert len(huge) < MAX_IMAGE_BYTES
    assert "pixels" in refused(413, "image_too_large", server.chat("Describe the scene.", huge))
    msg = refused(400, "invalid_image", server.chat("Describe the scene.", b"not an image"))
    assert "cannot decode" in msg
    truncated = data[: len(data) // 2]  # a good header, cut data: decoded (and refused) remotely
    refused(400, "invalid_image", server.chat("Describe the scene.", truncated))
    refused(400, "invalid_request", server.chat("Describe the scene.", data, max_tokens=0))
    refused(400, "invalid_request", server.chat("   ", data))
    refused(400, "context_length_exceeded", server.chat("Describe the scene.", data,
                                                        max_tokens=4000))  # fmt: skip
    r = server.http.post("/v1/chat/completions", content=b"{not json")
    refused(400, "invalid_request", r)
    no_image = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    refused(400, "invalid_request", server.http.post("/v1/chat/completions", no_image))
    # the replicas are fine afterwards
    assert server.chat("Describe the scene.", data, max_tokens=4).status_code == 200


def test_overload_is_refused_with_503_and_a_reason(server):
    """2 replicas x 1 ongoing + 2 queued: of 10 simultaneous long requests, some are refused
    at once by Ray Serve's max_queued_requests; every request is answered or refused."""
    data = scene_png(SCENES[0])
    results: list[Reply | Exception] = []
    gate = threading.Barrier(10)

    def one(i: int) -> None:
        gate.wait()
        try:
            results.append(server.chat("Describe the scene.", data, seed=i, **LONG))
        except Exception as exc:  # noqa: BLE001  (reported below)
            results.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    statuses = sorted(r.status_code if isinstance(r, Reply) else repr(r) for r in results)
    assert len(results) == 10 and set(statuses) <= {200, 503}, statuses
    refused = [r for r in results if r.status_code == 503]
    assert refused and statuses.count(200) >= 2, statuses
    for r in refused:
        assert r.json()["error"]["code"] == "overloaded"
        assert "queue" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "2"


# ---- faults: a replica killed mid-stream, the server down and up --------------------------------


def model_replicas() -> list[str]:
    prefix = f"SERVE_REPLICA::{ray_app.APP_NAME}#{ray_app.MODEL_DEPLOYMENT}#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(prefix)]  # fmt: skip


def wait_for_new_replicas(before: list[str], count: int, timeout: float = 180.0) -> list[str]:
    """The model replica actors, once ``count`` of them are alive and none is in ``before``."""
    end, now = time.monotonic() + timeout, []
    while time.monotonic() < end:
        now = model_replicas()
        if len(now) == count and not set(now) & set(before):
            return now
        time.sleep(1.0)
    raise AssertionError(f"Ray Serve did not replace {before} in {timeout} s: {now}")


def test_replica_killed_mid_stream_gives_a_clear_error_and_ray_restarts_it(server, local):
    data = scene_png(SCENES[0])
    image = wire.decode_image(data, wire.WireLimits())
    long = GenerationConfig(max_new_tokens=440, do_sample=True, temperature=100.0, seed=3)
    assert len(local.answer(image, "Describe the scene.", generation=long).token_ids) == 440
    before = model_replicas()
    assert len(before) == 2, before

    started = time.monotonic()
    body = {"model": "demo", "messages": messages("Describe the scene.", data), "stream": True,
            "seed": 3, **LONG}  # fmt: skip
    events, killed = [], False
    with server.http.request("POST", "/v1/chat/completions", json.dumps(body).encode()) as r:
        assert r.status == 200
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            events.append(json.loads(line.removeprefix("data: ")))
            if not killed:  # the replica took the request: kill every model replica now
                for name in before:
                    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
                killed = True
    elapsed = time.monotonic() - started
    assert elapsed < 60, elapsed  # no hang: the error arrives well inside the client's deadline
    assert "error" in events[-1], events[-1]
    error = events[-1]["error"]
    assert error["code"] == "replica_failed" and "Ray Serve restarts it" in error["message"]
    streamed = sum(len(e["choices"][0]["delta"].get("content", "")) for e in events[:-1])
    assert streamed < len(local.answer(image, "Describe the scene.", generation=long).text)

    # /health reads the controller's replica states, which still say RUNNING for the killed
    # replicas until its next health check: wait for two new replica actors first
    wait_for_new_replicas(before, 2)
    server.wait_healthy(2)  # Ray Serve replaced both replicas
    want = local.answer(image, "Describe the scene.", max_new_tokens=48)
    for _ in range(4):  # both new replicas answer, and answer right
        got = server.chat("Describe the scene.", data, max_tokens=48).json()
        assert got["vlm_ros"]["token_ids"] == list(want.token_ids)


def read_stream(response) -> list[dict]:
    """The JSON events of an open SSE response, up to [DONE] (which must come)."""
    events = []
    for raw in response:
        line = raw.decode().strip()
        if line == "data: [DONE]":
            return events
        if line.startswith("data: "):
            events.append(json.loads(line.removeprefix("data: ")))
    raise AssertionError(f"the stream ended without [DONE] after {len(events)} events")


def test_draining_then_server_down_and_up_again_with_the_cli(server, local):
    """Deleting the app drains it: a stream in flight runs to its end. Serve shut down refuses
    connections; `vlm-ros serve --detach --api-key-env` deploys the app again into the same
    cluster on the same port: answers as before, and only with the key."""
    data = scene_png(SCENES[1])
    want = local.answer(wire.decode_image(data, wire.WireLimits()), "Describe the scene.",
                        max_new_tokens=48)  # fmt: skip
    body = {"model": "demo", "messages": messages("Describe the scene.", data), "stream": True,
            "seed": 3, **LONG}  # fmt: skip
    with server.http.request("POST", "/v1/chat/completions", json.dumps(body).encode()) as r:
        first = json.loads(r.readline().decode().removeprefix("data: "))
        assert first["choices"][0]["delta"]["role"] == "assistant"  # a replica took it
        deleting = threading.Thread(target=ray_app.undeploy)
        deleting.start()
        events = read_stream(r)
    deleting.join(timeout=120)
    assert not deleting.is_alive()
    assert "error" not in events[-1], events[-1]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert len(events[-1]["vlm_ros"]["token_ids"]) == 440  # the whole answer, not cut

    serve.shutdown()
    # Refused outright, or reset by a proxy that accepted the connection as it was killed.
    with pytest.raises((urllib.error.URLError, ConnectionResetError)):
        server.chat("Describe the scene.", data)

    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "vlm_ros", "serve", "--address", address,
           "--port", str(server.port), "--replicas", "2", "--threads", "1", "--device", "cpu",
           "--max-queued", "2", "--max-image-bytes", str(MAX_IMAGE_BYTES),
           "--max-pixels", str(MAX_PIXELS), "--api-key-env", "VLM_ROS_TEST_KEY",
           "--detach"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    missing = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "VLM_ROS_TEST_KEY" in missing.stderr  # before Ray starts
    env["VLM_ROS_TEST_KEY"] = "k3y"
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"ready: http://127.0.0.1:{server.port}/v1 (model 'demo')" in out.stdout
    server.wait_healthy(2)
    refused = server.chat("Describe the scene.", data, max_tokens=48)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    server.http.key = "k3y"
    got = server.chat("Describe the scene.", data, max_tokens=48).json()
    assert got["vlm_ros"]["token_ids"] == list(want.token_ids)
    assert got["choices"][0]["message"]["content"] == want.text
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k3y", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["demo"]


def test_cli_deploys_through_ray_client(server, local):
    """`vlm-ros serve --address ray://HEAD:PORT`, as from a machine off the cluster: through
    Ray Client it deploys the app under a new name into the head's cluster (the same 4 CPUs),
    which then answers as the local model does."""
    data = scene_png(SCENES[0])
    want = local.answer(wire.decode_image(data, wire.WireLimits()), "Describe the scene.",
                        max_new_tokens=24)  # fmt: skip
    cmd = [sys.executable, "-m", "vlm_ros", "serve", "--address", server.ray_client,
           "--port", str(server.port), "--served-name", "demo-rc", "--replicas", "1",
           "--threads", "1", "--device", "cpu", "--detach"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "(cluster: 4 CPUs, 0 GPUs)" in out.stdout  # the head's cluster, not a new one
    assert f"ready: http://127.0.0.1:{server.port}/v1 (model 'demo-rc')" in out.stdout
    server.http.key = None  # deployed without --api-key-env
    assert server.http.get("/v1/models").json()["data"][0]["id"] == "demo-rc"
    body = {"model": "demo-rc", "messages": messages("Describe the scene.", data),
            "max_tokens": 24, "temperature": 0}  # fmt: skip
    got = server.http.post("/v1/chat/completions", body)
    assert got.status_code == 200, got.text
    assert got.json()["vlm_ros"]["token_ids"] == list(want.token_ids)


def test_options_reject_nonsense():
    with pytest.raises(ValueError, match="max_replicas"):
        replace(OPTIONS, max_replicas=1)
    with pytest.raises(ValueError, match="unknown serve option"):
        ray_app.ServeOptions.from_args({"modle": "demo"})


def test_the_shipped_serve_config_is_valid_for_ray_serve():
    """config/serve/vlm_ros.yaml: Ray Serve's own schema accepts it, its import_path builds the
    application from its args, and its deployment overrides name the app's deployments."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "config" / "serve" / "vlm_ros.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "vlm_ros.serving.ray_app:build"
    built = ray_app.build(app.args)
    opts = ray_app.ServeOptions.from_args(app.args)
    assert opts.gpus_per_replica == 1 and opts.device == "cuda"
    assert built is not None
    names = {d.name for d in app.deployments}
    assert names == {ray_app.MODEL_DEPLOYMENT, ray_app.INGRESS_DEPLOYMENT}
    model = next(d for d in app.deployments if d.name == ray_app.MODEL_DEPLOYMENT)
    assert model.max_ongoing_requests == 1 and model.max_queued_requests > 0
    assert model.ray_actor_options.num_gpus == 1


def test_connect_tries_again_when_the_heads_client_server_dies(monkeypatch, capsys):
    """Ray Client's head forks a server per connection, and that child dies at fork() now and
    then (ray-project/ray#63202: "Starting Ray client server failed"). connect() tries a new
    connection, up to CLIENT_SERVER_TRIES, saying why; any other failure is raised at once."""
    died = ConnectionAbortedError(
        "Initialization failure from server:\nRuntimeError: Starting Ray client server "
        "failed. See ray_client_server_23000.err for detailed logs."
    )
    calls = []

    def init(address=None, **_):
        calls.append(address)
        if len(calls) < 2:
            raise died

    monkeypatch.setattr(ray_app.ray, "init", init)
    monkeypatch.setattr(ray_app.ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray_app.ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(ray_app.time, "sleep", lambda s: None)
    assert ray_app.connect("ray://127.0.0.1:1") == {"CPU": 4.0} and len(calls) == 2
    assert "ray-project/ray#63202" in capsys.readouterr().err

    def always(address=None, **_):
        calls.append(address)
        raise died

    calls.clear()
    monkeypatch.setattr(ray_app.ray, "init", always)
    with pytest.raises(ConnectionError, match="Starting Ray client server failed"):
        ray_app.connect("ray://127.0.0.1:1")
    assert len(calls) == ray_app.CLIENT_SERVER_TRIES

    def other(address=None, **_):
        calls.append(address)
        raise ConnectionError("timed out")

    calls.clear()
    monkeypatch.setattr(ray_app.ray, "init", other)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ConnectionError, match="timed out"):
        ray_app.connect("ray://127.0.0.1:1")
    assert len(calls) == 1
