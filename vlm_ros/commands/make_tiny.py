"""``vlm-ros make-tiny``: write a tiny checkpoint in one of the four published layouts.

For CI and for trying the pipeline without downloading gigabytes: the directory it writes loads
with ``--model DIR`` like the real checkpoint of that family (random weights, toy sizes).
"""

from __future__ import annotations

import argparse

from vlm_ros.model.families import FAMILIES

FORMATS = ("safetensors", "sharded", "bin")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--family",
        choices=tuple(FAMILIES),
        default="llava_phi",
        help="published layout to imitate (config.json model_type)",
    )
    parser.add_argument("--out", required=True, help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="safetensors",
        help="model.safetensors, two safetensors shards with an index, or pytorch_model.bin",
    )
    parser.add_argument(
        "--fused-qkv",
        action="store_true",
        help="store Phi attention fused (query_key_value), as transformers 4.36 saved it",
    )


def run(args: argparse.Namespace) -> int:
    from vlm_ros.model.tiny import (
        write_tiny_checkpoint,  # torch: loaded when the command runs, not for --help
    )

    path = write_tiny_checkpoint(
        args.out,
        args.family,
        args.seed,
        safetensors=args.format != "bin",
        sharded=args.format == "sharded",
        fused_qkv=args.fused_qkv,
    )
    print(path)
    return 0
