"""``vlm-ros node``: run the ROS 2 assistant node without ros2 launch (rclpy, no launch tools).

Configures and activates the lifecycle node itself (parameter ``autostart``). ``--demo`` uses the
demo model and also runs a synthetic camera on /camera/image_raw, so the chain runs offline.
``--namespace`` and ``--camera-topic`` do what the launch file's ``namespace:=`` and
``camera_topic:=`` do, for every node of the process (the synthetic camera too). Arguments after
``--ros-args`` go to ROS unchanged (``-p name:=value``, remaps). ``--save-annotated DIR`` writes
the annotated frames (``~/annotated_image``) as PNG into DIR (parameter ``annotated_save_dir``);
``--scene-hold S`` sets how long the demo camera holds each scene. Ctrl-C (SIGINT) shuts the node
down through its lifecycle and exits with status 0 within about a second (docs/NODE.md,
Shutdown). Fast DDS gets the large-frame profile unless a transport is configured
(vlm_ros.ros.transport).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlm_ros.ros.names import CAMERA  # the node's default input (ROS-free module, no rclpy)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--demo", action="store_true", help="demo model on CPU plus a synthetic camera"
    )
    parser.add_argument("--params-file", help="ROS parameter YAML (e.g. config/default.yaml)")
    parser.add_argument(
        "--namespace", default="", help="namespace of the node (and of the demo camera)"
    )
    parser.add_argument(
        "--camera-topic", default="", help=f"topic remapped onto the camera input {CAMERA}"
    )
    parser.add_argument(
        "--camera-rate",
        type=float,
        default=10.0,
        help="synthetic camera frames per second (with --demo)",
    )
    parser.add_argument(
        "--scene-hold",
        type=float,
        default=3.0,
        help="seconds the synthetic camera holds each scene (with --demo; 0: new every frame)",
    )
    parser.add_argument(
        "--save-annotated",
        metavar="DIR",
        default="",
        help="write annotated frames (~/annotated_image) as PNG into DIR: one a second, the "
        "newest 20 kept (parameters annotated_save_period_s, annotated_save_keep)",
    )
    parser.add_argument(
        "--ros-args",
        dest="ros_args",
        nargs=argparse.REMAINDER,
        default=[],
        help="everything after it goes to ROS unchanged",
    )


def ros_arguments(args: argparse.Namespace) -> list[str]:
    """The rclpy argument list this command's flags stand for."""
    extra = list(args.ros_args or [])
    ros = ["vlm-ros-node", "--ros-args"]
    if args.params_file:
        if not Path(args.params_file).is_file():
            raise OSError(f"parameter file {args.params_file} does not exist")
        ros += ["--params-file", args.params_file]
    if args.namespace:
        ros += ["-r", f"__ns:=/{args.namespace.strip('/')}"]
    if args.camera_topic:
        ros += ["-r", f"{CAMERA}:={args.camera_topic}"]
    if args.save_annotated:
        ros += ["-p", f"annotated_save_dir:={Path(args.save_annotated).resolve()}"]
    return ros + extra


def run(args: argparse.Namespace) -> int:
    """Run the node, then leave the process at once with its status (ros.node.exit_now: the
    logs flushed, the interpreter's slow teardown skipped)."""
    from vlm_ros.ros import node  # rclpy only when the command runs

    status = node.run(
        ros_arguments(args),
        demo=args.demo,
        camera_rate_hz=args.camera_rate,
        scene_hold_s=args.scene_hold,
    )
    node.exit_now(status)
    return 0  # not reached
