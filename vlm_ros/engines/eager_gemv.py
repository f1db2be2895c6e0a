"""The uncompiled CPU decode step's float32 GEMVs as inductor kernels, compiled per shape.

Why: a decode token is one GEMV per Linear layer, bound by how fast the weights stream from
memory. On the AMD EPYC this work is measured on, the library GEMVs read well below the host's
bandwidth on the `small` decoder's shapes (oneDNN's 73 GEMVs of a token: 26.2 ms), where
inductor's own loop over the same weights (cpu_kernels.gemv_by_reduction, the compiled step's
GEMV) took 19.3 ms, called one by one from Python, its ~22 us per call included
(docs/performance.md, "The uncompiled step's GEMVs by inductor"). Compiling the whole step
(``compile_decode: true``) gets that and more, but costs minutes at load on a full-size
decoder; a GEMV per distinct weight shape (four on a Phi decoder) compiles in seconds.

Only the lean decode step (phi_step.PhiDecodeStep) calls these, one row at a time; prefill and
the action-hint branches keep the model's modules and their library kernels (a GEMM, which
these loops are not). Where this is used is ``cpu_linear``'s call (cpu_kernels.wants_inductor_gemv's
vendor rule): ``auto`` on an AMD CPU, ``inductor`` on any CPU; float32 weights only (quantized
layers keep their own kernels).

Every shape is compiled and checked at load against the library's Linear on a seeded row
(float32 rounding: ~1e-6 relative, allowed 1e-4); a failure to compile (no C++ compiler on the
machine) or a mismatch keeps the library kernels and says why. The calls run under inference
mode, so a caller in another grad mode cannot make dynamo compile a shape again (the compiled
function's guards include the grad mode, and a function compiled too often falls back to
running its Python: a multiply-sum that would allocate the whole weight matrix per call), and
with an input that never requires grad (another of those guards).
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from vlm_ros.engines.cpu_kernels import InductorGemvLinear, OneDnnLinear, gemv_by_reduction

_CHECK_RTOL = 1e-4  # max |gemv - F.linear| / max |F.linear| on a seeded row
LIBRARY_LINEARS = (nn.Linear, OneDnnLinear, InductorGemvLinear)  # float32 weight + bias


def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[1, in] -> [1, out]: one fused loop that reads ``weight`` once."""
    y = gemv_by_reduction(x, weight)
    return y if bias is None else y + bias


_compiled: dict[tuple[int, int, bool], Callable] = {}


def compiled_gemv(signature: tuple[int, int, bool]) -> Callable:
    """The compiled GEMV for one (out, in, has bias), made once per process. Each signature
    gets a function of its own code object: dynamo keeps its compiled entries per code object,
    at most 8, and a process holding models of many shapes (the test suite, a server with two
    models) would otherwise run the ninth shape as Python."""
    fn = _compiled.get(signature)
    if fn is None:
        out, inp, bias = signature
        code = _gemv.__code__.replace(co_name=f"gemv_{out}x{inp}{'_bias' if bias else ''}")
        own = types.FunctionType(code, _gemv.__globals__, code.co_name)
        fn = _compiled[signature] = torch.compile(own, fullgraph=True, dynamic=False)
    return fn


class CompiledGemv:
    """One Linear layer's one-row product through ``compiled_gemv``, on the layer's own weight
    and bias (shared, not copied). Called with [1, 1, in] as the lean step does."""

    def __init__(self, linear: nn.Module, fn: Callable):
        self.weight, self.bias, self.fn = linear.weight, linear.bias, fn
        self.in_features, self.out_features = int(linear.in_features), int(linear.out_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        row = x.detach().reshape(1, self.in_features)  # never one that requires grad: a guard
        if torch.is_inference_mode_enabled():
            return self.fn(row, self.weight, self.bias).view(1, 1, self.out_features)
        with torch.inference_mode():
            return self.fn(row, self.weight, self.bias).view(1, 1, self.out_features)

    def __repr__(self) -> str:
        return f"CompiledGemv(in={self.in_features}, out={self.out_features})"


@dataclass(frozen=True)
class GemvPlan:
    """What ``compile_gemvs`` did: the kernels by module id (empty when refused), the shapes
    compiled, the seconds it took, and why nothing is used (None when used)."""

    kernels: dict[int, CompiledGemv]
    shapes: int
    seconds: float
    refused: str | None

    def summary(self) -> str:
        if self.refused:
            return f"library GEMVs ({self.refused})"
        return (f"inductor GEMVs: {len(self.kernels)} layers, {self.shapes} shapes compiled "
                f"in {self.seconds:.1f} s")  # fmt: skip


def eligible(module: object) -> bool:
    """A float32 CPU Linear whose product is weight @ x + bias (quantized layers are not)."""
    if not isinstance(module, LIBRARY_LINEARS):
        return False
    weight = module.weight
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.dim() == 2


def _signature(module: nn.Module) -> tuple[int, int, bool]:
    return (module.out_features, module.in_features, module.bias is not None)


def check(fn: Callable, module: nn.Module) -> str | None:
    """Compile ``fn`` for ``module``'s shape (its first call) and compare it with F.linear on a
    seeded row: why it cannot serve, or None."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, module.in_features, generator=generator)
    with torch.inference_mode():
        want = F.linear(x, module.weight, module.bias)
        got = fn(x, module.weight, module.bias)
    scale = want.abs().max().item() or 1.0
    gap = (got - want).abs().max().item() if torch.isfinite(got).all() else float("inf")
    if gap > _CHECK_RTOL * scale:
        shape = f"{module.out_features}x{module.in_features}"
        return f"the compiled GEMV for {shape} differs from the library's by {gap:.3g}"
    return None


def compile_gemvs(
    modules: Iterable[nn.Module], make: Callable[[tuple[int, int, bool]], Callable] | None = None
) -> GemvPlan:
    """Compile and check one GEMV per distinct shape of the eligible ``modules``; all or none.
    ``make(signature)`` gives the function for a shape (default ``compiled_gemv``)."""
    make = make or compiled_gemv
    targets = [m for m in modules if eligible(m)]
    start = time.perf_counter()
    if not targets:
        return GemvPlan({}, 0, 0.0, "no float32 Linear layers")
    fns: dict[tuple[int, int, bool], Callable] = {}
    for module in targets:
        signature = _signature(module)
        if signature in fns:
            continue
        try:
            fns[signature] = make(signature)
            problem = check(fns[signature], module)
        except Exception as error:  # inductor's own failure: no C++ compiler, a lowering...
            line = (str(error).strip().splitlines() or [""])[0][:300]
            problem = f"compiling a GEMV failed: {type(error).__name__}: {line}"
        if problem:
            return GemvPlan({}, len(fns) + (signature not in fns), time.perf_counter() - start,
                            problem)  # fmt: skip
    kernels = {id(m): CompiledGemv(m, fns[_signature(m)]) for m in targets}
    return GemvPlan(kernels, len(fns), time.perf_counter() - start, None)
