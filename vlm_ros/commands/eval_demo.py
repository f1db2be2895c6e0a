"""``vlm-ros eval-demo``: accuracy of the demo model on the demo world's test split."""

from __future__ import annotations

import argparse

from vlm_ros.config import QUANTIZE_MODES, RuntimeConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/demo", help="checkpoint directory or 'demo'")
    parser.add_argument("--n", type=int, default=500, help="test scenes (about 5 questions each)")
    parser.add_argument("--json", default="eval_demo.json", help="where to write the results")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        default="none",
        help="int8: the opt-in lossy dynamic int8 decoder (CPU); int8_weight_only: int8 "
        "weights (with --dtype bfloat16/float16, or float32 with --compile); "
        "int4_weight_only: 4-bit weights (float32 or "
        "bfloat16 on CPU); to measure what they cost in accuracy on a "
        "trained model",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="default: the family's for the device (float32 on CPU); bfloat16 measures what the "
        "faster bf16 path costs in accuracy",
    )

    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step (compile_decode: true), as the node would run it",
    )


def run(args: argparse.Namespace) -> int:
    from vlm_ros.demo.evaluate import (  # torch: loaded when the command runs, not for --help
        evaluate,
        write_report,
    )
    from vlm_ros.infer.pipeline import Assistant

    runtime = RuntimeConfig(
        threads=args.threads, quantize=args.quantize, dtype=args.dtype,
        compile_decode=args.compile,
    )  # fmt: skip
    assistant = Assistant.load(args.model, runtime=runtime)
    report = evaluate(assistant, args.n, progress=True, captions=True)
    print(report.table())
    write_report(report, args.json, args.model, args.n)
    print(f"wrote {args.json}")
    return 0
