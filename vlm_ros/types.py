"""Results the core returns. Plain frozen dataclasses so the node, CLI, benchmark and bag
evaluator all read the same fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass

STAGES = ("preprocess", "vision", "projector", "prefill", "decode", "total")


@dataclass(frozen=True)
class StageTimings:
    """Wall-clock milliseconds per pipeline stage (CUDA events on GPU). ``decode`` is the time
    spent generating after the first token (or ranking candidates, for action hints)."""

    preprocess: float = 0.0
    vision: float = 0.0
    projector: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
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
    stop_reason: str
    prompt_tokens: int = 0

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
