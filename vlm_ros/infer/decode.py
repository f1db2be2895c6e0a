"""Splicing, decoding verbs and the generation loop (gpt-fast style: prefill /
decode_one_token / sample, each a few lines).

The eager decoder is the reference: transformers' PhiForCausalLM fed ``inputs_embeds`` with its
default DynamicCache. Any other decoder (the static-KV-cache one in static_decode.py) implements
the Decoder protocol below and must give the same tokens and logits; the loop, sampling and stop
rules here are shared by all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import DynamicCache, PhiForCausalLM

from vlm_ros.config import GenerationConfig, RuntimeConfig
from vlm_ros.errors import InputError, VlmError
from vlm_ros.infer.prompt import split_at_image
from vlm_ros.infer.static_decode import StaticDecoder
from vlm_ros.model.compat import cache_kwarg
from vlm_ros.timing import StageTimer
from vlm_ros.types import Request, StopReason


class Decoder(Protocol):
    """One sequence's decoder state. Logits are returned as float32.

    forward_calls counts decoder forward passes (tests assert ranking costs one prefill + one
    batched pass). reuses_outputs: decode_one_token's logits are overwritten by the next call
    (a replayed CUDA graph), so a caller that keeps them must copy them.
    """

    forward_calls: int
    reuses_outputs: bool

    def reset(self) -> None:
        """Forget the cached sequence."""

    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        """Start a sequence: embeds [1, S, hidden] -> logits of the last position [1, V]."""

    def decode_one_token(self, token: torch.Tensor) -> torch.Tensor:
        """Append one token: token [1, 1] -> its logits [1, V]."""

    def score_branches(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Continue the prefilled prefix with K branches at once (the prefix cache is shared,
        not recomputed). tokens, mask: [K, T], right-padded (mask: 1 = a real token whose
        logits are wanted, ones then zeros) -> logits [K, T, V]; rows where mask is 0 are not
        read. The decoder must be reset (or prefilled again) before it is used for anything
        else."""


class EagerDecoder:
    """PhiForCausalLM + DynamicCache, exactly as transformers runs it (the reference)."""

    def __init__(self, lm: PhiForCausalLM):
        self.lm = lm
        self.cache: DynamicCache | None = None
        self.length = 0  # positions held in the cache
        self.forward_calls = 0
        self.reuses_outputs = False

    def reset(self) -> None:
        self.cache, self.length = None, 0

    def _forward(self, **kwargs) -> torch.Tensor:
        self.forward_calls += 1
        return self.lm(**cache_kwarg(self.cache), use_cache=True, **kwargs).logits.float()

    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        self.cache, self.length = DynamicCache(config=self.lm.config), 0
        logits = self._forward(inputs_embeds=embeds, logits_to_keep=1)  # [1, 1, V]
        self.length = embeds.shape[1]
        return logits[:, -1]

    def decode_one_token(self, token: torch.Tensor) -> torch.Tensor:
        logits = self._forward(input_ids=token)  # [1, 1, V]
        self.length += 1
        return logits[:, -1]

    def score_branches(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assert self.cache is not None, "score_branches needs a prefilled prefix"
        branches, steps = tokens.shape
        self.cache.batch_repeat_interleave(branches)  # [1, h, P, d] -> [K, h, P, d]
        prefix = torch.ones(branches, self.length, dtype=mask.dtype, device=mask.device)
        positions = torch.arange(self.length, self.length + steps, device=tokens.device)
        logits = self._forward(
            input_ids=tokens,
            attention_mask=torch.cat([prefix, mask], dim=1),  # [K, P + T]
            position_ids=positions.expand(branches, steps),  # [K, T]
        )
        self.length += steps
        return logits  # [K, T, V]


def make_decoder(lm: PhiForCausalLM, runtime: RuntimeConfig) -> Decoder:
    """The decoder ``runtime.decoder`` selects, with its settings. The eager decoder is the
    unmodified reference: settings only the static one has are refused, not ignored."""
    if runtime.decoder == "eager":
        asked = [f"quantize={runtime.quantize!r}"] if runtime.quantize != "none" else []
        asked += ["compile_decode=True"] if runtime.compile_decode else []
        asked += ["cpu_linear='inductor'"] if runtime.cpu_linear == "inductor" else []
        if asked:
            raise InputError(
                f"{' and '.join(asked)} need decoder 'static'; the 'eager' decoder is the "
                "unmodified reference"
            )
        return EagerDecoder(lm)
    return StaticDecoder(
        lm, runtime.max_seq_len, runtime.compile_decode, runtime.quantize, runtime.cpu_linear,
        huge_pages=runtime.huge_pages, native_kernels=runtime.native_kernels,
    )  # fmt: skip


def splice_image(
    ids: Sequence[int],
    image_embeds: torch.Tensor,
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    expected_image_tokens: int,
) -> torch.Tensor:
    """Replace the one IMAGE_TOKEN_INDEX in ``ids`` by the N image embeddings.

    ids: S prompt ids with one placeholder; image_embeds: [1, N, hidden]
    -> inputs_embeds [1, S - 1 + N, hidden]. N must equal the count the prompt was sized for.
    """
    if image_embeds.shape[1] != expected_image_tokens:
        raise VlmError(
            f"image features do not match the image tokens: {image_embeds.shape[1]} features "
            f"for {expected_image_tokens} image tokens"
        )
    device = image_embeds.device
    before, after = (
        embed_tokens(torch.tensor([part], dtype=torch.long, device=device))  # [1, s, hidden]
        for part in split_at_image(ids)
    )
    return torch.cat([before, image_embeds.to(before.dtype), after], dim=1)


def make_generator(config: GenerationConfig, device: torch.device) -> torch.Generator | None:
    """A generator seeded per request, so the same seed gives the same sampled answer."""
    if not config.do_sample or config.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(config.seed)


def sample(
    logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. Greedy (argmax) unless config.do_sample with a positive
    temperature; then temperature, top-k, top-p (nucleus) and a multinomial draw."""
    if not config.do_sample or config.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / config.temperature
    if config.top_k > 0:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already hold top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs > config.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Generation:
    """Generated ids (the stop token excluded), why it stopped, and optionally the logits of
    every step (step_logits[i] produced token i; the last may have produced the stop token)."""

    token_ids: list[int]
    stop_reason: StopReason
    step_logits: list[torch.Tensor] = field(default_factory=list)


def generate(
    decoder: Decoder,
    embeds: torch.Tensor,
    request: Request,
    *,
    stop_token_id: int,
    timer: StageTimer,
    on_token: Callable[[list[int]], None] | None = None,
    keep_logits: bool = False,
) -> Generation:
    """Prefill ``embeds`` [1, S, hidden], then decode until the stop token, the request's token
    budget, its deadline or its cancel. Deadline and cancel are checked before every forward
    pass, so an expired request costs no model time and a cancelled one stops within one token.

    The token loop allocates nothing of its own and syncs with the device once per token, for
    the stop check (``int(token)``); the decode stage is timed as one span around the whole
    loop, not per token (on CUDA an event pair per token was two allocations per token).
    keep_logits (trace mode) keeps each step's logits, copied where the decoder reuses its
    output buffer (a compiled step replays a CUDA graph into one buffer, which the next step
    overwrites); otherwise nothing is copied."""
    out = Generation([], "max_new_tokens")
    reason = request.interrupted()
    if reason:
        out.stop_reason = reason
        return out
    config = request.config
    generator = make_generator(config, embeds.device)
    copy = keep_logits and decoder.reuses_outputs
    step = _Step(out, request, stop_token_id, on_token, keep_logits, copy)
    with timer.stage("prefill"):
        logits = decoder.prefill(embeds)  # [1, V]
        token = sample(logits, config, generator)  # [1]
        token_id = int(token)  # the stop check's one host sync
    if not step.take(token_id, logits):
        return out
    with timer.stage("decode"):
        while True:
            logits = decoder.decode_one_token(token.view(1, 1))  # [1, V]
            token = sample(logits, config, generator)
            if not step.take(int(token), logits):
                return out


@dataclass
class _Step:
    """The per-token bookkeeping of ``generate``: keep, stop, stream."""

    out: Generation
    request: Request
    stop_token_id: int
    on_token: Callable[[list[int]], None] | None
    keep_logits: bool
    copy_logits: bool

    def take(self, token_id: int, logits: torch.Tensor) -> bool:
        """Record one sampled token; False when generation stops here (out.stop_reason set)."""
        out = self.out
        if self.keep_logits:
            out.step_logits.append(logits[0].clone() if self.copy_logits else logits[0])
        if token_id == self.stop_token_id:
            out.stop_reason = "eos"
            return False
        out.token_ids.append(token_id)
        if self.on_token is not None:
            self.on_token(out.token_ids)
        if len(out.token_ids) >= self.request.token_budget:
            out.stop_reason = "max_new_tokens"
            return False
        reason = self.request.interrupted()
        if reason:
            out.stop_reason = reason
            return False
        return True
