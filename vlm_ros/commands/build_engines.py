"""``vlm-ros build-engines --model DIR``: export the vision stage to ONNX and build its TensorRT
engine for this GPU and TensorRT version, under ``models/engines/`` (untracked), with a JSON
sidecar the runtime checks before it uses the engine."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlm_ros.model import VlmModel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--engine-dir", default="models/engines")
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--workspace-gib", type=float, default=4.0)
    parser.add_argument(
        "--opt-level", type=int, default=3, help="builder_optimization_level 0-5 (default 3)"
    )


def build_for_model(
    model: VlmModel,
    engine_dir: str | Path,
    precision: str = "fp16",
    workspace_gib: float = 4.0,
    opt_level: int = 3,
) -> Path:
    """ONNX export (checked) -> TensorRT engine + sidecar for ``model``; returns the engine."""
    from vlm_ros.onnx_export import export_and_check
    from vlm_ros.ort_backend import structure_fingerprint
    from vlm_ros.trt_engine import (
        BuildOptions,
        EngineBuilder,
        engine_path,
        expected_identity,
        onnx_path_for,
    )

    builder = EngineBuilder(BuildOptions(precision, workspace_gib, opt_level))  # checks TRT+CUDA
    name = structure_fingerprint(model)
    onnx_file = onnx_path_for(engine_dir, name, precision)
    export_and_check(model, onnx_file, precision)
    identity = expected_identity(model, onnx_file, precision)
    return builder.build(onnx_file, engine_path(engine_dir, name, precision), identity)


def run(args: argparse.Namespace) -> int:
    from vlm_ros.checkpoint import load_checkpoint

    model = load_checkpoint(args.model, "cpu", "float32").model
    engine = build_for_model(
        model, args.engine_dir, args.precision, args.workspace_gib, args.opt_level
    )
    print(f"built {engine} (sidecar {engine.with_suffix('.json').name})")
    return 0
