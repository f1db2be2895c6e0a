"""What one model replica of ``vlm-ros serve`` does with a request, without Ray.

The Ray Serve deployment (serving/ray_app.py) holds one ModelServer and calls it from a worker
thread; everything here is plain Python over the project's ``Assistant``, so the answers are the
local ones by construction (same image decoding, same prompt, same decoder) and the replica's
logic is testable without a cluster. Requests become dicts (answers) or event streams (started,
text, done / error); every failure is a wire.WireError turned into a dict, never a traceback.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from vlm_ros.config import GenerationConfig, RuntimeConfig
from vlm_ros.errors import ContextOverflowError, InputError, VlmError
from vlm_ros.infer.pipeline import Assistant
from vlm_ros.serving import wire
from vlm_ros.types import Answer

Emit = Callable[[dict], None]


class ModelServer:
    """One Assistant behind the wire contract. Thread-safe (the Assistant serialises calls)."""

    def __init__(self, assistant: Assistant, limits: wire.WireLimits = wire.WireLimits()):
        self.assistant, self.limits = assistant, limits

    @classmethod
    def load(
        cls,
        model: str,
        runtime: RuntimeConfig,
        generation: GenerationConfig = GenerationConfig(),
        limits: wire.WireLimits = wire.WireLimits(),
    ) -> ModelServer:
        return cls(Assistant.load(model, runtime, generation, limits.core), limits)

    def check(self) -> None:
        """Raises when the replica cannot serve (Ray Serve's check_health calls this)."""
        self.assistant._check_open()  # VlmError once closed: the replica must be replaced

    def close(self) -> None:
        self.assistant.close()

    # ---- chat completions ----------------------------------------------------------------

    def answer(
        self,
        job: wire.ChatJob,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> dict:
        """The finished answer as a dict (text, token_ids, stop_reason, timings_ms,
        prompt_tokens, queue_ms), or {"error": ...}. ``on_text`` gets the streamable text each
        time it grows; ``cancel`` stops the decoder within one token."""
        try:
            return self._answer(job, self._admit(job), on_text, cancel or threading.Event())
        except wire.WireError as exc:
            return {"error": exc.as_dict()}
        except Exception as exc:  # a bug or a broken model: one line to the client, not a hang
            return {"error": _server_error(exc).as_dict()}

    def stream(self, job: wire.ChatJob, emit: Emit, cancel: threading.Event) -> None:
        """Events for a streamed answer: {"started": queue_ms} once the image decoded and the
        deadline holds, {"text": streamable text so far} as it grows, then {"done": answer} or
        {"error": ...}. Runs to completion (or to ``cancel``) in the caller's thread."""
        try:
            admitted = self._admit(job)
            emit({"started": admitted[1]})
            emit({"done": self._answer(job, admitted, lambda t: emit({"text": t}), cancel)})
        except wire.WireError as exc:
            emit({"error": exc.as_dict()})
        except Exception as exc:
            emit({"error": _server_error(exc).as_dict()})

    def _admit(self, job: wire.ChatJob) -> tuple:
        """Decode the image and check the deadline: (image, queue_ms, monotonic deadline)."""
        started = time.time()
        queue_ms = (started - job.arrival) * 1000.0
        deadline = None
        if job.deadline_s is not None:
            left = job.arrival + job.deadline_s - started
            if left <= 0:
                raise _deadline(
                    f"the deadline passed while the request waited ({queue_ms:.0f} ms in the queue)"
                )
            deadline = time.monotonic() + left
        return wire.decode_image(job.image, self.limits), queue_ms, deadline

    def _answer(self, job, admitted, on_text, cancel: threading.Event) -> dict:
        image, queue_ms, deadline = admitted
        stops = wire.StopText(job.stop)
        sent = [""]

        def grow(text: str) -> None:
            if stops.push(text):
                cancel.set()  # a stop string appeared: the decoder stops within one token
            safe = stops.safe(text)
            if on_text is not None and len(safe) > len(sent[0]):
                sent[0] = safe
                on_text(safe)

        watch = bool(job.stop) or on_text is not None
        try:
            answer = self.assistant.answer(
                image,
                job.question,
                generation=job.generation(self.assistant.generation),
                deadline=deadline,
                on_text=grow if watch else None,
                cancel=cancel,
            )
        except ContextOverflowError as exc:
            raise wire.bad_request(str(exc), "context_length_exceeded") from None
        except InputError as exc:
            raise wire.bad_request(str(exc)) from None
        return _result(answer, stops, queue_ms)

    # ---- ranking -------------------------------------------------------------------------

    def rank(self, job: wire.RankJob) -> dict:
        """Candidates' probabilities and log-likelihoods (Assistant.rank), or {"error": ...}."""
        try:
            queue_ms = (time.time() - job.arrival) * 1000.0
            image = wire.decode_image(job.image, self.limits)
            try:
                hint = self.assistant.rank(image, job.question, list(job.candidates))
            except InputError as exc:
                raise wire.bad_request(str(exc)) from None
        except wire.WireError as exc:
            return {"error": exc.as_dict()}
        except Exception as exc:
            return {"error": _server_error(exc).as_dict()}
        return {
            "candidates": list(hint.actions),
            "probabilities": list(hint.probabilities),
            "log_likelihoods": list(hint.log_likelihoods),
            "timings_ms": hint.timings.as_dict(),
            "queue_ms": queue_ms,
        }


def _result(answer: Answer, stops: wire.StopText, queue_ms: float) -> dict:
    text, reason = answer.text, answer.stop_reason
    if stops.hit is not None:
        text, reason = stops.hit, "stop"
    elif reason == "deadline":
        raise _deadline(f"the deadline passed after {len(answer.token_ids)} generated tokens")
    return {
        "text": text,
        "token_ids": list(answer.token_ids),
        "stop_reason": reason,
        "timings_ms": answer.timings.as_dict(),
        "prompt_tokens": answer.prompt_tokens,
        "queue_ms": queue_ms,
    }


def _deadline(message: str) -> wire.WireError:
    return wire.WireError(504, message, "deadline", "timeout_error")


def _server_error(exc: Exception) -> wire.WireError:
    kind = "model error" if isinstance(exc, VlmError) else f"internal error ({type(exc).__name__})"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return wire.WireError(500, f"{kind}: {first}", "server_error", "server_error")
