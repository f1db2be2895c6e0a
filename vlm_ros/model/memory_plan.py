"""Memory plan: what a configuration needs, computed before a byte of weights is read, against
what the board can give.

Why: on a Jetson the CPU and GPU share one memory. A model that does not fit does not fail
cleanly there: the loader or the first prefill runs the board into the out-of-memory killer,
swap thrashing or a hang, long after the node said "configuring". So the assistant adds up the
bytes first (Assistant.load calls ``check``) and refuses with one line that names the board,
the numbers and a setting that would fit.

Every byte is arithmetic on the architecture configs the loader resolved (PhiConfig, the
CLIP/SigLIP vision config), written out tensor by tensor as transformers builds them;
test/test_memory_plan.py checks the weight bytes against real modules (the tiny checkpoints of
all four layouts, loaded and quantized, and the full-size architectures on the meta device),
and the whole estimate against a measured CPU peak. What is not arithmetic (the CUDA context,
the OS + ROS 2 + camera reserve, the usable memory of each board) is a named constant of the
Board (model/boards.py), with where it comes from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from vlm_ros.config import RuntimeConfig
from vlm_ros.errors import InputError
from vlm_ros.model.boards import BOARDS, Board, GiB, resolve_board

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_log = logging.getLogger(__name__)

# The published architectures (config.json of the checkpoints; shared/facts/model-formats.md):
# Phi-2 2.7B, CLIP ViT-L/14-336, SigLIP-so400m-patch14-384. The bench builds the same shapes.
PHI2 = dict(
    vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
    num_attention_heads=32, partial_rotary_factor=0.4, max_position_embeddings=2048,
)  # fmt: skip
CLIP_L_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, hidden_act="quick_gelu",
)  # fmt: skip
SIGLIP_SO400M_384 = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    image_size=384, patch_size=14,
)  # fmt: skip


# ---- bytes of the architecture ------------------------------------------------------------


@dataclass(frozen=True)
class Tensors:
    """Element counts of a module tree, split the way precisions treat them:
    linear_weight: nn.Linear weights (what int8 weight-only quantizes), linear_out: their
    output channels (one scale each), other: every other parameter (embeddings, norms,
    biases, convolutions, position tables)."""

    linear_weight: int = 0
    linear_out: int = 0
    other: int = 0

    def __add__(self, o: Tensors) -> Tensors:
        return Tensors(
            self.linear_weight + o.linear_weight, self.linear_out + o.linear_out,
            self.other + o.other,
        )  # fmt: skip

    def __mul__(self, n: int) -> Tensors:
        return Tensors(self.linear_weight * n, self.linear_out * n, self.other * n)

    @property
    def params(self) -> int:
        return self.linear_weight + self.other


def linear(inp: int, out: int, bias: bool = True) -> Tensors:
    return Tensors(inp * out, out, out if bias else 0)


def norm(width: int) -> Tensors:  # LayerNorm: weight + bias
    return Tensors(other=2 * width)


def phi_tensors(text, lm_head_bias: bool = True) -> Tensors:
    """transformers' PhiForCausalLM: embed; per layer q/k/v/dense, fc1/fc2 (all with bias) and
    one input LayerNorm (attention and MLP run in parallel); final LayerNorm; lm_head."""
    h, inter, vocab = text.hidden_size, text.intermediate_size, text.vocab_size
    head_dim = h // text.num_attention_heads
    kv = (text.num_key_value_heads or text.num_attention_heads) * head_dim
    layer = (
        linear(h, h) + linear(h, kv) * 2 + linear(h, h)  # q, k, v, dense
        + linear(h, inter) + linear(inter, h) + norm(h)
    )  # fmt: skip
    embed = Tensors(other=vocab * h)
    return embed + layer * text.num_hidden_layers + norm(h) + linear(h, vocab, lm_head_bias)


def vision_tensors(kind: str, vision) -> Tensors:
    """transformers' CLIPVisionModel / SiglipVisionModel as the loader builds them (the SigLIP
    attention-pooling head only where the config keeps it)."""
    h, inter, p = vision.hidden_size, vision.intermediate_size, vision.patch_size
    patches = (vision.image_size // p) ** 2
    layer = linear(h, h) * 4 + norm(h) * 2 + linear(h, inter) + linear(inter, h)
    tower = layer * vision.num_hidden_layers + norm(h)  # + post_layernorm
    if kind == "clip":  # conv without bias, class embedding, CLS position, pre-LayerNorm
        return tower + Tensors(other=3 * p * p * h + h + (patches + 1) * h) + norm(h)
    tower = tower + Tensors(other=3 * p * p * h + h + patches * h)  # conv with bias
    if getattr(vision, "vision_use_head", True):
        # probe, nn.MultiheadAttention (packed in_proj: not an nn.Linear), LayerNorm, MLP
        attention = Tensors(other=h + 3 * h * h + 3 * h) + linear(h, h)
        tower = tower + attention + norm(h) + linear(h, inter) + linear(inter, h)
    return tower


def projector_tensors(vision_hidden: int, hidden: int) -> Tensors:
    return linear(vision_hidden, hidden) + linear(hidden, hidden)


def tensor_bytes(t: Tensors, dtype: str, quantize: str = "none") -> int:
    """Bytes of ``t`` held at ``dtype``, with the decoder quantization of RuntimeConfig:
    int8_weight_only: int8 weights + one scale per output channel in ``dtype``, the rest in
    ``dtype`` (engines/weight_int8.py); int8 (dynamic, CPU, float32): int8 packed weights,
    float32 rest (torch.ao's quantize_dynamic)."""
    width = DTYPE_BYTES[dtype]
    if quantize == "int8_weight_only":
        return t.linear_weight + t.linear_out * width + t.other * width
    if quantize == "int8":
        return t.linear_weight + t.linear_out * 4 + t.other * 4
    return t.params * width


# ---- the plan -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """What the plan needs of a model: its family's vision kind, lm_head bias and image-token
    count, and the two configs (PhiConfig, CLIP/SigLIP vision config)."""

    family: str
    vision_kind: str
    lm_head_bias: bool
    image_tokens: int
    text: object
    vision: object
    fp16_overflows: bool = False

    @classmethod
    def of(cls, spec, vision, text) -> Architecture:
        """From a FamilySpec and the configs the loader resolved (Layout / VlmModel)."""
        tokens = spec.num_image_tokens(vision.image_size, vision.patch_size)
        return cls(
            spec.name, spec.vision_kind, spec.lm_head_bias, tokens, text, vision,
            spec.fp16_overflows,
        )  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """Bytes one configuration needs, part by part, and what the device offers."""

    arch: Architecture
    dtype: str
    quantize: str
    max_seq_len: int
    decoder: int  # decoder weights as they run (quantized where asked)
    vision: int  # vision tower + projector (never quantized)
    engine: int  # a compiled vision engine's own copy of the tower (TensorRT / ONNX Runtime)
    kv_cache: int  # static cache, allocated once at max_seq_len
    workspace: int  # the largest transient of one request (prefill at max_seq_len)
    load_transient: int  # the largest transient while loading (one tensor converted)
    runtime: int  # CUDA context / the torch runtime
    reserve: int  # OS + ROS 2 + camera, which must keep running
    capacity: int  # what the device has
    where: str  # the board / device, in words

    @property
    def weights(self) -> int:
        return self.decoder + self.vision + self.engine

    @property
    def steady(self) -> int:
        """The model while it serves: weights + cache + one request's transient."""
        return self.weights + self.kv_cache + self.workspace

    @property
    def need(self) -> int:
        """Peak of loading and serving, plus what must run beside it."""
        return max(self.steady, self.weights + self.load_transient) + self.runtime + self.reserve

    @property
    def fits(self) -> bool:
        return self.need <= self.capacity

    def breakdown(self) -> str:
        parts = [("weights", self.weights), ("KV cache", self.kv_cache),
                 ("workspace", self.workspace), ("runtime", self.runtime),
                 ("OS/ROS/camera", self.reserve)]  # fmt: skip
        return " + ".join(f"{name} {gib(n)}" for name, n in parts if n)

    def label(self) -> str:
        quant = "" if self.quantize == "none" else f" + quantize {self.quantize}"
        return f"{self.arch.family} {self.dtype}{quant}, max_seq_len {self.max_seq_len}"


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def kv_cache_bytes(text, max_seq_len: int, dtype: str) -> int:
    """StaticCache: keys and values [1, kv_heads, max_seq_len, head_dim] per layer."""
    head_dim = text.hidden_size // text.num_attention_heads
    heads = text.num_key_value_heads or text.num_attention_heads
    return text.num_hidden_layers * 2 * heads * max_seq_len * head_dim * DTYPE_BYTES[dtype]


def workspace_bytes(
    arch: Architecture, max_seq_len: int, dtype: str, quantize: str = "none"
) -> int:
    """The largest transient of a request, doubled for the caching allocator's slack:
    a prefill of max_seq_len positions (residual, LayerNorm, q/k/v, the MLP's intermediate
    before and after GELU, float32 attention scores and their softmax; with int8 weight-only,
    the half-precision copy its eager kernel makes of a weight) or the vision tower (every
    hidden state kept: output_hidden_states), whichever is larger."""
    width = DTYPE_BYTES[dtype]
    t, s = arch.text, max_seq_len
    prefill = s * (6 * t.hidden_size + 2 * t.intermediate_size) * width
    prefill += 2 * t.num_attention_heads * s * s * 4
    v = arch.vision
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    tower = (v.num_hidden_layers + 1 + 6) * tokens * v.hidden_size * width
    tower += tokens * 2 * v.intermediate_size * width + 2 * v.num_attention_heads * tokens**2 * 4
    embeds = arch.image_tokens * t.hidden_size * width
    # int8 weight-only's eager kernel dequantizes one weight at a time (lm_head's is the
    # largest): one block, reused, so outside the slack factor
    dequantized = t.vocab_size * t.hidden_size * width if quantize == "int8_weight_only" else 0
    return 2 * (max(prefill, tower) + embeds) + dequantized


QUANTIZE_CHUNK_ROWS = 2048  # engines/weight_int8.CHUNK_ROWS (a test keeps them equal)


def load_transient_bytes(arch: Architecture, dtype: str, quantize: str) -> int:
    """What loading holds beyond the finished weights. The loader converts one tensor at a
    time (model/checkpoint.py), from a float32 source at worst; with int8 weight-only it
    quantizes each decoder block as soon as it is read (pipeline.Assistant.load), so the peak
    adds one block in half precision (the largest is lm_head) and the quantizer's float32
    slices (engines/weight_int8.py: a copy, its rounding, a quotient)."""
    t = arch.text
    largest = t.vocab_size * t.hidden_size  # the embedding or lm_head
    if quantize == "int8_weight_only":
        widest = max(t.hidden_size, t.intermediate_size)
        return largest * DTYPE_BYTES[dtype] + 3 * QUANTIZE_CHUNK_ROWS * widest * 4
    return largest * 4


def make_plan(arch: Architecture, runtime: RuntimeConfig, dtype: str, board: Board) -> Plan:
    """The plan of ``arch`` run as ``runtime`` says (dtype already resolved) on ``board``."""
    if dtype not in DTYPE_BYTES:
        raise InputError(f"dtype must be one of {tuple(DTYPE_BYTES)}, got {dtype!r}")
    vision = vision_tensors(arch.vision_kind, arch.vision)
    vision += projector_tensors(arch.vision.hidden_size, arch.text.hidden_size)
    vision_bytes = tensor_bytes(vision, dtype)
    # A compiled vision stage holds its own weights beside the PyTorch tower, which stays
    # loaded as the reference: TensorRT builds float16, the ONNX export is float32.
    engine = {"tensorrt": 2, "onnxruntime": 4}.get(runtime.vision_backend, 0) * vision.params
    return Plan(
        arch, dtype, runtime.quantize, runtime.max_seq_len,
        decoder=tensor_bytes(phi_tensors(arch.text, arch.lm_head_bias), dtype, runtime.quantize),
        vision=vision_bytes, engine=engine,
        kv_cache=kv_cache_bytes(arch.text, runtime.max_seq_len, dtype),
        workspace=workspace_bytes(arch, runtime.max_seq_len, dtype, runtime.quantize),
        load_transient=load_transient_bytes(arch, dtype, runtime.quantize),
        runtime=int(board.runtime_gib * GiB), reserve=int(board.reserve_gib * GiB),
        capacity=int(board.memory_gib * GiB), where=board.title,
    )  # fmt: skip


# ---- what would fit -----------------------------------------------------------------------


def suggestion(plan: Plan, arch: Architecture, runtime: RuntimeConfig, board: Board) -> str:
    """The most accurate precision that fits this board, else a shorter context, else the
    smallest board that fits this setting."""
    tries = [("float32", "none")] if not runtime.device.startswith("cuda") else []
    tries += [("bfloat16", "none"), ("float16", "none"), ("bfloat16", "int8_weight_only"),
              ("float16", "int8_weight_only")]  # fmt: skip
    for dtype, quantize in tries:
        if dtype == "float16" and arch.fp16_overflows:
            continue  # the family's reference warns that float16 overflows
        trial = make_plan(arch, replace(runtime, quantize=quantize), dtype, board)
        if trial.fits and trial.need < plan.need:
            return f"dtype: {dtype}, quantize: {quantize} needs {gib(trial.need)}"
    shortest = _min_seq(arch)
    if runtime.max_seq_len > shortest:
        trial = make_plan(arch, replace(runtime, max_seq_len=shortest), plan.dtype, board)
        if trial.fits:
            return f"max_seq_len: {shortest} needs {gib(trial.need)}"
    for bigger in sorted(BOARDS.values(), key=lambda b: b.memory_gib):
        if bigger.memory_gib > board.memory_gib and board.unified:
            if make_plan(arch, runtime, plan.dtype, bigger).fits:
                return f"a {bigger.title} ({bigger.memory_gib:.1f} GiB) fits this setting"
    return "none of this project's precisions fits this device"


def _min_seq(arch: Architecture) -> int:
    """The shortest useful context: the image tokens, a question and a short answer."""
    return arch.image_tokens + 128


def check(plan: Plan, arch: Architecture, runtime: RuntimeConfig, board: Board) -> None:
    """Raise MemoryPlanError (one line: board, need, breakdown, capacity, a fix) when
    ``plan`` does not fit."""
    if plan.fits:
        return
    raise MemoryPlanError(
        f"memory plan: {plan.label()} needs {gib(plan.need)} ({plan.breakdown()}) but the "
        f"{plan.where} has {gib(plan.capacity)}; fix: "
        f"{suggestion(plan, arch, runtime, board)} (or set memory_reserve_mb / board: none "
        "if you know better)"
    )


class MemoryPlanError(InputError):
    """A configuration that would not fit the device's memory, refused before loading."""


def trim_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc ``malloc_trim``; elsewhere a
    no-op). Called after each decoder block is quantized at load: glibc keeps the freed
    half-precision weights of earlier blocks as holes between the int8 ones, which measured
    ~200 MiB above the plan on the small preset; trimmed, the load peak stays within it."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to trim
        pass


def checker(runtime: RuntimeConfig, root: Path | None = None):
    """The check load_checkpoint runs once the layout is resolved and before any weight is
    read: a callable (spec, vision_config, text_config, dtype name) -> Plan that raises
    MemoryPlanError, or None with ``board: none``."""
    board = resolve_board(runtime, root)
    if board is None:
        return None

    def check_layout(spec, vision, text, dtype: str) -> Plan:
        arch = Architecture.of(spec, vision, text)
        plan = make_plan(arch, runtime, dtype, board)
        check(plan, arch, runtime, board)
        _log.info("memory plan: %s needs %s (%s) of the %s's %s", plan.label(),
                  gib(plan.need), plan.breakdown(), plan.where, gib(plan.capacity))  # fmt: skip
        return plan

    return check_layout


# ---- the published models on every board (docs/JETSON.md's table; `vlm-ros plan`) --------


def published(family: str) -> Architecture:
    """The full-size architecture of a published family (see PHI2 etc.): legacy TinyLLaVA's
    tower is SigLIP less its last layer, with no head (layouts.py builds it so)."""
    from transformers import CLIPVisionConfig, PhiConfig, SiglipVisionConfig

    from vlm_ros.model.families import FAMILIES

    spec = FAMILIES[family]
    if spec.vision_kind == "clip":
        vision = CLIPVisionConfig(**CLIP_L_336)
    elif family == "tiny_llava_phi":
        vision = SiglipVisionConfig(**{**SIGLIP_SO400M_384, "num_hidden_layers": 26,
                                       "vision_use_head": False})  # fmt: skip
    else:
        vision = SiglipVisionConfig(**SIGLIP_SO400M_384)
    return Architecture.of(spec, vision, PhiConfig(**PHI2))


SETTINGS = (("bfloat16", "none"), ("float16", "none"), ("bfloat16", "int8_weight_only"))


def table(runtime: RuntimeConfig, families=("llava_phi", "mipha_phi", "tinyllava")) -> list[dict]:
    """One row per board x family x setting: need, capacity, fits (the docs' fit table)."""
    rows = []
    for board in BOARDS.values():
        for family in families:
            arch = published(family)
            for dtype, quantize in SETTINGS:
                if dtype == "float16" and arch.fp16_overflows:
                    continue
                plan = make_plan(arch, replace(runtime, quantize=quantize), dtype, board)
                rows.append({
                    "board": board.key, "family": family, "dtype": dtype, "quantize": quantize,
                    "max_seq_len": plan.max_seq_len, "weights_gib": plan.weights / GiB,
                    "kv_cache_gib": plan.kv_cache / GiB, "workspace_gib": plan.workspace / GiB,
                    "need_gib": plan.need / GiB, "capacity_gib": plan.capacity / GiB,
                    "fits": plan.fits,
                })  # fmt: skip
    return rows
