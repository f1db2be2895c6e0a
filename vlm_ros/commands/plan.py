"""``vlm-ros plan``: the memory plan of the published models on every Jetson Orin board, or of
one checkpoint on one board, without loading any weights.

The same arithmetic Assistant.load checks before loading (model/memory_plan.py); docs/JETSON.md's
fit table is this command's output.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-seq-len", type=int, default=1024, help="static KV cache length")
    parser.add_argument("--vision-backend", default="torch", help="torch | onnxruntime | tensorrt")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument(
        "--measure",
        metavar="OUT_JSON",
        help="instead: measure the small preset's peaks on this CPU against the plan "
        "(bench/memory.py; ~0.5 GB of scratch files) and write them here",
    )


def run(args: argparse.Namespace) -> int:
    from vlm_ros.config import RuntimeConfig
    from vlm_ros.model import memory_plan

    if args.measure:
        return _measure(args.measure)
    runtime = RuntimeConfig(
        device="cuda", max_seq_len=args.max_seq_len, vision_backend=args.vision_backend
    )
    rows = memory_plan.table(runtime)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| board | family | precision | weights | KV cache | need | board has | fits |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        precision = r["dtype"] + ("" if r["quantize"] == "none" else " + int8 weight-only")
        print(
            f"| {r['board']} | {r['family']} | {precision} | {r['weights_gib']:.2f} | "
            f"{r['kv_cache_gib']:.2f} | {r['need_gib']:.2f} | {r['capacity_gib']:.1f} | "
            f"{'yes' if r['fits'] else '**no**'} |"
        )
    return 0


def _measure(out: str) -> int:
    import platform
    import tempfile
    from pathlib import Path

    from vlm_ros.bench.memory import measure_all

    with tempfile.TemporaryDirectory(prefix="vlm_ros_memory_") as scratch:
        rows = measure_all(Path(scratch))
    result = {"machine": platform.machine(), "processor": platform.processor(), "rows": rows}
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0
