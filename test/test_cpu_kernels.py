"""oneDNN float32 Linear on x86 CPUs (engines/cpu_kernels.py): same results as F.linear within
float32 rounding, the weights shared rather than copied, the model's own modules untouched, and
the static decoder using it by default on AMD CPUs (greedy parity with the eager reference is in
test_static_decode.py / test_parity.py, which run with it)."""

from __future__ import annotations

import platform

import pytest
import torch
from compile_helpers import traced_ops
from decode_helpers import greedy, tiny_phi
from tiny_models import tiny_checkpoint
from torch import nn
from torch.nn import functional as F

from vlm_ros.config import RuntimeConfig
from vlm_ros.engines import cpu_kernels
from vlm_ros.engines.cpu_kernels import (
    OneDnnLinear,
    onednn_linear_available,
    share_weights_copy,
    use_onednn_linear,
    wants_onednn,
)
from vlm_ros.infer.static_decode import StaticDecoder
from vlm_ros.infer.vision import TorchVisionEncoder
from vlm_ros.model.checkpoint import load_checkpoint
from vlm_ros.timing import StageTimer

X86 = platform.machine().lower() in ("x86_64", "amd64")


def test_available_on_x86_builds_of_torch():
    """Every x86 torch wheel ships oneDNN; if this fails, the fast path silently lost ~2x."""
    assert onednn_linear_available() == (X86 and torch.backends.mkldnn.is_available())


@pytest.mark.skipif(not X86, reason="oneDNN's linear is used on x86-64 only")
@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (2, 5, 64)])
def test_same_as_f_linear_within_float32_rounding(shape):
    generator = torch.Generator().manual_seed(1)
    linear = nn.Linear(64, 96)
    x = torch.randn(*shape, generator=generator)
    with torch.inference_mode():
        want = F.linear(x, linear.weight, linear.bias)
        got = OneDnnLinear(linear)(x)
        strided = OneDnnLinear(linear)(x.transpose(0, -1).contiguous().transpose(0, -1))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(strided, want, atol=1e-5, rtol=1e-5)


def test_other_dtypes_go_through_f_linear_exactly():
    linear = nn.Linear(16, 8).to(torch.bfloat16)
    x = torch.randn(3, 16).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(OneDnnLinear(linear)(x), F.linear(x, linear.weight, linear.bias))


@pytest.mark.skipif(not X86, reason="oneDNN's linear is used on x86-64 only")
def test_swap_shares_weights_and_keeps_the_original_tree():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Sequential(nn.Linear(8, 4)))
    keys = list(model.state_dict())
    copy = share_weights_copy(model)
    assert use_onednn_linear(copy) == 2
    assert [type(m) for m in model.modules()].count(nn.Linear) == 2  # original untouched
    assert isinstance(copy[0], OneDnnLinear) and isinstance(copy[2][0], OneDnnLinear)
    assert copy[0].weight is model[0].weight and copy[2][0].bias is model[2][0].bias
    assert list(copy.state_dict()) == keys


def test_mode_choice():
    assert not wants_onednn("torch", "cpu", torch.float32)
    assert not wants_onednn("auto", "cpu", torch.bfloat16)  # torch's bf16 is oneDNN already
    assert not wants_onednn("auto", "cuda", torch.float32)
    assert wants_onednn("onednn", "cpu", torch.float32) == onednn_linear_available()
    amd = cpu_kernels.cpu_vendor() in cpu_kernels.AMD_VENDORS
    assert wants_onednn("auto", "cpu", torch.float32) == (amd and onednn_linear_available())
    with pytest.raises(ValueError, match="cpu_linear"):
        wants_onednn("mkl", "cpu", torch.float32)


@pytest.mark.parametrize(
    ("vendor", "auto_picks_onednn"),
    [("AuthenticAMD", True), ("HygonGenuine", True), ("GenuineIntel", False), ("", False)],
)
def test_auto_picks_onednn_on_amd_cpus_only(monkeypatch, vendor, auto_picks_onednn):
    """MKL is the slow float32 kernel on AMD CPUs and the fast one on Intel's (measured both,
    docs/performance.md); an unknown vendor (Arm: no vendor_id) keeps torch's default."""
    monkeypatch.setattr(cpu_kernels, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(cpu_kernels, "onednn_linear_available", lambda: True)
    assert wants_onednn("auto", "cpu", torch.float32) is auto_picks_onednn
    assert wants_onednn("onednn", "cpu", torch.float32)  # asked for: any x86 CPU


def test_cpu_vendor_reads_this_machine():
    vendor = cpu_kernels.cpu_vendor()
    assert isinstance(vendor, str)
    if X86 and platform.system() == "Linux":
        assert vendor in ("GenuineIntel", *cpu_kernels.AMD_VENDORS), vendor


@pytest.mark.skipif(not X86, reason="oneDNN's linear is used on x86-64 only")
def test_static_decoder_uses_it_and_leaves_the_model_alone():
    lm = load_checkpoint(tiny_checkpoint("llava_phi")).model.language_model
    fast = StaticDecoder(lm, 64, cpu_linear="onednn")
    reference = StaticDecoder(lm, 64, cpu_linear="torch")
    swapped = [m for m in fast.lm.modules() if isinstance(m, OneDnnLinear)]
    assert len(swapped) == sum(isinstance(m, nn.Linear) for m in lm.modules()) > 0
    assert not any(isinstance(m, OneDnnLinear) for m in lm.modules())
    assert reference.lm is lm
    embeds = torch.randn(1, 9, lm.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(fast.prefill(embeds), reference.prefill(embeds), atol=1e-4,
                                   rtol=0)  # fmt: skip


def test_unavailable_op_means_plain_linear(monkeypatch):
    """Where the private op is missing (another torch), nothing is swapped and nothing fails."""
    monkeypatch.setattr(cpu_kernels, "onednn_linear_available", lambda: False)
    model = nn.Sequential(nn.Linear(4, 4))
    assert use_onednn_linear(model) == 0 and type(model[0]) is nn.Linear


@pytest.mark.parametrize("family", ["llava_phi", "mipha_phi"])  # CLIP and SigLIP towers
def test_torch_vision_backend_kernels(family):
    """The node's default vision backend: the model's own vision modules as VisionStage, float32
    Linear through oneDNN on x86 (within float32 rounding of encode_images, the model's modules
    untouched), and with cpu_linear="torch" the exact bits of encode_images."""
    model = load_checkpoint(tiny_checkpoint(family)).model
    size = int(model.vision_config.image_size)
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    fast = TorchVisionEncoder(model, RuntimeConfig(cpu_linear="onednn"))
    exact = TorchVisionEncoder(model, RuntimeConfig(cpu_linear="torch"))
    timer = StageTimer("cpu")
    with torch.inference_mode():
        want = model.encode_images(pixels)
        got = fast.encode(pixels, timer)
        assert torch.equal(exact.encode(pixels, StageTimer("cpu")), want)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert {"vision", "projector"} <= set(timer.milliseconds())
    swapped = sum(isinstance(m, OneDnnLinear) for m in fast.stage.modules())
    assert (swapped > 0) == onednn_linear_available()
    assert not any(isinstance(m, OneDnnLinear) for m in model.modules())
    assert not any(isinstance(m, OneDnnLinear) for m in exact.stage.modules())


# ---- the compiled decode step's Linear layers ----------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_compiled_one_row_linear_is_a_reduction_not_a_library_call(bias):
    """InductorGemvLinear traced with a one-row float32 input is a multiply and a sum, which
    inductor fuses into one loop reading the weight once (the point of it: measured 1.8x on
    an AMD CPU's decode step); traced with several rows (a prefill) it stays a GEMM. The values
    are F.linear's within float32 rounding either way, and uncompiled it is F.linear itself."""
    linear = nn.Linear(64, 96, bias=bias)
    gemv = cpu_kernels.InductorGemvLinear(linear, onednn=False)
    assert list(gemv.state_dict()) == list(linear.state_dict())
    assert gemv.weight is linear.weight
    one = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(3))
    ops, got = traced_ops(gemv, one)
    assert not any(name.split(".")[1] in ("mm", "addmm", "bmm", "linear") for name in ops), ops
    assert {"aten.mul.Tensor", "aten.sum.dim_IntList"} <= ops, ops
    with torch.inference_mode():
        want = F.linear(one, linear.weight, linear.bias)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(gemv(one), want)  # uncompiled: the library call
    many = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(4))
    ops, got = traced_ops(gemv, many)
    assert any(name.split(".")[1] in ("mm", "addmm", "bmm") for name in ops), ops
    with torch.inference_mode():
        torch.testing.assert_close(got, F.linear(many, linear.weight, linear.bias))


@pytest.mark.skipif(not X86, reason="oneDNN's linear is used on x86-64 only")
def test_compiled_onednn_linear_is_one_opaque_call():
    """Compiled, OneDnnLinear (and InductorGemvLinear's prefill on AMD) calls oneDNN through
    vlm_ros::onednn_linear: inductor cannot lower mkldnn's own op on a weight it did not pack
    (it asserted; before, cpu_linear=onednn was dropped when compiling, leaving MKL)."""
    linear = nn.Linear(64, 96)
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(5))
    for module in (OneDnnLinear(linear), cpu_kernels.InductorGemvLinear(linear, onednn=True)):
        ops, got = traced_ops(module, x)
        assert "vlm_ros.onednn_linear.default" in ops, ops
        with torch.inference_mode():
            torch.testing.assert_close(got, F.linear(x, linear.weight, linear.bias))


@pytest.mark.parametrize(
    ("mode", "vendor", "expected"),
    [
        ("auto", "AuthenticAMD", True),
        ("auto", "GenuineIntel", False),  # MKL's compiled step measured there; this not
        ("auto", "", False),
        ("inductor", "GenuineIntel", True),
        ("inductor", "", True),  # any CPU when asked for
        ("onednn", "AuthenticAMD", False),
        ("torch", "AuthenticAMD", False),
    ],
)
def test_who_gets_inductor_gemvs(monkeypatch, mode, vendor, expected):
    monkeypatch.setattr(cpu_kernels, "cpu_vendor", lambda: vendor)
    assert cpu_kernels.wants_inductor_gemv(mode, "cpu", torch.float32) is expected
    assert not cpu_kernels.wants_inductor_gemv(mode, "cpu", torch.bfloat16)
    assert not cpu_kernels.wants_inductor_gemv(mode, "cuda", torch.float32)


def test_inductor_mode_needs_the_static_decoder():
    """cpu_linear='inductor' shapes the static decoder's step (compiled, or uncompiled as
    compiled regions or per-shape GEMVs: test_regional_step.py, test_eager_gemv.py); the eager
    reference refuses it at load, naming the setting, not
    silently ignoring it."""
    from vlm_ros.errors import InputError
    from vlm_ros.infer.decode import make_decoder

    lm = load_checkpoint(tiny_checkpoint("llava_phi")).model.language_model
    runtime = RuntimeConfig(decoder="eager", cpu_linear="inductor", max_seq_len=64)
    with pytest.raises(InputError, match="cpu_linear='inductor'"):
        make_decoder(lm, runtime)
    runtime = RuntimeConfig(decoder="static", cpu_linear="inductor", max_seq_len=64)
    decoder = make_decoder(lm, runtime)
    assert decoder.regions is not None and decoder.regions.refused is None, decoder.regions


class _Attention(nn.Module):
    """What reduction_attention reads from transformers' attention module: nothing but this."""

    num_key_value_groups = 1
    is_causal = True
    training = False


@pytest.mark.parametrize("kv_heads", [4, 2])  # grouped-query heads read their keys in place
@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
def test_reduction_attention_traced_is_sdpa_without_the_library_call(kv_heads, mask):
    """The compiled decode step's attention on a CPU (cpu_kernels.reduction_attention): traced
    for one query it is multiplies, sums and a softmax, no SDPA kernel, and computes what
    transformers' SDPA computes, masked slots of the static cache included; a prefill's
    several queries and uncompiled calls are SDPA itself."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    generator = torch.Generator().manual_seed(6)
    module = _Attention()
    module.num_key_value_groups = 4 // kv_heads
    query = torch.randn(1, 4, 1, 16, generator=generator)
    key = torch.randn(1, kv_heads, 24, 16, generator=generator)
    value = torch.randn(1, kv_heads, 24, 16, generator=generator)
    seen = torch.arange(24) < 17  # the live slots of a longer static cache
    masks = {"none": None, "bool": seen.view(1, 1, 1, 24),
             "additive": torch.where(seen, 0.0, float("-inf")).view(1, 1, 1, 24)}  # fmt: skip
    attention_mask = masks[mask]

    class Step(nn.Module):
        def forward(self, q):
            out, _ = cpu_kernels.reduction_attention(
                module, q, key, value, attention_mask, scaling=0.25
            )
            return out

    ops, got = traced_ops(Step(), query)
    assert not any("scaled_dot_product" in name for name in ops), ops
    assert {"aten.mul.Tensor", "aten.sum.dim_IntList"} <= ops, ops
    with torch.inference_mode():
        want, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=0.25)
        assert got.shape == want.shape == (1, 1, 4, 16)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        uncompiled, _ = cpu_kernels.reduction_attention(module, query, key, value, attention_mask,
                                                        scaling=0.25)  # fmt: skip
        assert torch.equal(uncompiled, want)
    prefill = torch.randn(1, 4, 3, 16, generator=generator)
    ops, _ = traced_ops(Step(), prefill)  # several queries: SDPA
    assert any("scaled_dot_product" in name for name in ops), ops


def test_compiled_cpu_step_uses_the_reduction_attention_and_matches_the_uncompiled_one():
    """A compiled CPU decoder points its copy of the model at reduction_attention (the model's
    own modules keep SDPA) and, on grouped-query heads with cache slots past the live ones,
    decodes the uncompiled step's greedy tokens with logits within float32 rounding."""
    lm = tiny_phi(num_key_value_heads=2)
    embeds = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        compiled = StaticDecoder(lm, 40, compile=True, cpu_linear="inductor")
        assert compiled.compiled, compiled.compile_refused
        assert compiled.lm.config._attn_implementation == cpu_kernels.REDUCTION_ATTENTION
        assert lm.config._attn_implementation == "sdpa"
        plain = StaticDecoder(lm, 40)
        runs = [greedy(decoder, embeds, 12) for decoder in (compiled, plain)]
    assert runs[0][0] == runs[1][0]
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=1e-4, rtol=0)


def test_cpuinfo_reads_the_first_processor_of_x86_and_arm(tmp_path):
    """Every reader of the CPU (the inductor cache's kind, the kernel choice by vendor, the
    benchmarks' machine record) goes through engines/cpuinfo.py, so they cannot disagree."""
    from vlm_ros.engines import cpuinfo

    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\n"
        "flags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\nmodel name\t: another\n"
    )
    assert cpuinfo.vendor(x86) == "AuthenticAMD"
    assert cpuinfo.model_name(x86) == "AMD EPYC 9R14"
    assert cpuinfo.flags(x86) == {"fpu", "avx2", "avx512f"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd\n\nHardware\t: x\n")
    assert cpuinfo.vendor(arm) == "" and cpuinfo.flags(arm) == {"fp", "asimd"}
    assert cpuinfo.model_name(arm) == (platform.processor() or platform.machine())
    absent = tmp_path / "absent"
    assert cpuinfo.fields(absent) == {} and cpuinfo.flags(absent) == frozenset()
    if X86 and platform.system() == "Linux":  # this machine, read the same way as before
        assert cpuinfo.vendor() == cpu_kernels.cpu_vendor() and "sse2" in cpuinfo.flags()
