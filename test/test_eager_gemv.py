"""The uncompiled decode step's float32 GEMVs as inductor kernels compiled per shape
(engines/eager_gemv.py): same tokens as the library's, used where cpu_linear says, checked at
load (a wrong or failing kernel keeps the library's and says why), one compile per shape."""

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
        ours = StaticDecoder(lm, 40, cpu_linear="inductor", huge_pages=False)
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
    decoder = StaticDecoder(lm, 40, cpu_linear="inductor", huge_pages=False)
    compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        greedy(decoder, _embeds(lm), 3)
    greedy(decoder, _embeds(lm), 3)  # grad mode on
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiles


@pytest.mark.parametrize(
    ("mode", "vendor", "used"),
    [("auto", "AuthenticAMD", True), ("auto", "GenuineIntel", False), ("inductor", "", True),
     ("onednn", "AuthenticAMD", False), ("torch", "AuthenticAMD", False)],
)  # fmt: skip
def test_cpu_linear_decides_where_they_are_used(monkeypatch, mode, vendor, used):
    """auto: on AMD CPUs (where the library GEMVs read below the memory's pace), not Intel's;
    inductor: any CPU; onednn / torch: the library's, nothing compiled."""
    monkeypatch.setattr(cpu_kernels, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(cpu_kernels, "onednn_linear_available", lambda: False)
    with torch.inference_mode():
        decoder = StaticDecoder(tiny_phi(), 40, cpu_linear=mode, huge_pages=False)
    assert (decoder.gemvs is not None) == used
    kinds = {type(m) for m in decoder._fast.linears()}
    assert (kinds == {eager_gemv.CompiledGemv}) == used, kinds


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
        decoder = StaticDecoder(lm, 40, cpu_linear="inductor", huge_pages=False)
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
