"""The uncompiled CPU decode step with each layer's two halves compiled once for every layer
(regional compilation): the lean step (infer/phi_step.PhiDecodeStep) in 25 compiled calls a
token on a 12-layer decoder instead of 73 GEMV calls and ~20 small ops per layer.

Why: a `small` decode token on the AMD EPYC this is measured on cost 24-26 ms uncompiled with
each GEMV compiled per shape (engines/eager_gemv.py) against llama.cpp f32's 23-25 ms. The gap
was the calls, not the reads: a compiled call costs ~22 µs of Python and guards, a library
call ~3, and the step made 73 of the first and ~20 of the second per layer. Compiling the whole
step (``compile_decode: true``) removes them but compiles for minutes at full size. Here the
same graph serves every layer, the layer's weights passed in as inputs, so a decoder of any
depth compiles three small graphs in seconds (on `small`: 4 s with a warm inductor cache, 18 s
with an empty one; docs/performance.md, "The uncompiled step as compiled regions").

Per layer (Phi's parallel block: attention and MLP both read the normed input):
- ``layer_in`` (compiled): LayerNorm, q/k/v as inductor's one-row reductions
  (cpu_kernels.gemv_by_reduction), the partial rotary embedding at the token's slot;
- eager: the new key and value written into the StaticCache's storage at that slot (and the
  cache's length counter advanced, transformers 5.x), then SDPA over the live slots only, one
  library call (the attention inside one compiled function per layer needs a dynamic live
  length: measured 1.19x the per-shape step where these halves were 1.26x; over the whole
  cache it would read the unused slots too);
- ``layer_out`` (compiled): the attention's dense, fc1, the activation, fc2 and both residual
  adds.
Then ``head`` (compiled): the final LayerNorm and the vocabulary GEMV (the normed row returned
too, so inductor stores it once rather than recomputing it in the GEMV's loop for every row).

On a float32 decoder the GEMVs and the attention are engines/native.py's kernels where they
build (``native_kernels``, the default): each GEMV an opaque call inside its region (bias added
in its loop), and the cache write plus attention one eager call; they read the memory at a
plain sum's pace where inductor's one-chain loops and SDPA did not (full size, the host's fast
state: 139 against 174 ms a token, 91.5% of the read against 74%; docs/performance.md, "Native
decode kernels"). They are checked at load like the regions; where they do not build or
differ, the regions keep inductor's loops and SDPA.

Each graph is compiled with inductor's C++ wrapper (static_decode.compile_step's reasoning:
1.26x the per-shape step on `small`, 1.16x with the Python wrapper) and called under inference
mode with inputs that never require grad, so no call compiles again. Each model shape gets
functions of its own code objects (dynamo keeps at most 8 compiled entries per code object,
and a process with many models, the test suite, would run the ninth as Python, whose
multiply-sum GEMV allocates a weight-sized temporary).

``supports`` says which decoders this covers (float32 CPU Linear layers, or a float32 model's
int8 weight-only layers, bytes or int32 words read in the same loops; LayerNorms, no q/k norms,
one stateless activation) and why not; the static decoder then keeps the per-shape GEMVs. The
step is checked at load against the library step on the same input
(fidelity.compiled_step_problem), as a compiled step is.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlm_ros.engines import eager_gemv, native
from vlm_ros.engines.weight_int8 import WeightOnlyInt8Linear, gemv
from vlm_ros.infer.fidelity import compiled_step_problem
from vlm_ros.infer.phi_step import PhiDecodeStep

_log = logging.getLogger(__name__)


def _gemv(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """[1, in] -> [1, out], one loop over ``weight``: float32, or int8 (bytes, or int32 words
    of four column planes where torch's kernels are not AVX-512) converted as it is read and
    scaled per output channel after the sum (weight_int8.WeightOnlyInt8Linear)."""
    y = gemv(x, weight)
    y = y if scales is None else y * scales
    return y if bias is None else y + bias


@dataclass(frozen=True)
class Shape:
    """Everything a compiled region specialises on (dynamo guards the inputs' shapes, dtypes
    and which are None): one set of functions per distinct Shape in a process, so no model
    ever makes another's functions compile again."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary: int
    intermediate: int
    vocab: int
    eps: float
    activation: str  # repr of the activation module (its class and settings)
    biases: tuple[bool, ...]  # which of q, k, v, dense, fc1, fc2, head have a bias
    int8: bool = False  # int8 weights, per-channel scales (quantize: int8_weight_only)
    words: bool = False  # those as int32 words of four column planes (weight_int8.to_planes)
    native: bool = False  # float32 GEMVs through engines/native.py's kernel, not inductor's

    def name(self) -> str:
        shape = f"{self.hidden}_{self.heads}x{self.head_dim}_{self.kv_heads}kv_r{self.rotary}"
        int8 = ("_int8w" if self.words else "_int8") if self.int8 else ""
        return (
            shape + f"_{self.intermediate}_{self.vocab}" + int8 + ("_native" if self.native else "")
        )


def _regions(shape: Shape, act: nn.Module) -> tuple[Callable, Callable, Callable]:
    """The three region functions for ``shape``; ``act`` the decoder's activation module
    (stateless, one for every layer), called inside ``layer_out``."""
    hidden, eps, rotary, half = shape.hidden, shape.eps, shape.rotary, shape.rotary // 2
    q_shape = (1, shape.heads, 1, shape.head_dim)
    kv_shape = (1, shape.kv_heads, 1, shape.head_dim)

    def linear(x: torch.Tensor, weight, scales, bias) -> torch.Tensor:
        """One row through a Linear's (weight, scales, bias): the native kernel (an opaque
        call inside the region, bias added in its loop) or inductor's fused loop."""
        if shape.native:
            return native.gemv(x, weight, bias)
        return _gemv(x, weight, scales, bias)

    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., :rotary], x[..., rotary:]  # transformers' partial rotary arithmetic
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        return torch.cat((rot * cos + rotated * sin, rest), dim=-1)

    def layer_in(h, norm_w, norm_b, q, k, v, cos, sin):
        """h [1, D] -> the normed input [1, D], q [1, heads, 1, hd], k and v [1, kv, 1, hd];
        q, k, v each a Linear's (weight, scales or None, bias); cos, sin [1, rotary], the
        token's slot's."""
        x = F.layer_norm(h, (hidden,), norm_w, norm_b, eps)
        query = rope(linear(x, *q).view(q_shape), cos, sin)
        key = rope(linear(x, *k).view(kv_shape), cos, sin)
        return x, query, key, linear(x, *v).view(kv_shape)

    def layer_out(att, x, h, dense, fc1, fc2):
        """The attention's output [1, D], the normed input, the layer's input -> its output."""
        return linear(att, *dense) + linear(act(linear(x, *fc1)), *fc2) + h

    def head(h, norm_w, norm_b, vocab):
        """The logits [1, V], and the normed row: returned so that inductor stores it once;
        else it recomputes the LayerNorm inside the vocabulary GEMV's loop, for every row."""
        x = F.layer_norm(h, (hidden,), norm_w, norm_b, eps)
        return linear(x, *vocab), x

    return layer_in, layer_out, head


_compiled: dict[Shape, tuple[Callable, Callable, Callable]] = {}


def compiled_regions(shape: Shape, act: nn.Module) -> tuple[Callable, Callable, Callable]:
    """The compiled (layer_in, layer_out, head) for ``shape``, made once per process."""
    regions = _compiled.get(shape)
    if regions is None:
        own = eager_gemv.own_function  # dynamo's entry limit is per code object
        regions = _compiled[shape] = tuple(
            torch.compile(own(fn, f"{fn.__name__}_{shape.name()}"), fullgraph=True,
                          dynamic=False, options={"cpp_wrapper": True})
            for fn in _regions(shape, act)
        )  # fmt: skip
    return regions


def int8_linear(module: object) -> bool:
    """A weight-only int8 layer on a CPU whose scales and bias are float32 (a float32 model's
    ``quantize: int8_weight_only``)."""
    if not isinstance(module, WeightOnlyInt8Linear):
        return False
    tensors = [module.scales] + ([] if module.bias is None else [module.bias])
    int8 = module.weight.dtype in (torch.int8, torch.int32)  # bytes, or int32 words
    on_cpu = module.weight.device.type == "cpu" and int8
    return on_cpu and all(t.dtype == torch.float32 for t in tensors)


def supports(step: PhiDecodeStep) -> str | None:
    """Why ``step``'s decoder cannot run as regions (None: it can): every Linear a float32 CPU
    one, or every one a float32 model's int8 weight-only layer (other quantized layers keep
    their own kernels), LayerNorms with one eps, no q/k norms, and one parameter-free
    activation class for every layer."""
    layers, linears = step.layers, step.linears()
    if not (all(map(eager_gemv.eligible, linears)) or all(map(int8_linear, linears))):
        return "not every Linear layer is a float32 CPU one (or every one float32 int8 weights)"
    if any(layer.q_norm is not None for layer in layers):
        return "the decoder has q/k LayerNorms"
    norms = [layer.norm for layer in layers] + [step.final_norm]
    if not all(type(n) is nn.LayerNorm and n.elementwise_affine for n in norms):
        return "a norm is not an affine nn.LayerNorm"
    if len({float(n.eps) for n in norms}) != 1:
        return "the LayerNorms' eps differ"
    acts = {repr(layer.act) for layer in layers}
    if len(acts) != 1 or any(True for _ in layers[0].act.parameters()):
        return "the layers' activations differ or hold parameters"
    return None


def _linear(module: nn.Module) -> tuple:
    """A Linear layer as the regions take it: (weight, scales or None, bias or None)."""
    return module.weight, getattr(module, "scales", None), module.bias


class RegionalStep:
    """PhiDecodeStep's contract (token [1, 1] at cache slot ``position`` -> logits [1, V]
    float32, the token's keys and values written into the cache), on ``step``'s modules,
    weights, cache and rotary tables, through three compiled regions. Check ``supports``
    first. ``native`` (float32 weights; native.load() first): the GEMVs and the attention
    through engines/native.py's kernels rather than inductor's loops and SDPA."""

    def __init__(self, step: PhiDecodeStep, native: bool = False):
        first = step.layers[0]
        linears = (first.q, first.k, first.v, first.dense, first.fc1, first.fc2, step.head)
        self.shape = Shape(
            hidden=int(first.norm.normalized_shape[0]), heads=step.heads,
            kv_heads=step.kv_heads, head_dim=step.head_dim, rotary=step.rotary,
            intermediate=int(first.fc1.out_features), vocab=int(step.head.out_features),
            eps=float(first.norm.eps), activation=repr(first.act),
            biases=tuple(m.bias is not None for m in linears), int8=int8_linear(first.q),
            words=first.q.weight.dtype == torch.int32,
            native=native and not int8_linear(first.q),
        )  # fmt: skip
        self.layer_in, self.layer_out, self.head = compiled_regions(self.shape, first.act)
        self.gqa, self.embed, self.cos, self.sin = step.gqa, step.embed, step.cos, step.sin
        self.layers = [
            (
                (layer.norm.weight, layer.norm.bias, *map(_linear, (layer.q, layer.k, layer.v))),
                tuple(map(_linear, (layer.dense, layer.fc1, layer.fc2))),
                layer.keys, layer.values, layer.counter,
            )
            for layer in step.layers
        ]  # fmt: skip
        norm = step.final_norm
        self.head_weights = (norm.weight, norm.bias, _linear(step.head))
        # the token's slot's rotary row, copied here once a token: the regions take a fixed
        # [1, rotary] input whatever the table's length (max_seq_len) or the slot
        with torch.inference_mode():  # as every call runs: the same kind of input each time
            self.cos_row, self.sin_row = self.cos[:1].clone(), self.sin[:1].clone()

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        if not torch.is_inference_mode_enabled():  # a guard of every region: enter it once
            with torch.inference_mode():
                return self(token, position)
        live, gqa, cos, sin = position + 1, self.gqa, self.cos_row, self.sin_row
        native_kernels = self.shape.native
        cos.copy_(self.cos[position : position + 1])
        sin.copy_(self.sin[position : position + 1])
        h = self.embed(token.detach()).view(1, -1)  # [1, D]
        for first_half, second_half, keys, values, counter in self.layers:
            x, q, k, v = self.layer_in(h, *first_half, cos, sin)
            if native_kernels:  # the cache write and attention in one call, each slot read once
                att = native.attend_one(q, k, v, keys, values, position)
            else:
                keys[:, :, position] = k[:, :, 0]
                values[:, :, position] = v[:, :, 0]
                att = F.scaled_dot_product_attention(
                    q, keys[:, :, :live], values[:, :, :live], enable_gqa=gqa
                )  # [1, heads, 1, hd]: one query sees every earlier slot, no mask
            if counter is not None:
                counter.add_(1)
            h = self.layer_out(att.reshape(1, -1), x, h, *second_half)
        return self.head(h, *self.head_weights)[0].float()


# A trial: run a step for N tokens after a seeded one-token prefill, leaving the decoder empty:
# the last token's logits and the seconds per token.
Trial = Callable[[Callable, int], tuple[torch.Tensor, float]]
ROUND_SECONDS = 0.2  # a timed round's length at load: ~8 `small` tokens, 1 full-size one
ROUNDS = 3  # per step, alternated, the library's first and last


@dataclass(frozen=True)
class RegionPlan:
    """What ``plan`` did: the step to use (None: the library step stays), the seconds it took,
    why the regions are not used (None where they are), and where timed, ms per token of the
    library step and of the regions. ``compiled`` False: the regions did not apply (a
    structure they do not cover, a toy's weights), nothing was tried. ``native_refused``: why
    the regions' float32 GEMVs and attention are not engines/native.py's kernels (None: they
    are, or the weights are int8, whose loops are inductor's)."""

    step: RegionalStep | None
    seconds: float
    refused: str | None
    timings: tuple[float, float] | None = None
    compiled: bool = True
    native_refused: str | None = None

    @property
    def native(self) -> bool:
        """The regions serve on the native kernels."""
        return self.step is not None and self.step.shape.native

    def summary(self) -> str:
        if not self.compiled:
            return f"no compiled regions: {self.refused}"
        timed = ""
        if self.timings is not None:
            library, ours = self.timings
            timed = f" (ms a token, library step vs regions: {library:.2f} vs {ours:.2f})"
        if self.step is None:
            return f"library decode step: {self.refused}{timed}"
        kernels = "native GEMV and attention kernels" if self.native else "inductor's GEMV loops"
        if self.native_refused is not None:
            kernels += f" ({self.native_refused})"
        return f"decode step as compiled regions on {kernels}, built in {self.seconds:.1f} s{timed}"


def _checked(
    step: PhiDecodeStep, trial: Trial, want: torch.Tensor, native_kernels: bool
) -> tuple[RegionalStep | None, str | None]:
    """``step``'s regions, compiled and run on the trial's input, and their logits checked
    against ``want`` (the library step's, float32 rounding allowed:
    fidelity.compiled_step_problem); else None and why."""
    on = " on the native kernels" if native_kernels else ""
    try:
        regions = RegionalStep(step, native_kernels)
        got, _ = trial(regions, 2)  # compiles the three regions
    except Exception as error:  # inductor's own failure: no C++ compiler, a lowering...
        line = (str(error).strip().splitlines() or [""])[0][:300]
        return None, f"compiling the regions{on} failed: {type(error).__name__}: {line}"
    problem = compiled_step_problem(got, want, torch.float32, what="the compiled regions" + on)
    return (regions, None) if problem is None else (None, problem)


def plan(
    step: PhiDecodeStep, trial: Trial, measured: bool, native_kernels: bool = True
) -> RegionPlan:
    """Compile ``step``'s regions and check them against ``step`` itself on the same seeded
    input; with ``measured`` (cpu_linear auto) keep them only where they ran
    eager_gemv.MIN_GAIN faster than ``step`` here, timed in alternating rounds. With
    ``native_kernels`` a float32 decoder's regions run on engines/native.py's GEMV and
    attention where those build and pass the same check, else on inductor's loops (the
    reason kept in ``native_refused``). A failure to compile (no C++ compiler) or a mismatch
    keeps ``step``; ``refused`` says why. The caller checks ``supports`` first."""
    start = time.perf_counter()
    want, library_seconds = trial(step, 2)
    native_refused: str | None = None
    regions = None
    if native_kernels and not int8_linear(step.layers[0].q):
        native_refused = native.load()
        if native_refused is None:
            regions, native_refused = _checked(step, trial, want, native_kernels=True)
        if native_refused is not None:
            _log.warning("%s; the regions use inductor's loops", native_refused)
    if regions is None:
        regions, problem = _checked(step, trial, want, native_kernels=False)
        if regions is None:
            seconds = time.perf_counter() - start
            return RegionPlan(None, seconds, problem, native_refused=native_refused)
    if not measured:
        seconds = time.perf_counter() - start
        return RegionPlan(regions, seconds, None, native_refused=native_refused)
    tokens = max(1, min(16, int(ROUND_SECONDS / max(library_seconds, 1e-4))))
    library, ours = [], []
    for _ in range(ROUNDS):
        library.append(trial(step, tokens)[1])
        ours.append(trial(regions, tokens)[1])
    library.append(trial(step, tokens)[1])
    timings = (statistics.median(library) * 1e3, statistics.median(ours) * 1e3)
    seconds = time.perf_counter() - start
    if timings[0] < eager_gemv.MIN_GAIN * timings[1]:
        why = "the regions were not faster here"
        return RegionPlan(None, seconds, why, timings, native_refused=native_refused)
    return RegionPlan(regions, seconds, None, timings, native_refused=native_refused)
