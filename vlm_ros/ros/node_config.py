"""The node's parameters (name, default, description, allowed values) and NodeConfig, built
once from them.

ROS-free: the node declares every entry of PARAMETERS once (type from the default, description
as its ParameterDescriptor) and hands the values to ``NodeConfig.from_values``; nothing else in
the node reads a parameter. Keeping the table here lets the YAML files, the README and the tests
check the same names without rclpy.

Every value is checked by ``check_values`` against RULES, at configure and on every
``ros2 param set``; a bad one is refused with one line naming the parameter, the value and what
is allowed. Doubles accept integers (``-p scene_rate_hz:=2``). LIVE parameters apply to a
configured node at once (``NodeConfig.with_values``); the others are read at configure only,
and changing them on a configured node is refused with RECONFIGURE's reason.

Cameras: ``cameras`` lists topics; a topic ending in ``/compressed`` is a
sensor_msgs/CompressedImage (image_transport's naming), any other a sensor_msgs/Image. The camera
name used in outputs and in Ask/Describe requests is the topic as configured.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from vlm_ros.config import (
    BACKENDS,
    CPU_LINEAR_MODES,
    DECODERS,
    DTYPE_NAMES,
    IMAGE_ENCODINGS,
    QUANTIZE_MODES,
    VISION_BACKENDS,
    GenerationConfig,
    RemoteConfig,
    RuntimeConfig,
)
from vlm_ros.errors import InputError
from vlm_ros.model.boards import BOARDS
from vlm_ros.serving.latency import NAMES as BUDGET_NAMES
from vlm_ros.serving.latency import Budgets

DEFAULT_CANDIDATES = ["continue", "slow_down", "stop", "turn_left", "turn_right"]

# name -> (default, description). The default's type is the parameter's type.
PARAMETERS: dict[str, tuple[object, str]] = {
    "model": ("demo", "checkpoint directory, Hugging Face hub id, or 'demo'"),
    "backend": (
        "local",
        "local (load the model in this process) or remote (an OpenAI-compatible server at "
        "server_url answers: vlm-ros serve, vLLM, ...; the model-loading parameters then "
        "do not apply)",
    ),
    "server_url": ("", "backend remote: the server's base URL, e.g. http://gpu-box:8000"),
    "remote_model": ("", "backend remote: the model name the server serves; empty = model"),
    "api_key_env": (
        "",
        "backend remote: name of the environment variable holding the API key (sent as "
        "'Authorization: Bearer'); empty = no key",
    ),
    "request_timeout_s": (
        30.0,
        "backend remote: longest wait for a whole response, and for each of its bytes",
    ),
    "connect_timeout_s": (3.0, "backend remote: longest wait to connect to the server"),
    "image_encoding": (
        "jpeg",
        "backend remote: frames on the wire as jpeg (lossy, jpeg_quality) or png (lossless)",
    ),
    "jpeg_quality": (90, "backend remote: JPEG quality 1-95"),
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
        "static decoder: torch.compile the decode step (a CUDA graph on GPU, "
        "inductor's C++ kernels on CPU), compiled at configure, not at the first "
        "answer; the step attends over all max_seq_len slots, so size that to the "
        "prompt plus the answer",
    ),
    "quantize": (
        "none",
        "none, int8 (static decoder on CPU: dynamic int8 Linear layers; "
        "lossy, opt-in), int8_weight_only (static decoder, dtype bfloat16/float16: "
        "int8 weights, half-precision activations; or float32 on a CPU, read in inductor's "
        "loops: the compiled step or the uncompiled step's compiled regions) or "
        "int4_weight_only (static decoder; "
        "CPU float32/bfloat16, CUDA bfloat16: 4-bit weights, groups of 32; lossy, opt-in)",
    ),
    "cpu_linear": (
        "auto",
        "float32 on x86 CPUs, static decoder and torch vision stage: auto = Linear layers "
        "through oneDNN on AMD CPUs (~2x MKL there), torch's MKL on Intel's (the faster one "
        "there), and on AMD the decode step's GEMVs written by inductor (compile_decode: in "
        "the compiled step, 1.4-1.8x again; else, for weights of 1 MiB or more, the step as "
        "compiled regions shared by every layer, compiled at configure, kept where timed "
        "faster there: 1.25x the step on oneDNN's GEMVs at small size); "
        "onednn = oneDNN on any x86 CPU, nothing compiled; torch = plain F.linear; inductor = "
        "the decode step's GEMVs by inductor on any CPU, untimed (measured on AMD only)",
    ),
    "huge_pages": (
        True,
        "CPU, static decoder: weights and KV cache copied onto transparent huge pages at "
        "configure (Linux, THP not never): fewer TLB misses in the per-token weight stream; "
        "same values",
    ),
    "native_kernels": (
        True,
        "CPU float32, the uncompiled decode step's compiled regions: GEMVs and attention on "
        "vlm_ros's own kernels (built for this CPU on first use, ~10 s; they read the memory "
        "at a plain sum's pace where inductor's loops and SDPA do not), checked at configure; "
        "where they do not build or differ, inductor's loops serve; false = inductor's loops",
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
    "max_image_pixels": (
        4096 * 4096,
        "refuse frames of more pixels than this, from their declared size (compressed: from "
        "the header), before decoding",
    ),
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
    "diagnostics_window": (50, "outputs in the p50/p90/p99 window of /diagnostics"),
    "inference_delay_ms": (0.0, "FAULT INJECTION for tests: sleep before each inference"),
    "autostart": (True, "main(): configure and activate without a lifecycle manager"),
    "log_outputs": (False, "also log every scene answer and action hint (info); demo: on"),
    "annotated_save_dir": (
        "",
        "also write ~/annotated_image frames as PNG into this folder (created); empty = none",
    ),
    "annotated_save_period_s": (1.0, "at most one saved annotated frame per this many seconds"),
    "annotated_save_keep": (20, "saved annotated frames kept (the oldest are deleted)"),
    **{
        f"budget_{name}_ms": (0.0, f"latency budget of {name} in ms; 0 = none")
        for name in BUDGET_NAMES
    },
}


@dataclass(frozen=True)
class Rule:
    """What a parameter accepts: ``ok(value)`` and the words of the refusal."""

    ok: Callable[[object], bool]
    allowed: str


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_range(low: int, high: int | None = None) -> Rule:
    def ok(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= (high or v)

    return Rule(ok, f"an integer >= {low}" + (f" and <= {high}" if high else ""))


def _float_range(low: float, above: bool = False, high: float | None = None) -> Rule:
    def ok(v: object) -> bool:
        if not _number(v):
            return False
        x = float(v)  # type: ignore[arg-type]
        return (x > low if above else x >= low) and (high is None or x <= high)

    words = f"a number {'>' if above else '>='} {low:g}" + (f" and <= {high:g}" if high else "")
    return Rule(ok, words)


def _choice(*allowed: str) -> Rule:
    return Rule(lambda v: v in allowed, "one of " + ", ".join(repr(a) for a in allowed))


def _text(non_empty: bool = True, max_chars: int = 4000) -> Rule:
    def ok(v: object) -> bool:
        return isinstance(v, str) and (bool(v.strip()) or not non_empty) and len(v) <= max_chars

    return Rule(ok, f"a {'non-empty ' if non_empty else ''}string of at most {max_chars} chars")


def _names(v: Any) -> bool:
    """A non-empty list of distinct non-empty strings."""
    items = list(v) if isinstance(v, (list, tuple)) else []
    return (
        bool(items)
        and all(isinstance(x, str) and x.strip() for x in items)
        and len(set(items)) == len(items)
    )


_BOOL = Rule(lambda v: isinstance(v, bool), "true or false")
_DEVICE = re.compile(r"(cpu|cuda|cuda:\d+|auto)")
RULES: dict[str, Rule] = {
    "model": _text(),
    "backend": _choice(*BACKENDS),
    "server_url": Rule(
        lambda v: v == "" or (isinstance(v, str) and v.startswith(("http://", "https://"))),
        "an http:// or https:// URL (or empty with backend local)",
    ),
    "remote_model": _text(non_empty=False),
    "api_key_env": Rule(
        lambda v: isinstance(v, str) and (v == "" or bool(re.fullmatch(r"[A-Za-z_]\w*", v))),
        "an environment variable name (or empty)",
    ),
    "request_timeout_s": _float_range(0.0, above=True, high=3600.0),
    "connect_timeout_s": _float_range(0.0, above=True, high=600.0),
    "image_encoding": _choice(*IMAGE_ENCODINGS),
    "jpeg_quality": _int_range(1, 95),
    "device": Rule(lambda v: bool(_DEVICE.fullmatch(str(v))), "cpu, cuda, cuda:N or auto"),
    "dtype": _choice("", *DTYPE_NAMES),
    "vision_tower": _text(non_empty=False),
    "vision_backend": _choice(*VISION_BACKENDS),
    "decoder": _choice(*DECODERS),
    "max_seq_len": _int_range(1, 1 << 20),
    "compile_decode": _BOOL,
    "quantize": _choice(*QUANTIZE_MODES),
    "cpu_linear": _choice(*CPU_LINEAR_MODES),
    "huge_pages": _BOOL,
    "native_kernels": _BOOL,
    "engine_dir": _text(),
    "board": _choice("auto", "none", *BOARDS),
    "memory_reserve_mb": _float_range(0.0),
    "threads": _int_range(0, 1024),
    "max_image_pixels": _int_range(64, 1 << 28),
    "cameras": Rule(_names, "a non-empty list of distinct topic names"),
    "scene_rate_hz": _float_range(0.0, high=100.0),
    "scene_prompt": _text(),
    "hint_rate_hz": _float_range(0.0, high=100.0),
    "hint_instruction": _text(),
    "hint_candidates": Rule(
        lambda v: _names(v) and len(v) <= 32, "a list of 1 to 32 distinct non-empty actions"
    ),
    "max_new_tokens": _int_range(1, 4096),
    "max_frame_age_ms": _float_range(0.0),
    "queue_size": _int_range(1, 1024),
    "query_timeout_s": _float_range(0.0, above=True),
    "diagnostics_period_s": _float_range(0.0, above=True, high=3600.0),
    "diagnostics_window": _int_range(1, 100_000),
    "inference_delay_ms": _float_range(0.0),
    "autostart": _BOOL,
    "log_outputs": _BOOL,
    "annotated_save_dir": _text(non_empty=False),
    "annotated_save_period_s": _float_range(0.0),
    "annotated_save_keep": _int_range(1, 100_000),
    **{f"budget_{name}_ms": _float_range(0.0) for name in BUDGET_NAMES},
}
# double parameters: declared with dynamic typing so an integer is accepted (and coerced here)
DOUBLES = frozenset(n for n, (default, _) in PARAMETERS.items() if isinstance(default, float))
# applied to a configured node at once by ``NodeConfig.with_values``
LIVE = frozenset(
    (
        "scene_rate_hz",
        "scene_prompt",
        "hint_rate_hz",
        "hint_instruction",
        "hint_candidates",
        "max_new_tokens",
        "max_frame_age_ms",
        "query_timeout_s",
        "inference_delay_ms",
        "log_outputs",
        *(f"budget_{name}_ms" for name in BUDGET_NAMES),
    )
)
RECONFIGURE = (
    "it is read when the node is configured (it loads the model, sizes the queue or "
    "subscribes the cameras); deactivate and clean up the node, set it, then configure and "
    "activate again (ros2 lifecycle set <node> deactivate / cleanup / configure / activate)"
)


def check_value(name: str, value: object) -> None:
    """InputError, one line, when ``value`` is not allowed for parameter ``name``."""
    rule = RULES.get(name)
    if rule is not None and not rule.ok(value):
        raise InputError(f"parameter {name}: {value!r} is not allowed; expected {rule.allowed}")


def check_values(values: Mapping[str, object]) -> None:
    """Check every parameter in ``values``; the first bad one raises InputError."""
    for name, value in values.items():
        check_value(name, value)


@dataclass(frozen=True)
class Camera:
    """One camera input: its topic (also its name) and whether it is CompressedImage."""

    topic: str
    compressed: bool


@dataclass(frozen=True)
class NodeConfig:
    """Everything the node needs, read once at configure; LIVE fields replaced by
    ``with_values`` (a new frozen config, swapped in one assignment)."""

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
    max_image_pixels: int = 4096 * 4096
    annotated_save_dir: str = ""  # "" = annotated frames are not saved
    annotated_save_period_s: float = 1.0
    annotated_save_keep: int = 20

    @classmethod
    def from_values(cls, v: Mapping[str, Any]) -> NodeConfig:
        """Parameter values (names as PARAMETERS) -> NodeConfig; InputError names a bad one.
        ``device: auto`` is resolved here (it imports torch; not with backend remote)."""
        check_values(v)
        runtime = RuntimeConfig(
            device=resolve_device(str(v["device"])) if v["backend"] == "local" else "cpu",
            dtype=str(v["dtype"]) or None,
            vision_backend=str(v["vision_backend"]),
            decoder=str(v["decoder"]),
            max_seq_len=int(v["max_seq_len"]),
            engine_dir=str(v["engine_dir"]),
            threads=int(v["threads"]),
            compile_decode=bool(v["compile_decode"]),
            quantize=str(v["quantize"]),
            cpu_linear=str(v["cpu_linear"]),
            huge_pages=bool(v["huge_pages"]),
            native_kernels=bool(v["native_kernels"]),
            board=str(v["board"]),
            memory_reserve_mb=float(v["memory_reserve_mb"]),
            backend=str(v["backend"]),
            remote=RemoteConfig(
                server_url=str(v["server_url"]),
                model=str(v["remote_model"]),
                api_key_env=str(v["api_key_env"]),
                request_timeout_s=float(v["request_timeout_s"]),
                connect_timeout_s=float(v["connect_timeout_s"]),
                image_encoding=str(v["image_encoding"]),
                jpeg_quality=int(v["jpeg_quality"]),
                health_period_s=float(v["diagnostics_period_s"]),
            ),
        )
        cameras = tuple(Camera(t, t.rstrip("/").endswith("/compressed")) for t in v["cameras"])
        live = _live_fields(v)
        return cls(
            model=str(v["model"]),
            runtime=runtime,
            generation=GenerationConfig(max_new_tokens=int(live.pop("max_new_tokens"))),
            cameras=cameras,
            queue_size=int(v["queue_size"]),
            diagnostics_period_s=float(v["diagnostics_period_s"]),
            diagnostics_window=int(v["diagnostics_window"]),
            vision_tower=str(v["vision_tower"]) or None,
            max_image_pixels=int(v["max_image_pixels"]),
            annotated_save_dir=str(v["annotated_save_dir"]),
            annotated_save_period_s=float(v["annotated_save_period_s"]),
            annotated_save_keep=int(v["annotated_save_keep"]),
            **live,
        )

    def with_values(self, changed: Mapping[str, Any]) -> NodeConfig:
        """This config with LIVE parameters ``changed`` applied (already checked)."""
        unknown = set(changed) - LIVE
        if unknown:
            raise InputError(f"not live parameters: {', '.join(sorted(unknown))}")
        current = {name: getattr(self, name, None) for name in LIVE}
        current["max_new_tokens"] = self.generation.max_new_tokens
        current.update({f"budget_{n}_ms": ms for n, ms in self.budgets.as_dict().items()})
        fields = _live_fields({**current, **changed})
        generation = replace(self.generation, max_new_tokens=int(fields.pop("max_new_tokens")))
        return replace(self, generation=generation, **fields)

    def camera(self, name: str) -> Camera:
        """The camera a request names (its topic); empty = the first. InputError lists them."""
        if not name:
            return self.cameras[0]
        for cam in self.cameras:
            if name in (cam.topic, cam.topic.lstrip("/")):
                return cam
        known = ", ".join(c.topic for c in self.cameras)
        raise InputError(f"unknown camera {name!r}; configured: {known}")


def _live_fields(v: Mapping[str, Any]) -> dict[str, Any]:
    """NodeConfig's LIVE fields from parameter values (``max_new_tokens`` kept as a value)."""
    return dict(
        scene_rate_hz=float(v["scene_rate_hz"]),
        scene_prompt=str(v["scene_prompt"]),
        hint_rate_hz=float(v["hint_rate_hz"]),
        hint_instruction=str(v["hint_instruction"]),
        hint_candidates=tuple(str(c) for c in v["hint_candidates"]),
        max_frame_age_ms=float(v["max_frame_age_ms"]),
        query_timeout_s=float(v["query_timeout_s"]),
        inference_delay_ms=float(v["inference_delay_ms"]),
        log_outputs=bool(v["log_outputs"]),
        budgets=Budgets(**{n: float(v[f"budget_{n}_ms"]) for n in BUDGET_NAMES}),
        max_new_tokens=int(v["max_new_tokens"]),
    )


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; anything else unchanged."""
    if device != "auto":
        return device
    import torch  # only for ``auto``: the node's first log lines come before torch loads

    return "cuda" if torch.cuda.is_available() else "cpu"
