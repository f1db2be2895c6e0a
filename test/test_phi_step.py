"""phi_step.PhiDecodeStep, the static decoder's uncompiled decode step, against its reference
(transformers' PhiForCausalLM forward on the same StaticCache, ``fast_step=False``): the same
logits to float32 rounding, the same greedy tokens, the same cache contents and counter, on
Phi variants the tiny checkpoints do not cover (qk LayerNorm, grouped-query heads, another
rotary fraction) and with quantized Linear layers. A negative control shows the comparison
catches a step that is off by one position. The tiny checkpoints' decode parity with the eager
reference is test_static_decode.py's."""

from __future__ import annotations

import copy

import pytest
import torch
from decode_helpers import greedy, tiny_phi
from transformers import PhiForCausalLM

from vlm_ros.infer.static_decode import StaticDecoder

ATOL = 2e-5  # float32: attention over the live slots only sums fewer (zero) terms
PROMPT, STEPS, MAX_SEQ = 9, 16, 48

VARIANTS = {
    "phi2-like": {},
    "qk-layernorm": {"qk_layernorm": True},
    "grouped-query": {"num_key_value_heads": 2},
    "rotary-half": {"partial_rotary_factor": 0.5},
}


def pair(lm: PhiForCausalLM, **kwargs) -> tuple[StaticDecoder, StaticDecoder]:
    """The fast step and transformers' step, each with its own cache, on the same weights."""
    reference = StaticDecoder(lm, MAX_SEQ, fast_step=False, **kwargs)
    return StaticDecoder(lm, MAX_SEQ, **kwargs), reference


def prompt(lm: PhiForCausalLM) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(1, PROMPT, lm.config.hidden_size, generator=generator)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.inference_mode()
def test_fast_step_equals_transformers_step(variant):
    lm = tiny_phi(**VARIANTS[variant])
    fast, reference = pair(lm, cpu_linear="torch")
    assert fast._fast is not None and reference._fast is None
    embeds = prompt(lm)
    want_tokens, want = greedy(reference, embeds, STEPS)
    got_tokens, got = greedy(fast, embeds, STEPS)
    assert got_tokens == want_tokens
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    for mine, theirs in zip(fast.cache.layers, reference.cache.layers, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-6, rtol=0)
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-6, rtol=0)
        if hasattr(theirs, "cumulative_length"):  # transformers 5.x: the layer's own counter
            assert int(mine.cumulative_length) == int(theirs.cumulative_length) == PROMPT + STEPS


@torch.inference_mode()
def test_branch_pass_after_fast_steps_matches_the_reference():
    """score_branches still runs transformers' forward: after fast steps, it must find the
    cache (and its counter) where transformers' own steps would have left it."""
    lm = tiny_phi()
    fast, reference = pair(lm, cpu_linear="torch")
    embeds = prompt(lm)
    greedy(fast, embeds, STEPS), greedy(reference, embeds, STEPS)
    tokens = torch.tensor([[3, 4, 5], [6, 7, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    got, want = fast.score_branches(tokens, mask), reference.score_branches(tokens, mask)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_negative_control_a_step_one_slot_off_is_caught():
    """The comparison above fails for a step that writes its keys one slot late (the rotary
    angle and the attended slots shift): the tolerance is tight enough to see it."""
    lm = tiny_phi()
    fast, reference = pair(lm, cpu_linear="torch")
    step = fast._fast
    fast._fast = lambda token, position: step(token, position + 1)
    embeds = prompt(lm)
    _, want = greedy(reference, embeds, STEPS)
    _, got = greedy(fast, embeds, STEPS)
    assert (got - want).abs().max() > 100 * ATOL


@pytest.mark.parametrize("quantize", ["int8", "int4_weight_only"])
@torch.inference_mode()
def test_fast_step_runs_the_quantized_layers(quantize):
    """Quantization swaps the Linear modules in place; the fast step calls whatever is there.
    Each decoder quantizes its own copy, from the same weights, so both see the same ones."""
    lm = tiny_phi(hidden_size=128, intermediate_size=256, num_attention_heads=4)
    fast = StaticDecoder(copy.deepcopy(lm), MAX_SEQ, quantize=quantize)
    reference = StaticDecoder(copy.deepcopy(lm), MAX_SEQ, quantize=quantize, fast_step=False)
    embeds = prompt(lm)
    want_tokens, want = greedy(reference, embeds, STEPS)
    got_tokens, got = greedy(fast, embeds, STEPS)
    assert got_tokens == want_tokens
    spread = float(want.max() - want.min())
    assert float((got - want).abs().max()) < 0.05 * spread  # kernels' rounding, not a bug


def test_a_length_dependent_rotary_keeps_transformers_step():
    """Dynamic rotary scaling changes the angles with the length seen: no table of them can be
    built ahead, so the decoder keeps transformers' forward (still correct, not lean)."""
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "partial_rotary_factor": 0.4,
               "rope_theta": 10000.0}  # fmt: skip
    lm = tiny_phi(rope_parameters=dynamic)  # transformers 5.x
    if lm.model.rotary_emb.rope_type != "dynamic":  # 4.x names it rope_scaling
        lm = tiny_phi(rope_scaling={"type": "dynamic", "factor": 2.0})
    assert lm.model.rotary_emb.rope_type == "dynamic"
    assert StaticDecoder(lm, MAX_SEQ)._fast is None
    assert StaticDecoder(tiny_phi(), MAX_SEQ)._fast is not None
