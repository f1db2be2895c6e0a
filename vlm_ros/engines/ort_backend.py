"""ONNX Runtime backend of the vision stage (``RuntimeConfig.vision_backend = "onnxruntime"``).

The portable compiled path: the graph onnx_export.py writes (vision layers up to the selected
one + drop-first-token + projector) run by ONNX Runtime. Providers: TensorRT, then CUDA, where
the installed onnxruntime has them and the model runs on CUDA (on the model's GPU; TensorRT's
engines cached under ``<engine_dir>/ort_trt``); the CPU provider otherwise. ONNX Runtime
quietly drops a GPU provider whose libraries do not load (CUDA, cuDNN, TensorRT) and runs on
the CPU: the session's real providers are read back, the fallback is logged, and an fp16
graph is swapped for the fp32 one there.

Input and output are bound to torch tensors (IOBinding) on the device the session runs on: on
CUDA no host round trip per frame. A graph served by a GPU provider is checked once at load
against the PyTorch stage (the export check ran it on the CPU provider).

The graph is exported on first use into ``<engine_dir>/<weights sha>-<structure
sha>/vision_<precision>.onnx`` (structure: names, shapes, select layer, drop-first-token) and
checked against the PyTorch stage (onnx_export.TOLERANCE) before it serves; later loads reuse it
when its sidecar names the same precision and output shape. Never run: the GPU providers (no
onnxruntime-gpu with a GPU here); IOBinding is tested on the CPU provider.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlm_ros.config import RuntimeConfig
from vlm_ros.engines.naming import structure_fingerprint, weights_fingerprint
from vlm_ros.engines.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    TOLERANCE,
    export_and_check,
    onnx_name,
    ort_session,
    probe_reference,
    relative_error,
)
from vlm_ros.errors import VlmError
from vlm_ros.model.network import VlmModel
from vlm_ros.timing import StageTimer

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
TORCH_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}
_log = logging.getLogger(__name__)


def providers_for(device: str) -> list[str]:
    """GPU providers the installed onnxruntime offers (CUDA models only), then the CPU one."""
    import onnxruntime as ort  # optional dependency (the onnx extra)

    available = set(ort.get_available_providers())
    gpu = [p for p in GPU_PROVIDERS if p in available] if device.startswith("cuda") else []
    return [*gpu, "CPUExecutionProvider"]


def provider_options(name: str, device: torch.device, engine_dir: Path) -> dict[str, Any]:
    """ONNX Runtime options of a provider: the model's GPU, and for TensorRT fp16 kernels and
    an engine cache (without it every start rebuilds the engine: minutes on a Jetson)."""
    index = device.index if device.index is not None else 0
    if name == "CUDAExecutionProvider":
        return {"device_id": index}
    if name == "TensorrtExecutionProvider":
        return {
            "device_id": index,
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(engine_dir / "ort_trt"),
        }
    return {}


def expected_output_shape(model: VlmModel) -> list[int]:
    return [1, int(model.num_image_tokens), int(model.text_config.hidden_size)]


def ensure_onnx(model: VlmModel, directory: Path, precision: str) -> Path:
    """The vision-stage ONNX for these weights and this stage structure: reused when its
    sidecar says it was checked in this precision and gives this output shape, else exported
    (and checked) now. The old sidecar goes first, so an interrupted export is never reused."""
    key = f"{weights_fingerprint(model)}-{structure_fingerprint(model)}"
    path = directory / key / onnx_name(precision)
    sidecar = Path(f"{path}.json")
    if path.is_file() and sidecar.is_file():
        report = json.loads(sidecar.read_text())
        if (
            report.get("precision") == precision
            and report.get("max_rel_error") is not None
            and list(report.get("output_shape", [])) == expected_output_shape(model)
        ):
            return path
    sidecar.unlink(missing_ok=True)
    export_and_check(model, path, precision)
    return path


class OrtVisionEncoder:
    """VisionEncoder over an ONNX Runtime session. Records the whole stage as "vision".

    Input and output are torch tensors bound to the session (IOBinding) on the device it runs
    on: the model's GPU under a GPU provider, else the CPU. ``encode`` returns that output
    buffer where no cast or move is needed: read or copy it before the next call.
    """

    def __init__(self, model: VlmModel, onnx_path: str | Path, providers: list):
        self.path = Path(onnx_path)
        self.session = ort_session(onnx_path, providers)
        self.providers = list(self.session.get_providers())  # what really runs it
        self.num_image_tokens = model.num_image_tokens
        param = next(model.language_model.parameters())
        self.device, self.dtype = param.device, param.dtype
        on_gpu = self.providers[0] in GPU_PROVIDERS and self.device.type == "cuda"
        self.io_device = self.device if on_gpu else torch.device("cpu")
        (inp,), (out,) = self.session.get_inputs(), self.session.get_outputs()
        self.input_dtype, out_dtype = TORCH_DTYPES[inp.type], TORCH_DTYPES[out.type]
        shape = [int(d) if isinstance(d, int) else -1 for d in out.shape]
        if shape != expected_output_shape(model):
            raise VlmError(
                f"{onnx_path}: the graph gives {out.shape}, this model needs "
                f"{expected_output_shape(model)} (image tokens x hidden); delete it to re-export"
            )
        self.output = torch.empty(shape, dtype=out_dtype, device=self.io_device)
        # One binding: the output buffer bound once, each frame's pixels rebound in place (the
        # caller's tensor itself where dtype and device fit: no copy).
        self.binding = self.session.io_binding()
        self._bind(self.binding.bind_output, OUTPUT_NAME, self.output)

    def encode(self, pixel_values: torch.Tensor, timer) -> torch.Tensor:
        with timer.stage("vision"):
            pixels = pixel_values.detach().to(self.io_device, self.input_dtype).contiguous()
            if self.io_device.type == "cuda":  # ORT runs on its own stream: inputs ready first
                torch.cuda.current_stream(self.io_device).synchronize()
            self._bind(self.binding.bind_input, INPUT_NAME, pixels)
            self.session.run_with_iobinding(self.binding)  # [1, N, hidden]
            return self.output.to(self.device, self.dtype)  # no-op where they already match

    def _bind(self, bind: Any, name: str, tensor: torch.Tensor) -> None:
        kind, index = self.io_device.type, self.io_device.index or 0
        bind(name, kind, index, _np_dtype(tensor.dtype), list(tensor.shape), tensor.data_ptr())


def _np_dtype(dtype: torch.dtype) -> type:
    return np.float16 if dtype == torch.float16 else np.float32


def check_session(encoder: OrtVisionEncoder, model: VlmModel, precision: str) -> float:
    """Relative error of the serving session against the float32 PyTorch stage on a seeded
    probe image; VlmError above TOLERANCE[precision]. The export check ran the graph on the
    CPU provider: a GPU provider (its own kernels, TensorRT's fusions) is checked here."""
    pixels, expected = probe_reference(model)
    with torch.inference_mode():
        got = encoder.encode(pixels.to(encoder.device), StageTimer(encoder.device)).float().cpu()
    error = relative_error(got, expected)
    if error > TOLERANCE[precision]:
        raise VlmError(
            f"ONNX Runtime ({encoder.providers[0]}) differs from the PyTorch vision stage by "
            f"{error:.2e} (relative), more than the {precision} tolerance "
            f"{TOLERANCE[precision]:.0e}; set vision_backend: torch meanwhile"
        )
    return error


def graph_precision(providers: list[str]) -> str:
    """fp16 where a GPU provider runs the graph, fp32 on the CPU provider (ONNX Runtime's CPU
    kernels are fp32; fp16 there would only add casts). A CUDA model with a CPU-only
    onnxruntime (the plain ``onnxruntime`` wheel) therefore gets the fp32 graph."""
    return "fp16" if providers and providers[0] in GPU_PROVIDERS else "fp32"


def make_encoder(model: VlmModel, runtime: RuntimeConfig) -> OrtVisionEncoder:
    """Factory registered in vision.BACKENDS["onnxruntime"]: the session on the providers
    that really start, its graph in the precision they run, checked where a GPU runs it."""
    engine_dir = Path(runtime.engine_dir)
    device = torch.device(runtime.device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    wanted = providers_for(runtime.device)
    precision = graph_precision(wanted)
    providers = [(name, provider_options(name, device, engine_dir)) for name in wanted]
    path = ensure_onnx(model, engine_dir / "onnx", precision)
    encoder = OrtVisionEncoder(model, path, providers)
    dropped = [name for name in wanted if name not in encoder.providers]
    if dropped:
        _log.warning(
            "ONNX Runtime could not start %s (missing CUDA/cuDNN/TensorRT libraries?): the "
            "vision stage runs on %s",
            ", ".join(dropped),
            encoder.providers[0],
        )
    if graph_precision(encoder.providers) != precision:  # an fp16 graph left on the CPU
        precision = graph_precision(encoder.providers)
        path = ensure_onnx(model, engine_dir / "onnx", precision)
        encoder = OrtVisionEncoder(model, path, ["CPUExecutionProvider"])
    if encoder.providers[0] in GPU_PROVIDERS:
        check_session(encoder, model, precision)
    return encoder
