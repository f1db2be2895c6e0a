"""A deliberately scriptable HTTP server (stdlib http.server) speaking the wire contract of
docs/SERVING.md, for the remote backend's tests: a FAULT INJECTOR, not a model server. It sends
what a test tells it to (well-formed streams of a fixed answer, malformed or truncated streams,
error statuses, stalls, servers without /v1/rank), and records every request it got, so the
client's parsing, error mapping and deadlines are checked against real sockets.

The real server (``vlm-ros serve``, branch issue-16-serve) is what answer equality is checked
against; this one never runs a model.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

MODEL = "demo"
PIECES = ["The", " path", " is", " clear", "."]  # the "ok" mode's answer, one chunk each
VLM = {
    "token_ids": [11, 22, 33, 44, 55],
    "stop_reason": "eos",
    "timings_ms": {"preprocess": 1.0, "vision": 2.0, "projector": 0.5, "prefill": 3.0,
                   "decode": 4.0, "total": 10.5},
    "queue_ms": 7.0,
    "server_ms": 18.0,
}  # fmt: skip


class WireServer:
    """``mode`` picks the behaviour (see Handler); ``requests`` holds (path, body) received.
    ``gate``: in mode "gated" the server waits on it before each chunk after the first (the
    test's on_text sets it), and ``gate_ok`` records whether it was set in time: proof that
    the client parsed each chunk as it arrived."""

    def __init__(self, port: int = 0, mode: str = "ok"):
        self.mode = mode
        self.requests: list[tuple[str, dict]] = []
        self.headers: list[dict[str, str]] = []
        self.gate = threading.Event()
        self.gate_ok: list[bool] = []
        self.stall_s = 30.0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.wire = self  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def image(self, index: int = -1) -> np.ndarray:
        """The RGB pixels of the image in the index-th request (decoded from its data URL)."""
        body = self.requests[index][1]
        url = body["messages"][0]["content"][1]["image_url"]["url"]
        data = base64.b64decode(url.split(",", 1)[1])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def chunk(content: str | None = None, finish: str | None = None, **extra) -> dict:
    delta = {} if content is None else {"content": content}
    return {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra,
    }  # fmt: skip


def error_body(message: str, kind: str, code: str) -> dict:
    return {"error": {"message": message, "type": kind, "code": code}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    @property
    def wire(self) -> WireServer:
        return self.server.wire  # type: ignore[attr-defined]

    # ---- plumbing -------------------------------------------------------------------------

    def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _send(self, data: str) -> None:
        self.wfile.write(data.encode())
        self.wfile.flush()

    def _event(self, obj) -> None:
        self._send(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n")

    # ---- endpoints ------------------------------------------------------------------------

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            models = [{"id": MODEL, "object": "model", "created": 0, "owned_by": "vlm_ros"}]
            self._json(200, {"object": "list", "data": models})
        elif self.path == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._json(404, error_body("no such path", "invalid_request_error", "not_found"))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        self.wire.requests.append((self.path, body))
        self.wire.headers.append(dict(self.headers))
        mode = self.wire.mode
        if body.get("model") != MODEL:
            msg = f"model {body.get('model')!r} is not served here; try {MODEL!r}"
            return self._json(404, error_body(msg, "invalid_request_error", "model_not_found"))
        if mode in ("e400", "e413", "e500", "e503", "e504", "e401"):
            return self._error(int(mode[1:]))
        if self.path == "/v1/rank":
            return self._rank(body, mode)
        if self.path == "/v1/chat/completions":
            return self._chat(body, mode)
        self._json(404, error_body("no such path", "invalid_request_error", "not_found"))

    def _error(self, status: int) -> None:
        code, kind, headers = {
            400: ("invalid_image", "invalid_request_error", {}),
            401: ("invalid_api_key", "authentication_error", {}),
            413: ("image_too_large", "invalid_request_error", {}),
            500: ("internal_error", "server_error", {}),
            503: ("overloaded", "server_error", {"Retry-After": "2"}),
            504: ("deadline", "server_error", {}),
        }[status]
        self._json(status, error_body(f"injected {status} {code}", kind, code), headers)

    def _rank(self, body: dict, mode: str) -> None:
        if mode.startswith("norank"):
            return self._json(404, {"detail": "Not Found"})  # FastAPI's 404 for a missing route
        cands = body["candidates"]
        probs = [1.0 / len(cands)] * len(cands)
        if mode == "rank_wrong":
            cands = list(reversed(cands))
        self._json(200, {
            "object": "vlm_ros.rank", "model": MODEL, "candidates": cands,
            "probabilities": probs, "log_likelihoods": [-1.0] * len(cands),
            "vlm_ros": {"timings_ms": VLM["timings_ms"], "queue_ms": 3.0, "server_ms": 12.0},
        })  # fmt: skip

    def _chat(self, body: dict, mode: str) -> None:
        if not body.get("stream") or mode == "nostream":
            return self._chat_whole(body, mode)
        self._start_stream()
        if mode == "stall":
            self._event(chunk("The"))
            time.sleep(self.wire.stall_s)
            return
        if mode == "malformed":
            self._event(chunk("The"))
            self._send("data: {this is not json\n\n")
            return
        if mode == "truncated":
            self._event(chunk("The"))
            self._event(chunk(" path"))
            return  # connection closed: no final chunk, no [DONE]
        if mode == "deadline_event":  # what vlm-ros serve sends when vlm_ros.deadline_ms passed
            self._event(chunk("The"))
            self._event(error_body("the deadline passed", "server_error", "deadline"))
            self._event("[DONE]")
            return
        if mode == "midstream_error":
            self._event(chunk("The"))
            self._event(error_body("replica died", "server_error", "replica_failed"))
            self._event("[DONE]")
            return
        for i, piece in enumerate(PIECES):
            if mode == "gated" and i > 0:
                self.wire.gate_ok.append(self.wire.gate.wait(10.0))
                self.wire.gate.clear()
            self._event(chunk(piece))
        usage = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
        self._event(chunk(finish="stop", usage=usage, vlm_ros=VLM))
        self._event("[DONE]")

    def _chat_whole(self, body: dict, mode: str) -> None:
        """Non-streamed: the logprobs fallback's one-token request."""
        choice = {"index": 0, "message": {"role": "assistant", "content": "stop"},
                  "finish_reason": "length"}  # fmt: skip
        if mode == "nostream":  # a server that ignores "stream": true
            choice["message"]["content"], choice["finish_reason"] = "".join(PIECES), "stop"
        if body.get("logprobs") and mode == "norank":
            top = [("stop", -0.2), (" slow", -2.0), ("continue", -3.0), ("turn", -2.5)]
            entries = [{"token": t, "logprob": lp} for t, lp in top]
            choice["logprobs"] = {"content": [{"token": "stop", "logprob": -0.2,
                                               "top_logprobs": entries}]}  # fmt: skip
        self._json(200, {"id": "x", "object": "chat.completion", "created": 0, "model": MODEL,
                         "choices": [choice]})  # fmt: skip


@contextmanager
def http_server_process(
    command: list[str], log: Path, url: str, what: str, ready_s: float, stop_s: float, **popen
) -> Iterator[subprocess.Popen]:
    """A real HTTP server (``vlm-ros serve``, llama-cpp-python's) in a process of its own, its
    output in ``log``: yields once ``url``/v1/models answers 200 (an early exit fails with the
    log's tail), then stops it with SIGTERM (SIGINT is ignored in background jobs), killing it
    after ``stop_s``."""
    import httpx  # the remote backend's client; the fault injector above does not need it

    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, **popen)

    def up() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            return httpx.get(f"{url}/v1/models", timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False

    try:
        end = time.monotonic() + ready_s
        while not up():
            if time.monotonic() > end:
                raise AssertionError(f"timed out after {ready_s} s waiting for {what} at {url}")
            time.sleep(0.2)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=stop_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
