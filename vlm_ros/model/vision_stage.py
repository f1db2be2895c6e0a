"""The vision stage as one module: embeddings -> the encoder layers actually needed -> drop first
token or not -> projector.

``VlmModel.image_features`` runs the whole tower with ``output_hidden_states`` and then picks
``hidden_states[select_layer]``: with the published select_layer -2 the last encoder layer is
computed and thrown away (1/24 of CLIP-L's work, 1/27 of SigLIP's). This module runs only the
layers up to the selected one, shares the model's parameters (nothing copied), and is what the
``torch`` vision backend runs (vision.TorchVisionEncoder) and the single graph the ONNX export,
the ONNX Runtime backend and the TensorRT engine are built from, so every compiled backend is
checked against exactly this reference.
"""

from __future__ import annotations

import torch
from torch import nn

from vlm_ros.errors import VlmError
from vlm_ros.model import compat
from vlm_ros.model.network import VlmModel


def layers_needed(num_layers: int, select_layer: int) -> int:
    """Encoder layers to run so the last one's output is ``hidden_states[select_layer]``.

    hidden_states has num_layers + 1 entries (entry 0 is the embeddings), so index i (or its
    negative alias) is the output of layer i.
    """
    index = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
    if not 0 <= index <= num_layers:
        raise VlmError(f"select_layer {select_layer} out of range for {num_layers} encoder layers")
    return index


class VisionStage(nn.Module):
    """pixel_values [B, 3, S, S] -> projected image embeddings [B, N, hidden].

    Equal to ``model.encode_images`` (same modules, same order) minus the unused layers.
    """

    def __init__(self, model: VlmModel):
        super().__init__()
        vision = compat.tower_body(model.vision_tower)
        self.embeddings = vision.embeddings
        # CLIP normalises the embeddings before the encoder (hidden_states[0] is after it);
        # SigLIP has no pre-norm.
        self.pre_norm = getattr(vision, "pre_layrnorm", None) or nn.Identity()
        count = layers_needed(len(vision.encoder.layers), model.spec.select_layer)
        self.layers = nn.ModuleList(vision.encoder.layers[:count])
        self.mask_args = compat.encoder_layer_args(self.layers[0]) if count else (None,)
        self.drop_first_token = model.spec.drop_first_token
        self.projector = model.projector
        self.num_image_tokens = model.num_image_tokens
        self.image_size = int(model.vision_config.image_size)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> the selected layer's patch features [B, N, vision_hidden]."""
        hidden = self.pre_norm(self.embeddings(pixel_values))  # [B, T, vision_hidden]
        for layer in self.layers:
            # no attention mask: every patch sees every one
            hidden = compat.layer_output(layer(hidden, *self.mask_args))
        return hidden[:, 1:] if self.drop_first_token else hidden  # [B, N, vision_hidden]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.features(pixel_values))  # [B, N, hidden]
