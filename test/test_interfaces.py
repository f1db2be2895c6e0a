"""The generated vlm_ros interfaces and the ROS 2 package description.

Real rclpy over Fast DDS: an Ask request/response between two nodes. The package.xml checks parse
it with catkin_pkg (as ament/colcon do) and compare its dependencies with what the code imports.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# ---- generated types -----------------------------------------------------------------------------

LATENCY_FIELDS = {
    "queue_ms",
    "preprocess_ms",
    "vision_ms",
    "projector_ms",
    "prefill_ms",
    "decode_ms",
    "encode_ms",
    "network_ms",
    "server_queue_ms",
    "total_ms",
    "image_to_output_ms",
}


@pytest.mark.ros
def test_messages_have_documented_fields():
    from vlm_ros.msg import ActionHint, SceneAnswer, StageLatency

    assert set(StageLatency.get_fields_and_field_types()) == LATENCY_FIELDS
    scene = SceneAnswer.get_fields_and_field_types()
    assert scene["header"] == "std_msgs/Header"
    assert scene["latency"] == "vlm_ros/StageLatency"
    assert scene["budget_misses"] == "sequence<string>"
    for name in ("camera", "question", "answer", "num_tokens", "stop_reason", "within_budget"):
        assert name in scene
    hint = ActionHint.get_fields_and_field_types()
    assert hint["probabilities"] == "sequence<float>"
    for name in (
        "header",
        "camera",
        "instruction",
        "action",
        "confidence",
        "candidates",
        "latency",
        "within_budget",
        "budget_misses",
    ):
        assert name in hint

    msg = ActionHint(candidates=["stop", "continue"], probabilities=[0.75, 0.25], action="stop")
    assert list(msg.probabilities) == [0.75, 0.25]


@pytest.mark.ros
def test_service_and_action_types():
    from vlm_ros.action import Describe
    from vlm_ros.srv import Ask

    req = Ask.Request.get_fields_and_field_types()
    assert req == {
        "question": "string",
        "camera": "string",
        "max_new_tokens": "uint32",
        "want_action_hint": "boolean",
    }
    resp = Ask.Response.get_fields_and_field_types()
    assert resp["hint"] == "vlm_ros/ActionHint"
    assert resp["image_stamp"] == "builtin_interfaces/Time"
    for name in ("success", "error_message", "answer", "stop_reason", "latency", "image_age_ms"):
        assert name in resp

    goal = Describe.Goal.get_fields_and_field_types()
    assert set(goal) == {"question", "camera", "max_new_tokens"}
    feedback = Describe.Feedback.get_fields_and_field_types()
    assert set(feedback) == {"partial_text", "tokens_generated"}
    result = Describe.Result.get_fields_and_field_types()
    for name in ("success", "error_message", "answer", "stop_reason", "latency", "image_stamp"):
        assert name in result


@pytest.mark.ros
def test_source_package_is_extended_with_generated_modules():
    import vlm_ros
    import vlm_ros.msg

    # The source tree's vlm_ros/ is the package (so vlm_ros.infer.pipeline etc. come from it); the
    # generated modules are found through its extended __path__.
    assert Path(vlm_ros.__path__[0]).resolve() == (ROOT / "vlm_ros").resolve() or (
        # colcon install: both live in one site-packages folder
        (Path(vlm_ros.__path__[0]) / "msg").is_dir()
    )
    assert vlm_ros.__version__
    assert Path(vlm_ros.msg.__file__).parent.name == "msg"


@pytest.mark.ros
def test_ask_round_trip_over_dds(ros_context):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from vlm_ros.srv import Ask

    def handle(request, response):
        response.success = True
        response.answer = f"echo: {request.question} @ {request.camera or 'default'}"
        response.hint.candidates = ["stop", "continue"]
        response.hint.probabilities = [0.9, 0.1]
        response.latency.total_ms = 12.5
        response.image_stamp.sec = 42
        response.image_age_ms = 3.0
        return response

    server = rclpy.create_node("ask_server", context=ros_context)
    client_node = rclpy.create_node("ask_client", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    try:
        server.create_service(Ask, "test_ask", handle)
        client = client_node.create_client(Ask, "test_ask")
        executor.add_node(server)
        executor.add_node(client_node)
        assert client.wait_for_service(timeout_sec=15.0), "Ask service not discovered in 15 s"

        future = client.call_async(Ask.Request(question="Is the path clear?", max_new_tokens=8))
        executor.spin_until_future_complete(future, timeout_sec=15.0)
        assert future.done(), "no Ask response in 15 s"
        response = future.result()
        assert response.success
        assert response.answer == "echo: Is the path clear? @ default"
        assert list(response.hint.candidates) == ["stop", "continue"]
        assert response.hint.probabilities[0] == pytest.approx(0.9)
        assert response.latency.total_ms == pytest.approx(12.5)
        assert response.image_stamp.sec == 42
    finally:
        executor.shutdown()
        server.destroy_node()
        client_node.destroy_node()


# ---- package description -------------------------------------------------------------------------


def _package():
    catkin_pkg = pytest.importorskip("catkin_pkg.package")
    return catkin_pkg.parse_package(str(ROOT / "package.xml"))


def test_package_xml_is_valid():
    pkg = _package()
    pkg.validate()
    assert pkg.name == "vlm_ros"
    assert pkg.package_format == 3
    assert pkg.get_build_type() == "ament_cmake"
    assert "rosidl_interface_packages" in [g.name for g in pkg.member_of_groups]
    buildtool = {d.name for d in pkg.buildtool_depends}
    assert {"ament_cmake", "ament_cmake_python", "rosidl_default_generators"} <= buildtool


def _ros_imports() -> set[str]:
    """Top-level ROS package names imported by vlm_ros/ and launch/ files."""
    known_ros = {
        "rclpy",
        "launch",
        "launch_ros",
        "builtin_interfaces",
        "ament_index_python",
        "rosidl_runtime_py",
        "rcl_interfaces",
    }
    names: set[str] = set()
    files = list((ROOT / "vlm_ros").rglob("*.py")) + list((ROOT / "launch").glob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top in known_ros or re.fullmatch(r"[a-z0-9_]+_(msgs|srvs|interfaces)", top):
                    names.add(top)
    return names


def test_package_xml_declares_the_ros_packages_the_code_imports():
    pkg = _package()
    declared = {d.name for d in pkg.exec_depends}  # <depend> counts as exec_depend too
    missing = sorted(_ros_imports() - declared - {"vlm_ros"})
    assert not missing, f"package.xml lacks <exec_depend> for: {missing}"


def test_cmake_generates_every_interface_file():
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    files = sorted(
        p.relative_to(ROOT).as_posix()
        for d in ("msg", "srv", "action")
        for p in (ROOT / d).glob("*.*")
    )
    assert files, "no interface files"
    missing = [f for f in files if f'"{f}"' not in cmake]
    assert not missing, f"not in rosidl_generate_interfaces: {missing}"
