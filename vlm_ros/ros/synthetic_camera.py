"""A synthetic camera for demos and tests: a moving test pattern as sensor_msgs/Image (rgb8).

Publishes on ``/camera/image_raw`` (parameter ``topic``) at ``rate_hz`` with sensor-data QoS and a
stamped header, so the whole chain runs on a machine with no camera. Consecutive frames differ (a
bright square sweeps over colour bars), so answers can change.

Hook for the demo world: when ``vlm_ros.demo.world`` exists and provides
``render_frame(index: int, width: int, height: int) -> np.ndarray`` (RGB uint8 HxWx3), frames
come from it instead of the test pattern (``use_world`` parameter, default true).
"""

from __future__ import annotations

import sys

import numpy as np
import rclpy
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

from vlm_ros.ros.transport import use_large_frame_profile

QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT
)
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


def _world_renderer():
    """vlm_ros.demo.world.render_frame when the demo world exists, else None."""
    try:
        from vlm_ros.demo import world
    except ImportError:
        return None
    return getattr(world, "render_frame", None)


class SyntheticCamera(Node):
    """Publishes a frame every 1/rate_hz seconds."""

    def __init__(self, rate_hz: float = 10.0, **kwargs):
        super().__init__(kwargs.pop("node_name", "synthetic_camera"), **kwargs)
        p = self._param
        self.topic = p("topic", "/camera/image_raw", "image topic")
        self.width = p("width", 320, "image width in pixels")
        self.height = p("height", 240, "image height in pixels")
        self.frame_id = p("frame_id", "camera", "header.frame_id")
        rate = p("rate_hz", float(rate_hz), "frames per second")
        use_world = p("use_world", True, "render vlm_ros.demo.world scenes when available")
        self.render = (_world_renderer() if use_world else None) or test_pattern
        self.index = 0
        self.pub = self.create_publisher(Image, self.topic, QOS)
        self.timer = self.create_timer(1.0 / rate, self._tick)

    def _param(self, name: str, default, description: str):
        desc = ParameterDescriptor(description=description)
        return self.declare_parameter(name, default, desc).value

    def _tick(self) -> None:
        pixels = np.ascontiguousarray(self.render(self.index, self.width, self.height))
        msg = Image(
            height=pixels.shape[0],
            width=pixels.shape[1],
            encoding="rgb8",
            step=pixels.shape[1] * 3,
            data=pixels.tobytes(),
        )
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = self.frame_id
        self.pub.publish(msg)
        self.index += 1


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
