"""What the core takes and returns: one Request in, Answer / ActionHint out. Plain frozen
dataclasses so the node, CLI, benchmark and bag evaluator all read the same fields."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import numpy as np

from vlm_ros.config import GenerationConfig, check_choice
from vlm_ros.errors import InputError

STAGES = ("preprocess", "vision", "projector", "prefill", "decode", "total")
# What the remote backend adds around the server's own STAGES: encoding the frame (JPEG/PNG),
# the network (round trip minus the server's time) and the server's queue. 0 for a local model.
REMOTE_STAGES = ("encode", "network", "server_queue")
TIMING_NAMES = (*STAGES[:-1], *REMOTE_STAGES, "total")  # StageTimings.as_dict()'s keys
StopReason = Literal["eos", "max_new_tokens", "deadline", "cancelled"]  # remote "stop": "eos"
STOP_REASONS: tuple[StopReason, ...] = get_args(StopReason)
ColorOrder = Literal["rgb", "bgr"]


def check_token_budget(n: object) -> None:
    """A token budget is a positive int; anything else is an InputError naming it."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {n!r}")


@dataclass(frozen=True)
class Request:
    """One request, built once at the API boundary (Assistant.answer/rank/trace, or by a caller
    that passes it to Assistant.answer_request) and handed down unchanged to the prefix, the
    decode loop and ranking, instead of a list of loose arguments.

    image: uint8 HxWx3 (RGB, or BGR with color_order "bgr"), HxW or HxWx4; checked by the
    preprocessor, which names the problem. max_new_tokens: the token budget; None takes
    ``generation``'s (and a None generation the Assistant's own). deadline: absolute
    time.monotonic() seconds (stop_reason "deadline"); cancel: a threading.Event (stop_reason
    "cancelled"); on_text: called with the whole partial answer each time it grows.
    """

    image: np.ndarray
    question: str
    color_order: ColorOrder = "rgb"
    max_new_tokens: int | None = None
    generation: GenerationConfig | None = None
    deadline: float | None = None
    cancel: threading.Event | None = None
    on_text: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None:
            check_token_budget(self.max_new_tokens)

    @property
    def config(self) -> GenerationConfig:
        """How to decode: ``generation``, else the defaults (greedy)."""
        return self.generation or GenerationConfig()

    @property
    def token_budget(self) -> int:
        """New tokens allowed: max_new_tokens, else the generation config's."""
        return self.config.max_new_tokens if self.max_new_tokens is None else self.max_new_tokens

    def interrupted(self) -> StopReason | None:
        """ "cancelled" or "deadline" if the request must stop now, else None."""
        if self.cancel is not None and self.cancel.is_set():
            return "cancelled"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "deadline"
        return None


@dataclass(frozen=True)
class StageTimings:
    """Wall-clock milliseconds per pipeline stage (CUDA events on GPU). ``decode`` is the time
    spent generating after the first token (or ranking candidates, for action hints).

    Remote backend: preprocess..decode are the server's (its ``vlm_ros.timings_ms``), and
    encode / network / server_queue are REMOTE_STAGES; ``total`` is then the robot's whole wait,
    encode through the last byte, so total = encode + network + server_queue + the server's
    own total (up to rounding)."""

    preprocess: float = 0.0
    vision: float = 0.0
    projector: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    encode: float = 0.0
    network: float = 0.0
    server_queue: float = 0.0
    total: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Answer:
    """A generated answer. ``stop_reason`` is one of ``eos``, ``max_new_tokens``, ``deadline``,
    ``cancelled``; on ``deadline``/``cancelled`` ``text`` holds what was generated so far."""

    text: str
    token_ids: tuple[int, ...]
    timings: StageTimings
    stop_reason: StopReason
    prompt_tokens: int = 0

    def __post_init__(self) -> None:
        check_choice("Answer.stop_reason", self.stop_reason, STOP_REASONS)

    @property
    def tokens_per_second(self) -> float:
        n = max(len(self.token_ids) - 1, 0)
        return n / (self.timings.decode / 1000.0) if self.timings.decode > 0 else 0.0


@dataclass(frozen=True)
class ActionHint:
    """Candidate actions ranked by the model's likelihood of each as the answer.
    ``probabilities`` are a softmax over the candidates' total log-likelihoods (they sum to 1)."""

    actions: tuple[str, ...]
    probabilities: tuple[float, ...]
    log_likelihoods: tuple[float, ...]
    timings: StageTimings

    @property
    def chosen(self) -> str:
        return self.actions[self.best_index]

    @property
    def confidence(self) -> float:
        return self.probabilities[self.best_index]

    @property
    def best_index(self) -> int:
        return max(range(len(self.probabilities)), key=self.probabilities.__getitem__)
