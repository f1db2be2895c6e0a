"""The remote backend against a third-party OpenAI-compatible server: llama-cpp-python's own
server (``python -m llama_cpp.server``, the ``[server]`` extra, in a process of its own on a
free port), serving the demo model's Phi decoder written to GGUF with its byte-level BPE
tokenizer and a text-only chat template (vlm_ros/bench/llamacpp_chat.py).

The reference is llama-cpp-python itself, in this process, on the same GGUF file: the same
messages (question and image_url part, as the client sends them), temperature 0, and the
sampling defaults the server applies to a request that does not name them (its
CreateChatCompletionRequest; repeat_penalty 1.1 among them: llama-cpp-python applies penalties
before the greedy pick, so "temperature 0" alone is not the plain argmax there).

* RemoteAssistant's streamed answers equal llama-cpp-python's direct ones (its stream carries
  no ``usage``, and it has no ``stream_options``, so prompt_tokens is 0); the image_url part
  is ignored (llama-cpp-python hands the content list to the chat template, which keeps the
  text; no error), so two different frames give the same answer;
* action hints: llama-cpp-python's server has no /v1/rank (404) and does return top logprobs
  on /v1/chat/completions, so the client's first-token fallback ranks from them; its
  probabilities equal those computed from llama-cpp-python's direct logprobs;
* the node (backend remote, real rclpy and DDS): Ask's answer and hint equal the same.

llama-cpp-python[server] and gguf are in scripts/requirements.txt, so under CI a missing one is
a failure, not a skip.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from net_helpers import free_port
from ros_helpers import start_node
from test_node import Camera, ask
from wire_server import http_server_process

ROOT = Path(__file__).resolve().parents[1]
MODEL = "demo-text"  # the server's --model_alias: what GET /v1/models lists
QUESTIONS = ("Is the path ahead clear?", "Describe the scene.")  # "no"<eos>; 16 tokens
CANDIDATES = ["continue", "slow_down", "stop", "turn_left", "turn_right"]
MAX_NEW = 16
N_CTX = 512  # the decoder's max_position_embeddings


def scene(index: int, width: int = 320, height: int = 240) -> np.ndarray:
    from vlm_ros.demo.world import render_frame

    return np.ascontiguousarray(render_frame(index, width, height)[:, :, :3])


def image_msg_of(rgb: np.ndarray, i: int):
    from sensor_msgs.msg import Image

    h, w = rgb.shape[:2]
    msg = Image(encoding="rgb8", height=h, width=w, step=w * 3, data=rgb.tobytes())
    msg.header.frame_id = f"scene{i}"
    return msg


def _server_or_skip() -> None:
    from vlm_ros.bench.llamacpp import PeerUnavailable, require_llama_cpp
    from vlm_ros.bench.llamacpp_chat import require_server

    try:
        require_llama_cpp()
        require_server()
    except PeerUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI installs llama-cpp-python[server] and gguf: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    _server_or_skip()
    from vlm_ros.bench.llamacpp_chat import export_chat_gguf

    return export_chat_gguf(ROOT / "models" / "demo", tmp_path_factory.mktemp("gguf") / "d.gguf")


@pytest.fixture(scope="module")
def served(gguf_file, tmp_path_factory):
    """llama-cpp-python's server on the file; its URL once /v1/models answers."""
    port = free_port()
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_file),
               "--model_alias", MODEL, "--host", "127.0.0.1", "--port", str(port),
               "--n_ctx", str(N_CTX), "--n_threads", "1", "--n_threads_batch", "1"]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with http_server_process(command, log, url, "llama_cpp.server", 180, 30, cwd=ROOT):
        yield url


@pytest.fixture(scope="module")
def direct(gguf_file):
    """llama-cpp-python in this process on the same file, as the server loads it."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_file), n_ctx=N_CTX, n_threads=1, n_threads_batch=1,
                logits_all=True, verbose=False)  # fmt: skip
    yield llm
    llm.close()


def _server_defaults() -> dict:
    """The sampling settings llama-cpp-python's server uses when a request leaves them out."""
    from llama_cpp.server.types import CreateChatCompletionRequest

    fields = CreateChatCompletionRequest.model_fields
    return {k: fields[k].default for k in ("top_p", "top_k", "min_p", "repeat_penalty")}


def _messages(question: str, image: np.ndarray) -> list[dict]:
    """What RemoteAssistant sends for (question, image) with image_encoding png."""
    from vlm_ros.infer.remote import _messages as wire_messages
    from vlm_ros.infer.wire_image import encode_frame

    return wire_messages(question, encode_frame(image, "png", 90))


def _direct_answer(llm, messages: list[dict], **extra) -> dict:
    return llm.create_chat_completion(
        messages=messages, temperature=0.0, max_tokens=MAX_NEW, **_server_defaults(), **extra
    )


def _client(url: str):
    from vlm_ros.config import RemoteConfig
    from vlm_ros.infer.remote import RemoteAssistant

    config = RemoteConfig(server_url=url, image_encoding="png", health_period_s=0.0,
                          request_timeout_s=120.0)  # fmt: skip
    return RemoteAssistant(config, MODEL)


def test_answers_equal_llama_cpp_direct_and_the_image_is_ignored(served, direct):
    with _client(served) as remote:
        assert remote.probe().model_listed  # GET /v1/models lists the alias
        reasons = set()
        for question in QUESTIONS:
            image = scene(3)
            want = _direct_answer(direct, _messages(question, image))
            choice = want["choices"][0]
            texts: list[str] = []
            got = remote.answer(image, question, max_new_tokens=MAX_NEW, on_text=texts.append)
            assert got.text == choice["message"]["content"].strip() and got.text
            reason = "max_new_tokens" if choice["finish_reason"] == "length" else "eos"
            assert got.stop_reason == reason
            reasons.add(reason)
            assert texts and texts[-1] == got.text  # on_text saw the streamed answer
            assert len(texts) > 1 or got.stop_reason == "eos"  # one piece per token
            assert got.token_ids == ()  # no vlm_ros object from a third-party server
            assert want["usage"]["prompt_tokens"] > 0 and got.prompt_tokens == 0  # no usage
            assert got.timings.vision == 0 and got.timings.network > 0
            # the image part is dropped by the chat template: another frame, the same answer,
            # and the same as the question alone
            other = remote.answer(scene(8), question, max_new_tokens=MAX_NEW)
            assert other.text == got.text
            alone = _direct_answer(direct, [{"role": "user", "content": question}])
            assert alone["choices"][0]["message"]["content"].strip() == got.text
        assert reasons == {"eos", "max_new_tokens"}  # finish_reason "stop" and "length" mapped


def _direct_hint(llm, question: str, image: np.ndarray):
    """The client's logprobs fallback computed from llama-cpp-python's direct top logprobs."""
    from vlm_ros.infer.remote import TOP_LOGPROBS, first_token_probabilities

    out = llm.create_chat_completion(
        messages=_messages(question, image), temperature=0.0, max_tokens=1,
        logprobs=True, top_logprobs=TOP_LOGPROBS, **_server_defaults(),
    )  # fmt: skip
    top = out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    return first_token_probabilities([(t["token"], t["logprob"]) for t in top], tuple(CANDIDATES))


def test_action_hints_come_from_the_servers_top_logprobs(served, direct):
    """No /v1/rank on llama-cpp-python's server (404); its chat completions return
    top_logprobs, so hints are the first-token approximation, equal to the direct one."""
    import httpx

    assert httpx.post(f"{served}/v1/rank", json={}, timeout=30).status_code == 404
    with _client(served) as remote:
        question = "What should the robot do?"
        got = remote.rank(scene(2), question, CANDIDATES)
        assert remote.server_status().ranking == "logprobs"
        probs, logs = _direct_hint(direct, question, scene(2))
        assert got.actions == tuple(CANDIDATES)
        np.testing.assert_allclose(got.probabilities, probs, atol=1e-5)
        assert sum(got.probabilities) == pytest.approx(1.0)


@pytest.mark.ros
def test_node_ask_equals_llama_cpp_direct(ros, served, direct):
    node = start_node(ros, "unused-with-backend-remote", "rthird", backend="remote",
                      server_url=served, remote_model=MODEL, image_encoding="png",
                      max_new_tokens=MAX_NEW, hint_candidates=CANDIDATES,
                      query_timeout_s=120.0, request_timeout_s=120.0)  # fmt: skip
    camera, probe = Camera(ros, "rthird"), ros.client_node("rthird_probe")
    image = scene(5)
    camera.send(image_msg_of(image, 5), node)
    question = QUESTIONS[0]
    want = _direct_answer(direct, _messages(question, image))["choices"][0]
    resp = ask(ros, node, probe, question=question, hint=True, timeout=150.0)
    assert resp.success, resp.error_message
    assert resp.answer == want["message"]["content"].strip()
    probs, _ = _direct_hint(direct, "What should the robot do?", image)  # hint_instruction
    assert list(resp.hint.candidates) == CANDIDATES
    np.testing.assert_allclose(resp.hint.probabilities, probs, atol=1e-5)
    assert resp.hint.action == CANDIDATES[int(np.argmax(probs))]
    assert resp.latency.encode_ms > 0 and resp.latency.vision_ms == 0


def test_builtin_chat_formats_drop_the_whole_content_list(gguf_file):
    """Why the GGUF carries a chat template: llama-cpp-python's built-in string formats
    (chatml here; llama-2 is its fallback) keep a message's content only when it is a string,
    so the client's [text, image_url] content is dropped whole, question included, without an
    error: two different questions give the same prompt."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_file), n_ctx=N_CTX, n_threads=1, chat_format="chatml",
                verbose=False)  # fmt: skip
    try:
        usage = [
            _direct_answer(llm, _messages(q, scene(1)))["usage"]
            for q in ("Is the path ahead clear?", "What colour is the obstacle ahead? " * 8)
        ]
        text_only = _direct_answer(llm, [{"role": "user", "content": QUESTIONS[1]}])["usage"]
    finally:
        llm.close()
    assert usage[0]["prompt_tokens"] == usage[1]["prompt_tokens"]
    assert text_only["prompt_tokens"] > usage[0]["prompt_tokens"]
