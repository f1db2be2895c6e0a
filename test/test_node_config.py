"""NodeConfig and the parameter YAMLs, without ROS: every profile names only declared parameters
with the declared types, and builds a valid NodeConfig."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from vlm_ros.errors import InputError
from vlm_ros.ros import names
from vlm_ros.ros.node_config import PARAMETERS, NodeConfig
from vlm_ros.serving.latency import Budgets

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "config").glob("*.yaml"))


def defaults() -> dict:
    return {name: default for name, (default, _) in PARAMETERS.items()}


def test_every_profile_is_there():
    names = {p.name for p in PROFILES}
    assert {
        "default.yaml",
        "demo.yaml",
        "llava_phi_orin.yaml",
        "mipha_desktop_gpu.yaml",
        "tinyllava_factory.yaml",
    } <= names


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
    values = defaults() | {
        "cameras": ["/front/image_raw", "/rear/image_raw/compressed"],
        "budget_total_ms": 300.0,
    }
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
    for name, bad in (("decoder", "fast"), ("quantize", "int3"), ("cpu_linear", "mkl")):
        with pytest.raises(InputError, match=name):
            NodeConfig.from_values(defaults() | {name: bad})


def test_launch_file_is_valid_python_with_the_documented_arguments():
    tree = ast.parse((ROOT / "launch" / "assistant.launch.py").read_text())
    declared = {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "DeclareLaunchArgument"
    }
    assert declared == {"params_file", "namespace", "camera_topic", "model", "device", "demo"}
    constants = {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
    }
    assert constants["NODE_NAME"] == names.NODE_NAME and constants["CAMERA"] == names.CAMERA


# ---- every value checked, one line naming the parameter, the value and what is allowed ------


@pytest.mark.parametrize(
    "name, bad, allowed",
    [
        ("max_seq_len", 0, "an integer >= 1"),
        ("threads", -4, "an integer >= 0"),
        ("queue_size", 0, "an integer >= 1"),
        ("max_new_tokens", 0, "an integer >= 1"),
        ("max_image_pixels", 10, "an integer >= 64"),
        ("diagnostics_window", 0, "an integer >= 1"),
        ("scene_rate_hz", -1.0, "a number >= 0 and <= 100"),
        ("hint_rate_hz", "fast", "a number >= 0"),
        ("scene_rate_hz", True, "a number >= 0"),
        ("query_timeout_s", 0.0, "a number > 0"),
        ("diagnostics_period_s", -1, "a number > 0"),
        ("max_frame_age_ms", -5.0, "a number >= 0"),
        ("budget_total_ms", -1.0, "a number >= 0"),
        ("device", "gpu", "cpu, cuda, cuda:N or auto"),
        ("dtype", "fp16", "one of '', 'float32', 'bfloat16', 'float16'"),
        ("vision_backend", "trt", "one of 'torch', 'onnxruntime', 'tensorrt'"),
        ("decoder", "fast", "one of 'static', 'eager'"),
        ("quantize", "int3", "one of 'none', 'int8', 'int8_weight_only', 'int4_weight_only'"),
        ("cpu_linear", "mkl", "one of 'auto', 'onednn', 'torch', 'inductor'"),
        ("model", "", "a non-empty string"),
        ("scene_prompt", "  ", "a non-empty string"),
        ("cameras", [], "a non-empty list of distinct topic names"),
        ("cameras", ["/a", "/a"], "a non-empty list of distinct topic names"),
        ("hint_candidates", ["go", ""], "a list of 1 to 32 distinct non-empty actions"),
        ("compile_decode", 1, "true or false"),
    ],
)
def test_every_bad_value_is_refused_in_one_line(name, bad, allowed):
    with pytest.raises(InputError) as info:
        NodeConfig.from_values(defaults() | {name: bad})
    text = str(info.value)
    assert text.startswith(f"parameter {name}: {bad!r} is not allowed; expected {allowed}")
    assert "\n" not in text


def test_every_parameter_has_a_rule_and_its_default_passes():
    from vlm_ros.ros.node_config import RULES, check_values

    assert set(RULES) == set(PARAMETERS)
    check_values(defaults())


def test_integers_are_accepted_for_doubles():
    """`-p scene_rate_hz:=2` gives an int: accepted and stored as a float."""
    from vlm_ros.ros.node_config import DOUBLES

    assert {"scene_rate_hz", "hint_rate_hz", "budget_total_ms"} <= DOUBLES
    assert "max_new_tokens" not in DOUBLES
    config = NodeConfig.from_values(defaults() | {"scene_rate_hz": 2, "budget_total_ms": 300})
    assert config.scene_rate_hz == 2.0 and isinstance(config.scene_rate_hz, float)
    assert config.budgets.total == 300.0


def test_live_values_make_a_new_config_and_nothing_else_is_live():
    from vlm_ros.ros.node_config import LIVE

    config = NodeConfig.from_values(defaults())
    changed = config.with_values(
        {
            "scene_rate_hz": 3,
            "scene_prompt": "Describe it.",
            "hint_candidates": ["go", "stop"],
            "max_new_tokens": 7,
            "budget_total_ms": 250.0,
        }
    )
    assert (changed.scene_rate_hz, changed.scene_prompt) == (3.0, "Describe it.")
    assert changed.hint_candidates == ("go", "stop") and changed.generation.max_new_tokens == 7
    assert changed.budgets.total == 250.0 and changed.runtime == config.runtime
    assert config.scene_rate_hz == 1.0  # frozen: the old one is untouched
    assert {"model", "device", "dtype", "max_seq_len", "queue_size", "cameras"}.isdisjoint(LIVE)
    with pytest.raises(InputError, match="not live parameters: model"):
        config.with_values({"model": "other"})
