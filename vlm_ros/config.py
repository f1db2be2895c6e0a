"""Run-time configuration of the core, as frozen dataclasses built once and passed one way
(parameters/YAML -> these -> pipeline). Nothing reads a parameter anywhere else."""

from __future__ import annotations

from dataclasses import dataclass, field

# The values RuntimeConfig's string fields take; the node, the CLI and the decoders all check
# against these.
DECODERS = ("static", "eager")
QUANTIZE_MODES = ("none", "int8", "int8_weight_only")
CPU_LINEAR_MODES = ("auto", "onednn", "torch")


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
    dtype bfloat16/float16: int8 weights, half-precision activations; opt-in, small loss).
    cpu_linear: "auto" (float32 on an x86 CPU: the static decoder's and the torch vision
    stage's Linear layers through oneDNN, ~2x MKL on AMD CPUs, same arithmetic), "onednn" (the
    same, warning where unavailable) or "torch" (plain F.linear everywhere).
    board: the memory plan's device (model/memory_plan.py), checked before any weight is read:
    "auto" (this Jetson Orin from its device tree, else the CUDA GPU's free memory or the
    host's available memory), a board name (orin-nano-8gb, orin-nx-8gb, orin-nx-16gb,
    agx-orin-32gb, agx-orin-64gb: plan as if there), or "none" (no check).
    memory_reserve_mb: memory left to the OS, ROS 2 and the camera; 0 = the board's default.
    """

    device: str = "cpu"
    dtype: str | None = None
    vision_backend: str = "torch"
    decoder: str = "static"
    max_seq_len: int = 1024
    engine_dir: str = "models/engines"
    compile_decode: bool = False
    quantize: str = "none"
    cpu_linear: str = "auto"
    drop_first_patch: bool | None = None  # None: family default (Factory TinyLLaVA drops it)
    threads: int = 0  # torch intra-op threads on CPU; 0 = leave torch's default
    board: str = "auto"
    memory_reserve_mb: float = 0.0


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
