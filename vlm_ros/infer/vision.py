"""Image encoding: pixel values -> projected image embeddings, with a pluggable backend.

The PyTorch backend (transformers' CLIP/SigLIP vision model + the mlp2x_gelu projector inside
VlmModel) is the reference. Compiled backends (onnxruntime, TensorRT) are registered by module
path in BACKENDS and imported only when selected, so the core never imports them otherwise. A
backend is a factory ``make_encoder(model, runtime) -> VisionEncoder``; each must produce the
same embeddings as TorchVisionEncoder within its stated tolerance (parity test).
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch

from vlm_ros.config import RuntimeConfig, VisionBackend
from vlm_ros.engines import cpu_kernels
from vlm_ros.errors import VlmError
from vlm_ros.model.network import VlmModel
from vlm_ros.model.vision_stage import VisionStage
from vlm_ros.timing import StageTimer

# RuntimeConfig.vision_backend (checked there) -> "module:factory". The factory is called as
# factory(model, runtime) and returns a VisionEncoder.
BACKENDS: dict[VisionBackend, str] = {
    "torch": "vlm_ros.infer.vision:TorchVisionEncoder",
    "onnxruntime": "vlm_ros.engines.ort_backend:make_encoder",
    "tensorrt": "vlm_ros.engines.trt_engine:make_encoder",
}


class VisionEncoder(Protocol):
    """What the pipeline calls. ``encode`` records the stages "vision" and "projector" on the
    timer (a fused compiled engine may record everything under "vision")."""

    num_image_tokens: int

    def encode(self, pixel_values: torch.Tensor, timer: StageTimer) -> torch.Tensor:
        """[1, 3, S, S] pixel values (any device/dtype) -> [1, N, hidden] on the decoder's
        device and dtype."""
        ...


class TorchVisionEncoder:
    """Reference backend: the model's own vision modules in PyTorch, run as VisionStage (only
    the encoder layers up to select_layer: bit-identical to ``VlmModel.encode_images``, which
    computes the last layer and throws it away).

    float32 on an x86 CPU: the Linear layers go through the kernels ``runtime.cpu_linear``
    picks, like the static decoder's (oneDNN on AMD CPUs by default, engines/cpu_kernels.py;
    same arithmetic, another summation order),
    in a copy of the stage that shares the model's weights; ``cpu_linear="torch"`` keeps the
    exact bits of encode_images.
    """

    def __init__(self, model: VlmModel, runtime: RuntimeConfig | None = None):
        runtime = runtime or RuntimeConfig()
        self.num_image_tokens = model.num_image_tokens
        param = next(model.vision_tower.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.stage = cpu_kernels.with_onednn_linear(VisionStage(model).eval(), runtime.cpu_linear)

    def encode(self, pixel_values: torch.Tensor, timer: StageTimer) -> torch.Tensor:
        pixel_values = pixel_values.to(self.device, self.dtype)  # [1, 3, S, S]
        with timer.stage("vision"):
            feats = self.stage.features(pixel_values)  # [1, N, vision_hidden]
        with timer.stage("projector"):
            embeds = self.stage.projector(feats)  # [1, N, hidden]
        if embeds.shape[1] != self.num_image_tokens:
            raise VlmError(
                f"vision tower produced {embeds.shape[1]} image tokens, expected "
                f"{self.num_image_tokens}"
            )
        return embeds


def make_vision_encoder(model: VlmModel, runtime: RuntimeConfig) -> VisionEncoder:
    """The encoder selected by ``runtime.vision_backend`` (imported lazily)."""
    module_name, factory_name = BACKENDS[runtime.vision_backend].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise VlmError(
            f"vision_backend {runtime.vision_backend!r} is not available ({exc}); "
            "use vision_backend 'torch'"
        ) from exc
    return getattr(module, factory_name)(model, runtime)
