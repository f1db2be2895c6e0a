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
            return torch.ops.mkldnn._linear_pointwise(
                x.contiguous(), self.weight, self.bias, "none", [], ""
            )
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn"


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


AMD_VENDORS = ("AuthenticAMD", "HygonGenuine")  # x86 vendor ids whose float32 MKL is the slow one


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The x86 vendor id ("GenuineIntel", "AuthenticAMD", ...) from /proc/cpuinfo; "" where
    there is none (another OS, an Arm CPU)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def wants_onednn(mode: str, device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether ``cpu_linear`` mode picks oneDNN for a model on device/dtype: "auto" (the
    default) for float32 on an AMD CPU where available (on Intel CPUs MKL, torch's own, is the
    faster one: see the module docstring), "onednn" for float32 on any x86 CPU, said when
    impossible, "torch" never."""
    check_choice("cpu_linear", mode, CPU_LINEAR_MODES)  # also called outside RuntimeConfig
    if mode == "torch" or torch.device(device).type != "cpu" or dtype != torch.float32:
        return False
    if mode == "auto" and cpu_vendor() not in AMD_VENDORS:
        return False
    if mode == "onednn" and not onednn_linear_available():
        _log.warning("cpu_linear='onednn' asked for, but oneDNN's linear is unavailable here")
    return onednn_linear_available()


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
