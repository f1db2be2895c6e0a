"""What differs between the library versions and builds users run, in one place.

transformers 4.56 to 5.x (Humble and JetPack machines keep the older; scripts/compat.sh tests
the floor) and torch builds with or without oneDNN's capability checks. Everything else
calls these instead of testing versions itself, so a new release is handled here once.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import Cache, PhiConfig, PhiForCausalLM


def cache_kwarg(cache: Cache | None) -> dict[str, Cache | None]:
    """``{name: cache}`` for PhiForCausalLM.forward: transformers renamed ``past_key_values``
    to ``cache`` (5.2x; the old name is removed in 5.40), and users run both sides of that."""
    return {_CACHE_NAME: cache}


_CACHE_NAME = (
    "cache"
    if "cache" in inspect.signature(PhiForCausalLM.forward).parameters
    else "past_key_values"
)


def rotary_factor(text: PhiConfig) -> float:
    """PhiConfig's partial_rotary_factor: an attribute in 4.x, inside ``rope_parameters`` in
    5.x (when given as a keyword)."""
    params = getattr(text, "rope_parameters", None) or {}
    return float(params.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", 1.0)))


def tower_is_nested(tower: nn.Module) -> bool:
    """transformers < 5 nests a CLIP/SigLIP vision model's modules under ``.vision_model``
    (as every published checkpoint names them); 5.x flattens them onto the tower."""
    return isinstance(getattr(tower, "vision_model", None), nn.Module)


def tower_body(tower: nn.Module) -> nn.Module:
    """The module holding the tower's ``embeddings`` and ``encoder``, nested or flat."""
    return tower.vision_model if tower_is_nested(tower) else tower


def encoder_layer_args(layer: nn.Module) -> tuple[None, ...]:
    """The mask arguments an encoder layer takes after the hidden states, all None (no mask):
    transformers 5 layers take (hidden, attention_mask); 4.x CLIP layers also take
    causal_attention_mask."""
    forward = inspect.signature(type(layer).forward).parameters
    return (None, None) if "causal_attention_mask" in forward else (None,)


def layer_output(out: torch.Tensor | tuple) -> torch.Tensor:
    """An encoder layer's hidden states: 5.x returns the tensor, 4.x a tuple around it."""
    return out[0] if isinstance(out, tuple) else out


def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU computes ``dtype`` matrix products natively (oneDNN's own check:
    AVX512-BF16 or AMX for bfloat16, AVX512-FP16 or AMX-FP16 for float16). Without it, torch
    emulates them, slower than float32. True where the check itself is missing (another torch
    build): then nothing is claimed."""
    check = {
        torch.bfloat16: "_is_mkldnn_bf16_supported",
        torch.float16: "_is_mkldnn_fp16_supported",
    }
    if dtype not in check:
        return True
    try:
        return bool(getattr(torch.ops.mkldnn, check[dtype])())
    except (AttributeError, RuntimeError):
        return True
