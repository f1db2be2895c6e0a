"""Shared pytest setup for vlm_ros.

ROS tests carry ``@pytest.mark.ros`` (or ``pytestmark = pytest.mark.ros``). Where rclpy or the
generated vlm_ros interfaces cannot be imported they are skipped, with the import error as the
reason, unless ``VLM_ROS_REQUIRE_ROS=1`` (scripts/test.sh sets it, always under CI): then the whole
session stops at once with that error, so a broken ROS install can never pass as skips.
"""

from __future__ import annotations

import os

import pytest

REQUIRE_ROS = os.environ.get("VLM_ROS_REQUIRE_ROS") == "1"


def _ros_import_error() -> str | None:
    try:
        import rclpy  # noqa: F401

        from vlm_ros.action import Describe  # noqa: F401
        from vlm_ros.msg import ActionHint, SceneAnswer, StageLatency  # noqa: F401
        from vlm_ros.srv import Ask  # noqa: F401
    except Exception as exc:  # ImportError, or OSError for a missing shared library
        return f"{type(exc).__name__}: {exc}"
    return None


ROS_IMPORT_ERROR = _ros_import_error()


def pytest_sessionstart(session: pytest.Session) -> None:
    if REQUIRE_ROS and ROS_IMPORT_ERROR:
        pytest.exit(
            "VLM_ROS_REQUIRE_ROS=1 but rclpy / the generated vlm_ros interfaces cannot be "
            f"imported ({ROS_IMPORT_ERROR}); run scripts/setup.sh",
            returncode=3,
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ROS_IMPORT_ERROR is None:
        return
    skip = pytest.mark.skip(reason=f"rclpy / vlm_ros interfaces unavailable: {ROS_IMPORT_ERROR}")
    for item in items:
        if "ros" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def ros_context():
    """A fresh rclpy Context for one test (nodes: ``rclpy.create_node(name, context=ctx)``)."""
    import rclpy
    from rclpy.context import Context

    ctx = Context()
    rclpy.init(context=ctx)
    try:
        yield ctx
    finally:
        if ctx.ok():
            rclpy.shutdown(context=ctx)


@pytest.fixture(scope="module")
def ros():
    """One rclpy context per test module, its executor spinning in a thread (ros_helpers.Ros)."""
    from ros_helpers import Ros

    r = Ros()
    yield r
    r.close()
