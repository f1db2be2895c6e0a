"""The remote backend (vlm_ros/infer/remote.py) against real HTTP servers on local sockets.

Here: test/wire_server.py, a scriptable stdlib server that injects the faults a real server or
network can produce (malformed and truncated streams, 4xx/5xx, stalls, no /v1/rank), so the
client's parsing, error mapping and deadlines are checked byte for byte. Answer equality with a
local model against the project's own server is in test_remote_serve.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from net_helpers import free_port
from wire_server import MODEL, PIECES, VLM, WireServer

from vlm_ros.config import GenerationConfig, RemoteConfig, RuntimeConfig
from vlm_ros.errors import (
    BadResponseError,
    InputError,
    ModelNotFoundError,
    RemoteAuthError,
    RemoteInputError,
    RemoteTimeoutError,
    ServerBusyError,
    ServerUnreachableError,
    UnsupportedByServerError,
)
from vlm_ros.infer.backends import load_assistant
from vlm_ros.infer.remote import NO_RANKING, RemoteAssistant, first_token_probabilities, iter_sse
from vlm_ros.types import Request

CANDIDATES = ["continue", "slow_down", "stop", "turn_left", "turn_right"]


@pytest.fixture
def server():
    srv = WireServer()
    yield srv
    srv.close()


def frame(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def client(url: str, model: str = MODEL, **remote) -> RemoteAssistant:
    settings = {"health_period_s": 0.0, "image_encoding": "png", **remote}
    return RemoteAssistant(RemoteConfig(server_url=url, **settings), model)


# ---- answers -----------------------------------------------------------------------------------


def test_stream_is_parsed_as_it_arrives(server):
    """Each chunk reaches on_text before the server sends the next: the server waits for the
    callback's signal, and would record False had the client buffered the stream."""
    server.mode = "gated"
    seen: list[str] = []

    def on_text(text: str) -> None:
        seen.append(text)
        server.gate.set()

    with client(server.url) as remote:
        ans = remote.answer(frame(), "Is the path clear?", max_new_tokens=7, on_text=on_text)
    assert server.gate_ok == [True] * (len(PIECES) - 1)
    expected = ["".join(PIECES[: i + 1]).strip() for i in range(len(PIECES))]
    assert seen == expected
    assert ans.text == "The path is clear." and ans.stop_reason == "eos"
    assert ans.token_ids == tuple(VLM["token_ids"]) and ans.prompt_tokens == 9
    body = server.requests[-1][1]
    assert body["stream"] is True and body["max_tokens"] == 7 and body["temperature"] == 0.0
    assert (
        body["model"] == MODEL and body["messages"][0]["content"][0]["text"] == "Is the path clear?"
    )


def test_timings_split_encode_network_queue_and_server_stages(server):
    with client(server.url) as remote:
        t = remote.answer(frame(), "q").timings
    server_stages = VLM["timings_ms"]
    for stage in ("preprocess", "vision", "projector", "prefill", "decode"):
        assert t.as_dict()[stage] == server_stages[stage]
    assert t.server_queue == VLM["queue_ms"] and t.encode > 0
    # network is the round trip minus the server's own time; total is the robot's whole wait
    # (this server's server_ms is made up, so the round trip may be shorter: network 0 then)
    assert t.network >= 0 and t.total > t.encode
    if t.network > 0:
        assert t.total == pytest.approx(t.encode + t.network + VLM["server_ms"])


def test_png_is_lossless_and_bgr_is_converted(server):
    rgb = frame(seed=3)
    with client(server.url, image_encoding="png") as remote:
        remote.answer(rgb, "q")
        assert np.array_equal(server.image(), rgb)
        remote.answer_request(Request(np.ascontiguousarray(rgb[:, :, ::-1]), "q", "bgr"))
        assert np.array_equal(server.image(), rgb)
        gray = rgb[:, :, 0]
        remote.answer(gray, "q")
        assert np.array_equal(server.image(), np.repeat(gray[:, :, None], 3, axis=2))


def test_jpeg_quality_is_honoured(server):
    smooth = np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1))[:, :, None].repeat(3, 2)
    sizes = {}
    for quality in (30, 95):
        with client(server.url, image_encoding="jpeg", jpeg_quality=quality) as remote:
            remote.answer(smooth, "q")
        url = server.requests[-1][1]["messages"][0]["content"][1]["image_url"]["url"]
        assert url.startswith("data:image/jpeg;base64,")
        sizes[quality] = len(url)
        assert np.abs(server.image().astype(int) - smooth).max() < 40
    assert sizes[30] < sizes[95]


def test_sampling_settings_go_on_the_wire(server):
    gen = GenerationConfig(max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9, seed=4)
    with client(server.url) as remote:
        remote.answer(frame(), "q", generation=gen)
    body = server.requests[-1][1]
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["seed"]) == (
        5,
        0.7,
        0.9,
        4,
    )


def test_api_key_from_the_named_environment_variable(server, monkeypatch):
    monkeypatch.delenv("VLM_TEST_KEY", raising=False)
    with pytest.raises(InputError, match="VLM_TEST_KEY"):
        client(server.url, api_key_env="VLM_TEST_KEY")
    monkeypatch.setenv("VLM_TEST_KEY", "s3cret")
    with client(server.url, api_key_env="VLM_TEST_KEY") as remote:
        remote.answer(frame(), "q")
    assert server.headers[-1]["Authorization"] == "Bearer s3cret"


# ---- action hints ------------------------------------------------------------------------------


def test_rank_uses_v1_rank(server):
    with client(server.url) as remote:
        hint = remote.rank(frame(), "What should the robot do?", CANDIDATES)
        assert server.requests[-1][0] == "/v1/rank"
        assert hint.actions == tuple(CANDIDATES) and sum(hint.probabilities) == pytest.approx(1)
        assert hint.timings.server_queue == 3.0 and hint.timings.vision == 2.0
        assert remote.server_status().ranking == "rank"


def test_rank_answer_for_other_candidates_is_refused(server):
    server.mode = "rank_wrong"
    with client(server.url) as remote, pytest.raises(BadResponseError, match="asked"):
        remote.rank(frame(), "q", CANDIDATES)


def test_rank_falls_back_to_first_token_logprobs(server):
    server.mode = "norank"
    with client(server.url) as remote:
        hint = remote.rank(frame(), "What should the robot do?", CANDIDATES)
        paths = [p for p, _ in server.requests]
        assert paths == ["/v1/rank", "/v1/chat/completions"]
        assert server.requests[-1][1]["logprobs"] is True
        assert hint.chosen == "stop"
        probs = dict(zip(hint.actions, hint.probabilities, strict=True))
        assert probs["turn_left"] == probs["turn_right"] > 0  # "turn" is shared equally
        assert sum(hint.probabilities) == pytest.approx(1)
        remote.rank(frame(), "again", CANDIDATES)  # remembered: /v1/rank is not asked again
        assert [p for p, _ in server.requests][2:] == ["/v1/chat/completions"]


def test_rank_refused_without_rank_or_logprobs(server):
    server.mode = "norank_nologprobs"
    with client(server.url) as remote:
        with pytest.raises(UnsupportedByServerError, match=re.escape(NO_RANKING)):
            remote.rank(frame(), "q", CANDIDATES)
        assert remote.server_status().ranking == "unsupported"


def test_first_token_probabilities():
    probs, logs = first_token_probabilities([("stop", 0.0), ("xyz", 0.0)], ("go", "stop"))
    assert probs == (0.0, 1.0) and logs[0] == -float("inf") and logs[1] == 0.0


# ---- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "error", "words"),
    [
        ("e400", RemoteInputError, "HTTP 400 invalid_image"),
        ("e413", RemoteInputError, "HTTP 413 image_too_large"),
        ("e401", RemoteAuthError, "HTTP 401"),
        ("e500", BadResponseError, "HTTP 500 internal_error"),
        ("e503", ServerBusyError, "retry after 2 s"),
        ("e504", RemoteTimeoutError, "HTTP 504 deadline"),
        ("malformed", BadResponseError, "malformed stream event"),
        ("truncated", BadResponseError, "truncated after 8 characters"),
        ("midstream_error", BadResponseError, "replica died"),
    ],
)
def test_http_faults_are_clear_errors(server, mode, error, words):
    server.mode = mode
    with client(server.url) as remote, pytest.raises(error, match=words) as caught:
        remote.answer(frame(), "q")
    assert server.url in str(caught.value)
    if mode in ("e400", "e413"):
        assert isinstance(caught.value, InputError)  # the node counts it as a rejected frame


def test_unknown_model(server):
    with client(server.url, model="llava-13b") as remote:
        with pytest.raises(ModelNotFoundError, match="no model 'llava-13b'"):
            remote.answer(frame(), "q")
        with pytest.raises(ModelNotFoundError):  # not mistaken for a missing /v1/rank
            remote.rank(frame(), "q", CANDIDATES)
        assert remote.probe().model_listed is False


def test_oversized_image_is_refused_before_sending(server):
    with client(server.url, max_image_bytes=1000) as remote:
        with pytest.raises(RemoteInputError, match="over the 1000"):
            remote.answer(frame(256, 256), "q")
    assert server.requests == []


def test_stalled_stream_times_out(server):
    server.mode, server.stall_s = "stall", 20.0
    with client(server.url, request_timeout_s=1.0) as remote:
        start = time.monotonic()
        with pytest.raises(RemoteTimeoutError, match="request_timeout_s"):
            remote.answer(frame(), "q")
    assert time.monotonic() - start < 15.0  # bounded by the timeout, not by the stall


def test_deadline_returns_the_answer_so_far(server):
    server.mode, server.stall_s = "stall", 20.0
    with client(server.url, request_timeout_s=30.0) as remote:
        start = time.monotonic()
        ans = remote.answer(frame(), "q", deadline=time.monotonic() + 1.0)
    assert (ans.text, ans.stop_reason) == ("The", "deadline")
    assert time.monotonic() - start < 15.0


def test_cancelled_or_expired_before_sending(server):
    cancel = threading.Event()
    cancel.set()
    with client(server.url) as remote:
        assert remote.answer(frame(), "q", cancel=cancel).stop_reason == "cancelled"
        assert remote.answer(frame(), "q", deadline=time.monotonic() - 1).stop_reason == "deadline"
    assert server.requests == []


def test_server_down_then_up():
    """Down: a clear refusal naming the URL, and the status says unreachable; the same client
    answers once a server listens on the port (no reconnect logic of the caller's)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    remote = client(url, health_period_s=0.2)
    try:
        with pytest.raises(ServerUnreachableError, match=f"server unreachable at {url}"):
            remote.answer(frame(), "q")
        assert remote.server_status().reachable is False
        srv = WireServer(port=port)
        try:
            assert remote.answer(frame(), "q").text == "The path is clear."
            deadline = time.monotonic() + 10
            while not remote.server_status().model_listed and time.monotonic() < deadline:
                time.sleep(0.05)
            status = remote.server_status()
            assert status.reachable is True and status.model_listed is True
        finally:
            srv.close()
    finally:
        remote.close()


# ---- configuration and imports -----------------------------------------------------------------


def test_remote_config_is_checked_once():
    with pytest.raises(InputError, match="server_url"):
        RuntimeConfig(backend="remote")
    with pytest.raises(InputError, match="backend"):
        RuntimeConfig(backend="cloud")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="image_encoding"):
        RemoteConfig(image_encoding="webp")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="jpeg_quality"):
        RemoteConfig(jpeg_quality=0)


def test_node_parameters_build_the_remote_config():
    from vlm_ros.ros.node_config import PARAMETERS, NodeConfig, check_value

    values = {name: default for name, (default, _) in PARAMETERS.items()}
    values |= {"backend": "remote", "server_url": "http://gpu:8000", "remote_model": "m",
               "image_encoding": "png", "jpeg_quality": 70, "request_timeout_s": 5}  # fmt: skip
    runtime = NodeConfig.from_values(values).runtime
    assert runtime.backend == "remote"
    assert runtime.remote == RemoteConfig(
        server_url="http://gpu:8000", model="m", image_encoding="png", jpeg_quality=70,
        request_timeout_s=5.0, health_period_s=1.0,
    )  # fmt: skip
    for name, bad in (("backend", "cloud"), ("server_url", "gpu:8000"), ("jpeg_quality", 99),
                      ("image_encoding", "webp"), ("api_key_env", "MY KEY")):  # fmt: skip
        with pytest.raises(InputError, match=name):
            check_value(name, bad)


def test_load_assistant_remote_is_light_and_local_never_loads_httpx(server):
    """backend remote imports no torch; a local node's import path no httpx (subprocesses)."""
    remote = (
        "import sys, json\n"
        "from vlm_ros.config import RuntimeConfig, RemoteConfig\n"
        "from vlm_ros.infer.backends import load_assistant\n"
        f"r = RuntimeConfig(backend='remote', remote=RemoteConfig(server_url='{server.url}'))\n"
        "a = load_assistant('demo', r)\n"
        "import numpy as np\n"
        "text = a.answer(np.zeros((32, 32, 3), np.uint8), 'q').text\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'text': text}))\n"
    )
    local = (
        "import sys, json\n"
        "import vlm_ros.ros.node_config, vlm_ros.infer.backends, vlm_ros.cli\n"
        "print(json.dumps({'httpx': 'httpx' in sys.modules}))\n"
    )
    out = [
        json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  check=True, env=os.environ | {"PYTHONPATH": ""}).stdout)
        for code in (remote, local)
    ]  # fmt: skip
    assert out[0] == {"torch": False, "text": "The path is clear."}
    assert out[1] == {"httpx": False}


def test_load_assistant_picks_the_backend(server):
    runtime = RuntimeConfig(backend="remote", remote=RemoteConfig(server_url=server.url))
    with load_assistant("demo", runtime) as remote:
        assert isinstance(remote, RemoteAssistant) and remote.model == "demo"


def test_iter_sse_joins_data_lines_and_skips_comments():
    lines = [": keepalive", "data: a", "data: b", "", "event: x", "data: c", "", "data: d"]
    assert list(iter_sse(iter(lines))) == ["a\nb", "c", "d"]


# ---- the commands: ask, rank, eval-bag with --server-url ----------------------------------------


def vlm_ros(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlm_ros", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_ask_and_rank_through_a_server(server, tmp_path):
    from PIL import Image

    path = tmp_path / "f.png"
    Image.fromarray(frame()).save(path)
    out = vlm_ros("ask", "--image", str(path), "--server-url", server.url, "--stream", "q?")
    assert out.returncode == 0, out.stderr
    assert "The path is clear." in out.stdout and "network" in out.stdout
    out = vlm_ros("rank", "--image", str(path), "--server-url", server.url,
                  "--candidates", "stop", "go")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert server.requests[-1][0] == "/v1/rank" and "p=0.5000" in out.stdout
    down = f"http://127.0.0.1:{free_port()}"
    out = vlm_ros("ask", "--image", str(path), "--server-url", down, "q?")
    assert out.returncode != 0 and f"server unreachable at {down}" in out.stderr


def test_eval_bag_through_a_server(server, tmp_path):
    from vlm_ros.bag.evaluate import EvalSettings, evaluate
    from vlm_ros.bag.make_bag import BagSpec, make_bag

    bag = make_bag(BagSpec(out=str(tmp_path / "cam"), width=64, height=48, rate_hz=5,
                           duration_s=0.6))  # fmt: skip
    settings = EvalSettings(
        bag=str(bag), out_dir=str(tmp_path / "out"), max_new_tokens=2, candidates=("stop", "go"),
        warmup=0, rate="max", remote=RemoteConfig(server_url=server.url, health_period_s=0.0),
    )  # fmt: skip
    result = evaluate(settings)
    report = json.loads((result.report_dir / "report.json").read_text())
    paths = [p for p, _ in server.requests]
    assert paths.count("/v1/chat/completions") >= 3 and "/v1/rank" in paths
    assert report["frames"]["processed"] >= 3, report["frames"]


def test_frame_encoding_bench_measures_the_product_encoder():
    """bench/frame_encoding.py's row for one frame: PNG lossless, JPEG smaller and lossy, the
    data URL's base64 4/3 of the bytes (a small frame: the committed JSON has 720p/1080p)."""
    from vlm_ros.bench.frame_encoding import frames, measure

    rgb = frames(320, 240)["scene_noisy"]
    png, jpeg = measure(rgb, "png", 0, 2), measure(rgb, "jpeg", 75, 2)
    assert png["psnr_db"] == float("inf") and 20 < jpeg["psnr_db"] < 60
    assert jpeg["bytes"] < png["bytes"] < rgb.nbytes
    for row in (png, jpeg):
        assert row["wire_bytes"] == pytest.approx(row["bytes"] * 4 / 3, rel=0.01, abs=64)
        assert row["encode_ms_median"] > 0


def test_deadline_goes_on_the_wire_and_the_servers_deadline_event_ends_the_answer(server):
    server.mode = "deadline_event"
    with client(server.url) as remote:
        ans = remote.answer(frame(), "q", deadline=time.monotonic() + 30.0)
        assert (ans.text, ans.stop_reason) == ("The", "deadline")
        assert 0 < server.requests[-1][1]["vlm_ros"]["deadline_ms"] <= 30_000
        with pytest.raises(RemoteTimeoutError, match="deadline"):  # a deadline not ours
            remote.answer(frame(), "q")
        assert "vlm_ros" not in server.requests[-1][1]


def test_a_server_that_ignores_stream_still_answers(server):
    server.mode = "nostream"
    seen: list[str] = []
    with client(server.url) as remote:
        ans = remote.answer(frame(), "q", on_text=seen.append)
    assert (ans.text, ans.stop_reason, ans.token_ids) == ("The path is clear.", "eos", ())
    assert seen == ["The path is clear."]
