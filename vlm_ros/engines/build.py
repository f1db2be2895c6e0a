"""Ahead-of-time engine build for one model: ONNX export (checked against the PyTorch stage)
-> TensorRT engine + JSON sidecar, named by the stage's structure and the precision.

Shared by ``vlm-ros build-engines`` and the bench's TensorRT backend, so both build exactly
what the runtime (``trt_engine.TensorRTVisionEncoder``) later looks for.
"""

from __future__ import annotations

from pathlib import Path

from vlm_ros.engines.naming import structure_fingerprint
from vlm_ros.engines.onnx_export import export_and_check
from vlm_ros.engines.trt_engine import (
    BuildOptions,
    EngineBuilder,
    engine_path,
    expected_identity,
    onnx_path_for,
)
from vlm_ros.model.network import VlmModel


def build_for_model(
    model: VlmModel,
    engine_dir: str | Path,
    precision: str = "fp16",
    workspace_gib: float = 4.0,
    opt_level: int = 3,
) -> Path:
    """ONNX export (checked) -> TensorRT engine + sidecar for ``model``; returns the engine."""
    builder = EngineBuilder(BuildOptions(precision, workspace_gib, opt_level))  # checks TRT+CUDA
    name = structure_fingerprint(model)
    onnx_file = onnx_path_for(engine_dir, name, precision)
    export_and_check(model, onnx_file, precision)
    identity = expected_identity(model, onnx_file, precision)
    return builder.build(onnx_file, engine_path(engine_dir, name, precision), identity)
