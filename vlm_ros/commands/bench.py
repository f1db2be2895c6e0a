"""``vlm-ros bench``: fast path vs transformers generate() + the PyTorch vision tower, same
process, same random weights; writes JSON and a Markdown table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vlm_ros.bench.llamacpp import GGUF_TYPES
from vlm_ros.bench.measure import PRESETS, BenchOptions, markdown
from vlm_ros.bench.measure import run as run_bench


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    parser.add_argument("--iters", type=int, default=5, help="measured iterations per metric")
    parser.add_argument(
        "--vision-backend",
        choices=("torch", "onnxruntime", "tensorrt"),
        default="torch",
        help="fast path's vision stage (tensorrt: CUDA + TensorRT; the engine is built for the "
        "run, in a temporary directory)",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also measure the lossy int8 decoder (CPU) and int8 weights with float32 "
        "activations (int8_weight_only: in the compiled step with --compile, else in the "
        "uncompiled step's compiled regions)",
    )
    parser.add_argument(
        "--int4",
        action="store_true",
        help="also measure the decoder with int4 weights (quantize int4_weight_only; lossy; "
        "the model's dtype: float32 on CPU, bfloat16 on CUDA)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="also measure the whole model in bfloat16, and with weight-only int8 Linear "
        "layers (CPU; lossy; fast where the CPU has AVX512-BF16/AMX), against the fp32 and a "
        "bf16 baseline",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the decode step (CUDA graph on GPU)"
    )
    parser.add_argument(
        "--llamacpp",
        nargs="?",
        const=",".join(GGUF_TYPES),
        default="",
        metavar="TYPES",
        help="also run the decoder through llama.cpp (llama-cpp-python), exported to GGUF at "
        f"these comma-separated types (default {','.join(GGUF_TYPES)}), on the same input "
        "embeddings, with its logits checked against ours (CPU, float32 run)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--out", help="JSON path; the Markdown table goes next to it (.md)")


def run(args: argparse.Namespace) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    options = BenchOptions(
        preset=args.preset,
        device=args.device,
        dtype=args.dtype,
        iters=args.iters,
        vision_backend=args.vision_backend,
        int8=args.int8,
        compile_decode=args.compile,
        bf16=args.bf16,
        int4=args.int4,
        llamacpp=tuple(t for t in args.llamacpp.split(",") if t),
    )
    result = run_bench(options)
    table = markdown(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(table)
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0
