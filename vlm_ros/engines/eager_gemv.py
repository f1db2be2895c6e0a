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
layers keep their own kernels). ``auto`` measures rather than assumes: a call from Python
costs the compiled GEMV ~22 µs against ~3 µs for a library call, which the `small` decoder's
matrices (2.5-164 MB) pay back and a toy model's (the demo's, under 1 MiB) cannot, while on
Phi-2's (26-524 MB) the winner changed with the host's state (0.98x and 1.08x in two runs).
So under MIN_WEIGHT_BYTES nothing is compiled, and each compiled shape is timed against the
library's at load and kept only where it is MIN_GAIN faster; ``inductor`` takes every shape.

Every shape is compiled and checked at load against the library's Linear on a seeded row
(float32 rounding: ~1e-6 relative, allowed 1e-4); a failure to compile (no C++ compiler on the
machine) or a mismatch keeps the library kernels and says why. The calls run under inference
mode, so a caller in another grad mode cannot make dynamo compile a shape again (the compiled
function's guards include the grad mode, and a function compiled too often falls back to
running its Python: a multiply-sum that would allocate the whole weight matrix per call), and
with an input that never requires grad (another of those guards).
"""

from __future__ import annotations

import functools
import statistics
import time
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from vlm_ros.engines.cpu_kernels import InductorGemvLinear, OneDnnLinear, gemv_by_reduction

_CHECK_RTOL = 1e-4  # max |gemv - F.linear| / max |F.linear| on a seeded row
# measured choice (cpu_linear auto): a weight read in less than ~35 µs at these hosts' ~30 GB/s
# cannot pay back a compiled call's own ~22 µs (docs/performance.md), so it is not compiled
MIN_WEIGHT_BYTES = 1 << 20
STREAM_BYTES = 256 << 20  # what a timed round reads per call of every layer: past any L3
MIN_GAIN = 1.05  # a compiled GEMV is kept where the library's takes this many times as long
LIBRARY_LINEARS = (nn.Linear, OneDnnLinear, InductorGemvLinear)  # float32 weight + bias


def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[1, in] -> [1, out]: one fused loop that reads ``weight`` once."""
    y = gemv_by_reduction(x, weight)
    return y if bias is None else y + bias


_compiled: dict[tuple[int, int, bool], Callable] = {}


def own_function(fn: Callable, name: str) -> Callable:
    """``fn`` as a function of its own code object, named ``name``: dynamo keeps its compiled
    entries per code object (at most 8), so each shape compiled gets one of its own."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def compiled_gemv(signature: tuple[int, int, bool]) -> Callable:
    """The compiled GEMV for one (out, in, has bias), made once per process. Each signature
    gets a function of its own code object: dynamo keeps its compiled entries per code object,
    at most 8, and a process holding models of many shapes (the test suite, a server with two
    models) would otherwise run the ninth shape as Python."""
    fn = _compiled.get(signature)
    if fn is None:
        out, inp, bias = signature
        own = own_function(_gemv, f"gemv_{out}x{inp}{'_bias' if bias else ''}")
        fn = _compiled[signature] = torch.compile(own, fullgraph=True, dynamic=False)
    return fn


class CompiledGemv:
    """One Linear layer's one-row product through ``compiled_gemv``, on the layer's own weight
    and bias (shared, not copied). Called with [1, 1, in] as the lean step does."""

    def __init__(self, linear: nn.Module, fn: Callable):
        self.weight, self.bias, self.fn = linear.weight, linear.bias, fn
        self.in_features, self.out_features = int(linear.in_features), int(linear.out_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_inference_mode_enabled():  # entered only when needed: this is per token
            with torch.inference_mode():
                return self(x)
        row = x.detach().reshape(1, self.in_features)  # never one that requires grad: a guard
        return self.fn(row, self.weight, self.bias).view(1, 1, self.out_features)

    def __repr__(self) -> str:
        return f"CompiledGemv(in={self.in_features}, out={self.out_features})"


@dataclass(frozen=True)
class GemvPlan:
    """What ``compile_gemvs`` did: the kernels by module id (empty when none is used), the
    shapes compiled, the seconds it took, why nothing is used where it failed (None otherwise),
    and with ``measured`` each shape's time per call, library against compiled, in µs."""

    kernels: dict[int, CompiledGemv]
    shapes: int
    seconds: float
    refused: str | None
    timings: dict[str, tuple[float, float]] = field(default_factory=dict)

    def summary(self) -> str:
        if self.refused:
            return f"library GEMVs ({self.refused})"
        timed = "; ".join(f"{shape} {lib:.0f} vs {ours:.0f} us"
                          for shape, (lib, ours) in self.timings.items())  # fmt: skip
        timed = f" (library vs compiled per call: {timed})" if timed else ""
        if not self.kernels:
            return f"library GEMVs: no shape faster compiled{timed}"
        return (f"inductor GEMVs: {len(self.kernels)} layers, {self.shapes} shapes compiled "
                f"in {self.seconds:.1f} s{timed}")  # fmt: skip


def eligible(module: object) -> bool:
    """A float32 CPU Linear whose product is weight @ x + bias (quantized layers are not)."""
    if not isinstance(module, LIBRARY_LINEARS):
        return False
    weight = module.weight
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.dim() == 2


def _signature(module: nn.Module) -> tuple[int, int, bool]:
    return (module.out_features, module.in_features, module.bias is not None)


def weight_bytes(module: nn.Module) -> int:
    return module.weight.numel() * module.weight.element_size()


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


def time_per_call_us(calls: list[Callable[[], object]]) -> float:
    """Median µs per call over 5 rounds, a round running every one of ``calls`` in turn (as
    many turns as fill ~1 ms, at least one)."""
    for call in calls:
        call()
    start = time.perf_counter()
    for call in calls:
        call()
    turns = max(1, min(200, int(1e-3 / max(time.perf_counter() - start, 1e-7))))
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(turns):
            for call in calls:
                call()
        rounds.append((time.perf_counter() - start) / (turns * len(calls)) * 1e6)
    return statistics.median(rounds)


def streamed(modules: list[nn.Module]) -> list[nn.Module]:
    """The first of ``modules`` whose weights add up to STREAM_BYTES (all, if they do not):
    enough that calling them in turn reads from memory on any CPU cache, few enough that
    timing a full-size model's 128 layers of a shape takes milliseconds, not seconds."""
    total = 0
    for count, module in enumerate(modules, 1):
        total += weight_bytes(module)
        if total >= STREAM_BYTES:
            return modules[:count]
    return modules


def measure(modules: list[nn.Module], kernels: list[CompiledGemv]) -> tuple[float, float]:
    """µs per call of the library's Linear and of the compiled GEMV for one shape, each layer
    of that shape called in turn, as a token calls them: every weight streams from memory, not
    from a cache that a loop over one weight would keep warm (a `small` layer is 2.5-10 MB).
    Alternated, the library first and last, so both see the same moment of a drifting host."""
    x = torch.randn(1, 1, modules[0].in_features, generator=torch.Generator().manual_seed(1))
    library = [functools.partial(m, x) for m in modules]
    ours = [functools.partial(k, x) for k in kernels]
    with torch.inference_mode():
        first = time_per_call_us(library)
        compiled = time_per_call_us(ours)
        last = time_per_call_us(library)
    return min(first, last), compiled


def compile_gemvs(
    modules: Iterable[nn.Module],
    make: Callable[[tuple[int, int, bool]], Callable] | None = None,
    measured: bool = False,
) -> GemvPlan:
    """Compile and check one GEMV per distinct shape of the eligible ``modules``; a failure
    anywhere keeps the library's everywhere. ``make(signature)`` gives the function for a shape
    (default ``compiled_gemv``). ``measured`` (cpu_linear auto): shapes under MIN_WEIGHT_BYTES
    are not compiled, and a compiled shape is used only where it measured MIN_GAIN faster than
    the library here, now; else (cpu_linear inductor, asked for) every shape is used."""
    make = make or compiled_gemv
    targets = [m for m in modules if eligible(m)]
    if measured:
        targets = [m for m in targets if weight_bytes(m) >= MIN_WEIGHT_BYTES]
    start = time.perf_counter()
    if not targets:
        reason = "no float32 Linear layers" + (" of 1 MiB or more" if measured else "")
        return GemvPlan({}, 0, 0.0, reason)
    shapes: dict[tuple[int, int, bool], list[nn.Module]] = {}
    for module in targets:
        shapes.setdefault(_signature(module), []).append(module)
    fns: dict[tuple[int, int, bool], Callable] = {}
    timings: dict[tuple[int, int, bool], tuple[float, float]] = {}
    for tried, (signature, same) in enumerate(shapes.items(), 1):
        try:
            fns[signature] = make(signature)
            problem = check(fns[signature], same[0])
        except Exception as error:  # inductor's own failure: no C++ compiler, a lowering...
            line = (str(error).strip().splitlines() or [""])[0][:300]
            problem = f"compiling a GEMV failed: {type(error).__name__}: {line}"
        if problem:
            return GemvPlan({}, tried, time.perf_counter() - start, problem)
        if measured:
            timed = streamed(same)
            timings[signature] = measure(timed, [CompiledGemv(m, fns[signature]) for m in timed])
    used = {sig for sig in fns if not measured or timings[sig][0] >= MIN_GAIN * timings[sig][1]}
    kernels = {id(m): CompiledGemv(m, fns[sig]) for sig in used for m in shapes[sig]}
    shown = {f"{out}x{inp}": times for (out, inp, _), times in timings.items()}
    return GemvPlan(kernels, len(fns), time.perf_counter() - start, None, shown)
