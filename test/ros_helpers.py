"""rclpy helpers shared by the ROS tests (test_node.py, test_demo_e2e.py): one context in a
domain of its own with a MultiThreadedExecutor spinning in a thread, a lifecycle node started
in a namespace of its own, and polling with a timeout. Import as ``from ros_helpers import ...``
(pytest puts test/ on sys.path)."""

from __future__ import annotations

import os
import threading
import time

CANDIDATES = ["continue", "stop", "turn_left"]


class Ros:
    """The context, executor and helpers shared by the tests."""

    def __init__(self):
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import MultiThreadedExecutor

        self.ctx = Context()
        self.domain = int(os.environ.get("ROS_DOMAIN_ID", 0)) or (os.getpid() % 100 + 100)
        rclpy.init(context=self.ctx, domain_id=self.domain)
        self.executor = MultiThreadedExecutor(num_threads=8, context=self.ctx)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        self.nodes = []

    def add(self, node):
        self.nodes.append(node)
        self.executor.add_node(node)
        return node

    def client_node(self, name: str):
        import rclpy

        return self.add(rclpy.create_node(name, context=self.ctx))

    def close(self):
        import rclpy

        self.executor.shutdown()  # first: nothing spins while the nodes destroy their entities
        self.thread.join(5)
        for node in self.nodes:
            if hasattr(node, "trigger_shutdown") and node.config is not None:
                node.trigger_shutdown()
        for node in self.nodes:
            node.destroy_node()
        rclpy.shutdown(context=self.ctx)


def start_node(ros: Ros, model: str, ns: str, **params):
    """A configured, active AssistantNode in namespace ``ns``, camera ``/<ns>/cam``."""
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from vlm_ros.ros.node import AssistantNode

    values = dict(model=model, cameras=[f"/{ns}/cam"], scene_rate_hz=0.0, hint_rate_hz=0.0,
                  max_new_tokens=6, hint_candidates=CANDIDATES, diagnostics_period_s=0.5,
                  threads=1)  # fmt: skip
    values.update(params)
    overrides = [Parameter(k, value=v) for k, v in values.items()]
    node = ros.add(AssistantNode(namespace=ns, context=ros.ctx, parameter_overrides=overrides))
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS, node.last_error
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    return node


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    """Poll ``predicate`` until truthy (returned) or ``timeout`` s (AssertionError naming
    ``what``). The default is generous: DDS discovery and a reply take well under a second
    alone, but many seconds on a 2-core CI host beside other work; it costs only on failure."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class FeedbackTopic:
    """Every Describe feedback message for one action, from its feedback topic.

    rclpy's ActionClient drops a goal's feedback callback as soon as the result arrives, and
    feedback and result travel on different DDS topics: on a loaded host the last feedback can
    land after the result and never reach the callback. A robot that needs every partial text
    subscribes to ``<action>/_action/feedback`` the same way. Create it before sending the goal.
    """

    def __init__(self, probe, action: str, depth: int = 1000):
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        from vlm_ros.action import Describe

        self.messages: list = []  # (goal uuid bytes, Describe.Feedback)
        qos = QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE)
        self.sub = probe.create_subscription(
            Describe.Impl.FeedbackMessage, f"{action}/_action/feedback", self._on, qos
        )
        wait_for(lambda: self.sub.get_publisher_count() > 0, what=f"{action} feedback publisher")

    def _on(self, msg) -> None:
        self.messages.append((bytes(msg.goal_id.uuid), msg.feedback))

    def texts(self, goal_uuid: bytes) -> list[str]:
        """The partial texts of one goal, in arrival order."""
        return [fb.partial_text for uuid, fb in self.messages if uuid == goal_uuid]
