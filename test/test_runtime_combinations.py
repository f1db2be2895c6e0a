"""Every RuntimeConfig combination that can be set (dtype x vision backend x decoder x
quantize x CPU Linear kernels) on a tiny model: it either loads and then answers and ranks
consistently, or is refused at load with an error naming the setting. None may load and then
fail at the first request (dynamic int8 with a half-precision model once did). compile_decode
is covered in test_static_decode.py (slow to compile, so not multiplied here)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from tiny_models import tiny_checkpoint

from vlm_ros.config import RuntimeConfig
from vlm_ros.errors import InputError
from vlm_ros.infer.pipeline import Assistant

GRID = {
    "dtype": ["float32", "bfloat16", "float16"],
    "vision_backend": ["torch", "onnxruntime"],
    "decoder": ["static", "eager"],
    "quantize": ["none", "int8", "int8_weight_only"],
    "cpu_linear": ["auto", "torch"],
}
COMBINATIONS = [
    dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())
]


def _refusal(options: dict) -> str | None:
    """The words of the refusal a combination must get, or None if it must work."""
    if options["decoder"] == "eager" and options["quantize"] != "none":
        return "need decoder 'static'"
    if options["quantize"] == "int8" and options["dtype"] != "float32":
        return "needs dtype float32"
    if options["quantize"] == "int8_weight_only" and options["dtype"] == "float32":
        return "needs dtype bfloat16 or float16"
    return None


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("engines"))  # one ONNX export per precision, shared


@pytest.mark.parametrize("options", COMBINATIONS, ids=lambda o: "-".join(o.values()))
def test_combination_works_or_is_refused_at_load(options, engine_dir):
    runtime = RuntimeConfig(engine_dir=engine_dir, max_seq_len=256, **options)
    path = str(tiny_checkpoint("llava_phi"))
    refusal = _refusal(options)
    if refusal is not None:
        with pytest.raises(InputError, match=refusal):
            Assistant.load(path, runtime=runtime)
        return
    image = np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    with Assistant.load(path, runtime=runtime) as assistant:
        first = assistant.answer(image, "Is the path ahead clear?", max_new_tokens=4)
        hint = assistant.rank(image, "What should the robot do?", ["go", "stop", "turn left"])
        again = assistant.answer(image, "Is the path ahead clear?", max_new_tokens=4)
    assert len(first.token_ids) >= 1 and again.token_ids == first.token_ids
    assert abs(sum(hint.probabilities) - 1.0) < 1e-3 and hint.chosen in hint.actions
