"""``vlm-ros train-demo``: reproduce the embedded demo model (models/demo)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

DEFAULT_MINUTES = 20.0  # the shipped recipe's budget on a 2-core CPU (models/demo/README.md)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="models/demo", help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of data order and weights")
    parser.add_argument(
        "--minutes",
        type=float,
        default=DEFAULT_MINUTES,
        help="budget: scales every stage's step count by minutes/20, so the same arguments "
        f"always give the same weights (default {DEFAULT_MINUTES:g} = the shipped model)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: the recipe's 2; 1 on a CPU shared with other work, "
        "which gives other weights: the thread count is part of what makes them)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--after-instruct",
        default=None,
        metavar="DIR",
        help="skip stages 0a-2 and start stage 3 (captions) from DIR, a checkpoint those "
        "stages of the same recipe wrote (e.g. one trained with the stage-3 steps set to 0): "
        "the same weights as a whole run",
    )


def config(args: argparse.Namespace):
    """The TrainConfig the arguments ask for (torch is imported here, not for --help)."""
    from vlm_ros.demo.train import TrainConfig

    cfg = TrainConfig(seed=args.seed)
    if args.threads is not None:
        cfg = replace(cfg, threads=args.threads)
    if args.minutes != DEFAULT_MINUTES:
        cfg = cfg.scaled(args.minutes / DEFAULT_MINUTES)
    return cfg


def run(args: argparse.Namespace) -> int:
    from vlm_ros.demo.train import train  # torch: loaded when the command runs, not for --help

    summary = train(args.out, config(args), quiet=args.quiet, after_instruct=args.after_instruct)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    print(f"wrote {args.out} (loss log: {args.out}/train_log.jsonl)")
    return 0
