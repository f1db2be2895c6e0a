"""Export the vision stage (encoder layers up to the selected one + drop-first-token + projector)
as ONE static ONNX graph, then check it: ONNX Runtime against the PyTorch stage within a stated
tolerance, and every operator against the TensorRT ONNX parser's supported list.

Input ``pixel_values`` is fixed at [1, 3, S, S] (the family's crop/resize size); output
``image_embeds`` is [1, N, hidden]. Resizing (bicubic, with antialiasing) stays in preprocess.py,
outside the graph: TensorRT's Resize supports neither (shared/facts/tensorrt-onnx-operators.md).

The exporter is torch.onnx's TorchScript-based one (``dynamo=False``) at opset 17: with
torch 2.13 it gives a plain static graph of MatMul/Softmax/LayerNormalization nodes for the
CLIP and SigLIP layers, opset 17 is the first with LayerNormalization, and TensorRT 8.5+ parses
opsets 9-20. Attention is exported with transformers' "eager" implementation, so it is spelled
out as MatMul + Softmax rather than a fused op that older parsers do not know.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vlm_ros.engines.cpu_kernels import copy_structure
from vlm_ros.errors import VlmError
from vlm_ros.model.network import VlmModel
from vlm_ros.model.vision_stage import VisionStage

OPSET = 17
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeds"

# Tolerances of ORT against the PyTorch stage, as max |a - b| / max |b| (relative to the output's
# scale, so the same number serves tiny and full models). fp32: both run fp32 kernels that differ
# only in summation order. fp16: the graph computes in half precision (11-bit mantissa).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}

# TensorRT 10.0 ONNX parser, supported operators (onnx-tensorrt docs/operators.md at 96e7811,
# copied in shared/facts/tensorrt-onnx-operators.md). A graph with anything else is refused.
TENSORRT_SUPPORTED_OPS = frozenset(
    """Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
    DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
    Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
    GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish
    Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu
    Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
    RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
    Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
    Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor""".split()
)
# Supported with restrictions: Resize must not be bicubic or antialiased.
RESIZE_MODES_OK = frozenset({"nearest", "linear"})


@dataclass(frozen=True)
class ExportReport:
    """What was written and how it checked out (also saved next to the .onnx as JSON)."""

    path: str
    precision: str
    opset: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    sha256: str
    ops: tuple[str, ...]
    max_rel_error: float | None  # ORT vs PyTorch; None when not checked
    tolerance: float

    def as_dict(self) -> dict:
        return asdict(self)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def use_eager_attention(stage: torch.nn.Module) -> None:
    """Export attention as plain MatMul/Softmax: transformers looks the attention function up
    from each module's config at call time, so switching the (copied) configs is enough."""
    for module in stage.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = "eager"


def export_vision(
    model: VlmModel, out_path: str | Path, precision: str = "fp32", opset: int = OPSET
) -> Path:
    """Write the vision stage of ``model`` as ONNX at ``out_path`` (fp32 or fp16 weights and
    compute; input and output in the same precision)."""
    if precision not in TOLERANCE:
        raise VlmError(f"precision must be one of {', '.join(TOLERANCE)}, got {precision!r}")
    dtype = torch.float16 if precision == "fp16" else torch.float32
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # A private copy in the export precision (configs included), so the caller's model is
    # left as it was.
    stage = cpu_copy(VisionStage(model).eval(), dtype)
    use_eager_attention(stage)
    size = stage.image_size
    example = torch.zeros(1, 3, size, size, dtype=dtype)  # [1, 3, S, S]
    with torch.inference_mode():
        torch.onnx.export(
            stage,
            (example,),
            str(out_path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    return out_path


def cpu_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``module`` on the CPU, floating tensors in ``dtype``, made tensor by tensor:
    deepcopy of a GPU module would first duplicate it on the GPU (a Jetson's memory is shared
    with everything else). Integer buffers keep their dtype."""

    def to_cpu(tensor: torch.Tensor) -> torch.Tensor:
        moved = tensor.detach().to("cpu")
        return moved.to(dtype) if moved.is_floating_point() else moved

    return copy_structure(module, to_cpu)


def graph_ops(onnx_path: str | Path) -> tuple[str, ...]:
    """Sorted distinct operator types of the graph (subgraphs included)."""
    import onnx  # optional dependency (the onnx extra)

    model = onnx.load(str(onnx_path), load_external_data=False)
    ops: set[str] = set()

    def visit(graph) -> None:
        for node in graph.node:
            ops.add(node.op_type)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)

    visit(model.graph)
    return tuple(sorted(ops))


def unsupported_ops(onnx_path: str | Path) -> list[str]:
    """Operators (or restricted uses) the TensorRT ONNX parser would refuse; [] when clean."""
    import onnx  # optional dependency (the onnx extra)

    bad = [op for op in graph_ops(onnx_path) if op not in TENSORRT_SUPPORTED_OPS]
    model = onnx.load(str(onnx_path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "Resize":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            mode = attrs.get("mode", b"nearest")
            mode = mode.decode() if isinstance(mode, bytes) else str(mode)
            if mode not in RESIZE_MODES_OK or attrs.get("antialias", 0):
                bad.append(f"Resize(mode={mode}, antialias={attrs.get('antialias', 0)})")
        if node.op_type == "LayerNormalization" and len(node.output) > 1:
            bad.append("LayerNormalization with Mean/InvStdDev outputs")
    return bad


def ort_session(onnx_path: str | Path, providers: list[str] | None = None):
    """An ONNX Runtime session (CPU unless providers are given), sharing cores with torch."""
    import onnxruntime as ort  # optional dependency (the onnx extra)

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Share the cores with torch: the same thread count, and no spin-waiting after a run
    # (ORT's idle threads otherwise spin and slow down the decoder that runs next).
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        str(onnx_path), options, providers=providers or ["CPUExecutionProvider"]
    )


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (in float64)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual - expected).abs().max() / scale)


def probe_reference(model: VlmModel, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random image [1, 3, S, S] and the vision stage's output for it [1, N, hidden],
    both float32 on the CPU: what every compiled stage is compared with."""
    stage = VisionStage(model).eval()
    param = next(stage.parameters())
    if param.dtype != torch.float32 or param.device.type != "cpu":
        # A bf16/fp16 model (a GPU run) is no reference for an fp16 graph: on the full-size
        # towers bf16 alone is 1.2e-2 off fp32, fp16 1.7e-3 (CPU, measured). Its fp32 copy on
        # the CPU is (on a GPU, TF32 convolutions would blur even a float32 reference).
        stage = cpu_copy(stage, torch.float32)
    size = stage.image_size
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, 3, size, size, generator=generator)  # [1, 3, S, S]
    with torch.inference_mode():
        return pixels, stage(pixels).float()


def check_against_torch(
    model: VlmModel, onnx_path: str | Path, precision: str = "fp32", seed: int = 0
) -> float:
    """Relative error of ORT (CPU) on the exported graph against the fp32 PyTorch stage, for
    a seeded random image; raises VlmError above TOLERANCE[precision]."""
    pixels, expected = probe_reference(model, seed)
    np_dtype = "float16" if precision == "fp16" else "float32"
    session = ort_session(onnx_path)
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy().astype(np_dtype)})
    error = relative_error(torch.from_numpy(got).float(), expected)
    if error > TOLERANCE[precision]:
        raise VlmError(
            f"{onnx_path}: ONNX Runtime differs from the PyTorch stage by {error:.2e} "
            f"(relative), more than the {precision} tolerance {TOLERANCE[precision]:.0e}"
        )
    return error


def export_and_check(
    model: VlmModel, out_path: str | Path, precision: str = "fp32", check: bool = True
) -> ExportReport:
    """Export, refuse TensorRT-unsupported operators, and (check=True) compare ORT to PyTorch.
    Writes ``<out>.json`` with the report."""
    path = export_vision(model, out_path, precision)
    bad = unsupported_ops(path)
    if bad:
        raise VlmError(f"{path}: operators the TensorRT ONNX parser does not support: {bad}")
    error = check_against_torch(model, path, precision) if check else None
    stage = VisionStage(model)
    size = stage.image_size
    hidden = int(model.text_config.hidden_size)
    report = ExportReport(
        path=str(path),
        precision=precision,
        opset=OPSET,
        input_shape=(1, 3, size, size),
        output_shape=(1, stage.num_image_tokens, hidden),
        sha256=sha256_file(path),
        ops=graph_ops(path),
        max_rel_error=error,
        tolerance=TOLERANCE[precision],
    )
    Path(f"{path}.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return report


def onnx_name(precision: str) -> str:
    """File name of the vision stage export for a precision."""
    return f"vision_{precision}.onnx"
