"""``vlm-ros ask``: answer a question about an image file and print per-stage milliseconds."""

from __future__ import annotations

import argparse
import sys

from vlm_ros.commands._shared import (
    add_model_arguments,
    format_timings,
    read_image,
    runtime_from_args,
)
from vlm_ros.config import GenerationConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None, help="seed for --sample")
    parser.add_argument("--stream", action="store_true", help="print the answer as it grows")
    parser.add_argument("question")


def run(args: argparse.Namespace) -> int:
    image = read_image(args.image)  # before the heavy imports: a bad path fails at once
    # torch (or httpx with --server-url): loaded when the command runs, not for --help
    from vlm_ros.infer.backends import load_assistant

    generation = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    printed = [""]

    def stream(text: str) -> None:
        # on_text gives the whole text so far; print only what is new
        sys.stdout.write(text[len(printed[0]) :])
        sys.stdout.flush()
        printed[0] = text

    with load_assistant(
        args.model, runtime_from_args(args), generation, vision_tower=args.vision_tower
    ) as assistant:
        answer = assistant.answer(image, args.question, on_text=stream if args.stream else None)
    print("" if args.stream else answer.text)
    print(
        f"[{format_timings(answer.timings)} | {len(answer.token_ids)} tokens, "
        f"stop: {answer.stop_reason}]"
    )
    return 0
