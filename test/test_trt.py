"""TensorRT engine: sidecar matching and the rebuild message (CPU, always run), and the engine
build + parity with the PyTorch stage (only where TensorRT and a CUDA GPU exist: the skips say
exactly which is missing)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_checkpoint

from vlm_ros.config import RuntimeConfig
from vlm_ros.engines.trt_engine import (
    EngineIdentity,
    TensorRTUnavailable,
    built_precision,
    check_sidecar,
    engine_path,
    mismatches,
    require_tensorrt,
    sidecar_for,
)
from vlm_ros.errors import EngineMismatchError, VlmError
from vlm_ros.model.checkpoint import load_checkpoint

IDENTITY = EngineIdentity("abc123", "f" * 64, "10.3.0", "NVIDIA H100 80GB HBM3", "9.0", "fp16")


def _tensorrt_missing() -> str | None:
    try:
        require_tensorrt()
    except TensorRTUnavailable as exc:
        return str(exc)
    return None


TRT_MISSING = _tensorrt_missing()
NEEDS_GPU_TRT = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"
    ),
    pytest.mark.skipif(TRT_MISSING is not None, reason=f"no tensorrt: {TRT_MISSING}"),
]


def _write_engine(tmp_path, identity: EngineIdentity):
    path = engine_path(tmp_path, identity.model, identity.precision)
    path.write_bytes(b"not really an engine")
    sidecar_for(path).write_text(json.dumps(identity.as_dict()))
    return path


def test_matching_sidecar_is_accepted(tmp_path):
    path = _write_engine(tmp_path, IDENTITY)
    assert check_sidecar(path, IDENTITY)["gpu_name"] == IDENTITY.gpu_name


@pytest.mark.parametrize(
    "field, value",
    [("onnx_sha256", "0" * 64), ("gpu_name", "Orin"), ("compute_capability", "8.7"),
     ("tensorrt_version", "8.6.2"), ("model", "other"), ("precision", "fp32")],
)  # fmt: skip
def test_mismatched_sidecar_is_refused_with_rebuild_command(tmp_path, field, value):
    built = EngineIdentity(**{**IDENTITY.as_dict(), field: value})
    path = _write_engine(tmp_path, built)
    with pytest.raises(EngineMismatchError) as err:
        check_sidecar(path, IDENTITY, model_dir="models/llava-phi")
    message = str(err.value)
    assert field in message and value in message
    assert "vlm-ros build-engines --model models/llava-phi" in message
    assert mismatches(built.as_dict(), IDENTITY)


def test_runtime_uses_the_precision_that_was_built(tmp_path):
    """build-engines --precision fp32 leaves only an fp32 engine: the runtime must find it;
    with both, the default fp16; with none, fp16 (reported missing with the build command)."""
    assert built_precision(tmp_path, "abc123") == "fp16"
    _write_engine(tmp_path, EngineIdentity(**{**IDENTITY.as_dict(), "precision": "fp32"}))
    assert built_precision(tmp_path, "abc123") == "fp32"
    assert built_precision(tmp_path, "other") == "fp16"
    _write_engine(tmp_path, IDENTITY)
    assert built_precision(tmp_path, "abc123") == "fp16"


def test_build_options_are_checked_before_tensorrt_is_needed():
    from vlm_ros.engines.trt_engine import BuildOptions, EngineBuilder

    for options, words in [(BuildOptions(optimization_level=6), "optimization level"),
                           (BuildOptions(workspace_gib=0), "workspace"),
                           (BuildOptions(precision="int8"), "precision")]:  # fmt: skip
        with pytest.raises(VlmError, match=words):
            EngineBuilder(options)


def test_network_flags_ask_for_explicit_batch_before_tensorrt_10():
    """TensorRT 8.x makes an implicit-batch network from flags 0, which its ONNX parser
    refuses; 10.x has only explicit batch and deprecates the flag."""
    from vlm_ros.engines.trt_engine import EngineBuilder, major_version

    assert [major_version(v) for v in ("10.3.0.26", "8.6.2", "8.5.2.2", "")] == [10, 8, 8, 0]
    builder = EngineBuilder.__new__(EngineBuilder)  # no TensorRT here: only the flag logic
    builder.version = "10.13.0"
    assert builder.network_flags() == 0
    if TRT_MISSING is None:
        import tensorrt as trt

        builder.version = "8.6.2"
        explicit = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        assert builder.network_flags() == explicit


def test_missing_engine_names_the_build_command(tmp_path):
    with pytest.raises(EngineMismatchError, match="vlm-ros build-engines --model DIR"):
        check_sidecar(tmp_path / "vision-x-fp16.engine", IDENTITY)


def test_tensorrt_backend_without_tensorrt_is_a_clear_error(tmp_path):
    if TRT_MISSING is None:
        pytest.skip("tensorrt is installed here; this checks the message where it is not")
    from vlm_ros.infer.pipeline import Assistant

    runtime = RuntimeConfig(vision_backend="tensorrt", engine_dir=str(tmp_path))
    with pytest.raises(VlmError, match="TensorRT is not installed|no CUDA"):
        Assistant.load(str(tiny_checkpoint("llava_phi")), runtime=runtime)


@pytest.mark.parametrize("family", ["llava_phi", "mipha_phi"])
@NEEDS_GPU_TRT[0]
@NEEDS_GPU_TRT[1]
@NEEDS_GPU_TRT[2]
def test_engine_build_and_parity(tmp_path, family):
    from vlm_ros.engines.build import build_for_model
    from vlm_ros.engines.onnx_export import TOLERANCE, relative_error
    from vlm_ros.engines.trt_engine import make_encoder
    from vlm_ros.model.vision_stage import VisionStage
    from vlm_ros.timing import StageTimer

    model = load_checkpoint(tiny_checkpoint(family), "cuda", "float16").model
    build_for_model(model, tmp_path, precision="fp16")
    encoder = make_encoder(model, RuntimeConfig(device="cuda", engine_dir=str(tmp_path)))
    size = model.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        expected = VisionStage(model)(pixels).float()
        raw = encoder.encode(pixels, StageTimer("cuda"))
    assert relative_error(raw.float(), expected) <= TOLERANCE["fp16"]
    assert raw.data_ptr() == encoder.engine.output.data_ptr()  # written in place, no copy
    side = torch.cuda.Stream()  # a non-default stream: the engine runs on it directly
    side.wait_stream(torch.cuda.current_stream())  # pixels were made on the default one
    with torch.inference_mode(), torch.cuda.stream(side):
        again = encoder.encode(pixels, StageTimer("cuda")).float()
    side.synchronize()
    assert relative_error(again, expected) <= TOLERANCE["fp16"]


def test_build_engines_without_tensorrt_says_what_is_missing(tmp_path, capsys):
    if TRT_MISSING is None and torch.cuda.is_available():
        pytest.skip("TensorRT and CUDA exist here; test_engine_build_and_parity builds for real")
    from vlm_ros.cli import main

    argv = ["build-engines", "--model", str(tiny_checkpoint("llava_phi")),
            "--engine-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err or "no CUDA device" in err
    assert not list(tmp_path.glob("*.engine"))
