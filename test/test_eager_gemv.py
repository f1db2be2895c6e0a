"""The uncompiled decode step's float32 GEMVs as inductor kernels compiled per shape
(engines/eager_gemv.py): same tokens as the library's, used where cpu_linear says, checked at
load (a wrong or failing kernel keeps the library's and says why), one compile per shape.
These decoders pass ``regional=False``: where the decoder's structure allows, the step runs as
compiled regions instead (test_regional_step.py), and the per-shape GEMVs are its fallback."""

from __future__ import annotations

import logging

import pytest
import torch
from decode_helpers import greedy, tiny_phi
from torch import nn

from vlm_ros.engines import cpu_kernels, eager_gemv
from vlm_ros.infer.static_decode import StaticDecoder


def _embeds(lm, length: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(1, length, lm.config.hidden_size, generator=generator)


def test_the_step_on_inductor_gemvs_decodes_what_the_library_decodes():
    """cpu_linear 'inductor' without a compiled step: the lean step calls compiled GEMVs (one
    per shape: q/k/v/dense, fc1, fc2, head), prefill keeps the model's modules; tokens are the
    library's and logits within float32 rounding."""
    lm = tiny_phi()
    with torch.inference_mode():
        library = StaticDecoder(lm, 40, cpu_linear="torch", huge_pages=False)
        ours = StaticDecoder(lm, 40, cpu_linear="inductor", huge_pages=False, regional=False)
        assert library.gemvs is None and ours.gemvs is not None
        plan = ours.gemvs
        assert plan.refused is None and plan.shapes == 4, plan
        step_linears = ours._fast.linears()
        assert len(step_linears) == 2 * 6 + 1
        assert all(isinstance(m, eager_gemv.CompiledGemv) for m in step_linears)
        assert len(plan.kernels) == len(step_linears)
        assert not any(isinstance(m, eager_gemv.CompiledGemv) for m in ours.lm.modules())
        want_tokens, want = greedy(library, _embeds(lm), 12)
        tokens, logits = greedy(ours, _embeds(lm), 12)
    assert tokens == want_tokens
    assert torch.allclose(logits, want, atol=1e-4, rtol=1e-4), (logits - want).abs().max()
    assert (logits - want).abs().max() > 0  # really another kernel (another summation order)


def test_a_call_in_another_grad_mode_compiles_nothing_again():
    """The GEMVs run under inference mode whatever the caller's mode: a decode outside it
    reuses the kernels compiled at load (a recompile per shape and mode would add seconds
    per request and, past dynamo's limit, run the GEMV as Python)."""
    lm = tiny_phi(hidden_size=48, intermediate_size=96)
    decoder = StaticDecoder(lm, 40, cpu_linear="inductor", huge_pages=False, regional=False)
    compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        greedy(decoder, _embeds(lm), 3)
    greedy(decoder, _embeds(lm), 3)  # grad mode on
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiles


@pytest.mark.parametrize(
    ("mode", "vendor", "planned"),
    [("auto", "AuthenticAMD", True), ("auto", "GenuineIntel", False), ("inductor", "", True),
     ("onednn", "AuthenticAMD", False), ("torch", "AuthenticAMD", False)],
)  # fmt: skip
def test_cpu_linear_decides_where_they_are_used(monkeypatch, mode, vendor, planned):
    """auto: on AMD CPUs (where the library GEMVs read below the memory's pace), not Intel's,
    and there only the shapes measured faster (test below; this toy's are all under the floor:
    nothing compiled); inductor: every shape on any CPU; onednn / torch: nothing planned."""
    monkeypatch.setattr(cpu_kernels, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(cpu_kernels, "onednn_linear_available", lambda: False)
    with torch.inference_mode():
        decoder = StaticDecoder(tiny_phi(), 40, cpu_linear=mode, huge_pages=False, regional=False)
    assert (decoder.gemvs is not None) == planned
    kinds = {type(m) for m in decoder._fast.linears()}
    assert (kinds == {eager_gemv.CompiledGemv}) == (mode == "inductor"), kinds
    if mode == "auto" and planned:
        assert decoder.gemvs.kernels == {} and decoder.gemvs.shapes == 0
        assert "of 1 MiB or more" in decoder.gemvs.summary()


def test_auto_keeps_a_compiled_shape_only_where_it_measured_faster(monkeypatch):
    """cpu_linear auto times each compiled shape against the library's at load: a shape the
    library runs as fast (within MIN_GAIN) keeps the library's; one it runs slower takes the
    compiled GEMV. The times are in the plan, as the bench and the log show them."""
    lm = tiny_phi(hidden_size=512, intermediate_size=1024, vocab_size=600)  # 1-2.4 MiB layers
    times = {
        (512, 512): (30.0, 29.0),
        (1024, 512): (80.0, 40.0),
        (512, 1024): (80.0, 40.0),
        (600, 512): (50.0, 60.0),
    }  # library µs, compiled µs per shape (out, in)

    real_measure = eager_gemv.measure

    def timed(modules, kernels):
        assert all(isinstance(k, eager_gemv.CompiledGemv) for k in kernels)
        shape = (modules[0].out_features, modules[0].in_features)
        layers = {(512, 512): 8, (1024, 512): 2, (512, 1024): 2, (600, 512): 1}  # each in turn
        assert len(modules) == len(kernels) == layers[shape]
        return times[shape]

    monkeypatch.setattr(eager_gemv, "measure", timed)
    monkeypatch.setattr(eager_gemv, "MIN_WEIGHT_BYTES", 512 * 512 * 4)
    with torch.inference_mode():
        decoder = StaticDecoder(lm, 40, cpu_linear="auto", huge_pages=False, regional=False)
        plan = eager_gemv.compile_gemvs(decoder.lm.modules(), measured=True)  # the model's own
    assert plan.timings == {f"{o}x{i}": t for (o, i), t in times.items()}
    chosen = {(m.out_features, m.in_features) for m in decoder._fast.linears()
              if isinstance(m, eager_gemv.CompiledGemv)}  # fmt: skip
    if decoder.gemvs is not None:  # an AMD host: the decoder made the same choice at load
        assert chosen == {(1024, 512), (512, 1024)}, decoder.gemvs.summary()
        assert "1024x512 80 vs 40 us" in decoder.gemvs.summary()
    used = {(k.out_features, k.in_features) for k in plan.kernels.values()}
    assert used == {(1024, 512), (512, 1024)} and plan.shapes == 4
    # the real timer, on a real shape: two positive figures
    linear = nn.Linear(512, 1024)
    kernel = eager_gemv.CompiledGemv(linear, eager_gemv.compiled_gemv((1024, 512, True)))
    library_us, compiled_us = real_measure([linear], [kernel])
    assert library_us > 0 and compiled_us > 0


def _wrong(signature):
    def gemv(x, weight, bias):
        return torch.nn.functional.linear(x, weight, bias) + 1.0

    return gemv


def _failing(signature):
    def gemv(x, weight, bias):
        raise RuntimeError("C++ compile failed: g++ not found\nmore lines")

    return gemv


@pytest.mark.parametrize(
    ("make", "reason"), [(_wrong, "differs from the library's"), (_failing, "g++ not found")]
)
def test_a_gemv_that_fails_its_check_keeps_the_library_and_says_why(
    monkeypatch, caplog, make, reason
):
    """A kernel that computes something else (a miscompile) or cannot be built (no C++
    compiler on the robot) is not used: every layer keeps the library's, the decoder still
    decodes, and a warning names the problem."""
    monkeypatch.setattr(eager_gemv, "compiled_gemv", make)
    lm = tiny_phi()
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        decoder = StaticDecoder(lm, 40, cpu_linear="inductor", huge_pages=False, regional=False)
        library = StaticDecoder(lm, 40, cpu_linear="torch", huge_pages=False)
        tokens, _ = greedy(decoder, _embeds(lm), 4)
        want, _ = greedy(library, _embeds(lm), 4)
    assert decoder.gemvs.refused and reason in decoder.gemvs.refused
    assert decoder.gemvs.kernels == {} and decoder.gemvs.shapes == 1
    assert not any(isinstance(m, eager_gemv.CompiledGemv) for m in decoder._fast.linears())
    assert tokens == want
    assert any(reason in r.getMessage() for r in caplog.records), caplog.text
    assert "more lines" not in decoder.gemvs.refused  # one line of the error


def test_only_float32_linear_layers_are_taken():
    """Quantized layers and other dtypes keep their own kernels; nothing eligible: said."""
    linear = nn.Linear(8, 4)
    assert eager_gemv.eligible(linear)
    assert eager_gemv.eligible(cpu_kernels.OneDnnLinear(linear))
    assert not eager_gemv.eligible(nn.Linear(8, 4).to(torch.bfloat16))
    assert not eager_gemv.eligible(nn.LayerNorm(8))
    plan = eager_gemv.compile_gemvs([nn.LayerNorm(8)])
    assert plan.kernels == {} and plan.shapes == 0 and "no float32 Linear" in plan.refused


def test_each_shape_has_a_compiled_function_of_its_own():
    """One compiled function (one dynamo code object) per (out, in, bias): a process with
    models of many shapes never reaches dynamo's per-function limit of compiled entries."""
    a = eager_gemv.compiled_gemv((4, 8, True))
    assert eager_gemv.compiled_gemv((4, 8, True)) is a
    b = eager_gemv.compiled_gemv((8, 4, True))
    c = eager_gemv.compiled_gemv((4, 8, False))
    codes = {f._torchdynamo_orig_callable.__code__ for f in (a, b, c)}
    assert len(codes) == 3
    x, weight, bias = torch.randn(1, 8), torch.randn(4, 8), torch.randn(4)
    with torch.inference_mode():
        assert torch.allclose(a(x, weight, bias), x @ weight.T + bias, atol=1e-5)
        assert torch.allclose(c(x, weight, None), x @ weight.T, atol=1e-5)


def test_a_timed_round_streams_enough_layers_to_miss_the_caches(monkeypatch):
    """The timing calls as many layers of a shape as hold STREAM_BYTES of weights (all where
    they hold less): read from memory as a token reads them, and bounded at full size."""
    monkeypatch.setattr(eager_gemv, "STREAM_BYTES", 3 * 64 * 32 * 4)
    layers = [nn.Linear(32, 64) for _ in range(5)]  # 8 KiB each
    assert eager_gemv.streamed(layers) == layers[:3]
    assert eager_gemv.streamed(layers[:2]) == layers[:2]
