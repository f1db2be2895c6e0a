"""The wire contract of ``vlm-ros serve`` (docs/SERVING.md), without Ray or a web framework.

OpenAI chat-completions bodies in; "chat.completion", "chat.completion.chunk", "vlm_ros.rank"
and OpenAI error objects out. The Ray Serve application (serving/ray_app.py) only moves these
plain dicts and dataclasses between HTTP and the model replicas, so everything a client can get
wrong is checked here, once, and testable without a cluster.

Where the work happens: the ingress parses the body and reads the image's *header* (format,
width x height: refused with 413 before a pixel is decoded); the compressed bytes travel to a
model replica, which decodes them exactly like the local CLI (Pillow, ``convert("RGB")``), so a
PNG gives the replica the same RGB array as ``vlm-ros ask`` and greedy answers match.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import json
import math
import time
import uuid
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlm_ros.config import GenerationConfig, ImageLimits
from vlm_ros.types import STAGES

MAX_IMAGE_BYTES = 8 << 20  # 8 MiB of encoded image
MAX_PIXELS = 4096 * 4096  # like the node's max_image_pixels: 16 MP
MAX_TOKENS_LIMIT = 4096  # larger budgets are refused before the context check
FORMATS = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/png": "PNG"}
SSE_DONE = b"data: [DONE]\n\n"


class WireError(Exception):
    """A refusal with its HTTP status and OpenAI error body; ``message`` is one line."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str = "invalid_request",
        type_: str = "invalid_request_error",
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type_
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}

    def as_dict(self) -> dict:
        """Picklable form, for a replica's answer to carry an error to the ingress."""
        return {
            "status": self.status,
            "message": self.message,
            "code": self.code,
            "type": self.type,
            "retry_after": self.retry_after,
        }

    @classmethod
    def from_dict(cls, d: dict) -> WireError:
        return cls(d["status"], d["message"], d["code"], d["type"], d.get("retry_after"))


def bad_request(message: str, code: str = "invalid_request") -> WireError:
    return WireError(400, message, code)


@dataclass(frozen=True)
class WireLimits:
    """What the server accepts: encoded image bytes, decoded pixels, question length (the
    core's ImageLimits) and the token budget."""

    max_image_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_PIXELS
    max_tokens: int = MAX_TOKENS_LIMIT
    core: ImageLimits = field(default_factory=ImageLimits)


@dataclass(frozen=True)
class ChatJob:
    """One chat completion, as it crosses from the ingress to a model replica (picklable, the
    image still compressed). ``arrival``: time.time() at the ingress; ``deadline_s``: seconds
    after arrival (the body's optional ``vlm_ros.deadline_ms``)."""

    question: str
    image: bytes
    max_tokens: int | None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    arrival: float = 0.0
    deadline_s: float | None = None

    def generation(self, default: GenerationConfig) -> GenerationConfig:
        """temperature 0 is greedy (the local default); above 0 samples."""
        return GenerationConfig(
            max_new_tokens=self.max_tokens or default.max_new_tokens,
            do_sample=self.temperature > 0,
            temperature=self.temperature if self.temperature > 0 else 1.0,
            top_p=self.top_p,
            seed=self.seed,
        )


@dataclass(frozen=True)
class RankJob:
    """One /v1/rank request as it crosses to a replica."""

    question: str
    image: bytes
    candidates: tuple[str, ...]
    arrival: float = 0.0


# ---- parsing -----------------------------------------------------------------------------------


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def check_model(body: dict, served_name: str) -> None:
    model = body.get("model")
    if model is None:
        raise bad_request("'model' is required")
    if model != served_name:
        raise WireError(
            404,
            f"model {model!r} is not served here; this server serves {served_name!r}",
            "model_not_found",
        )


def parse_chat(body: dict, served_name: str, limits: WireLimits, arrival: float) -> ChatJob:
    """A chat-completions body -> ChatJob, or a WireError naming what is wrong."""
    check_model(body, served_name)
    question, image = user_message(body.get("messages"), limits)
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise bad_request(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise bad_request(f"max_tokens is {max_tokens}, at most {limits.max_tokens} allowed")
    temperature = _number(body, "temperature", 0.0, 0.0, 100.0)
    top_p = _number(body, "top_p", 1.0, 1e-6, 1.0)
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise bad_request(f"seed must be an integer, got {seed!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request(f"stream must be true or false, got {stream!r}")
    ext = body.get("vlm_ros") or {}
    deadline_ms = ext.get("deadline_ms") if isinstance(ext, dict) else None
    if deadline_ms is not None and (not isinstance(deadline_ms, (int, float)) or deadline_ms <= 0):
        raise bad_request(f"vlm_ros.deadline_ms must be a positive number, got {deadline_ms!r}")
    return ChatJob(
        question,
        image,
        max_tokens,
        temperature,
        top_p,
        seed,
        _stops(body.get("stop")),
        stream,
        arrival,
        None if deadline_ms is None else deadline_ms / 1000.0,
    )


def parse_rank(body: dict, served_name: str, limits: WireLimits, arrival: float) -> RankJob:
    check_model(body, served_name)
    question, image = user_message(body.get("messages"), limits)
    candidates = body.get("candidates")
    if not isinstance(candidates, list) or not candidates:
        raise bad_request("'candidates' must be a non-empty list of strings")
    if not all(isinstance(c, str) for c in candidates):
        raise bad_request("every candidate must be a string")
    return RankJob(question, image, tuple(candidates), arrival)


def user_message(messages: object, limits: WireLimits) -> tuple[str, bytes]:
    """The last user message's text (the question) and its one image (compressed bytes, the
    header checked). System and earlier turns are refused: the model is single-turn."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list")
    if (
        any(not isinstance(m, dict) or m.get("role") != "user" for m in messages)
        or len(messages) != 1
    ):
        raise bad_request("'messages' must hold exactly one message, with role 'user'")
    content = messages[0].get("content")
    if not isinstance(content, list):
        raise bad_request("the user message's content must be a list of text and image_url parts")
    texts, urls = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise bad_request("image_url must be {'url': 'data:image/...;base64,...'}")
            urls.append(url)
        else:
            raise bad_request(f"unsupported content part {kind!r}: use 'text' and 'image_url'")
    if len(urls) != 1:
        raise bad_request(f"the user message must hold exactly one image, got {len(urls)}")
    question = "\n".join(texts)
    if not question.strip():
        raise bad_request("the question (the message's text) is empty")
    if len(question) > limits.core.max_question_chars:
        raise bad_request(
            f"the question is too long: {len(question)} characters, at most "
            f"{limits.core.max_question_chars} allowed"
        )
    image = image_bytes(urls[0], limits)
    check_image_header(image, limits)
    return question, image


def image_bytes(url: str, limits: WireLimits) -> bytes:
    """A ``data:image/png;base64,...`` / jpeg URL -> its bytes (size checked before decoding
    the base64: four characters carry three bytes)."""
    if not url.startswith("data:"):
        raise bad_request(
            "image_url must be a data URL (data:image/jpeg;base64,...); "
            "the server fetches no remote URLs"
        )
    head, sep, payload = url.partition(",")
    mime = head[5:].split(";")[0].strip().lower()
    if not sep or ";base64" not in head:
        raise bad_request("image data URL must be base64 encoded (data:image/png;base64,...)")
    if mime not in FORMATS:
        raise bad_request(f"image type {mime!r} is not supported; send image/jpeg or image/png")
    if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
        raise _too_large(
            f"image is about {len(payload) * 3 // 4} bytes, at most "
            f"{limits.max_image_bytes} allowed"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"image data URL is not valid base64: {exc}") from None
    if len(data) > limits.max_image_bytes:
        raise _too_large(f"image is {len(data)} bytes, at most {limits.max_image_bytes} allowed")
    if not data:
        raise bad_request("image data is empty")
    return data


def _too_large(message: str) -> WireError:
    return WireError(413, message, "image_too_large")


def _open(data: bytes) -> Image.Image:
    """Pillow's lazy open (header only); its decompression-bomb guard counts as too large."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large(f"image is too large (decompression-bomb guard): {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise bad_request(f"cannot decode the image: {exc}", "invalid_image") from None
    if image.format not in ("JPEG", "PNG"):
        raise bad_request(f"image data is {image.format}, not JPEG or PNG", "invalid_image")
    return image


def check_image_header(data: bytes, limits: WireLimits) -> tuple[int, int]:
    """(height, width) from the header, refused (413/400) before any pixel is decoded."""
    with _open(data) as image:
        width, height = image.size
    if height * width > limits.max_pixels:
        raise _too_large(
            f"image is {height}x{width} = {height * width} pixels, at most "
            f"{limits.max_pixels} allowed (refused before decoding)"
        )
    side = limits.core
    if max(height, width) > side.max_side or min(height, width) < side.min_side:
        code = 413 if max(height, width) > side.max_side else 400
        raise WireError(
            code,
            f"image is {height}x{width}; each side must be {side.min_side} to "
            f"{side.max_side} pixels",
            "image_too_large" if code == 413 else "invalid_image",
        )
    return height, width


def decode_image(data: bytes, limits: WireLimits) -> np.ndarray:
    """Compressed bytes -> HxWx3 RGB uint8, as the CLI reads a file (PIL convert("RGB"))."""
    check_image_header(data, limits)
    with _open(data) as image:
        try:
            return np.asarray(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as exc:  # truncated after a good header
            raise bad_request(f"cannot decode the image: {exc}", "invalid_image") from None


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise bad_request(f"{key} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _stops(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("stop must be a non-empty string or a list of them")
    if len(stops) > 4:
        raise bad_request(f"at most 4 stop strings are allowed, got {len(stops)}")
    return tuple(stops)


def check_auth(authorization: str | None, key_sha256: str | None) -> None:
    """``Authorization: Bearer KEY`` against the SHA-256 of the server's key (the key itself
    never travels to the replicas); no key configured: everything passes."""
    if key_sha256 is None:
        return
    scheme, _, key = (authorization or "").partition(" ")
    digest = hashlib.sha256(key.strip().encode()).hexdigest()
    if scheme.lower() != "bearer" or not hmac.compare_digest(digest, key_sha256):
        raise WireError(
            401,
            "missing or wrong API key (Authorization: Bearer KEY)",
            "invalid_api_key",
            "authentication_error",
        )


# ---- stop strings ----------------------------------------------------------------------------


class StopText:
    """Stop strings over a growing answer text: ``hit`` is the text cut before the first stop
    string once one appears; ``safe(text)`` is what may be streamed (the tail that could still
    become a stop string is held back)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.hit = stops, None
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, text: str) -> bool:
        """True once a stop string appeared (then ``hit`` holds the cut text)."""
        if self.hit is None and self.stops:
            cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
            if cuts:
                self.hit = text[: min(cuts)]  # as OpenAI: up to the stop string, unstripped
        return self.hit is not None

    def safe(self, text: str) -> str:
        if self.hit is not None:
            return self.hit
        return text[: len(text) - self.hold] if self.hold else text


# ---- responses --------------------------------------------------------------------------------

FINISH = {"eos": "stop", "stop": "stop", "max_new_tokens": "length", "cancelled": "stop"}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def extension(result: dict, arrival: float) -> dict:
    """The "vlm_ros" object of a finished answer (``result``: what a replica returned)."""
    return {
        "token_ids": list(result["token_ids"]),
        "stop_reason": result["stop_reason"],
        "timings_ms": {k: round(result["timings_ms"].get(k, 0.0), 3) for k in STAGES},
        "queue_ms": round(result["queue_ms"], 3),
        "server_ms": round((time.time() - arrival) * 1000.0, 3),
    }


def completion(cid: str, model: str, result: dict, arrival: float) -> dict:
    n_prompt, n_out = result["prompt_tokens"], len(result["token_ids"])
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(arrival),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result["text"]},
                "finish_reason": FINISH[result["stop_reason"]],
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": n_prompt,
            "completion_tokens": n_out,
            "total_tokens": n_prompt + n_out,
        },
        "vlm_ros": extension(result, arrival),
    }


def chunk(cid: str, model: str, created: int, delta: dict, finish: str | None = None) -> dict:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def rank_response(model: str, result: dict, arrival: float) -> dict:
    return {
        "object": "vlm_ros.rank",
        "model": model,
        "candidates": list(result["candidates"]),
        "probabilities": list(result["probabilities"]),
        "log_likelihoods": list(result["log_likelihoods"]),
        "vlm_ros": {
            "timings_ms": {k: round(result["timings_ms"].get(k, 0.0), 3) for k in STAGES},
            "queue_ms": round(result["queue_ms"], 3),
            "server_ms": round((time.time() - arrival) * 1000.0, 3),
        },
    }


def models_list(model: str, created: int) -> dict:
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "vlm_ros"}],
    }


def sse(obj: dict) -> bytes:
    """One server-sent event."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
