"""``vlm-ros build-engines --model DIR``: export the vision stage to ONNX and build its TensorRT
engine for this GPU and TensorRT version, under ``models/engines/`` (untracked), with a JSON
sidecar the runtime checks before it uses the engine."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--engine-dir", default="models/engines")
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--workspace-gib", type=float, default=4.0)
    parser.add_argument(
        "--opt-level", type=int, default=3, help="builder_optimization_level 0-5 (default 3)"
    )


def run(args: argparse.Namespace) -> int:
    from vlm_ros.engines.build import (
        build_for_model,  # torch: loaded when the command runs, not for --help
    )
    from vlm_ros.model.checkpoint import load_checkpoint

    model = load_checkpoint(args.model, "cpu", "float32").model
    engine = build_for_model(
        model, args.engine_dir, args.precision, args.workspace_gib, args.opt_level
    )
    print(f"built {engine} (sidecar {engine.with_suffix('.json').name})")
    return 0
