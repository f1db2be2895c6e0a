"""Weight-only int8 Linear layers (``quantize="int8_weight_only"``): int8 weights with one
float scale per output channel, activations kept in the model's half precision.

Why: decoding one token reads every weight once, so on a memory-bound board the time per token
is the weight bytes over the bandwidth. int8 weights halve what bf16/fp16 weights read; the
activations stay bf16/fp16, so the only error is the per-channel rounding of the weights (a
relative ~0.4% per layer), less than dynamic int8's, which quantizes the activations too
(``quantize="int8"``; half its first-step logit error, measured side by side in the bench).
It is gpt-fast's WeightOnlyInt8Linear.

Kernels: on CPU, for the few rows of a decode step or an action-hint pass, ATen's
``_weight_int8pack_mm`` (int8 x bf16/fp16, ~2.5x the bf16 GEMV measured here); for a prefill's
hundreds of rows the weights are dequantized and multiplied in half precision (that GEMM is
compute-bound, and the int8 kernel is slower there). On CUDA the same dequantizing form
``F.linear(x, w.to(dtype)) * scale`` is what torch.compile fuses into one kernel (gpt-fast);
eager it is correct but not faster. Not run on a GPU here.

Half precision, or float32 on a CPU: there the decode step's GEMVs are written by inductor as
one loop that converts each int8 weight as it is read (the form of
cpu_kernels.InductorGemvLinear), so a float32 model reads a quarter of its Linear bytes per
token with float32 activations, the least lossy 8-bit setting. That loop runs in the compiled
step (``compile_decode: true``) or, uncompiled, in the step's compiled regions
(infer/regional_step.py, which take these layers too: seconds at load where compiling the whole
step takes minutes at full size). ATen's int8 kernel for float32 activations is a slow
reference kernel, so a float32 model's other calls (the prefill, an action hint's branches)
take the dequantizing form: in one measurement on the AMD host, the 51200x800 head on 10
rows took 254 ms in ATen's float32 int8 kernel and 74 ms dequantizing. Where the regions
cannot be built (no C++ compiler), the uncompiled float32 step dequantizes too, per token
(several times slower; the static decoder warns).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vlm_ros.config import dtype_name
from vlm_ros.engines import cpu_kernels
from vlm_ros.engines.cpu_kernels import replace_linears
from vlm_ros.errors import InputError

HALF = (torch.bfloat16, torch.float16)
CHUNK_ROWS = 2048  # rows quantized at once (float32 temporaries of this many rows)
PACKED_ROWS = 16  # up to this many rows on CPU: the int8 kernel; more: dequantize + GEMM
# ATen's CPU kernel (torch 2.3+); older torch takes the dequantizing form everywhere
HAS_PACKED_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")


class WeightOnlyInt8Linear(nn.Module):
    """nn.Linear with int8 weights [out, in] and float scales [out] (symmetric, per output
    channel); the bias stays in the activation dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()  # [out, in]
        dtype = weight.dtype
        quantized = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scales = torch.empty(weight.shape[0], dtype=dtype, device=weight.device)  # [out]
        # In slices of rows, so the float32 temporaries are a slice, not a second lm_head
        # (1.6 GB for Phi-2's: what an 8 GB Jetson cannot spare while loading).
        for start in range(0, weight.shape[0], CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            part = weight[rows].float()
            # the scales the kernels multiply by are in the activation dtype: round with those
            scale = (part.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(dtype)
            scales[rows] = scale
            part = torch.round(part / scale.float()[:, None]).clamp(-127, 127)
            quantized[rows] = part.to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", quantized)
        self.register_buffer("scales", scales)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), False)
        # a float32 model's dequantized GEMMs (prefill) on oneDNN where auto picks it (AMD)
        self.onednn = cpu_kernels.wants_onednn("auto", weight.device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1]  # [..., in] -> [..., out]
        cpu_fp32 = x.device.type == "cpu" and x.dtype == torch.float32
        if cpu_fp32 and cpu_kernels.compiling() and rows.numel() == 1:
            # a compiled CPU decode step: inductor fuses the int8 -> float conversion into the
            # GEMV's loop, reading 1 byte per weight
            out = cpu_kernels.gemv_by_reduction(x, self.weight) * self.scales
        elif self._packed_kernel(x):
            flat = x.reshape(-1, self.in_features).contiguous()
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
            out = out.reshape(*rows, self.out_features)
        elif cpu_fp32 and self.onednn:  # the dequantized GEMM on oneDNN, ~2x MKL on AMD
            out = cpu_kernels.linear_onednn(x, self.weight.to(x.dtype), None) * self.scales
        else:
            out = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return out if self.bias is None else out + self.bias

    @staticmethod
    def _packed_kernel(x: torch.Tensor) -> bool:
        """ATen's int8 kernel for a CPU call of a few rows in half precision (its float32
        one is a slow reference kernel: 3.4x the dequantizing form, module docstring)."""
        few = x.shape[:-1].numel() <= PACKED_ROWS
        return HAS_PACKED_KERNEL and x.device.type == "cpu" and few and x.dtype in HALF

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def check_dtype(dtype: torch.dtype, device: torch.device | str) -> None:
    """The activation dtypes the kernels serve: bfloat16/float16, or float32 on a CPU (the
    decode step's inductor loops over int8 weights; see the module docstring)."""
    if dtype in HALF or (dtype == torch.float32 and torch.device(device).type == "cpu"):
        return
    raise InputError(
        f"quantize='int8_weight_only' needs dtype bfloat16 or float16 (the model is "
        f"{dtype_name(dtype)} on {torch.device(device).type}): its GPU kernels take "
        "half-precision activations; float32 only on a CPU"
    )


def quantize_weights(module: nn.Module) -> int:
    """Replace every nn.Linear under ``module`` by WeightOnlyInt8Linear, in place (the float
    weights are released); returns how many. The module must be in bfloat16 or float16, or
    float32 on a CPU."""
    param = next(module.parameters())
    check_dtype(param.dtype, param.device)
    return replace_linears(module, WeightOnlyInt8Linear)
