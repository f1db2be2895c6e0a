"""``vlm-ros make-bag OUT``: write a synthetic camera bag (moving test pattern)."""

from __future__ import annotations

import argparse

from vlm_ros.bag.io import STORAGES
from vlm_ros.bag.make_bag import ENCODINGS, BagSpec, make_bag
from vlm_ros.errors import InputError


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, got {text!r}") from None
    return w, h


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "out", help="output bag: a new rosbag2 folder, or a .bag file with --storage ros1"
    )
    parser.add_argument("--rate", type=float, default=15.0, help="camera rate in Hz (default 15)")
    parser.add_argument(
        "--size", type=_size, default=(320, 240), help="WIDTHxHEIGHT (default 320x240)"
    )
    parser.add_argument(
        "--encoding",
        choices=ENCODINGS,
        default="rgb8",
        help="raw Image encoding, or jpeg/png for CompressedImage (default rgb8)",
    )
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of camera (default 3)")
    parser.add_argument(
        "--storage", choices=STORAGES, default="mcap", help="bag storage (default mcap)"
    )
    parser.add_argument(
        "--topic",
        default=None,
        help="camera topic (default /camera/image_raw, /camera/image_raw/compressed for jpeg/png)",
    )
    parser.add_argument("--frame-id", default="camera", help="header frame_id (default camera)")
    parser.add_argument(
        "--scenes",
        action="store_true",
        help="render demo-world scenes (vlm_ros.demo.world) instead of the test pattern",
    )
    parser.add_argument(
        "--transport-delay-ms",
        type=float,
        default=0.0,
        help="log each frame this long after its header stamp, as a recorder behind a real "
        "camera receives it (default 0: log time = stamp)",
    )


def run(args: argparse.Namespace) -> int:
    width, height = args.size
    if args.storage == "ros1" and not args.out.endswith(".bag"):
        raise InputError("a ROS 1 bag's file name must end in .bag")
    spec = BagSpec(
        out=args.out,
        rate_hz=args.rate,
        width=width,
        height=height,
        encoding=args.encoding,
        duration_s=args.duration,
        storage=args.storage,
        topic=args.topic,
        frame_id=args.frame_id,
        source="scenes" if args.scenes else "pattern",
        transport_delay_ms=args.transport_delay_ms,
    )
    path = make_bag(spec)
    print(
        f"wrote {spec.frame_count} frames ({width}x{height} {args.encoding}, {args.rate:g} Hz) "
        f"on {spec.topic_name} to {path} ({args.storage})"
    )
    return 0
