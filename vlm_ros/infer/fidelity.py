"""How close a runtime setting must stay to the float32 reference: one threshold per dtype,
quantization and vision backend, used by the tests (test/test_runtime_combinations.py) and by
the benchmark's JSON (each variant records its verdict), so both judge by the same numbers.

The comparison is teacher-free and fair: both runs decode greedily from the same image and
prompt. Up to and including the first step where the greedy tokens differ, both runs saw the
same inputs, so their logits there are comparable; later steps are not compared.

  logit_error: max |logits - reference| over those steps and the vocabulary, divided by the
    reference's first-step logit range (max - min), so it reads the same for tiny random
    models (logits O(1)) and real ones (O(10)).
  greedy_prefix_agreement: the share of the reference's greedy tokens matched before the first
    difference.

A setting is judged by the loosest threshold of what it uses (its dtype, its quantization, its
vision backend): float32 ONNX Runtime with a bfloat16 decoder is held to bfloat16's bound.
The bounds were measured on the tiny checkpoints (every combination, docs/TESTS.md) and set
with room for noise; each is also shown to catch a planted fault (a wrong weight in an ONNX
Runtime stage, int8 weights with wrong scales), which lies well above it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_ros.config import RuntimeConfig


@dataclass(frozen=True)
class Threshold:
    """The bound one dtype / quantization / backend is held to (see the module docstring)."""

    max_logit_error: float  # over the reference's logit range
    min_agreement: float  # greedy prefix agreement, 0..1
    why: str


# Measured on the tiny checkpoints, every combination against the fp32 eager reference
# (docs/TESTS.md): fp32 kernels/decoders/ONNX Runtime <= 2e-6; fp16 ~8e-3; bf16 3-4e-2;
# weight-only int8 4-6e-2; dynamic int8 ~0.17; weight-only int4 0.19-0.36 (float32 and bf16
# models; 4 bits are ~8% rounding noise per layer, and the tiny random models' logit range is
# ~4, so that noise is a large share of it). Each bound leaves room over those.
# Greedy agreement is bound only where it means something on random weights: the tiny models'
# logits are nearly flat (range ~4 over 512 tokens), so in bf16 or int8 a near-tie flips even
# the first token and everything after it differs. Lossless settings must agree fully; the
# lossy ones are bound by logit error here and by per-type accuracy on the demo model, whose
# answers are sharp (DEMO_MIN_ACCURACY).
THRESHOLDS: dict[str, Threshold] = {
    "float32": Threshold(1e-4, 1.0, "same arithmetic, other kernels or decoder: rounding order"),
    "onnxruntime": Threshold(1e-4, 1.0, "fp32 graph on the CPU provider: rounding order"),
    "float16": Threshold(0.02, 0.0, "11-bit mantissa; the tiny models stay far from overflow"),
    "bfloat16": Threshold(0.1, 0.0, "8-bit mantissa weights and activations"),
    "int8_weight_only": Threshold(0.12, 0.0, "int8 weights, per-channel scales, half maths"),
    "int8": Threshold(0.3, 0.0, "dynamic int8: per-tensor weight scales, activations per call"),
    "int4_weight_only": Threshold(0.5, 0.0, "int4 weights, a scale and zero per 32, bf16 maths"),
}
# Exact-match accuracy per question type of the demo model (models/demo) that every setting must
# keep on a test slice: the same bar as the shipped fp32 model's (test_demo.MIN_SLICE).
DEMO_MIN_ACCURACY = 0.9


def threshold_keys(runtime: RuntimeConfig) -> list[str]:
    """The THRESHOLDS entries a setting is subject to (dtype None is the CPU default, fp32)."""
    keys = [runtime.dtype or "float32"]
    if runtime.quantize != "none":
        keys.append(runtime.quantize)
    if runtime.vision_backend != "torch":
        keys.append(runtime.vision_backend)
    return keys


def threshold_for(runtime: RuntimeConfig) -> Threshold:
    """The loosest of the setting's thresholds (TensorRT has none here: never run)."""
    found = [THRESHOLDS[k] for k in threshold_keys(runtime) if k in THRESHOLDS]
    return Threshold(
        max(t.max_logit_error for t in found),
        min(t.min_agreement for t in found),
        "; ".join(t.why for t in found),
    )


@dataclass(frozen=True)
class Fidelity:
    """One setting's measured distance from the reference, and its verdict."""

    greedy_prefix_agreement: float
    logit_error: float
    first_token_equal: bool
    threshold: Threshold

    @property
    def passed(self) -> bool:
        t = self.threshold
        return self.logit_error <= t.max_logit_error and self.greedy_prefix_agreement >= (
            t.min_agreement
        )

    def as_dict(self) -> dict:
        return {
            "greedy_prefix_agreement": self.greedy_prefix_agreement,
            "logit_error_over_range": self.logit_error,
            "first_token_equal": self.first_token_equal,
            "max_logit_error": self.threshold.max_logit_error,
            "min_agreement": self.threshold.min_agreement,
            "passed": self.passed,
        }


def prefix_agreement(reference: list[int], other: list[int]) -> float:
    """Share of ``reference`` that ``other`` matches before the first difference."""
    same = 0
    for a, b in zip(reference, other, strict=False):
        if a != b:
            break
        same += 1
    return same / max(len(reference), 1)


def compare(
    ref_tokens: list[int],
    ref_logits: torch.Tensor,  # [T, V]
    tokens: list[int],
    logits: torch.Tensor,  # [T', V]
    threshold: Threshold,
) -> Fidelity:
    """Measure ``tokens``/``logits`` against the reference's (module docstring)."""
    agreement = prefix_agreement(ref_tokens, tokens)
    same = round(agreement * max(len(ref_tokens), 1))
    steps = min(same + 1, len(ref_logits), len(logits))  # the steps with the same inputs
    ref, got = ref_logits[:steps].float().cpu(), logits[:steps].float().cpu()
    spread = float(ref[0].max() - ref[0].min()) or 1.0
    error = float((got - ref).abs().max()) / spread
    return Fidelity(agreement, error, tokens[:1] == ref_tokens[:1], threshold)


def compiled_step_problem(
    compiled: torch.Tensor,
    reference: torch.Tensor,
    dtype: torch.dtype,
    what: str = "the compiled decode step",
) -> str | None:
    """Why the compiled step's logits are not the uncompiled step's on the same input, or None.
    Allowed: float32 rounding (1e-3 of the logit range; measured ~1e-6 on CPU) or, in half
    precision, the reordered sums of fused kernels (5e-2 of the range). A miscompile is far
    outside either (whole logits off, or NaN). ``what`` names the compiled step in the reason
    (the regions are one too)."""
    if not torch.isfinite(compiled).all():
        return f"{what} returned non-finite logits (the uncompiled step did not)"
    share = 1e-3 if dtype == torch.float32 else 5e-2
    scale = (reference.max() - reference.min()).item()
    gap = (compiled - reference).abs().max().item()
    if gap > share * scale:
        return (
            f"the logits of {what} differ from the uncompiled step's by {gap:.3g} "
            f"(allowed {share:g} of the logit range, {share * scale:.3g})"
        )
    return None
