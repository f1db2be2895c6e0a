"""NodeConfig and the parameter YAMLs, without ROS: every profile names only declared parameters
with the declared types, and builds a valid NodeConfig."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from vlm_ros.errors import InputError
from vlm_ros.ros.node_config import PARAMETERS, NodeConfig
from vlm_ros.serving.latency import Budgets

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "config").glob("*.yaml"))


def defaults() -> dict:
    return {name: default for name, (default, _) in PARAMETERS.items()}


def test_every_profile_is_there():
    names = {p.name for p in PROFILES}
    assert {"default.yaml", "demo.yaml", "llava_phi_orin.yaml", "mipha_desktop_gpu.yaml",
            "tinyllava_factory.yaml"} <= names  # fmt: skip


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_profile_uses_declared_parameters_and_types(path):
    params = yaml.safe_load(path.read_text())["/**"]["ros__parameters"]
    for name, value in params.items():
        assert name in PARAMETERS, f"{path.name}: undeclared parameter {name}"
        default = PARAMETERS[name][0]
        assert type(value) is type(default), f"{path.name}: {name} is {type(value).__name__}"
    values = defaults() | params
    values["device"] = "cpu"  # resolve without a GPU
    config = NodeConfig.from_values(values)
    assert config.cameras[0].topic == "/camera/image_raw"


def test_cameras_transport_budgets_and_bad_values():
    values = defaults() | {"cameras": ["/front/image_raw", "/rear/image_raw/compressed"],
                           "budget_total_ms": 300.0}  # fmt: skip
    config = NodeConfig.from_values(values)
    assert [c.compressed for c in config.cameras] == [False, True]
    assert config.camera("").topic == "/front/image_raw"
    assert config.camera("rear/image_raw/compressed").compressed
    with pytest.raises(InputError, match="unknown camera 'side'"):
        config.camera("side")
    assert config.budgets == Budgets(total=300.0)
    for name, bad in (("queue_size", 0), ("cameras", []), ("scene_rate_hz", -1.0)):
        with pytest.raises(InputError, match=name):
            NodeConfig.from_values(defaults() | {name: bad})


def test_fast_path_parameters_reach_the_runtime_config():
    """The node runs the fast path by default (static cache, as RuntimeConfig does) and exposes
    its switches; a wrong value is refused by name."""
    assert NodeConfig.from_values(defaults()).runtime.decoder == "static"
    values = defaults() | {"compile_decode": True, "quantize": "int8", "decoder": "static"}
    runtime = NodeConfig.from_values(values).runtime
    assert (runtime.compile_decode, runtime.quantize) == (True, "int8")
    plain = NodeConfig.from_values(defaults() | {"cpu_linear": "torch"})
    assert plain.runtime.cpu_linear == "torch"
    for name, bad in (("decoder", "fast"), ("quantize", "int4"), ("cpu_linear", "mkl")):
        with pytest.raises(InputError, match=name):
            NodeConfig.from_values(defaults() | {name: bad})


def test_launch_file_is_valid_python_with_the_documented_arguments():
    tree = ast.parse((ROOT / "launch" / "assistant.launch.py").read_text())
    declared = {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "DeclareLaunchArgument"
    }
    assert declared == {"params_file", "namespace", "camera_topic", "model", "demo"}
