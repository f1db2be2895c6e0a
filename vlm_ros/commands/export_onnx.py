"""``vlm-ros export-onnx``: the vision stage (encoder layers up to the selected one +
projector) of a checkpoint as one static ONNX graph per precision, checked with ONNX Runtime
against PyTorch and against the TensorRT parser's operator list."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--out", default="models/engines/onnx", help="output directory")
    parser.add_argument(
        "--precision", nargs="+", choices=("fp32", "fp16"), default=["fp32", "fp16"]
    )
    parser.add_argument(
        "--no-check", action="store_true", help="skip the ONNX Runtime parity check"
    )


def run(args: argparse.Namespace) -> int:
    from vlm_ros.engines.onnx_export import (  # torch: loaded when the command runs, not for --help
        export_and_check,
        onnx_name,
    )
    from vlm_ros.model.checkpoint import load_checkpoint

    model = load_checkpoint(args.model, "cpu", "float32").model
    for precision in args.precision:
        report = export_and_check(
            model, Path(args.out) / onnx_name(precision), precision, check=not args.no_check
        )
        error = "not checked" if report.max_rel_error is None else f"{report.max_rel_error:.1e}"
        print(
            f"{report.path}: {precision}, input {report.input_shape} -> output "
            f"{report.output_shape}, ORT vs PyTorch relative error {error} (tolerance "
            f"{report.tolerance:.0e}), {len(report.ops)} operator types, all TensorRT-parsable"
        )
    return 0
