"""End to end by meaning: synthetic camera frames -> the real vlm_assistant node -> answers.

Frames of the demo world (vlm_ros.demo.world, the synthetic camera's seed range, which no
training or test scene shares) are published as sensor_msgs/Image on the node's camera topic
over real rclpy / DDS, half as rgb8 and half as bgr8; for each one the ``~/ask`` service is
called with the path question and ``want_action_hint`` and then with the obstacle-colour
question, and the answers are scored against the scene's ground truth. The node serves the
shipped demo model (``model: demo``), so a wrong channel order, pad colour, image-token splice
or prompt anywhere in the chain shows up as accuracy falling to chance, which the tiny
random-weight models of test_node.py cannot reveal.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from ros_helpers import start_node, wait_for

pytestmark = pytest.mark.ros

FRAMES = 16  # synthetic camera frames 0..15 (seeds 9,000,000..): a new scene each
SIZE = (128, 96)  # camera width, height (the pipeline pads to square itself)
QUESTION = "Is the path ahead clear?"
COLOUR_QUESTION = "What colour is the obstacle ahead?"  # red <-> blue if channels were swapped
# Thresholds: the 90% target, far above chance (clear: 50%, action and colour: 20%) and
# at most what the shipped model scores on the whole test split (models/demo/eval_demo.json):
# one miss in 16 frames is allowed; a swapped channel order or a broken splice fails.
MIN_CLEAR = 0.9
MIN_ACTION = 0.9
MIN_COLOUR = 0.9


def frame_msg(index: int, encoding: str, stamp):
    """Synthetic camera frame ``index`` as an Image in ``encoding`` (rgb8 or bgr8)."""
    from sensor_msgs.msg import Image

    from vlm_ros.demo import world

    rgb = world.render_frame(index, *SIZE)
    pixels = rgb if encoding == "rgb8" else np.ascontiguousarray(rgb[..., ::-1])
    height, width = pixels.shape[:2]
    msg = Image(encoding=encoding, height=height, width=width, step=width * 3,
                data=pixels.tobytes())  # fmt: skip
    msg.header.frame_id = f"e2e{index}"
    msg.header.stamp = stamp
    return msg


def arrived(node, frame_id: str) -> bool:
    """Whether the node's latest-frame slot holds the frame ``frame_id``."""
    frames = (node.frames.latest(cam.topic) for cam in node.config.cameras)
    return any(f is not None and f.msg.header.frame_id == frame_id for f in frames)


def test_node_answers_synthetic_camera_frames_by_meaning(ros):
    from sensor_msgs.msg import Image

    from vlm_ros.demo import data, world
    from vlm_ros.ros.node import SENSOR_QOS
    from vlm_ros.srv import Ask

    ns = f"e2e_{os.getpid()}"
    node = start_node(ros, "demo", ns, max_new_tokens=4, max_frame_age_ms=0.0,
                      hint_candidates=list(world.ACTIONS),
                      hint_instruction=data.ACTION_INSTRUCTION)  # fmt: skip
    client_node = ros.client_node(f"{ns}_client")
    pub = client_node.create_publisher(Image, f"/{ns}/cam", SENSOR_QOS)
    client = client_node.create_client(Ask, f"{node.get_fully_qualified_name()}/ask")
    wait_for(lambda: pub.get_subscription_count() > 0, what="camera subscription")
    wait_for(client.service_is_ready, what="ask service")

    clear_ok = action_ok = colour_ok = 0
    misses = []
    for index in range(FRAMES):
        scene = world.scene_for_frame(index)
        encoding = ("rgb8", "bgr8")[index % 2]
        msg = frame_msg(index, encoding, client_node.get_clock().now().to_msg())
        for _ in range(50):  # best-effort QoS may drop a frame: publish until it arrived
            pub.publish(msg)
            try:
                wait_for(lambda m=msg: arrived(node, m.header.frame_id), 0.2)
                break
            except AssertionError:
                continue
        else:
            raise AssertionError(f"the node never received frame {index}")
        future = client.call_async(Ask.Request(question=QUESTION, want_action_hint=True))
        wait_for(future.done, 15.0, what=f"ask response for frame {index}")
        resp = future.result()
        assert resp.success, resp.error_message
        assert resp.image_stamp == msg.header.stamp  # answered on this very frame
        assert list(resp.hint.candidates) == list(world.ACTIONS)
        future = client.call_async(Ask.Request(question=COLOUR_QUESTION))
        wait_for(future.done, 15.0, what=f"colour response for frame {index}")
        colour = future.result()
        assert colour.success, colour.error_message
        assert colour.image_stamp == msg.header.stamp
        want = (data.path_clear(scene), data.action_for(scene), data.obstacle_colour(scene))
        got = (resp.answer.strip().lower(), resp.hint.action, colour.answer.strip().lower())
        clear_ok += got[0] == want[0]
        action_ok += got[1] == want[1]
        colour_ok += got[2] == want[2]
        if got != want:
            misses.append((index, encoding, want, got))

    clear, action, colour = clear_ok / FRAMES, action_ok / FRAMES, colour_ok / FRAMES
    detail = (f"clear {clear:.0%}, action {action:.0%}, colour {colour:.0%} over {FRAMES} frames;"
              f" misses (frame, encoding, expected, got): {misses}")  # fmt: skip
    print(detail)
    assert clear >= MIN_CLEAR, detail
    assert action >= MIN_ACTION, detail
    assert colour >= MIN_COLOUR, detail
