"""The uncompiled decode step as compiled regions (infer/regional_step.py): the same tokens,
logits and cache as the library step; used where cpu_linear says and the decoder's structure
allows (else the per-shape GEMVs); checked at load (a failing or wrong compile keeps the
library step and says why); with auto, kept only where it measured faster; one compile per
model shape, whatever the layer, the grad mode or the number of decoders."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from decode_helpers import greedy, tiny_phi

from vlm_ros.engines import cpu_kernels, weight_int8
from vlm_ros.infer import regional_step
from vlm_ros.infer.phi_step import PhiDecodeStep
from vlm_ros.infer.static_decode import StaticDecoder


def _embeds(lm, length: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(1, length, lm.config.hidden_size, generator=generator)


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize(
    "overrides", [{}, {"num_key_value_heads": 2}, {"num_hidden_layers": 3, "hidden_act": "gelu"}]
)
def test_the_regions_decode_what_the_library_step_decodes(overrides):
    """cpu_linear 'inductor' (asked: not timed): the served step is the regions'; the greedy
    tokens are the library step's, every step's logits within float32 rounding (and not
    bit-equal: really other kernels), and the cache holds the same keys, values and length
    afterwards. Grouped-query heads and another activation too."""
    lm = tiny_phi(**overrides)
    with torch.inference_mode():
        library = StaticDecoder(lm, 40, cpu_linear="torch", huge_pages=False)
        ours = StaticDecoder(lm, 40, cpu_linear="inductor", huge_pages=False)
        assert library.regions is None and isinstance(library._fast, PhiDecodeStep)
        assert ours.regions is not None and ours.regions.refused is None, ours.regions
        assert isinstance(ours._fast, regional_step.RegionalStep) and ours.gemvs is None
        assert ours.regions.timings is None  # asked for: used without timing
        want_tokens, want = greedy(library, _embeds(lm), 12)
        tokens, logits = greedy(ours, _embeds(lm), 12)
    assert tokens == want_tokens
    assert torch.allclose(logits, want, atol=1e-4, rtol=1e-4), (logits - want).abs().max()
    assert (logits - want).abs().max() > 0
    for mine, theirs in zip(ours.cache.layers, library.cache.layers, strict=True):
        assert torch.allclose(mine.keys, theirs.keys, atol=1e-5)
        assert torch.allclose(mine.values, theirs.values, atol=1e-5)
        if getattr(theirs, "cumulative_length", None) is not None:  # transformers 5.x
            assert int(mine.cumulative_length) == int(theirs.cumulative_length)


def test_one_compile_per_model_shape_in_any_grad_mode():
    """A second decoder of the same shape compiles nothing; decoding outside inference mode
    (no_grad, grad on) compiles nothing; a model of another shape gets functions of their own
    (dynamo's 8-entry limit is per code object), named by its shape and kernels."""
    lm = tiny_phi(hidden_size=48, intermediate_size=96)
    first = StaticDecoder(lm, 40, cpu_linear="inductor", huge_pages=False)
    compiled = _graphs()
    second = StaticDecoder(lm, 40, cpu_linear="inductor", huge_pages=False)
    with torch.no_grad():
        greedy(second, _embeds(lm), 3)
    greedy(first, _embeds(lm), 3)  # grad mode on
    assert _graphs() == compiled
    assert second._fast.layer_in is first._fast.layer_in
    other = StaticDecoder(tiny_phi(hidden_size=80), 40, cpu_linear="inductor", huge_pages=False)
    assert other._fast.layer_in is not first._fast.layer_in
    names = {step._fast.shape.name() for step in (first, other)}
    assert names == {"48_4x12_4kv_r4_96_96_native", "80_4x20_4kv_r8_128_96_native"}, names
    # another cache length (max_seq_len) compiles nothing; another vocabulary gets its own
    compiled = _graphs()
    longer = StaticDecoder(lm, 64, cpu_linear="inductor", huge_pages=False)
    greedy(longer, _embeds(lm), 3)
    assert longer._fast.layer_in is first._fast.layer_in and _graphs() == compiled
    wider = StaticDecoder(tiny_phi(hidden_size=48, intermediate_size=96, vocab_size=120), 40,
                          cpu_linear="inductor", huge_pages=False)  # fmt: skip
    assert wider._fast.layer_in is not first._fast.layer_in


@pytest.mark.parametrize(
    ("mode", "vendor", "regions"),
    [("auto", "AuthenticAMD", False), ("auto", "GenuineIntel", False), ("inductor", "", True),
     ("onednn", "AuthenticAMD", False), ("torch", "AuthenticAMD", False)],
)  # fmt: skip
def test_cpu_linear_decides_where_they_are_used(monkeypatch, mode, vendor, regions):
    """inductor: on any CPU. auto: on AMD CPUs only and only for weights of 1 MiB or more (a
    toy's step takes a millisecond, compiling would take seconds: this one's are not compiled,
    and the per-shape GEMVs skip them too). onednn / torch: never."""
    monkeypatch.setattr(cpu_kernels, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(cpu_kernels, "onednn_linear_available", lambda: False)
    with torch.inference_mode():
        decoder = StaticDecoder(tiny_phi(), 40, cpu_linear=mode, huge_pages=False)
    assert (decoder.regions is not None and decoder.regions.step is not None) == regions
    assert isinstance(decoder._fast, regional_step.RegionalStep) == regions
    if mode == "auto" and vendor == "AuthenticAMD":  # not tried; then the per-shape plan
        assert not decoder.regions.compiled and "under 1 MiB" in decoder.regions.summary()
        assert decoder.gemvs is not None and decoder.gemvs.shapes == 0
    elif mode != "inductor":
        assert decoder.regions is None and decoder.gemvs is None


def test_a_structure_the_regions_do_not_cover_keeps_the_per_shape_gemvs():
    """q/k LayerNorms (not in Phi-2's checkpoints) are not in the regions: the decoder uses
    the per-shape GEMVs and decodes as before."""
    lm = tiny_phi(qk_layernorm=True)
    with torch.inference_mode():
        decoder = StaticDecoder(lm, 40, cpu_linear="inductor", huge_pages=False)
        library = StaticDecoder(lm, 40, cpu_linear="torch", huge_pages=False)
        tokens, _ = greedy(decoder, _embeds(lm), 4)
        want, _ = greedy(library, _embeds(lm), 4)
    assert regional_step.supports(library._fast) == "the decoder has q/k LayerNorms"
    assert not decoder.regions.compiled and decoder.regions.step is None
    assert decoder.regions.summary() == "no compiled regions: the decoder has q/k LayerNorms"
    assert decoder.gemvs is not None and decoder.gemvs.kernels
    assert tokens == want


def test_quantized_layers_are_not_regions():
    """Dynamic int8 layers keep their own kernels: the regions do not take them."""
    with torch.inference_mode():
        decoder = StaticDecoder(tiny_phi(), 40, quantize="int8", huge_pages=False)
    assert regional_step.supports(decoder._fast).startswith("not every Linear layer is a float32")


def _wrong_regions(shape, act):
    layer_in, layer_out, head = regional_step._regions(shape, act)
    return layer_in, layer_out, lambda *args: (head(*args)[0] + 1.0, None)


def _failing_regions(shape, act):
    def fail(*args):
        raise RuntimeError("C++ compile failed: g++ not found\nmore lines")

    return fail, fail, fail


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_wrong_regions, "logits of the compiled regions differ"),
        (_failing_regions, "g++ not found"),
    ],
)
def test_regions_that_fail_their_check_keep_the_library_step_and_say_why(
    monkeypatch, caplog, make, reason
):
    """A miscompile or a machine without a C++ compiler: the decoder serves the library step
    (not the per-shape GEMVs, which would fail the same way), decodes the library's tokens,
    and a warning names the problem in one line."""
    monkeypatch.setattr(regional_step, "compiled_regions", make)
    lm = tiny_phi()
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        decoder = StaticDecoder(lm, 40, cpu_linear="inductor", huge_pages=False)
        left = (decoder.length, decoder.forward_calls)  # empty, as after warm_up
        library = StaticDecoder(lm, 40, cpu_linear="torch", huge_pages=False)
        tokens, _ = greedy(decoder, _embeds(lm), 4)
        want, _ = greedy(library, _embeds(lm), 4)
    assert decoder.regions.step is None and reason in decoder.regions.refused
    assert isinstance(decoder._fast, PhiDecodeStep) and decoder.gemvs is None
    assert left == (0, 0)
    assert tokens == want
    assert any(reason in r.getMessage() for r in caplog.records), caplog.text
    assert "more lines" not in decoder.regions.refused


@pytest.mark.parametrize(
    ("library_s", "regions_s", "kept"), [(0.02, 0.01, True), (0.02, 0.0195, False)]
)
def test_auto_keeps_the_regions_only_where_they_measured_faster(library_s, regions_s, kept):
    """With ``measured`` the regions are timed against the library step in alternating rounds
    and kept only where eager_gemv.MIN_GAIN faster; the times are in the plan and its
    summary, as the log and the bench show them."""
    lm = tiny_phi()
    with torch.inference_mode():
        decoder = StaticDecoder(lm, 40, cpu_linear="torch", huge_pages=False)
    step = decoder._fast
    calls: list[str] = []

    def trial(run, tokens):
        is_regions = isinstance(run, regional_step.RegionalStep)
        calls.append("regions" if is_regions else "library")
        logits, _ = decoder._trial(run, min(tokens, 2))  # real logits: the check passes
        return logits, regions_s if is_regions else library_s

    plan = regional_step.plan(step, trial, measured=True)
    assert (plan.step is not None) == kept
    assert plan.timings == (library_s * 1e3, regions_s * 1e3)
    assert calls[2:] == ["library", "regions"] * regional_step.ROUNDS + ["library"]
    assert f"{library_s * 1e3:.2f} vs {regions_s * 1e3:.2f}" in plan.summary()
    if not kept:
        assert plan.refused == "the regions were not faster here"


def test_the_real_trial_on_a_model_over_the_floor(monkeypatch):
    """auto on an AMD CPU with a model whose layers pass the 1 MiB floor: the regions are
    compiled, checked and timed here with the real clock (two positive figures), and the
    decoder serves whichever the timing chose, with the library step's tokens."""
    monkeypatch.setattr(cpu_kernels, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(cpu_kernels, "onednn_linear_available", lambda: False)
    lm = tiny_phi(
        hidden_size=320, intermediate_size=1024, vocab_size=1100
    )  # fc1, fc2, head > 1 MiB
    with torch.inference_mode():
        decoder = StaticDecoder(lm, 40, cpu_linear="auto", huge_pages=False)
        library = StaticDecoder(lm, 40, cpu_linear="torch", huge_pages=False)
        tokens, _ = greedy(decoder, _embeds(lm), 6)
        want, _ = greedy(library, _embeds(lm), 6)
    plan = decoder.regions
    assert plan is not None and plan.timings is not None and min(plan.timings) > 0
    assert isinstance(decoder._fast, regional_step.RegionalStep) == (plan.step is not None)
    assert tokens == want
    assert decoder.forward_calls > 0 and decoder.length == 5 + 6


@pytest.mark.parametrize("words", [False, True], ids=["bytes", "words"])
def test_a_float32_models_int8_weights_run_as_regions_on_any_cpu(monkeypatch, caplog, words):
    """quantize int8_weight_only on float32: the regions read the int8 weights (bytes, or the
    int32 words kept where torch's kernels are not AVX-512) in their own loops (scaled per
    channel after the sum), on any CPU vendor and any cpu_linear, untimed: the library step
    would dequantize every weight per token. Same greedy tokens as that step, logits within
    float32 rounding. Without the regions (regional=False) the decoder still decodes, and a
    warning says it is slow and what serves it fast."""
    monkeypatch.setattr(cpu_kernels, "cpu_vendor", lambda: "GenuineIntel")
    if words:
        monkeypatch.setattr(weight_int8, "WHOLE_BYTE_LOADS", ())
    lm = tiny_phi()
    with torch.inference_mode():
        ours = StaticDecoder(
            copy.deepcopy(lm), 40, quantize="int8_weight_only", cpu_linear="torch",
            huge_pages=False,
        )  # fmt: skip
        with caplog.at_level(logging.WARNING):
            library = StaticDecoder(
                copy.deepcopy(lm), 40, quantize="int8_weight_only", huge_pages=False,
                regional=False,
            )  # fmt: skip
        assert isinstance(ours._fast, regional_step.RegionalStep) and ours._fast.shape.int8
        assert ours.lm.model.layers[0].mlp.fc1.planes == words
        assert ours.regions.timings is None and ours.gemvs is None
        assert isinstance(library._fast, PhiDecodeStep) and library.regions is None
        want_tokens, want = greedy(library, _embeds(lm), 12)
        tokens, logits = greedy(ours, _embeds(lm), 12)
    assert tokens == want_tokens
    assert torch.allclose(logits, want, atol=1e-4, rtol=1e-4), (logits - want).abs().max()
    assert "dequantizes every weight per token" in caplog.text


def test_the_regions_run_on_the_native_kernels_where_they_build_else_inductors(monkeypatch):
    """A float32 decoder's regions run on engines/native.py's GEMV and attention by default
    (they build here: CI has a compiler); ``native_kernels=False``, a build that fails, or
    native kernels whose logits differ from the library step's leave inductor's loops
    serving, the reason in the plan and its summary; every one decodes the library's tokens."""
    from vlm_ros.engines import native

    lm = tiny_phi()
    with torch.inference_mode():
        library = StaticDecoder(lm, 40, cpu_linear="torch", huge_pages=False)
        want, _ = greedy(library, _embeds(lm), 6)

        def decoded(**kwargs) -> regional_step.RegionPlan:
            decoder = StaticDecoder(lm, 40, cpu_linear="inductor", huge_pages=False, **kwargs)
            assert isinstance(decoder._fast, regional_step.RegionalStep), decoder.regions
            assert greedy(decoder, _embeds(lm), 6)[0] == want
            return decoder.regions

        ours = decoded()
        assert ours.native and ours.native_refused is None and ours.step.shape.native
        assert "on native GEMV and attention kernels" in ours.summary()
        off = decoded(native_kernels=False)
        assert not off.native and off.native_refused is None
        assert "on inductor's GEMV loops," in off.summary()
        monkeypatch.setattr(native, "load", lambda: "no C++ compiler here")
        failed = decoded()
        assert not failed.native and failed.native_refused == "no C++ compiler here"
        assert "inductor's GEMV loops (no C++ compiler here)" in failed.summary()
        monkeypatch.undo()
        wrong = native.attend_one  # a kernel that computes something else: caught at load
        monkeypatch.setattr(native, "attend_one", lambda *args: wrong(*args) * 2 + 1)
        differed = decoded()
    assert not differed.native
    assert differed.native_refused.startswith(
        "the logits of the compiled regions on the native kernels differ"
    ), differed.native_refused


def test_runtime_config_passes_native_kernels_to_the_decoder():
    from vlm_ros.config import RuntimeConfig
    from vlm_ros.infer.decode import make_decoder

    with torch.inference_mode():
        decoder = make_decoder(
            tiny_phi(), RuntimeConfig(cpu_linear="inductor", huge_pages=False, native_kernels=False)
        )
    assert decoder.native_kernels is False and not decoder.regions.native
