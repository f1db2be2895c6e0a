"""A synthetic camera for demos and tests: demo-world scenes as sensor_msgs/Image (rgb8).

Publishes on ``/camera/image_raw`` (parameter ``topic``) at ``rate_hz`` with sensor-data QoS and a
stamped header, so the whole chain runs on a machine with no camera.

Like a robot's camera driving slowly, it holds each scene of the demo world
(vlm_ros.demo.world) for ``scene_hold_s`` seconds (default 3; 0 = a new scene every frame),
and every frame of a held scene gets fresh sensor noise and a small shift
(``world.render(scene, w, h, view)``), so frames differ while the answers stay the same. With
each frame it publishes the scene's ground truth on ``~/ground_truth`` (std_msgs/String, JSON:
the frame's stamp and frame_id, frame/scene/view indices, seed, caption, action, the expected
answer of each question, the boxes; vlm_ros.demo.truth), so a viewer or a test can check the
node's answers against the frame they name (docs/NODE.md, "The synthetic camera").

``use_world: false`` publishes a moving test pattern instead (colour bars with a sweeping
square; no ground truth).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import rclpy
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import String

from vlm_ros.demo import truth, world
from vlm_ros.ros.transport import use_large_frame_profile

QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT
)
# ground truth: reliable, so a checker sees every frame's truth (10 covers a slow reader's second)
TRUTH_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE
)
GROUND_TRUTH = "~/ground_truth"
BARS = np.array(
    [
        [255, 255, 255],
        [255, 255, 0],
        [0, 255, 255],
        [0, 255, 0],
        [255, 0, 255],
        [255, 0, 0],
        [0, 0, 255],
        [32, 32, 32],
    ],
    dtype=np.uint8,
)


def test_pattern(index: int, width: int, height: int) -> np.ndarray:
    """Colour bars with a white square moving left to right, one step per frame."""
    cols = np.arange(width) * len(BARS) // width
    frame = np.repeat(BARS[cols][None, :, :], height, axis=0)
    side = max(height // 4, 2)
    x = (index * 4) % max(width - side, 1)
    y = (height - side) // 2
    frame[y : y + side, x : x + side] = 255
    return frame


class SyntheticCamera(Node):
    """Publishes a frame (and, for world scenes, its ground truth) every 1/rate_hz seconds."""

    def __init__(self, rate_hz: float = 10.0, scene_hold_s: float = 3.0, **kwargs):
        super().__init__(kwargs.pop("node_name", "synthetic_camera"), **kwargs)
        p = self._param
        self.topic = p("topic", "/camera/image_raw", "image topic")
        self.width = p("width", 320, "image width in pixels")
        self.height = p("height", 240, "image height in pixels")
        self.frame_id = p("frame_id", "camera", "header.frame_id")
        rate = p("rate_hz", float(rate_hz), "frames per second")
        hold = p(
            "scene_hold_s", float(scene_hold_s), "seconds each scene is held; 0 = new each frame"
        )
        self.use_world = p("use_world", True, "demo-world scenes (else a moving test pattern)")
        if rate <= 0 or hold < 0:
            raise ValueError(f"rate_hz must be > 0 and scene_hold_s >= 0, got {rate}, {hold}")
        self.frames_per_scene = max(1, int(round(hold * rate)))
        self.index = 0
        self.pub = self.create_publisher(Image, self.topic, QOS)
        self.truth_pub = self.create_publisher(String, GROUND_TRUTH, TRUTH_QOS)
        self.timer = self.create_timer(1.0 / rate, self._tick)

    def _param(self, name: str, default, description: str):
        desc = ParameterDescriptor(description=description)
        return self.declare_parameter(name, default, desc).value

    def _tick(self) -> None:
        stamp = self.get_clock().now().to_msg()
        pixels, facts = self._frame()
        pixels = np.ascontiguousarray(pixels)
        msg = Image(
            height=pixels.shape[0],
            width=pixels.shape[1],
            encoding="rgb8",
            step=pixels.shape[1] * 3,
            data=pixels.tobytes(),
        )
        msg.header.stamp = stamp
        msg.header.frame_id = self.frame_id
        self.pub.publish(msg)
        if facts is not None:
            when = {"sec": stamp.sec, "nanosec": stamp.nanosec}
            facts = {"stamp": when, "frame_id": self.frame_id, **facts}
            self.truth_pub.publish(String(data=json.dumps(facts)))
        self.index += 1

    def _frame(self) -> tuple[np.ndarray, dict | None]:
        """This frame's RGB pixels and, for a world scene, its ground truth (stamp not yet)."""
        if not self.use_world:
            return test_pattern(self.index, self.width, self.height), None
        k, view = divmod(self.index, self.frames_per_scene)
        scene = world.scene_for_frame(k)
        facts = {"frame": self.index, "scene": k, "view": view, **truth.ground_truth(scene)}
        return world.render(scene, self.width, self.height, view), facts


def main(args: list[str] | None = None) -> int:
    """``synthetic_camera`` executable; a camera process, so it takes the large-frame transport
    profile too (vlm_ros.ros.transport) unless one is set."""
    use_large_frame_profile()
    rclpy.init(args=sys.argv if args is None else args)
    node = SyntheticCamera()
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
