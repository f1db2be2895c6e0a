"""The network: vision tower -> mlp2x_gelu projector -> Phi decoder.

Canonical module names (every published layout is remapped to these at load time, never in
the hot path):
    vision_tower.vision_model.*   transformers CLIPVisionModel / SiglipVisionModel as published
                                  (transformers >= 5 flattens it to vision_tower.*; see
                                  VlmModel.tower_prefix, which the loader maps onto)
    projector.{0,2}.*             Linear(vision_hidden -> hidden), GELU, Linear(hidden -> hidden)
    language_model.model.*        transformers PhiForCausalLM (separate q/k/v projections)
    language_model.lm_head.*      bias per family (absent in TinyLLaVABench's class)
The model sees tensors only; prompt text and <image> splicing live in prompt.py.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    PhiConfig,
    PhiForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vlm_ros.model.compat import tower_is_nested
from vlm_ros.model.families import FamilySpec, VisionKind

# How every published checkpoint (saved with transformers 4.3x/4.4x) names the vision tower.
PUBLISHED_TOWER_PREFIX = "vision_tower.vision_model."


class Projector(nn.Sequential):
    """LLaVA's ``mlp2x_gelu``: Linear -> GELU -> Linear (state-dict keys 0.* and 2.*)."""

    def __init__(self, vision_hidden: int, hidden: int):
        super().__init__(nn.Linear(vision_hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))


def build_vision_tower(
    kind: VisionKind, config: CLIPVisionConfig | SiglipVisionConfig
) -> nn.Module:
    """transformers' own tower for FamilySpec.vision_kind (checked when the spec is built)."""
    return CLIPVisionModel(config) if kind == "clip" else SiglipVisionModel(config)


@functools.cache
def installed_tower_prefix() -> str:
    """VlmModel.tower_prefix of the installed transformers, known before a model is built (the
    loader's Layout is final before the model exists): a one-layer tower on the meta device."""
    small = dict(hidden_size=8, intermediate_size=8, num_attention_heads=1, num_hidden_layers=1)
    with torch.device("meta"):
        tower = CLIPVisionModel(CLIPVisionConfig(**small, image_size=8, patch_size=4))
    return PUBLISHED_TOWER_PREFIX if tower_is_nested(tower) else "vision_tower."


class VlmModel(nn.Module):
    """LLaVA-style model assembled from transformers' own modules (not rewritten)."""

    def __init__(
        self,
        spec: FamilySpec,
        vision_config: CLIPVisionConfig | SiglipVisionConfig,
        text_config: PhiConfig,
    ):
        super().__init__()
        self.spec = spec
        self.vision_config = vision_config
        self.text_config = text_config
        self.vision_tower = build_vision_tower(spec.vision_kind, vision_config)
        self.projector = Projector(vision_config.hidden_size, text_config.hidden_size)
        self.language_model = PhiForCausalLM(text_config)
        if not spec.lm_head_bias:
            lm = self.language_model
            lm.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)

    @property
    def tower_prefix(self) -> str:
        """State-dict prefix of the tower's own modules in the installed transformers:
        "vision_tower.vision_model." before 5.0, "vision_tower." from 5.0 (flattened)."""
        return PUBLISHED_TOWER_PREFIX if tower_is_nested(self.vision_tower) else "vision_tower."

    @property
    def num_image_tokens(self) -> int:
        cfg = self.vision_config
        return self.spec.num_image_tokens(cfg.image_size, cfg.patch_size)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower -> selected layer -> drop first token or not.

        pixel_values: [B, 3, H, W] -> [B, N, vision_hidden]. The selected hidden state is taken
        before any post-layernorm, as every reference does.
        """
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.spec.select_layer]
        return feats[:, 1:] if self.spec.drop_first_token else feats

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> projected image embeddings [B, N, hidden]."""
        return self.projector(self.image_features(pixel_values))

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] token ids -> [B, S, hidden]."""
        return self.language_model.get_input_embeddings()(input_ids)
