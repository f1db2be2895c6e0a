"""Static-KV-cache decoder (gpt-fast style): the cache is allocated once, at construction, for
``max_seq_len`` positions; ``prefill`` and ``decode_one_token`` are separate small verbs and the
decode step has fixed shapes, so it can be captured in a CUDA graph
(``torch.compile(mode="reduce-overhead")``) on GPU, or compiled by inductor on CPU. A compiled
step is compiled when the decoder is built and checked there against the uncompiled step on
the same input; where they differ it is not used (``compile_refused`` says why).

It runs transformers' own PhiForCausalLM (not a rewrite) with a ``StaticCache`` and explicit
``cache_position``, so it computes what the eager reference (decode.EagerDecoder, DynamicCache)
computes: the parity tests require identical greedy tokens on every tiny layout. Where the new
keys/values land: by ``cache_position`` in transformers 4.x; in 5.x by the cache's own on-device
counter (a tensor, so a captured graph advances it too). ``prefill`` zeroes storage and counter
together and every request starts with a prefill, so both agree with ``self.length`` (tested).

Uncompiled, ``decode_one_token`` runs phi_step.PhiDecodeStep: the same modules, weights and
cache storage without transformers' per-token machinery (a quarter of a CPU step on the
``small`` preset); ``fast_step=False`` runs transformers' forward, the reference it is tested
against. Prefill and the branch pass stay transformers' (one call per request, not per token).

Action hints reuse the image+prompt prefix: ``score_branches`` packs every candidate's tokens
into one batch-1 sequence written into the static cache right after the prefix, with a
tree-shaped attention mask (each token sees the prefix and its own candidate's earlier tokens),
so the prefix's keys/values are read in place, never copied per candidate. Expanding the prefix
to K branches of a DynamicCache (what the eager reference does) spent ~40% of the branch pass
in torch.cat copies on the ``small`` preset. Where the cache lacks room for the packed tokens,
it falls back to that expanded form.

On an AMD CPU in float32 the decoder's Linear layers run through oneDNN (``cpu_linear="auto"``,
engines/cpu_kernels.py): ~2x MKL's speed on the AMD hosts measured, same float32 arithmetic
(on Intel CPUs MKL is the faster). Compiled there, the step's GEMVs are written by inductor
(cpu_kernels.InductorGemvLinear: 1.4-1.8x the uncompiled step on the AMD host). Either is swapped
in a copy of ``lm``'s module tree that shares its weights, so the model's own modules (and the
eager reference) are untouched. Uncompiled there, the lean step runs as three compiled regions
shared by every layer, the weights passed in (infer/regional_step.py, ``self.regions``:
1.25x the step on oneDNN's GEMVs on `small`, 1.17x llama.cpp f32), checked against the lean
step at load and, with ``auto``, timed against it there; where a decoder's structure is not
covered, its GEMVs are inductor kernels compiled per weight shape (engines/eager_gemv.py,
``self.gemvs``). Either serves the decode step only, so prefill and branches keep the
library's GEMMs.

Optional ``quantize="int8"``: dynamic int8 quantization (torch.ao, fbgemm/x86) of the decoder's
Linear layers, CPU only, lossy and opt-in; its greedy agreement and logit error are measured by
the benchmark (see docs/performance.md). ``quantize="int8_weight_only"``: int8 weights with
per-channel scales, bf16/fp16 activations, or float32 ones with a compiled CPU step
(engines/weight_int8.py), much less loss.
``quantize="int4_weight_only"``: 4-bit weights, a scale and zero per 32 input channels, torch's
int4 kernels (engines/weight_int4.py). Each replaces the Linear modules of ``lm`` in place.
"""

from __future__ import annotations

import gc
import logging
import platform
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from transformers import Cache, DynamicCache, PhiForCausalLM, StaticCache

from vlm_ros.config import CpuLinearMode, QuantizeMode, dtype_name
from vlm_ros.engines import (
    compile_cache,
    cpu_kernels,
    eager_gemv,
    weight_int4,
    weight_int8,
)
from vlm_ros.engines import huge_pages as thp
from vlm_ros.errors import ContextOverflowError, InputError
from vlm_ros.infer import regional_step
from vlm_ros.infer.fidelity import compiled_step_problem
from vlm_ros.infer.phi_step import PhiDecodeStep
from vlm_ros.model.compat import cache_kwarg

_log = logging.getLogger(__name__)


def quantize_int8(lm: nn.Module) -> nn.Module:
    """Dynamic int8 (per-tensor weights, activations quantized per call) for every Linear of
    ``lm``, in place. CPU only: the quantized kernels are fbgemm/onednn."""
    # Optional: only the opt-in int8 mode uses torch.ao (deprecated); kept off the import path.
    from torch.ao.quantization import quantize_dynamic

    torch.backends.quantized.engine = int8_engine()  # the packed weights are the engine's
    with warnings.catch_warnings():  # torch.ao's deprecation notices, once per process
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(lm, {nn.Linear}, dtype=torch.qint8, inplace=True)
    # The float32 Linear modules torch.ao swaps out are left in reference cycles, which only
    # the cyclic collector frees, and a serving process may not run a full collection for a
    # long time: measured on llava-phi-full, 15.1 GiB resident after loading instead of 5.3
    # (the float32 weights kept beside the int8 ones). Collect them now.
    gc.collect()
    return quantized


def quantized_engines() -> list[str]:
    """The quantized engines this torch build has (a function: tests replace it)."""
    return list(torch.backends.quantized.supported_engines)


def int8_engine(machine: str | None = None) -> str:
    """torch's quantized engine for dynamic int8 on this CPU. On an Arm CPU (a Jetson's cores)
    that is QNNPACK: torch's aarch64 wheel 2.13.0 registers and defaults to the x86 engine,
    whose linear_prepack raises "unknown architecure" there (pytorch/pytorch#177254; seen
    with 2.13.0 by scripts/arm64-emulated-check.sh). Elsewhere torch's default (x86 / fbgemm)
    stays."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("aarch64", "arm64"):
        return torch.backends.quantized.engine
    engines = quantized_engines()
    if "qnnpack" not in engines:
        raise InputError(
            "quantize='int8' on an Arm CPU needs torch's QNNPACK engine, which this torch "
            f"build lacks (engines: {engines}); use "
            "quantize='int4_weight_only', or dtype bfloat16 with quantize='int8_weight_only'"
        )
    return "qnnpack"


def check_quantize(quantize: QuantizeMode, device: torch.device, dtype: torch.dtype) -> None:
    """The quantization policy: dynamic int8 runs on CPU kernels that take float32."""
    if quantize != "int8":
        return
    if device.type != "cpu":
        raise InputError("quantize='int8' is CPU-only (dynamic int8 kernels)")
    int8_engine()  # an Arm torch without QNNPACK is refused here, by name
    if dtype != torch.float32:
        raise InputError(
            f"quantize='int8' needs dtype float32 (the model is {dtype_name(dtype)}): its "
            "dynamic kernels take float32 activations; with bfloat16/float16 use "
            "quantize='int8_weight_only'"
        )


def with_kernels(
    lm: PhiForCausalLM, quantize: QuantizeMode, cpu_linear: CpuLinearMode, compile: bool
) -> nn.Module:
    """``lm`` with the Linear kernels the settings pick: int8 (in place), oneDNN (a copy that
    shares the weights, the model's own modules untouched) or as it is."""
    param = next(lm.parameters())
    check_quantize(quantize, param.device, param.dtype)
    if quantize == "int8":
        return quantize_int8(lm)
    if quantize == "int8_weight_only":
        weight_int8.quantize_weights(lm)  # in place: the float weights are freed
        return lm
    if quantize == "int4_weight_only":
        weight_int4.quantize_weights(lm)  # in place; refuses device/dtype/shapes it cannot serve
        return lm
    if compile and cpu_kernels.wants_inductor_gemv(cpu_linear, param.device, param.dtype):
        return cpu_kernels.with_inductor_gemv(lm, cpu_linear)
    return cpu_kernels.with_onednn_linear(lm, cpu_linear)  # compiled: oneDNN as an opaque op


def compile_step(step: Callable, device: torch.device) -> Callable:
    """CUDA: capture the fixed-shape step in a CUDA graph. CPU: inductor's C++ kernels, called
    from a C++ wrapper (``cpp_wrapper``), not from inductor's default Python one: on a small
    decoder much of the step outside the GEMVs is the cost of calling kernels. In one A/B of
    seven alternating rounds on ``small`` at two threads the compiled step read 83% of the
    host's read bandwidth with the Python wrapper and 89% with the C++ one (the lean
    uncompiled step 79%); the committed measurement is scripts/decode_split.py
    ``--compiled`` (docs/performance.md)."""
    if device.type == "cuda":
        return torch.compile(step, mode="reduce-overhead", dynamic=False)
    return torch.compile(step, dynamic=False, options={"cpp_wrapper": True})


class StaticDecoder:
    """PhiForCausalLM + a StaticCache of ``max_seq_len`` positions (batch 1), allocated here.

    forward_calls counts decoder forward passes (the Decoder protocol in decode.py).
    """

    def __init__(
        self,
        lm: PhiForCausalLM,
        max_seq_len: int = 1024,
        compile: bool = False,
        quantize: QuantizeMode = "none",
        cpu_linear: CpuLinearMode = "auto",
        fast_step: bool = True,
        huge_pages: bool = True,
        regional: bool = True,
        native_kernels: bool = True,
    ):
        param = next(lm.parameters())
        self.device, self.dtype = param.device, param.dtype
        compile_cache.use_persistent_cache()  # before anything below compiles: kept across boots
        self.lm = with_kernels(lm, quantize, cpu_linear, compile)
        self.config = lm.config
        self.max_seq_len = int(max_seq_len)
        self.cache = self._allocate_cache()
        self.huge_pages = self._place_on_huge_pages() if huge_pages else None
        self.length = 0  # positions held in the cache
        self.forward_calls = 0
        # [1] the next cache slot, advanced in place every step (gpt-fast's input_pos): the
        # step allocates nothing, and a captured graph finds its input at the same address.
        # Made outside inference mode, so callers with or without it may advance it.
        with torch.inference_mode(False):
            self._position = torch.zeros(1, dtype=torch.long, device=self.device)
        self._step: Callable = self._decode_step
        # the uncompiled step that serves: PhiDecodeStep, or its compiled regions
        self._fast: PhiDecodeStep | regional_step.RegionalStep | None = None
        self.compiled = False  # the step runs compiled (compile asked and its check passed)
        self.compile_refused: str | None = None  # why an asked-for compiled step is not used
        # A CUDA graph replays into the same output buffer, so a step's logits are overwritten
        # by the next step (and reading a kept one raises): whoever keeps them copies them.
        self.reuses_outputs = False
        if compile:
            self._compile()
        # Not compiled: the step written over the same modules and cache (phi_step.py), which
        # skips transformers' per-token mask, rotary and wrapping; fast_step=False keeps
        # transformers' forward, the reference it is tested against.
        lean = None
        if fast_step and not self.compiled and PhiDecodeStep.supports(self.lm):
            self._fast = lean = PhiDecodeStep(self.lm, self.cache, self.max_seq_len)
        self.regions: regional_step.RegionPlan | None = None  # None: not asked
        self.gemvs: eager_gemv.GemvPlan | None = None  # None: the library's, not asked
        self.native_kernels = native_kernels  # the regions' float32 kernels (native.py)
        if lean is not None:
            self._inductor_step(lean, quantize, cpu_linear, regional)

    def _inductor_step(
        self, lean: PhiDecodeStep, quantize: QuantizeMode, cpu_linear: CpuLinearMode, regional: bool
    ) -> None:
        """Where inductor writes the uncompiled step's GEMVs (cpu_linear auto on AMD, inductor
        anywhere): the step as compiled regions (regional_step.py) where the decoder's structure
        allows, else each float32 GEMV compiled per shape (eager_gemv.py). A float32 model's
        int8 weights (weight_int8.py) on any CPU: the regions are its one fast uncompiled step,
        used untimed; without them a warning says the step is slow."""
        int8_f32 = quantize == "int8_weight_only" and self.dtype == torch.float32
        inductor = cpu_kernels.wants_inductor_gemv(cpu_linear, self.device, self.dtype)
        if not (inductor or int8_f32):
            return
        measured = cpu_linear == "auto" and not int8_f32
        self.regions = self._use_regions(lean, measured) if regional else None
        if int8_f32 and (self.regions is None or self.regions.step is None):
            why = self.regions.refused if self.regions is not None else "regional=False"
            _log.warning(
                "quantize int8_weight_only on float32 without the compiled regions (%s): the "
                "decode step dequantizes every weight per token, several times slower; "
                "compile_decode: true or dtype bfloat16 serve it fast", why,
            )  # fmt: skip
        elif not int8_f32 and (self.regions is None or not self.regions.compiled):
            self.gemvs = self._use_inductor_gemvs(lean, measured)

    def _use_regions(self, step: PhiDecodeStep, measured: bool) -> regional_step.RegionPlan:
        """The lean step as compiled regions, checked (and with ``measured``, timed) here
        against ``step``. Not tried (``compiled`` False) where they do not apply: a structure
        they do not cover, or with ``measured`` a decoder whose every weight is under
        eager_gemv.MIN_WEIGHT_BYTES (a toy's step takes a millisecond; compiling would take
        seconds)."""
        problem = regional_step.supports(step)
        if problem is None and measured:
            largest = max(map(eager_gemv.weight_bytes, step.linears()))
            if largest < eager_gemv.MIN_WEIGHT_BYTES:
                problem = "every weight is under 1 MiB"
        if problem is not None:
            return regional_step.RegionPlan(None, 0.0, problem, compiled=False)
        plan = regional_step.plan(step, self._trial, measured, self.native_kernels)
        if plan.step is not None:
            self._fast = plan.step
        elif plan.timings is None:  # failed or differed (not merely slower): say so
            _log.warning("cpu_linear: %s; the decode step keeps the library's", plan.refused)
        _log.info("static decoder: %s", plan.summary())
        return plan

    def _trial(self, step: Callable, tokens: int) -> tuple[torch.Tensor, float]:
        """Run ``step`` (the lean step's contract) for up to ``tokens`` tokens after a seeded
        one-token prefill, under inference mode as requests run: its last logits (a copy) and
        seconds per token. Leaves the decoder empty, as warm_up does."""
        generator = torch.Generator().manual_seed(0)
        try:
            with torch.inference_mode():
                embeds = torch.randn(1, 1, self.config.hidden_size, generator=generator)
                ids = torch.randint(self.config.vocab_size, (tokens, 1, 1), generator=generator)
                ids = ids[: max(self.max_seq_len - 1, 0)].to(self.device)
                logits = self.prefill(embeds.to(self.device))
                start = time.perf_counter()
                for position, token in enumerate(ids, 1):
                    logits = step(token, position)
                seconds = (time.perf_counter() - start) / max(len(ids), 1)
                return logits.clone(), seconds
        finally:  # a step that failed to compile too
            self.reset()
            self.forward_calls = 0

    @staticmethod
    def _use_inductor_gemvs(step: PhiDecodeStep, measured: bool) -> eager_gemv.GemvPlan:
        """The lean step's float32 GEMVs as inductor kernels compiled per shape, checked here
        (eager_gemv.py): with ``measured`` (auto) only the shapes that are faster so on this
        machine, timed here; else all. Where that fails the library's stay, and a warning
        says why."""
        plan = eager_gemv.compile_gemvs(step.linears(), measured=measured)
        if plan.kernels:
            step.swap_linears(lambda module: plan.kernels.get(id(module), module))
        elif plan.refused and plan.shapes:  # something to compile, and it could not serve
            _log.warning("cpu_linear: %s; the decode step keeps the library's", plan.refused)
        _log.info("static decoder: %s", plan.summary())
        return plan

    def _place_on_huge_pages(self) -> thp.Placement | None:
        """CPU: the weights (as the kernels chosen above store them) and the KV cache on huge
        pages (engines/huge_pages.py), before a compiled step binds their addresses. The
        tensors are moved in place, so the model's own modules, which share them, see the
        same memory and nothing is held twice."""
        if self.device.type != "cpu":
            return None
        cache = [t for layer in self.cache.layers for t in (layer.keys, layer.values)]
        placement = thp.place([*thp.module_tensors(self.lm), *cache])
        _log.info("static decoder: %s", placement.summary())
        return placement

    def _compile(self) -> None:
        """Compile the step and check it against the uncompiled one; where compiling fails or
        they disagree, keep the uncompiled step and say why (``compile_refused``, a warning).
        Measured: a compiled `small` step loaded from inductor's cache returned wrong logits
        or NaN where the entry had been written with AVX-512 kernels and the process ran
        AVX2 ones (torch 2.13's cache does not key on the instruction set; the cache is now
        kept per CPU kind: engines/compile_cache.py). Whatever the cause (another such key,
        a real miscompile), a robot must not get a fast wrong answer."""
        if self.device.type == "cpu":  # the step's attention as inductor's own reductions
            cpu_kernels.use_reduction_attention(self.lm)
        step = compile_step(self._decode_step, self.device)
        problem = self._compiled_step_check(step)
        if problem is None:
            self._use(step, compiled=True)
            return
        self.compile_refused = problem
        _log.warning(
            "compile_decode: %s; serving the uncompiled step (the same answers, slower). "
            "torch %s, CPU kernels %s", problem, torch.__version__,
            torch.backends.cpu.get_cpu_capability(),
        )  # fmt: skip

    def _compiled_step_check(self, step: Callable) -> str | None:
        """Run ``step`` (compiling it) and the uncompiled step on the same input: why ``step``
        cannot serve, or None. Leaves the decoder empty, on the uncompiled step."""
        self._use(step, compiled=True)
        try:
            compiled = self.warm_up()
        except Exception as error:  # inductor's own failure (no C++ compiler, a lowering...)
            self.reset()
            self.forward_calls = 0
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            return f"compiling the decode step failed: {type(error).__name__}: {first_line}"
        finally:
            self._use(self._decode_step, compiled=False)
        return compiled_step_problem(compiled, self.warm_up(), self.dtype)

    def _use(self, step: Callable, compiled: bool) -> None:
        self._step, self.compiled, self.reuses_outputs = step, compiled, compiled

    def warm_up(self, steps: int = 3) -> torch.Tensor:
        """Run the step now, at load, rather than inside the first request: compiling takes
        ~5-50 s on a 2-core CPU (tens of seconds with a cold inductor cache), which would
        otherwise land on the first question a robot asks. Three steps, because a CUDA graph
        is recorded only after torch.compile's warm-up runs. Under inference mode, as requests
        run (a step compiled for another grad mode would compile again). A seeded input, so
        two calls compute the same thing; returns the last step's logits (a copy) and leaves
        the decoder empty."""
        generator = torch.Generator().manual_seed(0)
        with torch.inference_mode():  # inference tensors too, as a request's: no recompile
            embeds = torch.randn(1, 1, self.config.hidden_size, generator=generator)
            tokens = torch.randint(self.config.vocab_size, (steps, 1, 1), generator=generator)
            logits = self.prefill(embeds.to(self.device))
            for token in tokens[: max(self.max_seq_len - 1, 0)].to(self.device):
                logits = self.decode_one_token(token)
            logits = logits.clone()
        self.reset()
        self.forward_calls = 0
        return logits

    def _allocate_cache(self) -> StaticCache:
        """[1, heads, max_seq_len, head_dim] keys and values per layer, allocated now."""
        cfg = self.config
        heads = cfg.num_key_value_heads or cfg.num_attention_heads
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        cache = StaticCache(config=cfg, max_cache_len=self.max_seq_len)
        cache.early_initialization(1, heads, head_dim, self.dtype, self.device)
        return cache

    # ---- the Decoder protocol (decode.py) -----------------------------------------------

    def reset(self) -> None:
        """Forget the sequence. The storage is cleared by the next prefill, once per request,
        not by every reset."""
        self.length = 0

    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds [1, S, hidden] -> logits of the last position [1, V] (float32)."""
        steps = embeds.shape[1]
        self._check_room(steps, start=0)
        self.reset()
        # Zero in place (same storage, so a captured graph's addresses stay valid): masked
        # slots are weighted 0, and 0 * an inf left by an earlier overflow would still be NaN.
        self.cache.reset()
        positions = torch.arange(steps, device=self.device)  # [S]
        logits = self._forward(
            inputs_embeds=embeds.to(self.dtype),
            cache_position=positions,
            position_ids=positions.unsqueeze(0),  # [1, S]
            logits_to_keep=1,
        )  # [1, 1, V]
        self.length = steps
        self._position.fill_(steps)  # a scalar fill: no host sync, nothing allocated
        return logits[:, -1]

    def decode_one_token(self, token: torch.Tensor) -> torch.Tensor:
        """token [1, 1] -> its logits [1, V] (float32); the cache grows by one position.
        Compiled, the logits live in the graph's output buffer until the next step
        (reuses_outputs; decode.generate copies them where it keeps them)."""
        self._check_room(1, start=self.length)
        self.forward_calls += 1
        if self._fast is not None:
            logits = self._fast(token, self.length)
        else:
            logits = self._step(token, self._position)
        self._position += 1
        self.length += 1
        return logits  # [1, V]

    def _decode_step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The fixed-shape step a CUDA graph captures: token [1, 1], position [1] -> [1, V]."""
        out = self.lm(
            input_ids=token,
            **cache_kwarg(self.cache),
            cache_position=position,
            position_ids=position.unsqueeze(0),  # [1, 1]
            use_cache=True,
        )
        return out.logits[:, -1].float()

    def score_branches(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """K right-padded continuations of the prefilled prefix in one pass.

        tokens, mask: [K, T] (mask: 1 = a real token whose logits are wanted; ones then zeros)
        -> logits [K, T, V], zero where mask is 0. The real tokens are packed into one sequence
        after the prefix (see the module docstring); the prefix itself is left untouched, the
        positions after it are scratch until the next prefill/reset.
        """
        if self.length == 0:
            raise InputError("score_branches needs a prefilled prefix")
        packed = int(mask.sum())
        if self.length + packed <= self.max_seq_len:
            return self._score_packed(tokens, mask)
        return self._score_expanded(tokens, mask)

    def _score_packed(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The real tokens as one batch-1 sequence at cache slots P..P+n-1, tree mask."""
        branches, steps = tokens.shape
        where = mask.bool()
        branch_of, step_of = where.nonzero(as_tuple=True)  # [n] each, row-major order
        prefix, count = self.length, int(branch_of.numel())
        slots = torch.arange(prefix, prefix + count, device=self.device)  # cache positions
        logits = self._forward(
            input_ids=tokens[where].unsqueeze(0),  # [1, n]
            cache_position=slots,
            position_ids=(prefix + step_of).unsqueeze(0).to(self.device),  # [1, n]
            attention_mask=self._tree_mask(branch_of, step_of),  # [1, 1, n, max_seq_len]
        )[0]  # [n, V]
        out = logits.new_zeros(branches, steps, logits.shape[-1])
        out[where] = logits
        return out  # [K, T, V]

    def _tree_mask(self, branch_of: torch.Tensor, step_of: torch.Tensor) -> torch.Tensor:
        """Additive mask [1, 1, n, max_seq_len]: packed token i sees the whole prefix and the
        packed tokens j of its own candidate with step_j <= step_i; nothing else (0 / -inf).
        Additive, not boolean: both the sdpa and the eager attention of transformers read it."""
        count = int(branch_of.numel())
        branch_of, step_of = branch_of.to(self.device), step_of.to(self.device)
        same = (branch_of[:, None] == branch_of[None, :]) & (step_of[None, :] <= step_of[:, None])
        allowed = torch.zeros(count, self.max_seq_len, dtype=torch.bool, device=self.device)
        allowed[:, : self.length] = True
        allowed[:, self.length : self.length + count] = same
        blocked = torch.finfo(self.dtype).min
        additive = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        return additive.masked_fill_(~allowed, blocked)[None, None]

    def _score_expanded(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Fallback when the packed tokens do not fit: the prefix's keys/values [1, h, P, d]
        sliced out of the static cache and expanded to [K, h, P, d] views in a DynamicCache
        (its update copies them), the static cache left untouched."""
        branches, steps = tokens.shape
        self._check_room(steps, start=self.length)
        cache = DynamicCache(config=self.config)
        for index, layer in enumerate(self.cache.layers):
            keys = layer.keys[:, :, : self.length].expand(branches, -1, -1, -1)
            values = layer.values[:, :, : self.length].expand(branches, -1, -1, -1)
            cache.update(keys, values, index)
        prefix = torch.ones(branches, self.length, dtype=mask.dtype, device=mask.device)
        positions = torch.arange(self.length, self.length + steps, device=tokens.device)
        logits = self._forward(
            input_ids=tokens,
            cache=cache,
            attention_mask=torch.cat([prefix, mask], dim=1),  # [K, P + T]
            position_ids=positions.expand(branches, steps),  # [K, T]
        )
        return logits  # [K, T, V]

    # ---- helpers ----------------------------------------------------------------------

    def _forward(self, cache: Cache | None = None, **kwargs) -> torch.Tensor:
        self.forward_calls += 1
        chosen = self.cache if cache is None else cache
        return self.lm(**cache_kwarg(chosen), use_cache=True, **kwargs).logits.float()

    def _check_room(self, steps: int, start: int) -> None:
        if start + steps > self.max_seq_len:
            raise ContextOverflowError(
                f"static KV cache holds {self.max_seq_len} positions; {start} used + {steps} "
                f"new = {start + steps} (raise RuntimeConfig.max_seq_len)"
            )
