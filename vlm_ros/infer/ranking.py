"""Action hints: rank candidate answers by the model's log-likelihood, in one batched pass.

Each candidate c is scored as the answer text " c<|endoftext|>" after "ASSISTANT:":
- the leading space: answers were trained as "ASSISTANT: answer<|endoftext|>" (the template's
  separator is ": "), and GPT-2 BPE keeps the space inside the first word's token, so " stop" is
  the token the model actually predicts after "ASSISTANT:" (what greedy generation would emit);
- the terminating <|endoftext|>: it scores that the answer *ends* there, so a candidate that is
  only the start of a likelier longer answer ("turn" vs "turn_left") is not favoured, and every
  candidate is a complete answer.
Probabilities are a softmax over the candidates' total log-likelihoods (no length normalisation:
the total is the probability of the whole answer string).

Cost: the image+prompt prefix is prefilled once at batch 1; then all candidates run together in
one pass that shares the prefix's KV cache (decode.Decoder.score_branches). Each candidate's
first token is scored from the prefix's last logits, the rest from its own branch; a
candidate's last token is never an input (nothing after it is scored), so the branch pass runs
on the candidates without their last token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlm_ros.errors import InputError
from vlm_ros.infer.decode import Decoder
from vlm_ros.infer.prompt import ANSWER_PREFIX, encode_text
from vlm_ros.timing import StageTimer

MAX_CANDIDATES = 64


def validate_candidates(candidates: object) -> tuple[str, ...]:
    """A non-empty list of distinct, non-empty strings (at most MAX_CANDIDATES)."""
    if isinstance(candidates, str) or not isinstance(candidates, Sequence):
        raise InputError(f"candidates must be a list of strings, got {type(candidates).__name__}")
    if not candidates:
        raise InputError("candidates list is empty")
    if len(candidates) > MAX_CANDIDATES:
        raise InputError(f"too many candidates: {len(candidates)} > {MAX_CANDIDATES}")
    for c in candidates:
        if not isinstance(c, str):
            raise InputError(f"candidate {c!r} is not a string")
        if not c.strip():
            raise InputError(f"candidate {c!r} is empty")
    duplicates = sorted({c for c in candidates if list(candidates).count(c) > 1})
    if duplicates:
        raise InputError(f"duplicate candidates: {', '.join(duplicates)}")
    return tuple(candidates)


def candidate_ids(tokenizer, candidates: Sequence[str], stop_token_id: int) -> list[list[int]]:
    """Token ids of " candidate<|endoftext|>" for each candidate."""
    return [encode_text(tokenizer, ANSWER_PREFIX + c) + [stop_token_id] for c in candidates]


def pad_right(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """K id lists -> tokens [K, T] right-padded with pad_id, mask [K, T] (1 = real token)."""
    steps = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), steps), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), steps), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return tokens.to(device), mask.to(device)


def sequence_log_likelihoods(
    first_logits: torch.Tensor,
    branch_logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Sum of each candidate's own token log-probabilities.

    first_logits [1, V] predict every candidate's token 0; branch_logits [K, T - 1, V] at step t
    predict token t + 1. tokens, mask: [K, T] -> [K] float32.
    """
    branches = tokens.shape[0]
    predicting = torch.cat(
        [first_logits.expand(branches, -1).unsqueeze(1), branch_logits], dim=1
    )  # [K, T, V]: row t predicts tokens[:, t]
    logp = torch.log_softmax(predicting.float(), dim=-1)
    picked = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [K, T]
    return (picked * mask).sum(dim=1)


def score_candidates(
    decoder: Decoder,
    prefix_embeds: torch.Tensor,
    ids: Sequence[Sequence[int]],
    pad_id: int,
    timer: StageTimer,
) -> torch.Tensor:
    """Total log-likelihood of each candidate id list after the prefix [1, S, hidden] -> [K].

    Two decoder forward passes in all: the prefix prefill and one batched branch pass (one
    only, when every candidate is a single token).
    """
    tokens, mask = pad_right(ids, pad_id, prefix_embeds.device)  # [K, T]
    with timer.stage("prefill"):
        first = decoder.prefill(prefix_embeds)  # [1, V]
    with timer.stage("decode"):
        if tokens.shape[1] > 1:  # inputs: all but the last column; wanted: a next token exists
            branch = decoder.score_branches(tokens[:, :-1], mask[:, 1:])  # [K, T - 1, V]
        else:
            branch = first.new_zeros(tokens.shape[0], 0, first.shape[-1])
        totals = sequence_log_likelihoods(first, branch, tokens, mask)
    decoder.reset()  # the cache now holds K branches; never reuse it
    return totals


def probabilities(log_likelihoods: torch.Tensor) -> torch.Tensor:
    """Softmax over candidates' total log-likelihoods (in float64, so they sum to 1)."""
    return torch.softmax(log_likelihoods.double(), dim=0)
