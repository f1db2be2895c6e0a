"""float32 Linear layers through oneDNN on x86 CPUs.

Why: torch's CPU ``F.linear`` in float32 goes to MKL, which is tuned for Intel CPUs; on the AMD
EPYC these benchmarks ran on, oneDNN (inside torch, the library torch already uses for bf16)
was ~2x faster for both the compute-bound prefill GEMMs and the memory-bound decode GEMVs
(7.5 -> 4.0 ms for 304x800x3200, 9.6 -> 4.0 ms for the 51200-row vocabulary head at batch 1;
docs/performance.md). On an Intel Xeon (AVX-512, AMX) it is the other way round: MKL's GEMVs
read 15-19 GB/s against oneDNN's 13-17, and the decode step took 39 against 44 ms, so
``cpu_linear: auto`` picks oneDNN on AMD CPUs only (cpu_vendor). It is the
same float32 arithmetic in another summation order (differences ~1e-6 relative), so greedy
tokens stay those of the reference; test/test_cpu_kernels.py and the parity tests check it.

The decode step's float32 GEMVs are better written by inductor itself on AMD CPUs
(``cpu_linear: auto`` there, ``inductor`` anywhere): compiled (``compile_decode: true``) as
part of the step (InductorGemvLinear), uncompiled inside the step's compiled regions
(infer/regional_step.py) or, where those do not apply, as one kernel per weight shape
(eager_gemv.py); ``cpu_linear: onednn`` compiled calls oneDNN through an opaque op
(onednn_linear_op).

``torch.ops.mkldnn._linear_pointwise`` is a private op (the one torch.compile's CPU freezing
pass emits), so it is probed once against F.linear and never used if it is missing or differs;
the module falls back to F.linear for any input it was not probed for (other dtypes, devices).
"""

from __future__ import annotations

import copy
import functools
import logging
import platform
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from vlm_ros.config import CPU_LINEAR_MODES, check_choice
from vlm_ros.engines import cpuinfo

_log = logging.getLogger(__name__)
_PROBE_RTOL = 1e-4  # max |onednn - F.linear| / max |F.linear| on a seeded probe


@functools.lru_cache(maxsize=1)
def onednn_linear_available() -> bool:
    """x86-64 with torch's oneDNN and its linear op, agreeing with F.linear on a probe."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(3, 5, 64, generator=generator)
        w, b = torch.randn(48, 64, generator=generator), torch.randn(48, generator=generator)
        with torch.inference_mode():
            got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
            want = F.linear(x, w, b)
    except (AttributeError, RuntimeError) as exc:
        _log.info("oneDNN linear unavailable (%s); float32 Linear stays on F.linear", exc)
        return False
    return bool((got - want).abs().max() <= _PROBE_RTOL * want.abs().max())


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


def _onednn_linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# The same call as an opaque op for torch.compile: inductor cannot lower mkldnn's op on a weight
# it did not pack itself (AssertionError, torch 2.13), and its own float32 Linear on x86 is
# MKL's (extern addmm, or MKL's packed GEMM when freezing), the slow one on AMD. Registered
# with its schema spelled out: inferring it from postponed annotations is version-dependent.
# torch < 2.4 has no custom_op: there the plain call is traced, and where inductor refuses it
# the decoder's load-time check serves the step uncompiled (static_decode.py).
onednn_linear_op: Callable[..., torch.Tensor] = onednn_linear
if hasattr(torch.library, "custom_op"):
    _op = torch.library.custom_op(
        "vlm_ros::onednn_linear",
        onednn_linear,
        mutates_args=(),
        schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    )
    _op.register_fake(_onednn_linear_shape)
    onednn_linear_op = _op


# Whether torch.compile is tracing this call; resolved once (the eager Linear calls ask it on
# every token). A torch without it (< 2.3) traces the modules' uncompiled form.
compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", lambda: False)


def linear_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """oneDNN's float32 Linear: the direct call, or the opaque op while torch.compile traces."""
    return (onednn_linear_op if compiling() else onednn_linear)(x, weight, bias)


def gemv_by_reduction(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for one row written as a multiply-sum, [.., 1, in] * [out, in] ->
    [.., out]: traced, inductor makes it one fused loop that reads ``weight`` once (converting
    it on the way where it is int8: weight_int8.py)."""
    return (x.unsqueeze(-2) * weight.to(x.dtype)).sum(-1)


class OneDnnLinear(nn.Module):
    """An nn.Linear's own weight and bias (shared, not copied), float32 CPU inputs through
    oneDNN, anything else through F.linear. State-dict keys are nn.Linear's."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.device.type == "cpu" and self.weight.dtype == x.dtype:
            return linear_onednn(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn"


class InductorGemvLinear(nn.Module):
    """An nn.Linear's own weight and bias (shared, not copied) for a compiled float32 CPU decode
    step. Traced by torch.compile with a one-row input it is written as ``(x * W).sum(-1) + b``,
    which inductor turns into one fused, vectorised loop that reads W once: a GEMV at the
    memory's pace, where a library call is not. Measured on an AMD EPYC (2 threads, 37 GB/s
    read): the 51200x800 head read at 35 GB/s this way, 21 through oneDNN, 11 through MKL;
    the `small` decode step 22 ms against 40 (docs/performance.md). Anything else (prefill,
    an uncompiled call) goes through oneDNN where ``onednn`` says so, else F.linear. The
    reduction sums in another order than a GEMM (differences ~1e-6 relative). State-dict keys
    are nn.Linear's."""

    def __init__(self, linear: nn.Linear, onednn: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.onednn = onednn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cpu_fp32 = x.dtype == torch.float32 and x.device.type == "cpu"
        if cpu_fp32 and self.weight.dtype == x.dtype:
            if compiling() and x.shape[:-1].numel() == 1:
                y = gemv_by_reduction(x, self.weight)
                return y if self.bias is None else y + self.bias
            if self.onednn:
                return linear_onednn(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        eager = "onednn" if self.onednn else "torch"
        return f"in_features={self.in_features}, out_features={self.out_features}, {eager}"


def replace_linears(module: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace every plain nn.Linear under ``module`` by ``make(linear)``, in place; returns
    how many (the one module-tree walk OneDnnLinear and weight_int8 both use)."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, make(child))
                count += 1
    return count


def use_onednn_linear(module: nn.Module) -> int:
    """Replace every plain nn.Linear under ``module`` by OneDnnLinear, in place; returns how
    many (0 where oneDNN's linear is unavailable)."""
    if not onednn_linear_available():
        return 0
    return replace_linears(module, OneDnnLinear)


def with_onednn_linear(module: nn.Module, mode: str) -> nn.Module:
    """``module`` itself, or, where ``cpu_linear`` ``mode`` picks oneDNN for its device and
    dtype (wants_onednn), a weight-sharing copy with OneDnnLinear layers: the caller's path
    gets the fast kernels, the model's own modules stay as loaded."""
    param = next(module.parameters())
    if not wants_onednn(mode, param.device, param.dtype):
        return module
    swapped = share_weights_copy(module)
    use_onednn_linear(swapped)
    return swapped


def with_inductor_gemv(module: nn.Module, mode: str) -> nn.Module:
    """A weight-sharing copy of ``module`` whose Linear layers are InductorGemvLinear (their
    uncompiled calls on the kernels ``mode`` picks): the compiled CPU decode step's."""
    param = next(module.parameters())
    onednn = wants_onednn(mode, param.device, param.dtype)
    swapped = share_weights_copy(module)
    replace_linears(swapped, lambda linear: InductorGemvLinear(linear, onednn))
    return swapped


AMD_VENDORS = ("AuthenticAMD", "HygonGenuine")  # x86 vendor ids whose float32 MKL is the slow one


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The x86 vendor id ("GenuineIntel", "AuthenticAMD", ...); "" where there is none
    (another OS, an Arm CPU). Read once; the tests patch it."""
    return cpuinfo.vendor()


def wants_onednn(mode: str, device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether ``cpu_linear`` mode picks oneDNN for a model on device/dtype (for the calls
    that are not a compiled step's GEMVs): "auto" (the default) and "inductor" for float32 on
    an AMD CPU where available (on Intel CPUs MKL, torch's own, is the faster one: see the
    module docstring), "onednn" for float32 on any x86 CPU, said when impossible, "torch"
    never."""
    check_choice("cpu_linear", mode, CPU_LINEAR_MODES)  # also called outside RuntimeConfig
    if mode == "torch" or torch.device(device).type != "cpu" or dtype != torch.float32:
        return False
    if mode in ("auto", "inductor") and cpu_vendor() not in AMD_VENDORS:
        return False
    if mode == "onednn" and not onednn_linear_available():
        _log.warning("cpu_linear='onednn' asked for, but oneDNN's linear is unavailable here")
    return onednn_linear_available()


def wants_inductor_gemv(mode: str, device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether the decode step on device/dtype has inductor write its float32 GEMVs: compiled
    (InductorGemvLinear) or not (eager_gemv.py). "inductor" on any CPU, "auto" on an AMD CPU
    (measured there: the compiled step 1.4-1.8x the uncompiled one and 2.0-2.3x the compiled
    step on MKL; uncompiled, 1.14x the step on oneDNN's GEMVs). On Intel CPUs "auto" keeps
    MKL, whose compiled step was measured (89% of the read bandwidth); inductor's GEMVs were
    not."""
    check_choice("cpu_linear", mode, CPU_LINEAR_MODES)
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        return False
    return mode == "inductor" or (mode == "auto" and cpu_vendor() in AMD_VENDORS)


def share_weights_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure that shares its parameters and buffers (no weight
    memory), so one path's modules can be swapped without touching another path's."""
    return copy_structure(module, lambda tensor: tensor)


def copy_structure(module: nn.Module, tensor_fn: Callable[[torch.Tensor], torch.Tensor]):
    """A copy of ``module``'s structure whose every parameter and buffer ``t`` is
    ``tensor_fn(t)`` (``t`` itself: shared; a new tensor: a frozen Parameter where ``t`` was
    one), without deepcopy first copying the tensors themselves."""
    memo: dict[int, object] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        new = tensor_fn(tensor)
        if new is not tensor and isinstance(tensor, nn.Parameter):
            new = nn.Parameter(new, requires_grad=False)
        memo[id(tensor)] = new
    return copy.deepcopy(module, memo)


# ---- attention of a compiled CPU decode step --------------------------------------------------

REDUCTION_ATTENTION = "vlm_ros_reduction"  # the name registered with transformers


def reduction_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: one query over the cache written as
    reductions, ``softmax((q * K).sum(-1)) * V`` summed over positions, when torch.compile
    traces a float32 CPU decode step; everything else (prefill, the action-hint branches,
    uncompiled calls, other devices) is transformers' SDPA, unchanged.

    Why: in the compiled `small` step ATen's flash-attention kernel for a single query read
    the live KV at ~11 GB/s (2.2 ms of a 21 ms token, profiled); inductor's fused reductions
    read it at ~18 GB/s (1.3 ms), and at full size 24 against 36 ms a token (docs/performance.md,
    "The compiled step's attention"). Grouped-query heads read their shared keys in place."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not (compiling() and query.shape[2] == 1 and query.device.type == "cpu"):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, _, dim = query.shape
    kv_heads, positions = key.shape[1], key.shape[2]
    scale = dim**-0.5 if scaling is None else scaling
    q = query.reshape(batch, kv_heads, heads // kv_heads, 1, dim)  # [B, KV, G, 1, D]
    scores = (q * key.unsqueeze(2)).sum(-1) * scale  # [B, KV, G, S]
    if attention_mask is not None:  # [B, 1, 1, >=S]: True / 0 where a position is seen
        mask = attention_mask[..., :positions].reshape(batch, 1, 1, positions)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    weights = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    out = (weights.unsqueeze(-1) * value.unsqueeze(2)).sum(-2)  # [B, KV, G, D]
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None  # [B, 1, H, D], as SDPA's


def use_reduction_attention(lm: nn.Module) -> bool:
    """Point ``lm``'s attention at ``reduction_attention`` (registered with transformers once,
    its masks built as SDPA's); False where this transformers has no such registry."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(REDUCTION_ATTENTION, reduction_attention)
    AttentionMaskInterface.register(REDUCTION_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    lm.config._attn_implementation = REDUCTION_ATTENTION
    return lm.config._attn_implementation == REDUCTION_ATTENTION
