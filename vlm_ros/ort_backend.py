"""ONNX Runtime backend of the vision stage (``RuntimeConfig.vision_backend = "onnxruntime"``).

The portable compiled path: the graph onnx_export.py writes (vision layers up to the selected
one + drop-first-token + projector) run by ONNX Runtime. Providers: TensorRT, then CUDA, where
the installed onnxruntime has them and the model runs on CUDA; the CPU provider otherwise.

The graph is exported on first use into ``<engine_dir>/<model sha>/vision_<precision>.onnx`` and
checked against the PyTorch stage (onnx_export.TOLERANCE) before it serves; later loads reuse it
when its sidecar names the same weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from vlm_ros.config import RuntimeConfig
from vlm_ros.errors import VlmError
from vlm_ros.model import VlmModel
from vlm_ros.onnx_export import INPUT_NAME, OUTPUT_NAME, export_and_check, onnx_name, ort_session

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Short sha256 over the vision stage's parameters (names, shapes and a strided sample of
    values): identifies which weights an export was made from, without hashing every byte."""
    digest = hashlib.sha256()
    stage_prefixes = ("vision_tower.", "projector.")
    for name, tensor in model.state_dict().items():
        if not name.startswith(stage_prefixes):
            continue
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def structure_fingerprint(model: torch.nn.Module) -> str:
    """Short sha256 over the vision stage's parameter names and shapes (and nothing that
    depends on dtype): names a TensorRT engine, whose weights are then verified by a probe."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name.startswith(("vision_tower.", "projector.")):
            digest.update(f"{name}{tuple(tensor.shape)};".encode())
    spec = getattr(model, "spec", None)
    layer, drop = getattr(spec, "select_layer", None), getattr(spec, "drop_first_token", None)
    digest.update(f"select={layer};drop={drop}".encode())
    return digest.hexdigest()[:16]


def providers_for(device: str) -> list[str]:
    """GPU providers the installed onnxruntime offers (CUDA models only), then the CPU one."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    gpu = [p for p in GPU_PROVIDERS if p in available] if device.startswith("cuda") else []
    return [*gpu, "CPUExecutionProvider"]


def ensure_onnx(model: VlmModel, directory: Path, precision: str) -> Path:
    """The vision-stage ONNX for these weights: reused when its sidecar says it was made from
    them, else exported (and checked) now."""
    path = directory / weights_fingerprint(model) / onnx_name(precision)
    sidecar = Path(f"{path}.json")
    if path.is_file() and sidecar.is_file():
        report = json.loads(sidecar.read_text())
        if report.get("precision") == precision and report.get("max_rel_error") is not None:
            return path
    export_and_check(model, path, precision)
    return path


class OrtVisionEncoder:
    """VisionEncoder over an ONNX Runtime session. Records the whole stage as "vision"."""

    def __init__(self, model: VlmModel, onnx_path: str | Path, providers: list[str]):
        self.session = ort_session(onnx_path, providers)
        self.num_image_tokens = model.num_image_tokens
        param = next(model.language_model.parameters())
        self.device, self.dtype = param.device, param.dtype
        (inp,) = self.session.get_inputs()
        self.input_dtype = np.float16 if "float16" in inp.type else np.float32

    def encode(self, pixel_values: torch.Tensor, timer) -> torch.Tensor:
        pixels = pixel_values.detach().float().cpu().numpy().astype(self.input_dtype)
        with timer.stage("vision"):
            (embeds,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: pixels})  # [1, N, hidden]
        if embeds.shape[1] != self.num_image_tokens:
            raise VlmError(
                f"ONNX vision stage produced {embeds.shape[1]} image tokens, expected "
                f"{self.num_image_tokens}"
            )
        return torch.from_numpy(embeds).to(self.device, self.dtype)


def graph_precision(providers: list[str]) -> str:
    """fp16 where a GPU provider runs the graph, fp32 on the CPU provider (ONNX Runtime's CPU
    kernels are fp32; fp16 there would only add casts). A CUDA model with a CPU-only
    onnxruntime (the plain ``onnxruntime`` wheel) therefore gets the fp32 graph."""
    return "fp16" if providers and providers[0] in GPU_PROVIDERS else "fp32"


def make_encoder(model: VlmModel, runtime: RuntimeConfig) -> OrtVisionEncoder:
    """Factory registered in vision.BACKENDS["onnxruntime"]."""
    providers = providers_for(runtime.device)
    path = ensure_onnx(model, Path(runtime.engine_dir) / "onnx", graph_precision(providers))
    return OrtVisionEncoder(model, path, providers)
