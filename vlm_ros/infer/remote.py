"""RemoteAssistant: the Assistant's interface (answer_request, rank_request, close, limits,
family) over HTTP, for ``backend: remote``. The model runs on a server that speaks OpenAI chat
completions: ``vlm-ros serve`` (docs/SERVING.md, the wire contract), or vLLM, SGLang, TGI,
Ollama, llama.cpp's server for a model vlm_ros does not implement.

One request: the frame is converted to RGB, encoded (wire_image: JPEG or PNG) into a data URL,
and POSTed to ``/v1/chat/completions`` with ``stream: true``; the server-sent events are parsed
line by line as they arrive, so ``request.on_text`` sees the answer grow token by token (the
node's Describe feedback). Answers always stream: one code path, and a deadline or cancel is
checked between events, closing the connection (the server sees the disconnect).

Action hints: ``POST /v1/rank`` (the project's extension: each candidate's probability, equal
to a local ``Assistant.rank``). A server without it (HTTP 404 that is not model_not_found) is
asked once for one token with ``logprobs``/``top_logprobs``; each candidate gets the
probability of the first-position tokens that begin it (``first_token_probabilities``): an
approximation, shared equally by candidates with the same first token. A server that returns
no logprobs either refuses with UnsupportedByServerError ("action hints not supported by this
server (no /v1/rank, no logprobs)"). Which one a server got is remembered.

Timings (StageTimings): encode (the frame's JPEG/PNG encoding), network (round trip minus
the server's own ``server_ms``), server_queue (the server's ``queue_ms``), the server's stages
from ``vlm_ros.timings_ms``, and total = the robot's whole wait. A third-party server sends no
``vlm_ros`` object: its time then counts as network.

Faults, each a RemoteError subclass naming the URL (errors.py); nothing waits past
request_timeout_s, or past the request's deadline (sent as ``vlm_ros.deadline_ms``, so the
server stops there too; the answer so far, stop_reason "deadline", as locally): connect
failure -> ServerUnreachableError "server unreachable at URL"; 400/413 -> RemoteInputError;
401/403 -> RemoteAuthError; 404 model_not_found -> ModelNotFoundError; 503 -> ServerBusyError;
504 or a timeout -> RemoteTimeoutError; other 4xx/5xx, malformed or truncated streams ->
BadResponseError. The node still configures with the server down;
``server_status()`` (a background probe of ``/v1/models`` every health_period_s, and every
request's outcome) is what /diagnostics shows.

httpx is imported here only: a node or CLI that runs the model locally never loads it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import httpx  # optional dependency: only the remote backend imports this module

from vlm_ros.config import GenerationConfig, ImageLimits, RemoteConfig
from vlm_ros.errors import (
    BadResponseError,
    InputError,
    ModelNotFoundError,
    RemoteAuthError,
    RemoteError,
    RemoteInputError,
    RemoteTimeoutError,
    ServerBusyError,
    ServerUnreachableError,
    UnsupportedByServerError,
    VlmError,
)
from vlm_ros.infer.image import to_rgb, validate_image
from vlm_ros.infer.wire_image import EncodedFrame, encode_frame
from vlm_ros.types import (
    STAGES,
    STOP_REASONS,
    ActionHint,
    Answer,
    ColorOrder,
    Request,
    StageTimings,
    StopReason,
    check_token_budget,
)

_log = logging.getLogger(__name__)
MAX_CANDIDATES = 32
TOP_LOGPROBS = 20  # OpenAI's maximum; what the logprobs fallback asks for
NO_RANKING = "action hints not supported by this server (no /v1/rank, no logprobs)"


@dataclass(frozen=True)
class RemoteFamily:
    """What ``Assistant.family`` gives the node's log line: a name."""

    name: str


@dataclass(frozen=True)
class ServerStatus:
    """The server as last seen (/diagnostics): reachable is None before any contact."""

    url: str
    model: str
    reachable: bool | None
    message: str
    seconds_since_contact: float | None  # since the last response of any kind
    probe_ms: float  # round trip of the last successful /v1/models probe
    ranking: str  # "rank" (/v1/rank), "logprobs", "unsupported" or "unknown" (not tried yet)
    model_listed: bool | None  # whether the last /v1/models probe listed the model


@dataclass
class _Reply:
    """What the server said about one request, in the wire contract's terms."""

    vlm: dict[str, Any]
    usage: dict[str, Any]
    finish_reason: str | None


class RemoteAssistant:
    """The Assistant's interface over an OpenAI-compatible HTTP server (module docstring).

    Thread-safe: httpx.Client pools connections across threads; no lock is held across a call.
    """

    def __init__(
        self,
        remote: RemoteConfig,
        model: str,
        generation: GenerationConfig = GenerationConfig(),
        limits: ImageLimits = ImageLimits(),
    ):
        if not model:
            raise InputError("the remote backend needs a model name (remote_model / model)")
        self.remote, self.model = remote, model
        self.generation, self.limits = generation, limits
        self.url = remote.server_url.rstrip("/")
        self.family = RemoteFamily(f"remote {model!r} at {self.url}")
        headers = {"Accept": "application/json"}
        key = _api_key(remote.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(headers=headers, timeout=self._timeout(None))
        self._ranking = "unknown"
        self._status_lock = threading.Lock()
        self._reachable: bool | None = None
        self._message = "not contacted yet"
        self._contact: float | None = None
        self._probe_ms = 0.0
        self._listed: bool | None = None
        self._closed = threading.Event()
        self._prober: threading.Thread | None = None
        if remote.health_period_s > 0:
            self._prober = threading.Thread(
                target=self._probe_loop, name="vlm-remote-probe", daemon=True
            )
            self._prober.start()

    # ---- the Assistant interface ----------------------------------------------------------

    def answer(
        self,
        image,
        question: str,
        max_new_tokens: int | None = None,
        generation: GenerationConfig | None = None,
        deadline: float | None = None,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        color_order: ColorOrder = "rgb",
    ) -> Answer:
        request = Request(
            image, question, color_order, max_new_tokens, generation, deadline, cancel, on_text
        )
        return self.answer_request(request)

    def rank(self, image, instruction: str, candidates, color_order: ColorOrder = "rgb"):
        return self.rank_request(Request(image, instruction, color_order), candidates)

    def answer_request(self, request: Request) -> Answer:
        """One streamed chat completion -> Answer (see the module docstring)."""
        self._check_open()
        if request.generation is None:
            request = replace(request, generation=self.generation)
        check_token_budget(request.token_budget)
        _check_question(request.question, self.limits)
        frame = self._encode(request)
        stopped = request.interrupted()
        if stopped:  # expired or cancelled before anything was sent, as the local pipeline
            return Answer("", (), StageTimings(encode=frame.encode_ms), stopped)
        body = self._body(request, frame)
        return _Stream(self, request, frame).run(body)

    def rank_request(self, request: Request, candidates) -> ActionHint:
        """``/v1/rank``, else first-token logprobs, else UnsupportedByServerError."""
        self._check_open()
        actions = _check_candidates(candidates)
        _check_question(request.question, self.limits)
        frame = self._encode(request)
        messages = _messages(request.question, frame)
        if self._ranking in ("unknown", "rank"):
            start = time.perf_counter()
            body = {"model": self.model, "messages": messages, "candidates": list(actions)}
            try:
                data = self._post_json("/v1/rank", body, endpoint_optional=True)
            except _NoEndpoint:
                self._ranking = "logprobs"
                _log.info("%s has no /v1/rank: action hints from first-token logprobs", self.url)
            else:
                self._ranking = "rank"
                return _rank_result(data, actions, frame, start, self.url)
        if self._ranking == "unsupported":
            raise UnsupportedByServerError(f"{NO_RANKING}: {self.url}")
        return self._rank_by_logprobs(request, actions, frame, messages)

    def close(self) -> None:
        """Stop the probe and close the connections; later calls raise VlmError."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._prober is not None:
            self._prober.join(timeout=self.remote.connect_timeout_s + 1.0)
        self._client.close()

    def __enter__(self) -> RemoteAssistant:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- /diagnostics ---------------------------------------------------------------------

    def server_status(self) -> ServerStatus:
        with self._status_lock:
            since = None if self._contact is None else time.monotonic() - self._contact
            return ServerStatus(
                self.url, self.model, self._reachable, self._message, since, self._probe_ms,
                self._ranking, self._listed,
            )  # fmt: skip

    def probe(self) -> ServerStatus:
        """GET /v1/models once (bounded by the timeouts) and record what it says."""
        start = time.perf_counter()
        try:
            response = self._client.get(f"{self.url}/v1/models", timeout=self._timeout(None))
        except httpx.TransportError as exc:
            self._seen(False, _unreachable(self.url, exc).args[0])
            return self.server_status()
        ms = (time.perf_counter() - start) * 1000.0
        if response.status_code != 200:
            self._seen(True, f"GET /v1/models answered HTTP {response.status_code}")
        else:
            try:
                ids = [m["id"] for m in response.json()["data"]]
            except (ValueError, KeyError, TypeError):
                ids = None
            if ids is None:
                self._seen(True, "GET /v1/models: not an OpenAI model list")
            elif self.model not in ids:
                self._seen(True, f"server does not list model {self.model!r}; it has {ids}")
            else:
                self._seen(True, "reachable, model listed")
            with self._status_lock:
                self._probe_ms, self._listed = ms, ids is not None and self.model in ids
        return self.server_status()

    def _probe_loop(self) -> None:
        while not self._closed.wait(0 if self._reachable is None else self.remote.health_period_s):
            try:
                self.probe()
            except Exception as exc:  # the probe must never die: /diagnostics relies on it
                self._seen(False, f"probe failed: {type(exc).__name__}: {exc}")
                self._closed.wait(self.remote.health_period_s)

    def _seen(self, reachable: bool, message: str) -> None:
        with self._status_lock:
            self._reachable, self._message = reachable, message
            if reachable:
                self._contact = time.monotonic()

    # ---- HTTP -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise VlmError("this RemoteAssistant is closed")

    def _timeout(self, deadline: float | None) -> httpx.Timeout:
        """Connect: connect_timeout_s; each read/write: request_timeout_s, cut to the deadline."""
        wait = self.remote.request_timeout_s
        if deadline is not None:
            wait = max(min(wait, deadline - time.monotonic()), 0.001)
        return httpx.Timeout(wait, connect=min(self.remote.connect_timeout_s, wait))

    def _encode(self, request: Request) -> EncodedFrame:
        image = validate_image(request.image, self.limits)
        frame = encode_frame(
            to_rgb(image, request.color_order), self.remote.image_encoding, self.remote.jpeg_quality
        )
        if len(frame.data) > self.remote.max_image_bytes:
            raise RemoteInputError(
                f"encoded image is {len(frame.data)} bytes, over the {self.remote.max_image_bytes}"
                f" the server takes ({self.remote.image_encoding}); send a smaller frame or JPEG"
            )
        return frame

    def _body(self, request: Request, frame: EncodedFrame) -> dict[str, Any]:
        gen = request.config
        body: dict[str, Any] = {
            "model": self.model,
            "messages": _messages(request.question, frame),
            "max_tokens": request.token_budget,
            "temperature": gen.temperature if gen.do_sample else 0.0,
            "stream": True,
        }
        if gen.do_sample:
            body["top_p"] = gen.top_p
            if gen.seed is not None:
                body["seed"] = gen.seed
        if request.deadline is not None:  # the server stops there too (its 504 "deadline")
            left_ms = (request.deadline - time.monotonic()) * 1000.0
            body["vlm_ros"] = {"deadline_ms": max(left_ms, 1.0)}
        return body

    def _post_json(
        self, path: str, body: dict[str, Any], endpoint_optional: bool = False
    ) -> dict[str, Any]:
        """A non-streaming POST -> its JSON object; errors mapped by _raise_for."""
        try:
            response = self._client.post(f"{self.url}{path}", json=body)
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                raise self._unreachable(exc) from exc
            raise self._timed_out(path) from exc
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        self._seen(True, "reachable")
        if response.status_code == 404 and endpoint_optional and not _model_missing(response):
            raise _NoEndpoint()
        if response.status_code != 200:
            raise self._http_error(response, path)
        try:
            data = response.json()
        except ValueError as exc:
            raise BadResponseError(f"{self.url}{path} answered non-JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise BadResponseError(f"{self.url}{path} answered {type(data).__name__}, not object")
        return data

    def _unreachable(self, exc: Exception) -> ServerUnreachableError:
        error = _unreachable(self.url, exc)
        self._seen(False, str(error))
        return error

    def _timed_out(self, path: str) -> RemoteTimeoutError:
        return RemoteTimeoutError(
            f"{self.url}{path} sent nothing for request_timeout_s "
            f"({self.remote.request_timeout_s} s)"
        )

    def _http_error(self, response: httpx.Response, path: str) -> RemoteError:
        """An HTTP error status -> the RemoteError subclass of the wire contract."""
        status, (message, code) = response.status_code, _error_of(response)
        where = f"{self.url}{path}: HTTP {status}"
        text = f"{where} {code + ': ' if code else ''}{message}"
        if status in (400, 413, 422):
            return RemoteInputError(text)
        if status in (401, 403):
            return RemoteAuthError(f"{text} (api_key_env {self.remote.api_key_env!r})")
        if status == 404 and _model_missing(response):
            return ModelNotFoundError(f"{where}: server has no model {self.model!r} ({message})")
        if status == 503:
            retry = response.headers.get("retry-after")
            return ServerBusyError(text + (f" (retry after {retry} s)" if retry else ""))
        if status == 504:
            return RemoteTimeoutError(text)
        return BadResponseError(text)

    def _rank_by_logprobs(self, request, actions, frame, messages) -> ActionHint:
        start = time.perf_counter()
        body = {
            "model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0.0,
            "logprobs": True, "top_logprobs": TOP_LOGPROBS, "stream": False,
        }  # fmt: skip
        data = self._post_json("/v1/chat/completions", body)
        try:
            top = data["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            pairs = [(str(t["token"]), float(t["logprob"])) for t in top]
        except (KeyError, IndexError, TypeError, ValueError):
            pairs = []
        if not pairs:
            self._ranking = "unsupported"
            raise UnsupportedByServerError(f"{NO_RANKING}: {self.url}")
        probs, logs = first_token_probabilities(pairs, actions)
        if not any(p > 0 for p in probs):
            raise UnsupportedByServerError(
                f"none of the candidates {list(actions)} begins with one of the "
                f"{len(pairs)} most likely first tokens at {self.url} (logprobs ranking)"
            )
        wall = (time.perf_counter() - start) * 1000.0
        timings = StageTimings(encode=frame.encode_ms, network=wall, total=frame.encode_ms + wall)
        return ActionHint(actions, probs, logs, timings)


class _NoEndpoint(Exception):
    """The server has no such endpoint (404 without code model_not_found)."""


class _DeadlineEvent(Exception):
    """The server ended the stream at the request's own deadline (error code "deadline")."""


class _Stream:
    """One streamed answer: the SSE events parsed as they arrive (see the module docstring)."""

    def __init__(self, owner: RemoteAssistant, request: Request, frame: EncodedFrame):
        self.owner, self.request, self.frame = owner, request, frame
        self.text, self.sent = "", ""
        self.reply = _Reply({}, {}, None)
        self.start = time.perf_counter()
        self.began = time.monotonic()

    def run(self, body: dict[str, Any]) -> Answer:
        owner, url = self.owner, f"{self.owner.url}/v1/chat/completions"
        try:
            timeout = owner._timeout(self.request.deadline)
            with owner._client.stream("POST", url, json=body, timeout=timeout) as response:
                owner._seen(True, "reachable")
                if response.status_code != 200:
                    response.read()
                    error = owner._http_error(response, "/v1/chat/completions")
                    if isinstance(error, RemoteTimeoutError) and self.request.interrupted():
                        return self._answer("deadline")  # the server kept our deadline
                    raise error
                if response.headers.get("content-type", "").startswith("application/json"):
                    self._whole(response)  # a server that ignores "stream": one JSON answer
                    stopped = None
                else:
                    stopped = self._events(response)
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                raise owner._unreachable(exc) from exc
            stopped = self.request.interrupted()
            if stopped is None:
                raise owner._timed_out("/v1/chat/completions") from exc
        except httpx.TransportError as exc:
            if isinstance(exc, httpx.ConnectError):
                raise owner._unreachable(exc) from exc
            raise BadResponseError(
                f"{url}: connection broke after {len(self.text)} characters of the answer "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        return self._answer(stopped)

    def _events(self, response: httpx.Response) -> StopReason | None:
        """Consume the stream; returns "deadline"/"cancelled" when the request stopped it."""
        url, done = self.owner.url, False
        for data in iter_sse(response.iter_lines()):
            if data == "[DONE]":
                done = True
                break
            if self.reply.finish_reason is not None:
                raise BadResponseError(f"{url}: stream went on after its final chunk: {data!r}")
            try:
                self._chunk(_parse_event(data, url))
            except _DeadlineEvent:
                return "deadline"
            stopped = self.request.interrupted()
            if stopped:
                return stopped
            if time.monotonic() - self.began > self.owner.remote.request_timeout_s:
                raise self.owner._timed_out("/v1/chat/completions")
        if not done or self.reply.finish_reason is None:
            missing = "[DONE]" if self.reply.finish_reason else "its final chunk"
            raise BadResponseError(
                f"{url}: stream ended before {missing} (truncated after "
                f"{len(self.text)} characters of the answer)"
            )
        return None

    def _whole(self, response: httpx.Response) -> None:
        """A non-streamed chat.completion, read as one final chunk."""
        url = self.owner.url
        try:
            data = json.loads(response.read())
            choice = data["choices"][0]
            event = {
                "choices": [{"delta": {"content": choice["message"]["content"] or ""},
                             "finish_reason": choice.get("finish_reason") or "stop"}],
                "usage": data.get("usage"), "vlm_ros": data.get("vlm_ros"),
            }  # fmt: skip
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise BadResponseError(f"{url}: malformed chat.completion ({exc!r})") from exc
        self._chunk(event)

    def _chunk(self, event: dict[str, Any]) -> None:
        url = self.owner.url
        if "error" in event:
            error = event["error"] if isinstance(event["error"], dict) else {}
            message = str(error.get("message") or event["error"])
            code = str(error.get("code") or "")
            if code == "deadline" and self.request.deadline is not None:
                raise _DeadlineEvent()  # the server kept our deadline: the answer so far
            cls = RemoteTimeoutError if code == "deadline" else BadResponseError
            raise cls(f"{url}: server error mid-stream: {code + ': ' if code else ''}{message}")
        try:
            choice = event["choices"][0] if event.get("choices") else {}
            piece = (choice.get("delta") or {}).get("content") or ""
            finish = choice.get("finish_reason")
        except (AttributeError, KeyError, TypeError) as exc:
            raise BadResponseError(f"{url}: malformed stream chunk {event!r}") from exc
        if not isinstance(piece, str):
            raise BadResponseError(f"{url}: malformed stream chunk {event!r}")
        if piece:
            self.text += piece
            grown = self.text.strip()
            if grown and grown != self.sent and self.request.on_text is not None:
                self.sent = grown
                self.request.on_text(grown)
        if isinstance(event.get("usage"), dict):
            self.reply.usage = event["usage"]
        if isinstance(event.get("vlm_ros"), dict):
            self.reply.vlm = event["vlm_ros"]
        if finish is not None:
            self.reply.finish_reason = str(finish)

    def _answer(self, stopped: StopReason | None) -> Answer:
        wall = (time.perf_counter() - self.start) * 1000.0
        vlm, text = self.reply.vlm, self.text.strip()
        if text != self.sent and self.request.on_text is not None and text:
            self.request.on_text(text)
        reason = stopped or _stop_reason(vlm.get("stop_reason"), self.reply.finish_reason)
        ids = tuple(int(i) for i in vlm.get("token_ids") or ())
        timings = _timings(vlm, self.frame.encode_ms, wall)
        prompt_tokens = int(self.reply.usage.get("prompt_tokens") or 0)
        return Answer(text, ids, timings, reason, prompt_tokens)


# ---- the wire contract's pieces -----------------------------------------------------------


def iter_sse(lines: Iterator[str]) -> Iterator[str]:
    """Server-sent events -> each event's data (its ``data:`` lines joined by newlines), as
    soon as the blank line ending it arrives. Comments (``:``) and other fields are skipped;
    an event cut off without its blank line is still yielded at the end of the stream."""
    data: list[str] = []
    for line in lines:
        line = line.rstrip("\r")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def first_token_probabilities(
    top: list[tuple[str, float]], actions: tuple[str, ...]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The logprobs fallback: each top first token (its text stripped, case folded) that begins
    one or more candidates gives its probability to them, shared equally; probabilities are
    normalised over the candidates, log-likelihoods are the log of each one's mass (-inf when
    no token begins it)."""
    mass = [0.0] * len(actions)
    folded = [a.casefold().replace("_", " ") for a in actions]
    for token, logprob in top:
        t = token.strip().casefold().replace("_", " ")
        if not t:
            continue
        hits = [i for i, a in enumerate(folded) if a.startswith(t)]
        for i in hits:
            mass[i] += math.exp(logprob) / len(hits)
    total = sum(mass)
    probs = tuple(m / total if total > 0 else 0.0 for m in mass)
    logs = tuple(math.log(m) if m > 0 else -math.inf for m in mass)
    return probs, logs


def _messages(question: str, frame: EncodedFrame) -> list[dict[str, Any]]:
    content = [
        {"type": "text", "text": question},
        {"type": "image_url", "image_url": {"url": frame.data_url()}},
    ]
    return [{"role": "user", "content": content}]


def _timings(vlm: dict[str, Any], encode_ms: float, wall_ms: float) -> StageTimings:
    """StageTimings of one remote request: the server's stages, its queue, the network (the
    round trip minus the server's time) and the robot's total wait."""
    server = vlm.get("timings_ms")
    server = server if isinstance(server, dict) else {}
    stages = {s: _ms(server.get(s)) for s in STAGES if s != "total"}
    server_ms = _ms(vlm.get("server_ms"))
    return StageTimings(
        **stages,
        encode=encode_ms,
        network=max(wall_ms - server_ms, 0.0),
        server_queue=_ms(vlm.get("queue_ms")),
        total=encode_ms + wall_ms,
    )


def _ms(value: object) -> float:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return out if math.isfinite(out) and out >= 0 else 0.0


def _stop_reason(vlm_reason: object, finish_reason: str | None) -> StopReason:
    """The server's vlm_ros.stop_reason where it is ours; else from OpenAI's finish_reason
    (a stop string or an end-of-sequence token both read "eos": the model ended it)."""
    if vlm_reason in STOP_REASONS:
        return vlm_reason  # type: ignore[return-value]
    return "max_new_tokens" if finish_reason == "length" else "eos"


def _rank_result(data, actions, frame: EncodedFrame, start: float, url: str) -> ActionHint:
    """/v1/rank's response -> ActionHint, its candidates checked against the ones sent."""
    wall = (time.perf_counter() - start) * 1000.0
    try:
        got = tuple(str(c) for c in data["candidates"])
        probs = tuple(float(p) for p in data["probabilities"])
        logs = tuple(float(x) for x in data["log_likelihoods"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BadResponseError(f"{url}/v1/rank: malformed response ({exc!r})") from exc
    if got != actions or len(probs) != len(actions) or len(logs) != len(actions):
        raise BadResponseError(f"{url}/v1/rank: answered for {list(got)}, asked {list(actions)}")
    vlm = data.get("vlm_ros") if isinstance(data.get("vlm_ros"), dict) else {}
    return ActionHint(actions, probs, logs, _timings(vlm, frame.encode_ms, wall))


def _parse_event(data: str, url: str) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise BadResponseError(f"{url}: malformed stream event {data[:80]!r}: {exc}") from exc
    if not isinstance(event, dict):
        raise BadResponseError(f"{url}: malformed stream event {data[:80]!r}")
    return event


def _error_of(response: httpx.Response) -> tuple[str, str]:
    """(message, code) of an OpenAI-form error body; the body's start when it is not one."""
    try:
        error = response.json()["error"]
        return " ".join(str(error.get("message", "")).split()), str(error.get("code") or "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return " ".join(response.text[:200].split()) or response.reason_phrase, ""


def _model_missing(response: httpx.Response) -> bool:
    return _error_of(response)[1] == "model_not_found"


def _unreachable(url: str, exc: Exception) -> ServerUnreachableError:
    return ServerUnreachableError(f"server unreachable at {url}: {type(exc).__name__}: {exc}")


def _api_key(env: str) -> str:
    """The API key from environment variable ``env`` ("" = none); a named, unset one is an
    InputError at configure, not a 401 at the first request."""
    if not env:
        return ""
    key = os.environ.get(env, "")
    if not key:
        raise InputError(f"api_key_env names {env!r}, but that environment variable is not set")
    return key


def _check_question(question: object, limits: ImageLimits) -> None:
    """The local pipeline's question check (prompt.validate_question), without its tokenizer."""
    if not isinstance(question, str) or not question.strip():
        raise InputError("question must be a non-empty string")
    if len(question) > limits.max_question_chars:
        raise InputError(
            f"question is {len(question)} characters, over the {limits.max_question_chars} limit"
        )


def _check_candidates(candidates) -> tuple[str, ...]:
    """ranking.validate_candidates' rules: 1..32 distinct non-empty strings."""
    actions = tuple(candidates) if isinstance(candidates, (list, tuple)) else ()
    if not actions or not all(isinstance(a, str) and a.strip() for a in actions):
        raise InputError(
            f"candidates must be a non-empty list of non-empty strings: {candidates!r}"
        )
    if len(set(actions)) != len(actions) or len(actions) > MAX_CANDIDATES:
        raise InputError(f"candidates must be 1..{MAX_CANDIDATES} distinct strings: {candidates!r}")
    return actions
