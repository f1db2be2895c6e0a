"""Run-time configuration of the core, as frozen dataclasses built once and passed one way
(parameters/YAML -> these -> pipeline). Nothing reads a parameter anywhere else."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal, get_args

from vlm_ros.errors import InputError

# The modes RuntimeConfig's string fields take. Literal types, so mypy checks the spellings in
# code; YAML, CLI and parameter strings are checked once, in RuntimeConfig.__post_init__, and
# nothing downstream checks them again.
DecoderKind = Literal["static", "eager"]
QuantizeMode = Literal["none", "int8", "int8_weight_only", "int4_weight_only"]
CpuLinearMode = Literal["auto", "onednn", "torch", "inductor"]
VisionBackend = Literal["torch", "onnxruntime", "tensorrt"]
DTypeName = Literal["float32", "bfloat16", "float16"]  # torch.<name>; checkpoint.to_dtype
Backend = Literal["local", "remote"]  # the model in this process, or an HTTP server's
ImageEncoding = Literal["jpeg", "png"]  # how the remote backend puts a frame on the wire
DECODERS: tuple[DecoderKind, ...] = get_args(DecoderKind)
QUANTIZE_MODES: tuple[QuantizeMode, ...] = get_args(QuantizeMode)
CPU_LINEAR_MODES: tuple[CpuLinearMode, ...] = get_args(CpuLinearMode)
VISION_BACKENDS: tuple[VisionBackend, ...] = get_args(VisionBackend)
DTYPE_NAMES: tuple[DTypeName, ...] = get_args(DTypeName)
BACKENDS: tuple[Backend, ...] = get_args(Backend)
IMAGE_ENCODINGS: tuple[ImageEncoding, ...] = get_args(ImageEncoding)


def check_choice(name: str, value: object, allowed: Collection[object]) -> None:
    """The one check of a mode string: InputError (a ValueError) naming the field, the value
    and the allowed values, on one line, so a node can log it and a CLI print it."""
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise InputError(f"{name} must be one of {choices}; got {value!r}")


def dtype_name(dtype: object) -> str:
    """The spelling RuntimeConfig.dtype and the errors use: "bfloat16" for torch.bfloat16."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class GenerationConfig:
    """How answers are decoded. Greedy by default: every published eval of the three families
    uses temperature 0, one beam."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass(frozen=True)
class RemoteConfig:
    """The remote backend (infer/remote.py): an OpenAI-compatible chat-completions server
    (``vlm-ros serve``, vLLM, ...) answers instead of a model in this process.

    server_url: the server's base URL, e.g. ``http://gpu-box:8000`` (``/v1/...`` is added).
    model: the model name sent in every request (``vlm-ros serve --model demo`` serves "demo").
    api_key_env: name of the environment variable holding the API key ("" = send none); the
    key itself never sits in a parameter file. request_timeout_s bounds a whole request (and
    each wait for the next byte); connect_timeout_s bounds connecting. image_encoding: "jpeg"
    (jpeg_quality 1-95; lossy) or "png" (lossless: the server decodes the same pixels).
    health_period_s: how often a background probe asks the server for its model list, for
    /diagnostics (0 = never; requests still report reachability).
    """

    server_url: str = ""
    model: str = ""
    api_key_env: str = ""
    request_timeout_s: float = 30.0
    connect_timeout_s: float = 3.0
    image_encoding: ImageEncoding = "jpeg"
    jpeg_quality: int = 90
    health_period_s: float = 2.0
    max_image_bytes: int = 8 << 20  # the server's default limit: refused here before sending

    def __post_init__(self) -> None:
        check_choice("RemoteConfig.image_encoding", self.image_encoding, IMAGE_ENCODINGS)
        if not (isinstance(self.jpeg_quality, int) and 1 <= self.jpeg_quality <= 95):
            raise InputError(f"RemoteConfig.jpeg_quality must be 1..95; got {self.jpeg_quality!r}")
        for name in ("request_timeout_s", "connect_timeout_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"RemoteConfig.{name} must be > 0; got {getattr(self, name)!r}")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the model runs.

    dtype: None picks the family's safe default for the device (see families.default_dtype):
    fp32 on CPU; bf16 for LLaVA-Phi/Mipha on CUDA (LLaVA-Phi's reference warns fp16 gives NaN),
    fp16 for TinyLLaVA on CUDA.
    vision_backend: "torch" (the model's own modules, only the encoder layers needed: the
    reference), "onnxruntime" or "tensorrt" for encoder+projector.
    decoder: "static" (KV cache allocated once, max_seq_len long; the default: greedy tokens
    identical to "eager" on every tiny layout, test/test_static_decode.py) or "eager"
    (transformers' dynamic cache, the reference).
    quantize: "none", "int8" (static decoder on CPU only: dynamic int8 Linear layers; lossy,
    opt-in; measured agreement in docs/performance.md) or "int8_weight_only" (static decoder,
    dtype bfloat16/float16: int8 weights, half-precision activations; or float32 on a CPU:
    int8 weights read in inductor's own GEMV loops, in the compiled step with compile_decode,
    else in the uncompiled step's compiled regions (infer/regional_step.py), float32
    activations; opt-in, small loss) or
    "int4_weight_only" (static decoder; CPU with float32/bfloat16, CUDA with bfloat16: 4-bit
    weights in groups of 32 with a scale and zero each, PyTorch's int4 kernels; opt-in, lossy).
    cpu_linear: "auto" (float32 on an AMD x86 CPU: the static decoder's and the torch vision
    stage's Linear layers through oneDNN, ~2x MKL there, same arithmetic, and the decode
    step's GEMVs written by inductor: with compile_decode inside the compiled step, 1.4-1.8x
    again; without it, for a decoder with a weight of 1 MiB or more, the step as three
    compiled regions shared by every layer (infer/regional_step.py), checked and timed
    against the library step at load and kept where 5% faster (1.25x the step on oneDNN's
    GEMVs on `small`), or where a decoder's structure is not covered one GEMV kernel per
    weight shape (engines/eager_gemv.py); on Intel CPUs MKL, torch's default, is the faster
    and is kept),
    "onednn" (oneDNN on any x86 CPU, warning where unavailable; nothing compiled), "torch"
    (plain F.linear everywhere) or "inductor" (the decode step's GEMVs written by inductor on
    any CPU, compiled step or not, as regions or every shape, untimed; the rest as "auto";
    measured on AMD only).
    native_kernels: in the uncompiled step's compiled regions (cpu_linear auto or inductor), a
    float32 decoder's GEMVs and attention through vlm_ros's own kernels
    (engines/native.py, built for this CPU on first use), which read the memory at a plain
    sum's pace where inductor's loops and SDPA do not; checked at load like the regions, and
    where they do not build or differ, inductor's loops serve. False: inductor's loops.
    huge_pages: on CPU, the static decoder's weights and KV cache copied onto transparent huge
    pages (Linux, THP not "never"; engines/huge_pages.py): fewer TLB misses in the per-token
    stream of every weight. Same values; off keeps torch's allocation.
    board: the memory plan's device (model/memory_plan.py), checked before any weight is read:
    "auto" (this Jetson Orin from its device tree, else the CUDA GPU's free memory or the
    host's available memory), a board name (orin-nano-8gb, orin-nx-8gb, orin-nx-16gb,
    agx-orin-32gb, agx-orin-64gb: plan as if there), or "none" (no check).
    memory_reserve_mb: memory left to the OS, ROS 2 and the camera; 0 = the board's default.
    backend: "local" (this process loads the model; every field above applies) or "remote"
    (``remote`` names the server; the fields above are the server's business and unused).
    """

    device: str = "cpu"
    dtype: DTypeName | None = None
    vision_backend: VisionBackend = "torch"
    decoder: DecoderKind = "static"
    max_seq_len: int = 1024
    engine_dir: str = "models/engines"
    compile_decode: bool = False
    quantize: QuantizeMode = "none"
    cpu_linear: CpuLinearMode = "auto"
    huge_pages: bool = True
    native_kernels: bool = True
    drop_first_patch: bool | None = None  # None: family default (Factory TinyLLaVA drops it)
    threads: int = 0  # torch intra-op threads on CPU; 0 = leave torch's default
    board: str = "auto"
    memory_reserve_mb: float = 0.0
    backend: Backend = "local"
    remote: RemoteConfig = field(default_factory=RemoteConfig)

    def __post_init__(self) -> None:
        for name, allowed in (
            ("backend", BACKENDS),
            ("dtype", (None, *DTYPE_NAMES)),
            ("vision_backend", VISION_BACKENDS),
            ("decoder", DECODERS),
            ("quantize", QUANTIZE_MODES),
            ("cpu_linear", CPU_LINEAR_MODES),
        ):
            check_choice(f"RuntimeConfig.{name}", getattr(self, name), allowed)
        if self.backend == "remote" and not self.remote.server_url.startswith(
            ("http://", "https://")
        ):
            raise InputError(
                "RuntimeConfig.remote.server_url must be an http:// or https:// URL with "
                f"backend 'remote'; got {self.remote.server_url!r}"
            )


@dataclass(frozen=True)
class ImageLimits:
    """Images outside these bounds are refused with an error naming the problem."""

    min_side: int = 8
    max_side: int = 8192
    max_question_chars: int = 4000


@dataclass(frozen=True)
class AssistantConfig:
    """Everything needed to build an Assistant."""

    model: str = "demo"
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    limits: ImageLimits = field(default_factory=ImageLimits)
