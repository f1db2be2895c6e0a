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
take the dequantizing form, a block of rows at a time into one buffer (DEQUANT_BLOCK_BYTES):
in one measurement on the AMD host, the 51200x800 head on 10 rows took 254 ms in ATen's
float32 int8 kernel and 74 ms dequantizing. Where the regions cannot be built (no C++
compiler), the uncompiled float32 step dequantizes too, per token (several times slower; the
static decoder warns).

Where torch's kernels are not AVX-512, a float32 model's int8 weights are stored as int32
words, four weights a word from four column planes (``to_planes``): word j of a row holds its
columns j, j + in/4, j + 2 in/4 and j + 3 in/4, and ``gemv_planes`` takes them apart with
shifts. Why: inductor vectorizes a loop by the float lanes, and an AVX2 tile (8 floats) needs
8 weight bytes, which its code loaded through a buffer copy: a `small` token took 93.5 ms
against llama.cpp q8_0's 20.0 on AVX2 kernels (cpu-small-avx2-limited-amd-regions.json). 8
int32 words fill the tile's vector load, four planes at a time. In one run on the AMD host, 2
threads (bench/results/cpu-int8-gemv-words-amd.json, scripts/int8_gemv_words.py), the words'
GEMVs took 1/7 to 1/15 of the bytes' on AVX2 kernels (3200x800: 0.124 against 1.471 ms),
and a `small` token 10.62 ms, 1.95x q8_0 (cpu-small-avx2-limited-amd-words.json). On AVX-512
kernels, which load 16 bytes in one masked load, the words ran at 0.84-1.08x the bytes'
speed (6 of 8 shapes slower): so AVX-512 keeps the bytes (WHOLE_BYTE_LOADS). Arm's 4-lane
tiles would load 4 bytes; they get the words (not measured on Arm). The other calls
(prefill, an action hint's branches) view the words as the int8 [out, in] they are, in plane
order, and put the activations' columns in the same order (``planes_order``): a copy of the
activations, not of the weights.
"""

from __future__ import annotations

import threading

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
# A CPU call's dequantized weights (a prefill's, an action hint's branches', an uncompiled step
# without regions) go through one buffer per thread, this many bytes, a block of rows at a
# time: not a float copy of the whole weight per call, whose fresh pages were the prefill's
# memory peak. llava-phi-full, a float32 model with int8 weights, a 624-position prefill on
# the AMD host (scripts/int8_prefill_blocks.py, bench/results/cpu-llava-phi-full-int8-prefill-
# blocks*.json, three runs): the first prefill's peak over the resident set 807-849 MB with
# whole copies (the head's alone is 524 MB), 19-21 MB with 16 MB blocks; the time a wash
# (whole copies over blocks 1.17x, 0.94x, 1.13x in three runs); 16 and 64 MB blocks within
# 3% of each other where a run had both, so the smaller.
DEQUANT_BLOCK_BYTES = 16 << 20
_scratch = threading.local()
# ATen's CPU kernel (torch 2.3+); older torch takes the dequantizing form everywhere
HAS_PACKED_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")


# torch's CPU kernels where inductor loads a float tile's int8 weights in one whole vector
# (AVX-512: 16 bytes, one masked load). There a float32 model's int8 weights stay bytes: the
# words ran at 0.84-1.08x the bytes' GEMV speed (cpu-int8-gemv-words-amd.json, the module
# docstring); everywhere else (AVX2's 8-lane tiles, Arm's 4-lane ones) they are words.
WHOLE_BYTE_LOADS = ("AVX512",)


def planes_wanted(weight: torch.Tensor) -> bool:
    """Whether a weight [out, in] is stored as int32 words of four column planes: a float32
    model's on a CPU, ``in`` a multiple of 4 (every Phi's is), where torch's kernels are not
    in WHOLE_BYTE_LOADS."""
    cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
    bytes_whole = torch.backends.cpu.get_cpu_capability() in WHOLE_BYTE_LOADS
    return cpu_fp32 and weight.shape[1] % 4 == 0 and not bytes_whole


def to_planes(quantized: torch.Tensor) -> torch.Tensor:
    """int8 [rows, in] -> int32 words [rows, in/4]: word j holds columns j + p * in/4 for
    p = 0..3, column plane p in byte p (little-endian, as every CPU torch runs on)."""
    rows, columns = quantized.shape
    planes = quantized.view(rows, 4, columns // 4).transpose(1, 2).reshape(rows, columns)
    return planes.view(torch.int32)


def from_planes(words: torch.Tensor) -> torch.Tensor:
    """The int8 [rows, in] in natural column order that ``to_planes`` stored (a copy)."""
    rows, quarter = words.shape
    return words.view(torch.int8).view(rows, quarter, 4).transpose(1, 2).reshape(rows, -1)


def planes_order(x: torch.Tensor) -> torch.Tensor:
    """x [..., in] with its columns in the words' byte order: column 4j + p is x's column
    j + p * in/4, so ``x' @ words.view(int8).T`` is ``x @ weight.T``."""
    return x.unflatten(-1, (4, -1)).transpose(-1, -2).flatten(-2)


def gemv_planes(x: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for one row, [.., 1, in] x int32 words [out, in/4] -> [.., out]: the
    four planes taken apart with shifts (sign-extended by the arithmetic right shift) and
    summed in one loop over the words. Traced, inductor makes it one reduction reading each
    word once (the module docstring's measurements); eager, it makes weight-sized
    temporaries."""
    xs = x.unflatten(-1, (4, -1)).unsqueeze(-3)  # [.., 1, 4, in/4]
    total = None
    for plane in range(4):
        weights = ((words << (24 - 8 * plane)) >> 24).to(x.dtype)  # [out, in/4]
        term = xs[..., plane, :] * weights
        total = term if total is None else total + term
    return total.sum(-1)


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One row's ``x @ weight.T`` as one loop over ``weight`` (traced: inductor's reduction):
    int32 words through ``gemv_planes``, float32 or int8 bytes through
    cpu_kernels.gemv_by_reduction."""
    if weight.dtype == torch.int32:
        return gemv_planes(x, weight)
    return cpu_kernels.gemv_by_reduction(x, weight)


class WeightOnlyInt8Linear(nn.Module):
    """nn.Linear with int8 weights [out, in] and float scales [out] (symmetric, per output
    channel); the bias stays in the activation dtype. A float32 model's CPU weights, where
    torch's kernels are not AVX-512, are stored as int32 words [out, in/4] of four column
    planes (``planes``; module docstring): the state is then not nn.Linear's layout (these
    modules are made at load, never saved)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()  # [out, in]
        dtype = weight.dtype
        self.planes = planes_wanted(weight)
        out, columns = weight.shape
        stored = (out, columns // 4, torch.int32) if self.planes else (out, columns, torch.int8)
        quantized = torch.empty(stored[:2], dtype=stored[2], device=weight.device)
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
            part = part.to(torch.int8)
            quantized[rows] = to_planes(part) if self.planes else part
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
            # GEMV's loop, reading each weight byte once (bytes, or words: ``gemv``)
            out = gemv(x, self.weight) * self.scales
        elif self._packed_kernel(x):
            flat = x.reshape(-1, self.in_features).contiguous()
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
            out = out.reshape(*rows, self.out_features)
        elif x.device.type == "cpu" and not (torch.is_grad_enabled() or cpu_kernels.compiling()):
            return self._dequantized_blocks(x)
        else:  # traced (inductor fuses the conversion), on a GPU, or under autograd
            x, weight = self._dequantized(x)
            if cpu_fp32 and self.onednn:  # the dequantized GEMM on oneDNN, ~2x MKL on AMD
                out = cpu_kernels.linear_onednn(x, weight, None) * self.scales
            else:
                out = F.linear(x, weight) * self.scales
        return out if self.bias is None else out + self.bias

    def _dequantized_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """A CPU call's ``x @ weight.T * scales + bias``, the weights dequantized a block of
        rows at a time (DEQUANT_BLOCK_BYTES) into this thread's buffer: each block's GEMM
        writes its own output columns. The same maths as the whole dequantized copy, in the
        library's GEMM (oneDNN for a float32 model where ``auto`` picks it, ~2x MKL on AMD)."""
        rows = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        weight = self.weight
        if self.planes:  # the words viewed as the int8 [out, in] they are, in plane order
            flat, weight = planes_order(flat), weight.view(torch.int8)
        onednn = self.onednn and x.dtype == torch.float32
        out = flat.new_empty(flat.shape[0], self.out_features)
        per = max(1, DEQUANT_BLOCK_BYTES // (self.in_features * x.element_size()))
        buffer = _scratch_buffer(min(per, self.out_features) * self.in_features, x.dtype)
        for start in range(0, self.out_features, per):
            stop = min(start + per, self.out_features)
            block = buffer[: (stop - start) * self.in_features].view(stop - start, -1)
            block.copy_(weight[start:stop])
            part = cpu_kernels.linear_onednn(flat, block, None) if onednn else flat @ block.T
            torch.mul(part, self.scales[start:stop], out=out[:, start:stop])
        if self.bias is not None:
            out += self.bias
        return out.view(*rows, self.out_features)

    def _dequantized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, the weights in x's dtype) for a library GEMM: where ``planes``, the int8 view
        of the words (plane order) and x's columns put in the same order."""
        if self.planes:
            return planes_order(x), self.weight.view(torch.int8).to(x.dtype)
        return x, self.weight.to(x.dtype)

    def int8_weight(self) -> torch.Tensor:
        """The int8 weights [out, in] in nn.Linear's column order (a copy where ``planes``)."""
        return from_planes(self.weight) if self.planes else self.weight

    @staticmethod
    def _packed_kernel(x: torch.Tensor) -> bool:
        """ATen's int8 kernel for a CPU call of a few rows in half precision (its float32
        one is a slow reference kernel: 3.4x the dequantizing form, module docstring)."""
        few = x.shape[:-1].numel() <= PACKED_ROWS
        return HAS_PACKED_KERNEL and x.device.type == "cpu" and few and x.dtype in HALF

    def extra_repr(self) -> str:
        words = " as int32 words of 4 column planes" if self.planes else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"
            + words
        )


def _scratch_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's CPU buffer of at least ``numel`` elements of ``dtype``, made once (and
    again only when a larger or another dtype's is asked for). Made outside inference mode,
    so a call in inference mode and one under no_grad can both write it."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
        with torch.inference_mode(False):
            buffer = _scratch.buffer = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


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
