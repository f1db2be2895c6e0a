"""Weight-only int4 Linear layers (``quantize="int4_weight_only"``): 4-bit weights in groups of
GROUP_SIZE input channels, each group with its own scale and zero point, run by PyTorch's own
int4 kernels (no kernel of ours).

Why: decoding one token reads every weight once, so on a memory-bound CPU or board the time per
token is the weight bytes over the bandwidth. 4 bits plus a bf16 scale and zero per 32 weights
is 5 bits a weight: 6.4x fewer bytes than float32, 3.2x fewer than bf16 (gpt-fast's int4, whose
layout these kernels were written for; GROUP_SIZE 32 = llama.cpp q4_0's block, so the two are
compared at the same grouping).

Kernels (ATen, torch >= 2.6): on CPU ``_convert_weight_to_int4pack_for_cpu`` packs once at load
and ``_weight_int4pack_mm_for_cpu`` multiplies; on CUDA ``_convert_weight_to_int4pack`` and
``_weight_int4pack_mm`` (tensor-core kernels, Ampere and newer: Jetson Orin and up). Both
dequantize ``(q - 8) * scale + zero`` inside the kernel. Their fast paths take bfloat16
activations only: on CPU the float32 and float16 variants are reference loops ~50x slower
(measured: a 3200x800 GEMV 9.6 ms in float32 against 0.18 ms in bf16), so a float32 model's
Linear inputs are rounded to bf16 for the kernel and the outputs come back as float32 (the rest
of the model, norms, attention and residuals, stays float32); a float16 model is refused on CPU
and anything but bfloat16 is refused on CUDA (the kernel's only dtype there).

Shapes: the kernels need the output rows in multiples of 16 (zero rows are padded at load and
sliced off) and the input width in whole groups (refused at load otherwise, naming the layer).
"""

from __future__ import annotations

import torch
from torch import nn

from vlm_ros.config import dtype_name
from vlm_ros.engines.cpu_kernels import replace_linears
from vlm_ros.errors import InputError

GROUP_SIZE = 32  # input channels per scale/zero pair (llama.cpp q4_0's block)
ROW_MULTIPLE = 16  # the packing kernels' output-row granularity
KERNEL_DTYPE = torch.bfloat16  # the activations the fast kernels take (CPU and CUDA)
CHUNK_ROWS = 2048  # rows quantized at once (float32 temporaries of this many rows)


def check_supported(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, in one line, a model the int4 kernels cannot serve well."""
    op = "_weight_int4pack_mm_for_cpu" if device.type == "cpu" else "_weight_int4pack_mm"
    if not hasattr(torch.ops.aten, op):
        raise InputError(
            f"quantize='int4_weight_only' needs torch's {op} (torch {torch.__version__} has none)"
        )
    if device.type == "cpu" and dtype not in (torch.float32, torch.bfloat16):
        raise InputError(
            f"quantize='int4_weight_only' on CPU needs dtype float32 or bfloat16 (the model is "
            f"{dtype_name(dtype)}): torch's float16 int4 CPU kernel is a slow reference loop"
        )
    if device.type == "cuda" and dtype != torch.bfloat16:
        raise InputError(
            f"quantize='int4_weight_only' on CUDA needs dtype bfloat16 (the model is "
            f"{dtype_name(dtype)}): torch's int4 CUDA kernel takes bfloat16 only"
        )
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"quantize='int4_weight_only' runs on cpu or cuda, not {device.type}")


def quantize_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [n, k] -> (q [n, k] int32 in 0..15, scales_and_zeros [k/G, n, 2] float32) with
    weight ~= (q - 8) * scale + zero per group of G input channels (asymmetric: the group's
    minimum and maximum map to 0 and 15)."""
    rows, cols = weight.shape
    groups = weight.float().reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)  # [n, k/G, G]
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [n, k/G]
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
    zero = low + 8 * scale  # (q - 8) * scale + zero == low + q * scale
    pairs = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [k/G, n, 2]
    return q.reshape(rows, cols).to(torch.int32), pairs


def dequantize(q: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """The float32 weight [n, k] that (q, scales_and_zeros) stand for (tests, error reports)."""
    rows, cols = q.shape
    scale, zero = pairs[..., 0].t(), pairs[..., 1].t()  # [n, k/G]
    groups = (q.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE).float() - 8) * scale[..., None]
    return (groups + zero[..., None]).reshape(rows, cols)


def inner_k_tiles(cols: int) -> int:
    """The CUDA packing's K tiling (input width a multiple of 16 x tiles); CPU ignores it."""
    return next(t for t in (8, 4, 2) if cols % (16 * t) == 0)


def pack(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    """q [n, k] (0..15, int32) -> the packed weight the device's int4 matmul reads."""
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles(q.shape[1]))
    nibbles = q.to(torch.uint8)
    pairs = (nibbles[:, ::2] << 4 | nibbles[:, 1::2]).to(device)  # [n, k/2], high nibble first
    return torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles(q.shape[1]))


class WeightOnlyInt4Linear(nn.Module):
    """nn.Linear with packed int4 weights and bf16 (scale, zero) per group of GROUP_SIZE input
    channels; the bias stays in the model's dtype."""

    def __init__(self, linear: nn.Linear, name: str = "a Linear layer"):
        super().__init__()
        weight = linear.weight.detach()  # [out, in]
        device, (rows, cols) = weight.device, weight.shape
        if cols % GROUP_SIZE:
            raise InputError(
                f"quantize='int4_weight_only': {name} has {cols} input features, not a multiple "
                f"of the int4 group size {GROUP_SIZE}"
            )
        padded = -(-rows // ROW_MULTIPLE) * ROW_MULTIPLE
        qs, pairs = [], []
        for start in range(0, rows, CHUNK_ROWS):  # float32 temporaries of a slice of rows
            q, pair = quantize_groups(weight[start : start + CHUNK_ROWS].cpu())
            qs.append(q)
            pairs.append(pair)
        q, pair = torch.cat(qs), torch.cat(pairs, dim=1)  # [n, k], [k/G, n, 2]
        if padded != rows:  # zero rows (q = 8, scale/zero 0: weight 0), sliced off the output
            q = torch.cat([q, torch.full((padded - rows, cols), 8, dtype=torch.int32)])
            pair = torch.cat([pair, pair.new_zeros(cols // GROUP_SIZE, padded - rows, 2)], dim=1)
        self.in_features, self.out_features = cols, rows
        self.register_buffer("weight", pack(q, device))
        self.register_buffer("scales_and_zeros", pair.to(device, KERNEL_DTYPE))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1]  # [..., in] -> [..., out]
        flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE).contiguous()
        if x.device.type == "cpu":
            mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        else:
            mm = torch.ops.aten._weight_int4pack_mm
        out = mm(flat, self.weight, GROUP_SIZE, self.scales_and_zeros)
        out = out[:, : self.out_features].reshape(*rows, self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int4 weights, "
            f"group {GROUP_SIZE}"
        )


def quantize_weights(module: nn.Module) -> int:
    """Replace every nn.Linear under ``module`` by WeightOnlyInt4Linear, in place (the float
    weights are released); returns how many. Refuses (InputError) before changing anything
    what the kernels cannot serve: the device/dtype (check_supported) or a layer's shape."""
    param = next(module.parameters())
    check_supported(param.device, param.dtype)
    for name, child in module.named_modules():
        if type(child) is nn.Linear and child.in_features % GROUP_SIZE:
            raise InputError(
                f"quantize='int4_weight_only': {name} has {child.in_features} input features, "
                f"not a multiple of the int4 group size {GROUP_SIZE}"
            )
    return replace_linears(module, WeightOnlyInt4Linear)
