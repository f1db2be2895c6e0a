"""Weight-only int8 (``quantize="int8_weight_only"``, engines/weight_int8.py): each layer within
int8-weight rounding of the half-precision Linear on both kernel paths, the float weights
released, float32 models refused by name, and on the trained demo model the same answers as
bf16 (a trained model is where weight rounding could flip a token; random tiny weights say
little)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compile_helpers import traced_ops
from torch import nn
from torch.nn import functional as F

from vlm_ros.config import RuntimeConfig
from vlm_ros.engines import weight_int8
from vlm_ros.engines.weight_int8 import PACKED_ROWS, WeightOnlyInt8Linear, quantize_weights
from vlm_ros.errors import InputError
from vlm_ros.infer.pipeline import Assistant


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, PACKED_ROWS + 1, 64])  # int8 kernel, then dequantize
def test_layer_within_weight_rounding(dtype, rows):
    generator = torch.Generator().manual_seed(rows)
    linear = nn.Linear(96, 160).to(dtype)
    x = torch.randn(rows, 96, generator=generator).to(dtype)
    quantized = WeightOnlyInt8Linear(linear)
    with torch.inference_mode():
        want = F.linear(x.float(), linear.weight.float(), linear.bias.float())
        got = quantized(x.unsqueeze(0)).float()[0]  # [1, rows, in]: leading dims kept
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()  # int8 weights + half rounding
    assert quantized.weight.dtype == torch.int8 and quantized.scales.shape == (160,)


def test_without_the_packed_kernel_the_dequantizing_form_is_used(monkeypatch):
    """Older torch (< 2.3) lacks ATen's _weight_int8pack_mm: same result, other kernel."""
    from vlm_ros.engines import weight_int8

    linear = nn.Linear(32, 48).to(torch.bfloat16)
    quantized = WeightOnlyInt8Linear(linear)
    x = torch.randn(1, 32).to(torch.bfloat16)
    with torch.inference_mode():
        packed = quantized(x).float()
        monkeypatch.setattr(weight_int8, "HAS_PACKED_KERNEL", False)
        monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", None, raising=False)
        fallback = quantized(x).float()
    torch.testing.assert_close(fallback, packed, atol=2e-2 * packed.abs().max().item(), rtol=0)


def test_quantize_releases_float_weights_and_refuses_float32_off_a_cpu():
    """bfloat16 anywhere; float32 on a CPU only (its decode step reads the int8 weights in
    inductor's loops, compiled step or compiled regions); float32 elsewhere is refused."""
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)).to(torch.bfloat16)
    assert quantize_weights(model) == 2
    assert not [p for p in model.parameters() if p.dtype != torch.bfloat16 or p.dim() > 1]
    assert all(isinstance(m, WeightOnlyInt8Linear) for m in (model[0], model[2]))
    assert quantize_weights(nn.Sequential(nn.Linear(4, 4))) == 1  # float32 on a CPU
    with pytest.raises(InputError, match="bfloat16 or float16.*float32 on meta.*only on a CPU"):
        quantize_weights(nn.Sequential(nn.Linear(4, 4, device="meta")))


@pytest.mark.parametrize("words", [False, True], ids=["bytes", "words"])
def test_float32_compiled_step_reads_int8_weights_in_its_own_loop(monkeypatch, words):
    """float32 with a compiled CPU step: traced with one row, the layer is one multiply-sum over
    the int8 bytes, or the int32 words taken apart with shifts, in the loop (no library GEMM,
    no dequantized copy of the weight), within int8-weight rounding of the float32 Linear;
    with several rows (a prefill) it dequantizes and multiplies."""
    if words:
        _words_everywhere(monkeypatch)
    linear = nn.Linear(96, 160)
    quantized = WeightOnlyInt8Linear(linear)
    one = torch.randn(1, 1, 96, generator=torch.Generator().manual_seed(7))
    ops, got = traced_ops(quantized, one)
    assert not any(op.split(".")[1] in ("mm", "addmm", "bmm", "_weight_int8pack_mm") for op in ops)
    assert quantized.planes == words
    assert {"aten.mul.Tensor", "aten.sum.dim_IntList"} <= ops, ops
    assert ("aten.__rshift__.Scalar" in ops) == words, ops
    with torch.inference_mode():
        want = F.linear(one, linear.weight, linear.bias)
        torch.testing.assert_close(got, quantized(one))  # uncompiled: dequantized, same maths
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()  # int8 weight rounding only
    ops, _ = traced_ops(quantized, torch.randn(1, 5, 96))  # a GEMM: torch's, or oneDNN's
    gemms = ("mm", "addmm", "bmm", "onednn_linear")
    assert any(op.split(".")[1] in gemms for op in ops), ops


@pytest.mark.parametrize("columns", [4, 96])
def test_the_word_layout_round_trips_and_sign_extends(columns):
    """Every int8 value, in every byte of a word: ``to_planes`` puts column j + p * in/4 in
    byte p of word j, ``from_planes`` gives back the same int8 matrix, and the shifts of
    ``gemv_planes`` read each byte as its signed value (eager, one row)."""
    generator = torch.Generator().manual_seed(columns)
    weight = torch.randint(-128, 128, (256, columns), generator=generator, dtype=torch.int8)
    weight[:, 0], weight[0, :] = torch.arange(-128, 128, dtype=torch.int8), -128
    words = weight_int8.to_planes(weight)
    quarter = columns // 4
    assert words.dtype == torch.int32 and words.shape == (256, quarter)
    assert torch.equal(weight_int8.from_planes(words), weight)
    as_bytes = words.view(torch.int8)  # [out, in] in the words' byte order
    assert torch.equal(as_bytes[:, 4 * (quarter - 1) + 3], weight[:, columns - 1])
    assert torch.equal(as_bytes[:, 1], weight[:, quarter])
    x = torch.randn(1, columns, generator=generator, dtype=torch.float64)
    want = x @ weight.double().T
    torch.testing.assert_close(weight_int8.gemv_planes(x, words), want)
    torch.testing.assert_close(weight_int8.planes_order(x) @ as_bytes.double().T, want)


def _words_everywhere(monkeypatch) -> None:
    """A float32 model's int8 weights as int32 words whatever torch's kernels here (as on
    AVX2 or Arm ones; this host's AVX-512 kernels keep bytes)."""
    monkeypatch.setattr(weight_int8, "WHOLE_BYTE_LOADS", ())


def test_float32_weights_are_words_except_on_avx512_kernels(monkeypatch):
    """Where torch's kernels are in WHOLE_BYTE_LOADS (AVX-512) a float32 model's layer keeps
    int8 bytes [out, in]; elsewhere int32 words [out, in/4]."""
    assert weight_int8.WHOLE_BYTE_LOADS == ("AVX512",)
    capability = torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(weight_int8, "WHOLE_BYTE_LOADS", (capability,))
    kept = WeightOnlyInt8Linear(nn.Linear(96, 8))
    assert not kept.planes and kept.weight.shape == (8, 96) and kept.weight.dtype == torch.int8
    monkeypatch.setattr(weight_int8, "WHOLE_BYTE_LOADS", ("NOT_" + capability,))
    words = WeightOnlyInt8Linear(nn.Linear(96, 8))
    assert words.planes and words.weight.shape == (8, 24) and words.weight.dtype == torch.int32


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_float32_layer_stores_words_and_computes_what_its_int8_weights_do(monkeypatch, rows):
    """A float32 model's layer on a CPU, as words: int32 words of four column planes (what
    inductor's AVX2 code reads a whole vector of); uncompiled, any number of rows, it computes
    what the int8 weights in nn.Linear's order compute, within float32 rounding, and those are
    the per-channel rounding of the float weights. A width that is not a multiple of 4, and a
    bfloat16 layer, keep plain int8 [out, in]."""
    _words_everywhere(monkeypatch)
    linear = nn.Linear(96, 160)
    quantized = WeightOnlyInt8Linear(linear)
    assert quantized.planes and quantized.weight.dtype == torch.int32
    assert quantized.weight.shape == (160, 24) and "int32 words" in repr(quantized)
    int8 = quantized.int8_weight()
    scales = quantized.scales
    rounded = torch.round(linear.weight.detach() / scales[:, None]).clamp(-127, 127)
    assert torch.equal(int8, rounded.to(torch.int8))
    x = torch.randn(2, rows, 96, generator=torch.Generator().manual_seed(rows))
    with torch.inference_mode():
        want = F.linear(x, int8.float()) * scales + linear.bias
        torch.testing.assert_close(quantized(x), want, atol=1e-5, rtol=1e-5)
    odd = WeightOnlyInt8Linear(nn.Linear(30, 8))
    assert not odd.planes and odd.weight.shape == (8, 30) and odd.weight.dtype == torch.int8
    half = WeightOnlyInt8Linear(nn.Linear(96, 8).to(torch.bfloat16))
    assert not half.planes and half.weight.dtype == torch.int8


@pytest.mark.parametrize("words", [False, True], ids=["bytes", "words"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled_step", "regions"])
def test_float32_decoder_with_int8_weights(monkeypatch, compiled, words):
    """quantize int8_weight_only on a float32 model (CPU), its weights int8 bytes or int32
    words: loads (the blocks quantized as they are read); compiled, the step passes its load
    check; uncompiled, the step runs as compiled regions reading the int8 weights
    (regional_step.py), never the per-token dequantizing form; either answers within the
    setting's fidelity threshold of the float32 reference on the tiny checkpoint."""
    if words:
        _words_everywhere(monkeypatch)
    from tiny_models import tiny_checkpoint

    from vlm_ros.infer import fidelity, regional_step

    path = str(tiny_checkpoint("llava_phi"))
    image = np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    question = "Is the path ahead clear?"
    with Assistant.load(path, runtime=RuntimeConfig(max_seq_len=256)) as plain:
        reference = plain.trace(image, question, max_new_tokens=8)
    runtime = RuntimeConfig(max_seq_len=256, quantize="int8_weight_only", compile_decode=compiled)
    with Assistant.load(path, runtime=runtime) as int8:
        decoder = int8.decoder
        if compiled:
            assert decoder.compiled and decoder.compile_refused is None
        else:
            assert isinstance(decoder._fast, regional_step.RegionalStep), decoder.regions
            assert decoder._fast.shape.int8 and decoder.regions.timings is None  # untimed
        assert not any(isinstance(m, nn.Linear) for m in decoder.lm.modules())
        layers = [m for m in decoder.lm.modules() if isinstance(m, WeightOnlyInt8Linear)]
        assert layers and all(m.planes == words for m in layers)
        trace = int8.trace(image, question, max_new_tokens=8)
    result = fidelity.compare(
        list(reference.answer.token_ids), reference.step_logits,
        list(trace.answer.token_ids), trace.step_logits, fidelity.threshold_for(runtime),
    )  # fmt: skip
    assert result.passed, result.as_dict()


def test_demo_model_answers_as_in_bf16():
    """The trained demo model in bf16 with and without int8 weights: the same answers and the
    same action hints on the first test scenes (eval-demo measures all 500)."""
    from vlm_ros.demo.evaluate import evaluate

    plain = Assistant.load("demo", runtime=RuntimeConfig(dtype="bfloat16"))
    int8 = Assistant.load(
        "demo", runtime=RuntimeConfig(dtype="bfloat16", quantize="int8_weight_only")
    )
    assert any(isinstance(m, WeightOnlyInt8Linear) for m in int8.decoder.lm.modules())
    a, b = evaluate(plain, n=12), evaluate(int8, n=12)
    assert b.accuracy() == a.accuracy() and min(a.accuracy().values()) >= 0.9
    plain.close()
    int8.close()


def test_eval_demo_float32_int8_weights_compiled(tmp_path):
    """`vlm-ros eval-demo --quantize int8_weight_only --compile` on a float32 trained demo
    model: every question type of the first test scenes right, as the float32 model gets them
    (eval-demo over all 500 is docs/performance.md's run)."""
    import json

    from vlm_ros.cli import main

    out = tmp_path / "eval.json"
    argv = ["eval-demo", "--n", "6", "--threads", "2", "--quantize", "int8_weight_only",
            "--compile", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    accuracy = json.loads(out.read_text())["accuracy"]
    assert accuracy and min(accuracy.values()) >= 0.9, accuracy


def test_settings_that_cannot_apply_are_refused_at_load():
    """Found by loading every RuntimeConfig combination on a tiny model: dynamic int8 with a
    half-precision model crashed at the first answer, and the eager decoder silently ignored
    quantize / compile_decode. Both are refused at load, naming the fix."""
    with pytest.raises(InputError, match="int8.*needs dtype float32.*int8_weight_only"):
        Assistant.load("demo", runtime=RuntimeConfig(dtype="bfloat16", quantize="int8"))
    for options in ({"quantize": "int8"}, {"compile_decode": True}):
        with pytest.raises(InputError, match="need decoder 'static'"):
            Assistant.load("demo", runtime=RuntimeConfig(decoder="eager", **options))


@pytest.mark.parametrize(
    "dtype,words,bias",
    [(torch.float32, False, True), (torch.float32, True, False), (torch.bfloat16, False, True)],
    ids=["float32-bytes", "float32-words", "bfloat16"],
)
def test_a_cpu_prefill_dequantizes_block_by_block_into_one_buffer(monkeypatch, dtype, words, bias):
    """Many rows on a CPU (a prefill): the weights are dequantized a block of rows at a time
    into this thread's buffer, made once; the result is the whole dequantized GEMM's, for
    bytes, words (the activations' columns in plane order) and bfloat16, with a ragged last
    block. Under autograd it keeps the whole copy (the buffer is overwritten per block)."""
    if words:
        _words_everywhere(monkeypatch)
    generator = torch.Generator().manual_seed(3)
    linear = nn.Linear(96, 160, bias=bias).to(dtype)
    quantized = WeightOnlyInt8Linear(linear)
    assert quantized.planes == words
    element = torch.finfo(dtype).bits // 8
    monkeypatch.setattr(weight_int8, "DEQUANT_BLOCK_BYTES", 48 * 96 * element)  # 48 rows: 4 blocks
    monkeypatch.setattr(weight_int8, "_scratch", __import__("threading").local())
    x = torch.randn(2, 20, 96, generator=generator).to(dtype)
    int8 = quantized.int8_weight().to(dtype)  # natural column order
    want = F.linear(x, int8) * quantized.scales + (linear.bias if bias else 0)
    blocks = []
    real = weight_int8.WeightOnlyInt8Linear._dequantized_blocks

    def spy(self, x):
        blocks.append(
            weight_int8._scratch.buffer.data_ptr()
            if hasattr(weight_int8._scratch, "buffer")
            else None
        )
        return real(self, x)

    monkeypatch.setattr(weight_int8.WeightOnlyInt8Linear, "_dequantized_blocks", spy)
    with torch.inference_mode():
        got = quantized(x)
    with torch.no_grad():  # the buffer, made in inference mode's call, is written here too
        again = quantized(x)
    buffer = weight_int8._scratch.buffer
    assert len(blocks) == 2 and blocks[1] == buffer.data_ptr()  # one buffer, made once
    assert buffer.numel() == 48 * 96 and buffer.dtype == dtype and not buffer.is_inference()
    assert got.shape == (2, 20, 160) and got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tolerance * want.abs().max().item(), rtol=0)
    torch.testing.assert_close(again, got, atol=0, rtol=0)
    whole = quantized(x)  # grad enabled: the whole dequantized copy, not the buffer
    assert len(blocks) == 2
    torch.testing.assert_close(whole, want, atol=tolerance * want.abs().max().item(), rtol=0)
