"""``vlm-ros report BAG``: latency report from a bag of the node's outputs (recorded live with
``ros2 bag record`` or written by eval-bag)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlm_ros.bag.report import report_bag, summary_text
from vlm_ros.commands.eval_bag import (
    add_budget_arguments,
    add_out_arguments,
    budgets_from_args,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bag", help="bag with SceneAnswer/ActionHint (and /diagnostics) messages")
    parser.add_argument(
        "--out", default=None, help="report folder (default: BAG_report beside the bag)"
    )
    add_out_arguments(parser)
    add_budget_arguments(parser)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(f"{Path(args.bag).resolve()}_report")
    report = report_bag(args.bag, out, budgets_ms=budgets_from_args(args) or None, force=args.force)
    print(summary_text(report))
    print(f"report: {out / 'report.md'}")
    return 0
