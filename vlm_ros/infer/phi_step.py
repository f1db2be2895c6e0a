"""The one-token decode step of a Phi decoder, written over transformers' own modules and the
StaticCache's own storage (gpt-fast's ``decode_one_token``): what ``PhiForCausalLM.forward``
computes for one new token, without the machinery around it.

Why: on a CPU the step of the ``small`` preset spent about a quarter of its time outside any
kernel (docs/performance.md, "fp32 decode: where the time goes"): transformers builds a causal
mask over the whole static cache, computes the rotary table, wraps every output in a dataclass
and walks ~60 small ops per layer. Here the rotary table is built once for every cache slot, a
single query needs no mask, and attention reads only the live slots, not the unused ones.

It calls the decoder's modules (``q_proj``, ``fc1``, the LayerNorms...), so whatever replaced
the Linear layers (oneDNN, dynamic int8, int8/int4 weight-only) runs here too, on the same
weights. The keys and values land in the StaticCache's tensors at the slot the token takes, and
the cache's own length counter (transformers 5.x) advances with them, so prefill and
``score_branches``, which still run through transformers, find the cache as they left it.

The reference is transformers' forward on the same cache (``StaticDecoder.fast_step=False``);
``test_phi_step.py`` holds the two to the same greedy tokens, logits within float32 rounding and
the same cache, and ``test_static_decode.py`` the decoder to the eager one on every tiny
layout. Not used where the step is compiled (a CUDA graph already removes the overhead this
removes, and wants the fixed-shape form).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class _Layer:
    """One PhiDecoderLayer's modules, read once (attribute lookups are per-token overhead)."""

    norm: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    dense: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    fc1: nn.Module
    act: nn.Module
    fc2: nn.Module
    keys: torch.Tensor  # [1, heads, max_seq_len, head_dim], the StaticCache's storage
    values: torch.Tensor
    counter: torch.Tensor | None  # transformers 5.x: the layer's cumulative_length


class PhiDecodeStep:
    """token [1, 1] at cache slot ``position`` -> logits [1, V] (float32); writes the token's
    keys and values into the cache. ``lm`` is a PhiForCausalLM (its Linear layers may be
    swapped), ``cache`` a StaticCache for batch 1 already allocated."""

    def __init__(self, lm: nn.Module, cache, max_seq_len: int):
        model = lm.model
        attn0 = model.layers[0].self_attn
        self.heads = int(lm.config.num_attention_heads)
        self.kv_heads = int(lm.config.num_key_value_heads or self.heads)
        self.head_dim = int(attn0.head_dim)
        self.rotary = int(attn0.rotary_ndims)
        self.q_shape = (1, 1, self.heads, self.head_dim)
        self.kv_shape = (1, 1, self.kv_heads, self.head_dim)
        self.gqa = self.kv_heads != self.heads
        self.embed, self.final_norm = model.embed_tokens, model.final_layernorm
        self.head = lm.lm_head
        self.layers = [self._layer(layer, cache_layer) for layer, cache_layer in
                       zip(model.layers, cache.layers, strict=True)]  # fmt: skip
        first = self.layers[0].keys
        # cos/sin of every slot, as transformers' rotary embedding computes them per call
        with torch.inference_mode():
            slots = torch.arange(max_seq_len, device=first.device).unsqueeze(0)
            cos, sin = model.rotary_emb(first[:, :, :1], position_ids=slots)  # [1, L, rotary]
        self.cos, self.sin = cos[0].clone(), sin[0].clone()  # [L, rotary], this dtype

    @staticmethod
    def supports(lm: nn.Module) -> bool:
        """Whether the table of every slot's rotary angles is what transformers computes per
        call: true for the default rotary embedding (Phi-2, all three families); a "dynamic"
        scaling, whose angles depend on the length seen, keeps transformers' step."""
        return getattr(lm.model.rotary_emb, "rope_type", "default") == "default"

    @staticmethod
    def _layer(layer: nn.Module, cache_layer) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        norms = (attn.q_layernorm, attn.k_layernorm) if attn.qk_layernorm else (None, None)
        return _Layer(
            layer.input_layernorm, attn.q_proj, attn.k_proj, attn.v_proj, attn.dense, *norms,
            mlp.fc1, mlp.activation_fn, mlp.fc2, cache_layer.keys, cache_layer.values,
            getattr(cache_layer, "cumulative_length", None),
        )  # fmt: skip

    def linears(self) -> list:
        """Every Linear layer the step calls, in order (the head last)."""
        kinds = ("q", "k", "v", "dense", "fc1", "fc2")
        return [getattr(layer, kind) for layer in self.layers for kind in kinds] + [self.head]

    def swap_linears(self, swap) -> None:
        """Call ``swap(linear)``'s result where the step called ``linear``: kernels for this
        one-row step only (eager_gemv.py), the model's modules, which prefill calls, untouched."""
        self.layers = [replace(layer, q=swap(layer.q), k=swap(layer.k), v=swap(layer.v),
                               dense=swap(layer.dense), fc1=swap(layer.fc1),
                               fc2=swap(layer.fc2)) for layer in self.layers]  # fmt: skip
        self.head = swap(self.head)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Partial rotary embedding of x [1, heads, 1, head_dim] (transformers' arithmetic)."""
        rot, rest = x[..., : self.rotary], x[..., self.rotary :]
        half = self.rotary // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        return torch.cat(((rot * cos) + (rotated * sin), rest), dim=-1)

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        shape, kv_shape, gqa = self.q_shape, self.kv_shape, self.gqa
        cos, sin = self.cos[position], self.sin[position]
        live = position + 1
        hidden = self.embed(token)  # [1, 1, D]
        for layer in self.layers:
            x = layer.norm(hidden)
            q = layer.q(x).view(shape).transpose(1, 2)  # [1, heads, 1, head_dim]
            k = layer.k(x).view(kv_shape).transpose(1, 2)  # [1, kv_heads, 1, head_dim]
            v = layer.v(x).view(kv_shape).transpose(1, 2)
            if layer.q_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            layer.keys[:, :, position] = k[:, :, 0]
            layer.values[:, :, position] = v[:, :, 0]
            if layer.counter is not None:
                layer.counter.add_(1)
            att = F.scaled_dot_product_attention(
                q, layer.keys[:, :, :live], layer.values[:, :, :live], enable_gqa=gqa
            )  # one query sees every earlier slot: no mask
            att = layer.dense(att.transpose(1, 2).reshape(1, 1, -1))
            hidden = att + layer.fc2(layer.act(layer.fc1(x))) + hidden
        return self.head(self.final_norm(hidden))[:, -1].float()
