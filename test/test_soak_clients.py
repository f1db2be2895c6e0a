"""The soak clients' accounting over real rclpy futures: lost (no response in the wait) and late
(a response after the node's promise) are told apart, and the soak sums both."""

import argparse
import time

import pytest

pytestmark = pytest.mark.ros


def test_await_all_tells_lost_from_late(ros_context):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.task import Future

    from vlm_ros.ros import soak_clients

    node = rclpy.create_node("soak_accounting", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    on_time, late, never = Future(), Future(), Future()
    on_time.set_result("now")  # done before the wait: arrives at ~0 ms
    timer = node.create_timer(1.0, lambda: late.done() or late.set_result("after 1 s"))
    tally = soak_clients.Tally()
    args = argparse.Namespace(timeout=2.5, promise=0.5)
    start = time.monotonic()
    try:
        arrived = soak_clients._await_all(executor, [on_time, late, never], start, args, tally)
    finally:
        timer.cancel()
        executor.shutdown()
        node.destroy_node()
    assert arrived[0] is not None and arrived[0] < 500, arrived
    assert arrived[1] is not None and arrived[1] >= 1000, arrived
    assert arrived[2] is None, arrived
    assert (tally.lost, tally.late) == (1, 1)
    # no promise given: nothing counts as late
    tally = soak_clients.Tally()
    executor = SingleThreadedExecutor(context=ros_context)
    args = argparse.Namespace(timeout=0.1, promise=0.0)
    soak_clients._await_all(executor, [on_time, late], start, args, tally)
    assert (tally.lost, tally.late) == (0, 0)


def test_soak_sums_late_and_lost_per_kind():
    from vlm_ros.ros import soak

    clients = [
        {"sent": 10, "answered": 2, "refused": 7, "lost": 1, "late": 3,
         "refused_by_reason": {"queue_full": 7}},
        {"sent": 10, "answered": 1, "refused": 9, "lost": 0, "late": 2,
         "refused_by_reason": {"queue_full": 8, "bad_image": 1}},
        {"error": "service not available"},
    ]  # fmt: skip
    out = soak.requests(clients, 10)
    assert (out["sent"], out["answered"], out["refused"], out["lost"], out["late"]) == (
        20, 3, 16, 1, 5)  # fmt: skip
    assert out["refused_by_reason"] == {"queue_full": 15, "bad_image": 1}
    assert out["client_errors"] == ["service not available"]
