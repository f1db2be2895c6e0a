"""``vlm-ros eval-bag IN_BAG --out DIR``: replay a camera bag through the assistant as the node
would, write its outputs as an MCAP rosbag2 and a latency report of that bag."""

from __future__ import annotations

import argparse
import json

from vlm_ros.bag.budgets import load_budgets, parse_budget_flags
from vlm_ros.bag.evaluate import (
    DEFAULT_CANDIDATES,
    DEFAULT_INSTRUCTION,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_SCENE_PROMPT,
    EvalSettings,
    evaluate,
    load_questions,
)
from vlm_ros.bag.replay import RATES
from vlm_ros.bag.report import summary_text
from vlm_ros.commands._shared import add_remote_arguments, remote_from_args
from vlm_ros.ros.names import NODE_NAME


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bag", help="camera bag: rosbag2 folder (sqlite3 or MCAP) or ROS 1 .bag")
    parser.add_argument(
        "--out", required=True, help="folder for output_bag/ and the report (checked first)"
    )
    add_out_arguments(parser)
    parser.add_argument(
        "--frames",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the frames the model took into the output bag, JPEG-compressed with their "
        "header, on <camera topic>/compressed (default on)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar (it is off anyway when not a TTY)"
    )
    parser.add_argument("--model", default="demo", help="'demo', a checkpoint folder or a hub id")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--rate",
        choices=RATES,
        default="recorded",
        help="recorded: frames arriving while the model is busy are dropped as in the "
        "node; max: every frame, each as if the model were free (default recorded)",
    )
    parser.add_argument(
        "--topic", default=None, help="camera topic (default: the bag's only image topic)"
    )
    parser.add_argument(
        "--scene-prompt",
        default=DEFAULT_SCENE_PROMPT,
        help="question asked about the frames ('' for none)",
    )
    parser.add_argument(
        "--questions",
        default=None,
        metavar="FILE",
        help="more questions, one per line, asked in turn with the scene prompt",
    )
    parser.add_argument(
        "--hint",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rank action hints on every processed frame (default on)",
    )
    parser.add_argument(
        "--instruction", default=DEFAULT_INSTRUCTION, help="action-hint instruction"
    )
    parser.add_argument(
        "--candidates", nargs="+", default=list(DEFAULT_CANDIDATES), help="candidate actions"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"answer length limit (default {DEFAULT_MAX_NEW_TOKENS}, the node's)",
    )
    parser.add_argument(
        "--max-frames", type=int, default=None, help="read at most this many frames"
    )
    parser.add_argument(
        "--node-name",
        default=NODE_NAME,
        help=f"name of the node the outputs stand for (default {NODE_NAME}): "
        "they go to /<namespace>/<node-name>/scene_answer and .../action_hint",
    )
    parser.add_argument("--namespace", default="", help="that node's namespace (default none)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed runs on the first frame before the replay (default 1)",
    )
    add_budget_arguments(parser)
    add_remote_arguments(parser)


def add_out_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace a report (and output bag) already in --out instead of refusing",
    )


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--budgets",
        default=None,
        metavar="YAML",
        help="node parameter file (config/*.yaml) whose latency budgets to apply",
    )
    parser.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="STAGE=MS",
        help="a budget in ms, e.g. total=500 or image_to_output=800 (repeatable; "
        "overrides --budgets)",
    )


def budgets_from_args(args: argparse.Namespace) -> dict[str, float]:
    budgets = load_budgets(args.budgets) if args.budgets else {}
    budgets.update(parse_budget_flags(args.budget))
    return budgets


def run(args: argparse.Namespace) -> int:
    settings = EvalSettings(
        bag=args.bag,
        out_dir=args.out,
        model=args.model,
        rate=args.rate,
        topic=args.topic,
        scene_prompt=args.scene_prompt or None,
        questions=load_questions(args.questions) if args.questions else (),
        hint=args.hint,
        instruction=args.instruction,
        candidates=tuple(args.candidates),
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        budgets_ms=budgets_from_args(args),
        max_frames=args.max_frames,
        warmup=args.warmup,
        frames=args.frames,
        force=args.force,
        node_name=args.node_name,
        namespace=args.namespace,
        remote=remote_from_args(args),
    )
    result = evaluate(settings, progress=None if not args.quiet else False)
    report = json.loads((result.report_dir / "report.json").read_text(encoding="utf-8"))
    print(summary_text(report))
    print(f"output bag: {result.out_bag}")
    print(f"report: {result.report_dir / 'report.md'}")
    return 0
