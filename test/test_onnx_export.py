"""ONNX export of the vision stage: ONNX Runtime matches the PyTorch stage within the stated
tolerance (tiny CLIP and tiny SigLIP, fp32 and fp16), every operator is one the TensorRT ONNX
parser supports, the graph is static, the onnxruntime backend serves the pipeline."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from tiny_models import FAMILIES, tiny_checkpoint

from vlm_ros.config import RuntimeConfig
from vlm_ros.engines.onnx_export import (
    TENSORRT_SUPPORTED_OPS,
    TOLERANCE,
    check_against_torch,
    export_and_check,
    graph_ops,
    unsupported_ops,
)
from vlm_ros.errors import VlmError
from vlm_ros.infer.pipeline import Assistant
from vlm_ros.model.checkpoint import load_checkpoint
from vlm_ros.model.vision_stage import VisionStage, layers_needed


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return load_checkpoint(tiny_checkpoint(request.param)).model


def test_vision_stage_equals_full_tower(model):
    """Running only the needed layers changes nothing (exactly)."""
    stage = VisionStage(model).eval()
    size = model.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(stage(pixels), model.encode_images(pixels), rtol=0, atol=0)


def test_layers_needed():
    assert layers_needed(24, -2) == 23  # CLIP-L, penultimate
    assert layers_needed(26, -1) == 26  # legacy TinyLLaVA's truncated SigLIP
    assert layers_needed(27, 5) == 5
    with pytest.raises(VlmError):
        layers_needed(2, -4)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_export_matches_torch_and_tensorrt_ops(model, precision, tmp_path):
    report = export_and_check(model, tmp_path / f"v_{precision}.onnx", precision)
    assert report.max_rel_error is not None
    assert report.max_rel_error <= TOLERANCE[precision]
    assert set(report.ops) <= TENSORRT_SUPPORTED_OPS
    assert unsupported_ops(report.path) == []
    loaded = onnx.load(report.path)
    onnx.checker.check_model(loaded)
    assert report.opset == 17
    (inp,) = loaded.graph.input
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == [1, 3, model.vision_config.image_size, model.vision_config.image_size]
    (out,) = loaded.graph.output
    dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
    assert dims == [1, model.num_image_tokens, model.text_config.hidden_size]
    elem = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
    assert inp.type.tensor_type.elem_type == elem


def test_half_precision_model_is_checked_against_its_fp32_copy(tmp_path):
    """A GPU run exports from a bf16 model: the parity check must compare with the stage in
    fp32 (bf16 itself is ~1e-2 off on the full-size towers, the whole fp16 tolerance)."""
    import copy

    bf16 = copy.deepcopy(load_checkpoint(tiny_checkpoint("llava_phi")).model).to(torch.bfloat16)
    fp32 = copy.deepcopy(bf16).to(torch.float32)  # the same weights, exactly
    path = export_and_check(bf16, tmp_path / "v.onnx", "fp16").path
    assert check_against_torch(bf16, path, "fp16") == check_against_torch(fp32, path, "fp16")
    assert next(bf16.parameters()).dtype == torch.bfloat16  # the caller's model is left as is


def test_unsupported_operator_is_reported(tmp_path):
    """A graph with an op outside the list (Unique) and a bicubic Resize is refused."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    scales = helper.make_tensor("s", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    graph = helper.make_graph(
        [
            helper.make_node("Resize", ["x", "", "s"], ["y"], mode="cubic"),
            helper.make_node("Unique", ["x"], ["z"]),
        ],
        "g", [x], [y, z], [scales],
    )  # fmt: skip
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert "Unique" in graph_ops(path)
    bad = unsupported_ops(path)
    assert "Unique" in bad and any(b.startswith("Resize(mode=cubic") for b in bad)


def test_parity_failure_is_an_error(tmp_path):
    """Export from one model, check against another: the tolerance check must fire."""
    a = load_checkpoint(tiny_checkpoint("llava_phi")).model
    b = load_checkpoint(tiny_checkpoint("llava_phi", seed=1)).model
    report = export_and_check(a, tmp_path / "a.onnx", "fp32")
    with pytest.raises(VlmError, match="tolerance"):
        check_against_torch(b, report.path, "fp32")


def test_onnxruntime_backend_in_pipeline(tmp_path):
    """vision_backend "onnxruntime": same image embeddings (within tolerance) and tokens."""
    path = str(tiny_checkpoint("mipha_phi"))
    image = np.random.default_rng(3).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    runtime = RuntimeConfig(vision_backend="onnxruntime", engine_dir=str(tmp_path))
    with Assistant.load(path) as ref, Assistant.load(path, runtime=runtime) as ort:
        a = ref.trace(image, "Is the path ahead clear?", 8)
        b = ort.trace(image, "Is the path ahead clear?", 8)
        scale = a.image_embeds.abs().max()
        assert (b.image_embeds - a.image_embeds).abs().max() / scale <= TOLERANCE["fp32"]
        assert b.answer.token_ids == a.answer.token_ids
    # the second load reuses the exported graph (sidecar names the same weights)
    assert len(list(tmp_path.rglob("*.onnx"))) == 1


def test_graph_precision_follows_the_provider_that_runs_it():
    """fp16 only where a GPU provider runs the graph: a CUDA model with the CPU-only
    onnxruntime wheel must not get an fp16 graph on the CPU provider (casts, no speed)."""
    from vlm_ros.engines.ort_backend import graph_precision, providers_for

    assert graph_precision(["CUDAExecutionProvider", "CPUExecutionProvider"]) == "fp16"
    assert graph_precision(["TensorrtExecutionProvider", "CPUExecutionProvider"]) == "fp16"
    assert graph_precision(["CPUExecutionProvider"]) == "fp32"
    assert providers_for("cpu") == ["CPUExecutionProvider"]


def test_onnx_cache_is_keyed_on_the_stage_structure_too(tmp_path):
    """Same weights, another drop-first-token (RuntimeConfig.drop_first_patch) or select
    layer: another graph, never the cached one; a sidecar giving another output shape, or one
    left by an interrupted export, is not reused."""
    import json

    from vlm_ros.engines.ort_backend import ensure_onnx

    model = load_checkpoint(tiny_checkpoint("llava_phi")).model
    first = ensure_onnx(model, tmp_path, "fp32")
    assert ensure_onnx(model, tmp_path, "fp32") == first  # reused
    spec = model.spec
    try:
        model.spec = spec.with_overrides(drop_first_token=not spec.drop_first_token)
        other = ensure_onnx(model, tmp_path, "fp32")
    finally:
        model.spec = spec
    assert other != first and other.is_file()
    sidecar = first.with_name(first.name + ".json")
    report = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**report, "output_shape": [1, 3, 4]}))
    stamp = first.stat().st_mtime_ns
    assert ensure_onnx(model, tmp_path, "fp32") == first
    assert first.stat().st_mtime_ns != stamp  # exported again
    assert json.loads(sidecar.read_text())["output_shape"] == report["output_shape"]


def test_a_gpu_provider_that_does_not_start_falls_back_to_the_fp32_graph(tmp_path, monkeypatch,
                                                                          caplog):  # fmt: skip
    """onnxruntime-gpu without its CUDA libraries drops the CUDA provider quietly and runs on
    the CPU. The encoder reads the session's real providers, says so, and serves the fp32 graph
    (an fp16 one there would only add casts). Simulated with the CPU-only wheel here: asking
    it for CUDA gives the same quiet fallback."""
    import logging

    from vlm_ros.engines import ort_backend

    monkeypatch.setattr(
        ort_backend,
        "providers_for",
        lambda device: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    model = load_checkpoint(tiny_checkpoint("mipha_phi")).model
    runtime = RuntimeConfig(vision_backend="onnxruntime", engine_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="vlm_ros.engines.ort_backend"):
        encoder = ort_backend.make_encoder(model, runtime)
    assert encoder.providers == ["CPUExecutionProvider"]
    assert encoder.input_dtype == torch.float32
    assert "could not start CUDAExecutionProvider" in caplog.text
    names = sorted(p.name for p in tmp_path.rglob("*.onnx"))
    assert names == ["vision_fp16.onnx", "vision_fp32.onnx"]


def test_serving_session_check_and_io_binding(tmp_path):
    """The check a GPU provider's session gets at load, run here on the CPU provider through
    the same IOBinding path: within tolerance for its own weights, refused for others'."""
    from vlm_ros.engines.ort_backend import OrtVisionEncoder, check_session

    a = load_checkpoint(tiny_checkpoint("llava_phi")).model
    b = load_checkpoint(tiny_checkpoint("llava_phi", seed=1)).model
    report = export_and_check(a, tmp_path / "a.onnx", "fp32")
    encoder = OrtVisionEncoder(a, report.path, ["CPUExecutionProvider"])
    assert check_session(encoder, a, "fp32") <= TOLERANCE["fp32"]
    with pytest.raises(VlmError, match="differs from the PyTorch vision stage"):
        check_session(encoder, b, "fp32")
    b.spec = b.spec.with_overrides(drop_first_token=not b.spec.drop_first_token)  # N +- 1
    with pytest.raises(VlmError, match="image tokens x hidden"):
        OrtVisionEncoder(b, report.path, ["CPUExecutionProvider"])


def test_cpu_copy_converts_floats_keeps_integers_and_leaves_the_original():
    """cpu_copy is how a GPU model's stage reaches the CPU for export and checks, without a
    second copy on the GPU first: tensor by tensor into deepcopy's memo."""
    from vlm_ros.engines.onnx_export import cpu_copy

    model = load_checkpoint(tiny_checkpoint("llava_phi")).model.to(torch.bfloat16)
    stage = VisionStage(model).eval()
    copied = cpu_copy(stage, torch.float32)
    assert {p.dtype for p in copied.parameters()} == {torch.float32}
    assert {p.dtype for p in stage.parameters()} == {torch.bfloat16}
    (buffer,) = [b for n, b in copied.named_buffers() if n.endswith("position_ids")]
    assert buffer.dtype == torch.int64
    pairs = zip(stage.parameters(), copied.parameters(), strict=True)
    assert all(a.data_ptr() != b.data_ptr() for a, b in pairs)
    size = model.vision_config.image_size
    pixels = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        reference = VisionStage(model.to(torch.float32))(pixels)
        torch.testing.assert_close(copied(pixels), reference, rtol=0, atol=0)
