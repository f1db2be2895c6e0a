"""Every RuntimeConfig combination that can be set (dtype x vision backend x decoder x
quantize x CPU Linear kernels) on a tiny model: it either loads and then stays within its
documented threshold of the fp32 reference, or is refused at load with an error naming the
setting. None may load and then fail at the first request (dynamic int8 with a half-precision
model once did). compile_decode is covered in test_static_decode.py (slow to compile, so not
multiplied here).

The reference is the fp32 eager decoder on torch's own Linear kernels, which test_parity.py
holds to an independent implementation at 1e-4. The thresholds (one per dtype, quantization
and backend) are vlm_ros/infer/fidelity.py's, which the benchmark's JSON applies too. Each is
shown to catch a planted fault (the negative controls below), and on the demo model, whose
answers are sharp, every lossy setting must keep the per-type accuracy of the fp32 model.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_checkpoint

from vlm_ros.config import RuntimeConfig
from vlm_ros.demo.evaluate import evaluate
from vlm_ros.engines import ort_backend, weight_int8
from vlm_ros.errors import InputError
from vlm_ros.infer import fidelity
from vlm_ros.infer.pipeline import Assistant

GRID = {
    "dtype": ["float32", "bfloat16", "float16"],
    "vision_backend": ["torch", "onnxruntime"],
    "decoder": ["static", "eager"],
    "quantize": ["none", "int8", "int8_weight_only", "int4_weight_only"],
    "cpu_linear": ["auto", "torch"],
}
COMBINATIONS = [
    dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())
]
QUESTION = "Is the path ahead clear?"
CANDIDATES = ["go", "stop", "turn left"]
TOKENS = 12
IMAGE = np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)


def _refusal(options: dict) -> str | None:
    """The words of the refusal a combination must get, or None if it must work."""
    if options["decoder"] == "eager" and options["quantize"] != "none":
        return "need decoder 'static'"
    if options["quantize"] == "int8" and options["dtype"] != "float32":
        return "needs dtype float32"
    if options["quantize"] == "int4_weight_only" and options["dtype"] == "float16":
        return "on CPU needs dtype float32 or bfloat16"
    return None


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("engines"))  # one ONNX export per precision, shared


@pytest.fixture(scope="module")
def reference():
    """(trace, action hint) of the fp32 reference setting on the shared tiny checkpoint."""
    runtime = RuntimeConfig(max_seq_len=256, decoder="eager", cpu_linear="torch")
    with Assistant.load(str(tiny_checkpoint("llava_phi")), runtime=runtime) as assistant:
        return assistant.trace(IMAGE, QUESTION, max_new_tokens=TOKENS), assistant.rank(
            IMAGE, "What should the robot do?", CANDIDATES
        )


def fidelity_of(assistant: Assistant, reference_trace) -> fidelity.Fidelity:
    trace = assistant.trace(IMAGE, QUESTION, max_new_tokens=TOKENS)
    return fidelity.compare(
        list(reference_trace.answer.token_ids),
        reference_trace.step_logits,
        list(trace.answer.token_ids),
        trace.step_logits,
        fidelity.threshold_for(assistant.runtime),
    )


@pytest.mark.parametrize("options", COMBINATIONS, ids=lambda o: "-".join(o.values()))
def test_combination_matches_the_reference_or_is_refused_at_load(options, engine_dir, reference):
    runtime = RuntimeConfig(engine_dir=engine_dir, max_seq_len=256, **options)
    path = str(tiny_checkpoint("llava_phi"))
    refusal = _refusal(options)
    if refusal is not None:
        with pytest.raises(InputError, match=refusal):
            Assistant.load(path, runtime=runtime)
        return
    ref_trace, ref_hint = reference
    with Assistant.load(path, runtime=runtime) as assistant:
        measured = fidelity_of(assistant, ref_trace)
        hint = assistant.rank(IMAGE, "What should the robot do?", CANDIDATES)
        first = assistant.answer(IMAGE, QUESTION, max_new_tokens=4)
        again = assistant.answer(IMAGE, QUESTION, max_new_tokens=4)
    assert measured.passed, measured.as_dict()
    assert len(first.token_ids) >= 1 and again.token_ids == first.token_ids
    assert hint.actions == ref_hint.actions and abs(sum(hint.probabilities) - 1.0) < 1e-3
    if measured.threshold.min_agreement == 1.0:  # lossless: the same ranking, to rounding
        gaps = [abs(a - b) for a, b in zip(hint.probabilities, ref_hint.probabilities, strict=True)]
        assert max(gaps) < 1e-4 and hint.chosen == ref_hint.chosen, (hint, ref_hint)


def test_every_setting_has_a_threshold():
    keys = {k for o in COMBINATIONS for k in fidelity.threshold_keys(RuntimeConfig(**o))}
    assert keys <= set(fidelity.THRESHOLDS), keys - set(fidelity.THRESHOLDS)
    bf16_ort = RuntimeConfig(dtype="bfloat16", vision_backend="onnxruntime")
    assert fidelity.threshold_for(bf16_ort).max_logit_error == 0.1  # the loosest applies


# ---- negative controls: each threshold catches a planted fault ---------------------------------


def _roll_ort_projector(assistant: Assistant, engine_dir: str) -> None:
    """An ONNX Runtime vision stage whose projector output channels are off by one (a wrong
    weight layout in an export): the graph exported from a copy with that weight rolled."""
    bad = copy.deepcopy(assistant.model).float()
    with torch.no_grad():
        bad.projector[2].weight.copy_(bad.projector[2].weight.roll(1, 0))
    path = ort_backend.ensure_onnx(bad, Path(engine_dir) / "planted", "fp32")
    cpu = ["CPUExecutionProvider"]
    assistant.encoder = ort_backend.OrtVisionEncoder(assistant.model, path, cpu)


def _roll_weight_only_scales(assistant: Assistant, engine_dir: str) -> None:
    """Weight-only int8 whose per-channel scales are off by one channel."""
    for module in assistant.model.modules():
        if isinstance(module, weight_int8.WeightOnlyInt8Linear):
            module.scales.copy_(module.scales.roll(1))


def _double_dynamic_int8_scales(assistant: Assistant, engine_dir: str) -> None:
    """Dynamic int8 whose weights are dequantized with twice their scale."""
    patched = 0
    lm = getattr(assistant.decoder, "lm", assistant.model)  # the quantized copy the decoder runs
    for module in lm.modules():
        if hasattr(module, "set_weight_bias") and hasattr(module, "weight"):
            w = module.weight()
            if w.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                wrong = torch._make_per_tensor_quantized_tensor(
                    w.int_repr(), w.q_scale() * 2, w.q_zero_point()
                )
            else:
                wrong = torch._make_per_channel_quantized_tensor(
                    w.int_repr(),
                    w.q_per_channel_scales() * 2,
                    w.q_per_channel_zero_points(),
                    w.q_per_channel_axis(),
                )
            module.set_weight_bias(wrong, module.bias())
            patched += 1
    assert patched, "no dynamic int8 Linear found to plant the fault in"


PLANTED = {
    "float32-onnxruntime": ({"vision_backend": "onnxruntime"}, _roll_ort_projector),
    "float16-onnxruntime": (
        {"dtype": "float16", "vision_backend": "onnxruntime"},
        _roll_ort_projector,
    ),
    "bfloat16-onnxruntime": (
        {"dtype": "bfloat16", "vision_backend": "onnxruntime"},
        _roll_ort_projector,
    ),
    "bfloat16-int8_weight_only": (
        {"dtype": "bfloat16", "quantize": "int8_weight_only"},
        _roll_weight_only_scales,
    ),
    "float16-int8_weight_only": (
        {"dtype": "float16", "quantize": "int8_weight_only"},
        _roll_weight_only_scales,
    ),
    "int8": ({"quantize": "int8"}, _double_dynamic_int8_scales),
}


@pytest.mark.parametrize("name", list(PLANTED))
def test_threshold_catches_a_planted_fault(name, engine_dir, reference):
    """The same setting passes (test above) and, with the fault planted, fails its threshold
    by at least 2x (measured: rolled projector 0.22-0.24 of the logit range; rolled
    weight-only scales 0.34; doubled dynamic int8 scales 0.66)."""
    options, plant = PLANTED[name]
    runtime = RuntimeConfig(engine_dir=engine_dir, max_seq_len=256, **options)
    with Assistant.load(str(tiny_checkpoint("llava_phi")), runtime=runtime) as assistant:
        plant(assistant, engine_dir)
        measured = fidelity_of(assistant, reference[0])
    assert not measured.passed
    assert measured.logit_error > 2 * measured.threshold.max_logit_error, measured.as_dict()


# ---- the demo model: per-type accuracy, where the lossy settings are judged by meaning ---------

DEMO_SETTINGS = {
    "bfloat16": {"dtype": "bfloat16"},
    "float16": {"dtype": "float16"},
    "int8": {"quantize": "int8"},
    "bfloat16-int8_weight_only": {"dtype": "bfloat16", "quantize": "int8_weight_only"},
    "onnxruntime": {"vision_backend": "onnxruntime"},
}
DEMO_SCENES = 20


@pytest.mark.parametrize("name", list(DEMO_SETTINGS))
def test_demo_model_keeps_its_accuracy_per_question_type(name, engine_dir):
    runtime = RuntimeConfig(engine_dir=engine_dir, **DEMO_SETTINGS[name])
    with Assistant.load("demo", runtime=runtime) as assistant:
        report = evaluate(assistant, n=DEMO_SCENES)
    low = {k: v for k, v in report.accuracy().items() if v < fidelity.DEMO_MIN_ACCURACY}
    assert len(report.total) >= 5 and not low, (low, report.errors)


def test_demo_accuracy_catches_wrong_int8_scales(engine_dir):
    """Negative control of the check above: rolled weight-only scales fall below the bar."""
    runtime = RuntimeConfig(dtype="bfloat16", quantize="int8_weight_only")
    with Assistant.load("demo", runtime=runtime) as assistant:
        _roll_weight_only_scales(assistant, engine_dir)
        report = evaluate(assistant, n=DEMO_SCENES)
    assert min(report.accuracy().values()) < fidelity.DEMO_MIN_ACCURACY, report.accuracy()
