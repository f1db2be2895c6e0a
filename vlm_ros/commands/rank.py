"""``vlm-ros rank``: probability of each candidate action for an image file."""

from __future__ import annotations

import argparse

from vlm_ros.commands._shared import (
    add_model_arguments,
    format_timings,
    read_image,
    runtime_from_args,
)

DEFAULT_INSTRUCTION = "What should the robot do?"
DEFAULT_CANDIDATES = ("continue", "slow_down", "stop", "turn_left", "turn_right")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--instruction", default=DEFAULT_INSTRUCTION)
    parser.add_argument(
        "--candidates", nargs="+", default=list(DEFAULT_CANDIDATES), metavar="ACTION"
    )


def run(args: argparse.Namespace) -> int:
    image = read_image(args.image)  # before the heavy imports: a bad path fails at once
    # torch (or httpx with --server-url): loaded when the command runs, not for --help
    from vlm_ros.infer.backends import load_assistant

    runtime = runtime_from_args(args)
    with load_assistant(args.model, runtime, vision_tower=args.vision_tower) as assistant:
        hint = assistant.rank(image, args.instruction, args.candidates)
    width = max(len(a) for a in hint.actions)
    order = sorted(range(len(hint.actions)), key=lambda i: -hint.probabilities[i])
    for i in order:
        mark = "*" if i == hint.best_index else " "
        print(
            f"{mark} {hint.actions[i]:<{width}}  p={hint.probabilities[i]:.4f}  "
            f"logL={hint.log_likelihoods[i]:.3f}"
        )
    print(f"[{format_timings(hint.timings)}]")
    return 0
