"""A tiny Phi decoder and a greedy run of a static decoder, for the tests that compare two
decoders' tokens and logits (test_phi_step, test_huge_pages, test_cpu_kernels)."""

from __future__ import annotations

import torch
from transformers import PhiConfig, PhiForCausalLM

from vlm_ros.infer.static_decode import StaticDecoder


def tiny_phi(**overrides) -> PhiForCausalLM:
    """A seeded 2-layer Phi (hidden 64, 4 heads, 40% rotary); ``overrides`` change its config."""
    config = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, partial_rotary_factor=0.4,
                  max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    return PhiForCausalLM(PhiConfig(**{**config, **overrides})).eval()


def greedy(
    decoder: StaticDecoder, embeds: torch.Tensor, steps: int
) -> tuple[list[int], torch.Tensor]:
    """Prefill then ``steps`` greedy decode steps: the tokens and every step's logits
    [steps, V]."""
    logits, tokens, kept = decoder.prefill(embeds), [], []
    for _ in range(steps):
        tokens.append(int(logits.argmax(-1)))
        logits = decoder.decode_one_token(torch.tensor([[tokens[-1]]]))
        kept.append(logits.clone())
    return tokens, torch.cat(kept)
