"""``vlm-ros`` command line: one dispatcher, one module per command.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and is imported
only when its command runs, so ``vlm-ros ask`` never pays for rosbags or rclpy. Errors the
project raises on purpose (VlmError, OSError for files) are printed as one line, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from vlm_ros.errors import VlmError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "ask": ("vlm_ros.commands.ask", "answer a question about an image file"),
    "rank": ("vlm_ros.commands.rank", "rank candidate actions for an image file"),
    "plan": ("vlm_ros.commands.plan", "memory plan of the published models per Jetson board"),
    "make-tiny": ("vlm_ros.commands.make_tiny", "write a tiny checkpoint in a published layout"),
    "node": ("vlm_ros.commands.node", "run the ROS 2 node without ros2 launch"),
    "serve": ("vlm_ros.commands.serve", "serve the model over HTTP (OpenAI API) on Ray Serve"),
    "soak": ("vlm_ros.commands.soak", "the node under request bursts and camera floods; JSON"),
    "export-onnx": ("vlm_ros.commands.export_onnx", "export vision encoder+projector to ONNX"),
    "build-engines": ("vlm_ros.commands.build_engines", "build TensorRT engines for a model"),
    "bench": ("vlm_ros.commands.bench", "benchmark the fast path against transformers generate()"),
    "make-bag": ("vlm_ros.commands.make_bag", "write a synthetic camera rosbag"),
    "eval-bag": ("vlm_ros.commands.eval_bag", "replay a camera bag through the assistant"),
    "report": ("vlm_ros.commands.report", "latency report from a bag of the node's outputs"),
    "train-demo": ("vlm_ros.commands.train_demo", "train the embedded demo model"),
    "eval-demo": ("vlm_ros.commands.eval_demo", "evaluate the demo model on its test split"),
}


def _command_module(name: str):
    return importlib.import_module(COMMANDS[name][0])


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-ros", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the chosen command's module is imported; the others get a help-only stub.
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _command_module(name).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)

    try:
        return int(_command_module(args.command).run(args) or 0)
    except (VlmError, OSError) as exc:
        print(f"vlm-ros {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
