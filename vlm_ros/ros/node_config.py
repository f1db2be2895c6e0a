"""The node's parameters (name, default, description) and NodeConfig, built once from them.

ROS-free: the node declares every entry of PARAMETERS once (type from the default, description
as its ParameterDescriptor) and hands the values to ``NodeConfig.from_values``; nothing else in
the node reads a parameter. Keeping the table here lets the YAML files, the README and the tests
check the same names without rclpy.

Cameras: ``cameras`` lists topics; a topic ending in ``/compressed`` is a
sensor_msgs/CompressedImage (image_transport's naming), any other a sensor_msgs/Image. The camera
name used in outputs and in Ask/Describe requests is the topic as configured.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm_ros.config import (
    CPU_LINEAR_MODES,
    DECODERS,
    QUANTIZE_MODES,
    GenerationConfig,
    RuntimeConfig,
)
from vlm_ros.errors import InputError
from vlm_ros.serving.latency import NAMES as BUDGET_NAMES
from vlm_ros.serving.latency import Budgets

DEFAULT_CANDIDATES = ["continue", "slow_down", "stop", "turn_left", "turn_right"]

# name -> (default, description). The default's type is the parameter's type.
PARAMETERS: dict[str, tuple[object, str]] = {
    "model": ("demo", "checkpoint directory, Hugging Face hub id, or 'demo'"),
    "device": ("cpu", "torch device: cpu, cuda, cuda:N, or auto (cuda when available)"),
    "dtype": ("", "float32, bfloat16 or float16; empty = the family's safe default"),
    "vision_tower": (
        "",
        "legacy TinyLLaVA only: directory of its SigLIP vision tower; "
        "empty = config.json's mm_vision_tower",
    ),
    "vision_backend": ("torch", "vision encoder backend: torch, onnxruntime or tensorrt"),
    "decoder": (
        "static",
        "decoder: static (KV cache allocated once; the fast path, tokens "
        "identical to eager) or eager (transformers' dynamic cache, the reference)",
    ),
    "max_seq_len": (1024, "static decoder's KV cache length (tokens)"),
    "compile_decode": (
        False,
        "static decoder: torch.compile the decode step (a CUDA graph on "
        "GPU; compiles at the first answer)",
    ),
    "quantize": (
        "none",
        "none, int8 (static decoder on CPU: dynamic int8 Linear layers; "
        "lossy, opt-in) or int8_weight_only (static decoder, dtype bfloat16/float16: "
        "int8 weights, half-precision activations)",
    ),
    "cpu_linear": (
        "auto",
        "float32 on x86 CPUs, static decoder and torch vision stage: "
        "auto/onednn = Linear layers through oneDNN (~2x MKL on AMD; the decoder not with "
        "compile_decode, whose inductor lowers Linear itself), torch = plain F.linear",
    ),
    "engine_dir": ("models/engines", "directory of prebuilt ONNX/TensorRT engines"),
    "board": (
        "auto",
        "memory plan checked before loading: auto (this Jetson Orin, else this GPU/host), "
        "none, or orin-nano-8gb / orin-nx-8gb / orin-nx-16gb / agx-orin-32gb / agx-orin-64gb",
    ),
    "memory_reserve_mb": (
        0.0,
        "memory the plan leaves to the OS, ROS 2 and the camera; 0 = the board's default",
    ),
    "threads": (0, "torch CPU threads; 0 = torch's default"),
    "cameras": (["/camera/image_raw"], "camera topics; '.../compressed' = CompressedImage"),
    "scene_rate_hz": (1.0, "periodic scene answers per second per camera; 0 disables"),
    "scene_prompt": ("Describe the scene in front of the robot.", "question of scene answers"),
    "hint_rate_hz": (1.0, "periodic action hints per second per camera; 0 disables"),
    "hint_instruction": ("What should the robot do?", "instruction the action hints rank for"),
    "hint_candidates": (DEFAULT_CANDIDATES, "candidate actions ranked by the hints"),
    "max_new_tokens": (32, "default answer length limit (tokens)"),
    "max_frame_age_ms": (1000.0, "refuse frames received longer ago than this; 0 = no limit"),
    "queue_size": (4, "inference queue bound; a full queue refuses requests at once"),
    "query_timeout_s": (30.0, "longest an Ask waits for its answer before failing"),
    "diagnostics_period_s": (1.0, "seconds between /diagnostics messages"),
    "diagnostics_window": (50, "outputs in the p50/p95 window of /diagnostics"),
    "inference_delay_ms": (0.0, "FAULT INJECTION for tests: sleep before each inference"),
    "autostart": (True, "main(): configure and activate without a lifecycle manager"),
    "log_outputs": (False, "also log every scene answer and action hint (info); demo: on"),
    **{
        f"budget_{name}_ms": (0.0, f"latency budget of {name} in ms; 0 = none")
        for name in BUDGET_NAMES
    },
}


@dataclass(frozen=True)
class Camera:
    """One camera input: its topic (also its name) and whether it is CompressedImage."""

    topic: str
    compressed: bool


@dataclass(frozen=True)
class NodeConfig:
    """Everything the node needs, read once at configure."""

    model: str
    runtime: RuntimeConfig
    generation: GenerationConfig
    cameras: tuple[Camera, ...]
    scene_rate_hz: float
    scene_prompt: str
    hint_rate_hz: float
    hint_instruction: str
    hint_candidates: tuple[str, ...]
    max_frame_age_ms: float
    queue_size: int
    query_timeout_s: float
    diagnostics_period_s: float
    diagnostics_window: int
    inference_delay_ms: float
    budgets: Budgets
    vision_tower: str | None = None  # Assistant.load(vision_tower=...); None: mm_vision_tower
    log_outputs: bool = False

    @classmethod
    def from_values(cls, v: dict[str, object]) -> NodeConfig:
        """Parameter values (names as PARAMETERS) -> NodeConfig; InputError names a bad one."""
        cameras = tuple(Camera(t, t.rstrip("/").endswith("/compressed")) for t in v["cameras"])
        _check(bool(cameras) and all(c.topic for c in cameras), "cameras", v["cameras"])
        _check(len({c.topic for c in cameras}) == len(cameras), "cameras", v["cameras"])
        for name in ("queue_size", "diagnostics_window", "max_new_tokens"):
            _check(int(v[name]) >= 1, name, v[name])
        for name in ("scene_rate_hz", "hint_rate_hz", "max_frame_age_ms", "inference_delay_ms"):
            _check(float(v[name]) >= 0, name, v[name])
        for name in ("diagnostics_period_s", "query_timeout_s"):
            _check(float(v[name]) > 0, name, v[name])
        for name, allowed in (("decoder", DECODERS), ("quantize", QUANTIZE_MODES),
                              ("cpu_linear", CPU_LINEAR_MODES)):  # fmt: skip
            _check(str(v[name]) in allowed, name, v[name])
        runtime = RuntimeConfig(
            device=resolve_device(str(v["device"])), dtype=str(v["dtype"]) or None,
            vision_backend=str(v["vision_backend"]), decoder=str(v["decoder"]),
            max_seq_len=int(v["max_seq_len"]), engine_dir=str(v["engine_dir"]),
            threads=int(v["threads"]), compile_decode=bool(v["compile_decode"]),
            quantize=str(v["quantize"]), cpu_linear=str(v["cpu_linear"]),
            board=str(v["board"]), memory_reserve_mb=float(v["memory_reserve_mb"]),
        )  # fmt: skip
        return cls(
            model=str(v["model"]),
            runtime=runtime,
            generation=GenerationConfig(max_new_tokens=int(v["max_new_tokens"])),
            cameras=cameras,
            scene_rate_hz=float(v["scene_rate_hz"]),
            scene_prompt=str(v["scene_prompt"]),
            hint_rate_hz=float(v["hint_rate_hz"]),
            hint_instruction=str(v["hint_instruction"]),
            hint_candidates=tuple(str(c) for c in v["hint_candidates"]),
            max_frame_age_ms=float(v["max_frame_age_ms"]),
            queue_size=int(v["queue_size"]),
            query_timeout_s=float(v["query_timeout_s"]),
            diagnostics_period_s=float(v["diagnostics_period_s"]),
            diagnostics_window=int(v["diagnostics_window"]),
            inference_delay_ms=float(v["inference_delay_ms"]),
            budgets=Budgets(**{n: float(v[f"budget_{n}_ms"]) for n in BUDGET_NAMES}),
            vision_tower=str(v["vision_tower"]) or None,
            log_outputs=bool(v["log_outputs"]),
        )

    def camera(self, name: str) -> Camera:
        """The camera a request names (its topic); empty = the first. InputError lists them."""
        if not name:
            return self.cameras[0]
        for cam in self.cameras:
            if name in (cam.topic, cam.topic.lstrip("/")):
                return cam
        known = ", ".join(c.topic for c in self.cameras)
        raise InputError(f"unknown camera {name!r}; configured: {known}")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; anything else unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check(ok: bool, name: str, value: object) -> None:
    if not ok:
        raise InputError(f"parameter {name} has an invalid value {value!r}")
