"""The node's name and topic names, defined once; ROS-free so eval-bag and tests share them.

The node creates its outputs under private names (``~/scene_answer``); ROS resolves ``~`` to the
node's fully qualified name (``/<namespace>/<node name>``). eval-bag writes a bag that must read
like ``ros2 bag record`` of the live node, so it resolves the same names with ``resolve`` for the
node name and namespace it is told (``--node-name``, ``--namespace``).
"""

from __future__ import annotations

NODE_NAME = "vlm_assistant"
CAMERA = "/camera/image_raw"  # the default camera input (parameter ``cameras``)
SCENE_ANSWER = "~/scene_answer"
ACTION_HINT = "~/action_hint"
ASK = "~/ask"
DESCRIBE = "~/describe"
ANNOTATED_IMAGE = "~/annotated_image"  # the frame with the latest outputs drawn (ros.annotate)
ANNOTATED_COMPRESSED = ANNOTATED_IMAGE + "/compressed"  # image_transport's naming
DIAGNOSTICS = "/diagnostics"  # absolute: every node's diagnostics share one topic


def latency_status(node_name: str = NODE_NAME) -> str:
    """The name of the node's /diagnostics status (its hardware_id is ``fully_qualified``)."""
    return f"{node_name}: latency"


def fully_qualified(node_name: str = NODE_NAME, namespace: str = "") -> str:
    """``/ns/name`` (``/name`` without a namespace), as rclpy's get_fully_qualified_name."""
    ns = namespace.strip("/")
    return f"/{ns}/{node_name}" if ns else f"/{node_name}"


def resolve(topic: str, node_name: str = NODE_NAME, namespace: str = "") -> str:
    """A topic name as ROS resolves it for the node: ``~`` is the node, a relative name is
    under the namespace, an absolute name stays as it is."""
    if topic.startswith("/"):
        return topic
    if topic == "~" or topic.startswith("~/"):
        return fully_qualified(node_name, namespace) + topic[1:]
    ns = namespace.strip("/")
    return f"/{ns}/{topic}" if ns else f"/{topic}"
