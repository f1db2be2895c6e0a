"""TensorRT engine of the vision stage: build ahead of time (``EngineBuilder``), run on the
PyTorch CUDA stream with zero copies (``TensorRTVision``), refuse engines built for something else.

Build: the ONNX graph from onnx_export.py -> OnnxParser (every parser error reported; an
explicit-batch network, which TensorRT < 10 needs a flag for) -> IBuilderConfig (fp16 by default;
fp32 with TF32 off, so it really is fp32; workspace via set_memory_pool_limit;
builder_optimization_level where the TensorRT has it, 8.6 on) -> build_serialized_network ->
``<engine_dir>/vision-<weights>-<precision>.engine`` plus a JSON sidecar naming what it was
built from and for: ONNX sha256, TensorRT version, GPU name and compute capability, precision,
input/output shapes.

Run: the sidecar is checked BEFORE deserialising (an engine is specific to the TensorRT version
and GPU it was built on; a stale one is refused with EngineMismatchError that prints the rebuild
command). Input and output are bound by name (num_io_tensors / get_tensor_name /
set_tensor_address: TensorRT 8.5 through 10.x); the output is a torch tensor allocated once, the
input is the caller's CUDA tensor, and execute_async_v3 runs on torch's current stream, so no
copy and no host synchronisation sits between vision and the decoder. One exception: on the
legacy default stream (torch's unless the caller made another current), TensorRT adds a
device-wide synchronisation per launch, so there the engine runs on its own stream, ordered
against the caller's by two stream waits (events, no host sync). A launch also waits for the
stream that read the previous output, should the caller have changed streams since.

``import tensorrt`` happens only here, inside functions, and raises TensorRTUnavailable (naming
what is missing) where it is not installed. This module is type-checked with mypy against
``tensorrt-stubs`` in CI (test/test_trt_types.py); the GPU tests are in test/test_trt.py.
Never run: no machine this was written on had TensorRT (not even the lent GPU's image), so the
TensorRT 8.x branches rest on NVIDIA's API reference and the stubs only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vlm_ros.config import RuntimeConfig
from vlm_ros.engines.naming import structure_fingerprint
from vlm_ros.engines.onnx_export import TOLERANCE, relative_error, sha256_file
from vlm_ros.errors import EngineMismatchError, VlmError
from vlm_ros.model.network import VlmModel
from vlm_ros.model.vision_stage import VisionStage

PRECISIONS = ("fp16", "fp32")
REBUILD = "vlm-ros build-engines --model {model}"
# Sidecar fields that must equal the running setup for an engine to be used.
MATCHED_FIELDS = (
    "model",
    "onnx_sha256",
    "tensorrt_version",
    "gpu_name",
    "compute_capability",
    "precision",
)


class TensorRTUnavailable(VlmError):
    """TensorRT (or CUDA) is not available in this environment."""


def require_tensorrt() -> str:
    """TensorRT's version, or TensorRTUnavailable saying what is missing.

    An installed ``tensorrt-stubs`` leaves a ``tensorrt`` directory with only .pyi files, which
    Python imports as an empty namespace package: that is "not installed" too.
    """
    try:
        import tensorrt as trt  # optional dependency (GPU machines only)
    except ImportError as exc:
        raise TensorRTUnavailable(
            f"TensorRT is not installed ({exc}); install NVIDIA's tensorrt wheel or JetPack"
        ) from exc
    if not hasattr(trt, "Builder"):
        raise TensorRTUnavailable(
            "TensorRT is not installed (only type stubs are: `import tensorrt` has no Builder)"
        )
    return str(trt.__version__)


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("no CUDA device: torch.cuda.is_available() is False")


_LOGGER: Any = None


def trt_logger() -> Any:
    """One TensorRT logger per process: builder and runtime given different loggers make
    TensorRT warn that the logger changed."""
    global _LOGGER
    if _LOGGER is None:
        import tensorrt as trt  # optional dependency (GPU machines only)

        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def major_version(version: str) -> int:
    """10 for "10.3.0.26"; 0 where the string does not start with a number."""
    head = version.split(".")[0]
    return int(head) if head.isdigit() else 0


# ---- identity: what an engine was built from and for -----------------------------------------


@dataclass(frozen=True)
class EngineIdentity:
    """The facts an engine depends on. The sidecar stores them; the runtime compares them."""

    model: str  # naming.structure_fingerprint: vision-stage names, shapes, select layer
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7" (Orin), "9.0" (H100)
    precision: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def cuda_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` with its index ("cuda" -> "cuda:<current>"; None: the current device)."""
    chosen = torch.device(device if device is not None else "cuda")
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", torch.cuda.current_device())
    return chosen


def current_gpu(device: str | torch.device | None = None) -> tuple[str, str]:
    """(name, compute capability "major.minor") of ``device`` (default: the current one)."""
    require_cuda()
    chosen = cuda_device(device)
    index = chosen.index if chosen.type == "cuda" else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


def mismatches(sidecar: dict[str, Any], expected: EngineIdentity) -> list[str]:
    """Human-readable differences between an engine's sidecar and the running setup."""
    wanted = expected.as_dict()
    return [
        f"{key}: engine has {sidecar.get(key)!r}, this setup needs {wanted[key]!r}"
        for key in MATCHED_FIELDS
        if sidecar.get(key) != wanted[key]
    ]


def rebuild_hint(model_dir: str | None) -> str:
    return REBUILD.format(model=model_dir or "DIR")


def check_sidecar(
    engine_path: Path, expected: EngineIdentity, model_dir: str | None = None
) -> dict[str, Any]:
    """The engine's sidecar if it matches ``expected``; else EngineMismatchError naming every
    difference and the command that rebuilds the engine."""
    sidecar_path = sidecar_for(engine_path)
    command = rebuild_hint(model_dir)
    if not engine_path.is_file() or not sidecar_path.is_file():
        raise EngineMismatchError(
            f"no TensorRT engine at {engine_path} (or its sidecar {sidecar_path.name}); "
            f"build it with: {command}"
        )
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except ValueError as exc:
        raise EngineMismatchError(
            f"unreadable sidecar {sidecar_path}: {exc}; rebuild it with: {command}"
        ) from exc
    problems = mismatches(sidecar, expected)
    if problems:
        raise EngineMismatchError(
            f"TensorRT engine {engine_path} was built for something else ("
            + "; ".join(problems)
            + f"); rebuild it with: {command}"
        )
    return sidecar


def sidecar_for(engine_path: Path) -> Path:
    return engine_path.with_suffix(".json")


def engine_path(engine_dir: str | Path, model: str, precision: str) -> Path:
    return Path(engine_dir) / f"vision-{model}-{precision}.engine"


def dims(shape: Any) -> tuple[int, ...]:
    """A TensorRT Dims as a tuple (Dims indexes but does not iterate, per its stubs)."""
    return tuple(int(shape[i]) for i in range(len(shape)))


# ---- build ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp16"
    workspace_gib: float = 4.0
    optimization_level: int = 3  # TensorRT's default; 5 searches longest (TensorRT >= 8.6)


class EngineBuilder:
    """ONNX -> serialized TensorRT engine + sidecar, with the TensorRT Python API (no trtexec)."""

    def __init__(self, options: BuildOptions = BuildOptions()):
        if options.precision not in PRECISIONS:
            raise VlmError(f"precision must be one of {PRECISIONS}, got {options.precision!r}")
        if not 0 <= options.optimization_level <= 5:
            raise VlmError(f"optimization level must be 0-5, got {options.optimization_level}")
        if options.workspace_gib <= 0:
            raise VlmError(f"workspace must be > 0 GiB, got {options.workspace_gib}")
        self.options = options
        self.version = require_tensorrt()
        require_cuda()

    def build(self, onnx_path: Path, out_path: Path, identity: EngineIdentity) -> Path:
        """Parse, build, write ``out_path`` and its sidecar; returns out_path."""
        import tensorrt as trt  # optional dependency (GPU machines only)

        logger = trt_logger()
        builder = trt.Builder(logger)
        network = builder.create_network(self.network_flags())
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise VlmError(f"TensorRT cannot parse {onnx_path}: " + " | ".join(errors))
        config = builder.create_builder_config()
        workspace = int(self.options.workspace_gib * 2**30)
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
        if hasattr(config, "builder_optimization_level"):  # TensorRT 8.6 on (JetPack 5: 8.5)
            config.builder_optimization_level = self.options.optimization_level
        if self.options.precision == "fp16":
            # Weakly typed: TensorRT may keep a layer in fp32 where fp16 is slower or unsafe.
            # (10.12 deprecates the flag in favour of strongly typed networks; still honoured.)
            config.set_flag(trt.BuilderFlag.FP16)
        else:
            config.clear_flag(trt.BuilderFlag.TF32)  # on by default: 10-bit-mantissa matmuls
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise VlmError(f"TensorRT failed to build an engine from {onnx_path} (see log above)")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_bytes(bytes(serialized))
        shapes = {
            "inputs": {
                network.get_input(i).name: dims(network.get_input(i).shape)
                for i in range(network.num_inputs)
            },
            "outputs": {
                network.get_output(i).name: dims(network.get_output(i).shape)
                for i in range(network.num_outputs)
            },
        }
        sidecar = {**identity.as_dict(), **shapes, **asdict(self.options)}
        sidecar_for(out_path).write_text(json.dumps(sidecar, indent=2) + "\n")
        return out_path

    def network_flags(self) -> int:
        """create_network's flags: EXPLICIT_BATCH before TensorRT 10 (0 made an implicit-batch
        network there, which the ONNX parser refuses); 0 from 10 on, where every network is
        explicit batch and the flag is deprecated."""
        if major_version(self.version) >= 10:
            return 0
        import tensorrt as trt  # optional dependency (GPU machines only)

        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


# ---- run --------------------------------------------------------------------------------------

TORCH_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT32": torch.int32,
    "INT64": torch.int64,
}


class TensorRTVision:
    """A deserialized vision engine bound to one input and one preallocated output tensor.

    ``encode`` returns the same output tensor every call (the engine writes into it on torch's
    current stream): read it, or copy it, before the next call. Everything (engine, context,
    output) lives on ``device``.
    """

    def __init__(self, engine_file: Path, device: str | torch.device = "cuda"):
        require_tensorrt()
        require_cuda()
        self.device = cuda_device(device)
        if self.device.type != "cuda":
            raise VlmError(f"the TensorRT backend runs on a CUDA device, not {self.device}")
        with torch.cuda.device(self.device):
            self._load(engine_file)
            # Used only when the caller is on the legacy default stream (see __call__).
            self.side_stream = torch.cuda.Stream(self.device)
        self._reader: torch.cuda.Stream | None = None  # the stream given the last output

    def _load(self, engine_file: Path) -> None:
        import tensorrt as trt  # optional dependency (GPU machines only)

        self.runtime = trt.Runtime(trt_logger())
        self.engine = self.runtime.deserialize_cuda_engine(engine_file.read_bytes())
        if self.engine is None:
            raise VlmError(f"TensorRT could not deserialize {engine_file}")
        self.context = self.engine.create_execution_context()
        if self.context is None:  # e.g. no device memory left for its activations
            raise VlmError(f"TensorRT could not create an execution context for {engine_file}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        modes = {n: self.engine.get_tensor_mode(n) for n in names}
        inputs = [n for n in names if modes[n] == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if modes[n] == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise VlmError(f"{engine_file}: expected 1 input and 1 output, got {names}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_shape = dims(self.engine.get_tensor_shape(self.input_name))
        self.input_dtype = self._torch_dtype(self.input_name)
        self.output = torch.empty(
            dims(self.engine.get_tensor_shape(self.output_name)),
            dtype=self._torch_dtype(self.output_name),
            device=self.device,
        )  # [1, N, hidden], allocated once
        self._bind(self.output_name, self.output)

    def _bind(self, name: str, tensor: torch.Tensor) -> None:
        if not self.context.set_tensor_address(name, tensor.data_ptr()):
            raise VlmError(f"TensorRT refused the address of tensor {name}")

    def _torch_dtype(self, name: str) -> torch.dtype:
        kind = self.engine.get_tensor_dtype(name).name
        if kind not in TORCH_DTYPES:
            raise VlmError(f"engine tensor {name} has unsupported dtype {kind}")
        return TORCH_DTYPES[kind]

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [1, 3, S, S] (CUDA) -> [1, N, hidden], ordered on torch's current
        stream: whatever the caller queues next on it sees the output."""
        if tuple(pixel_values.shape) != self.input_shape:
            raise VlmError(f"engine input is {self.input_shape}, got {tuple(pixel_values.shape)}")
        with torch.cuda.device(self.device):
            caller = torch.cuda.current_stream(self.device)
            # a cast where the caller's dtype differs (fp32 pixels, fp16 engine); else no-op
            pixels = pixel_values.to(self.device, self.input_dtype).contiguous()
            self._bind(self.input_name, pixels)
            # Legacy default stream: TensorRT would synchronise the device around the launch.
            run_on = caller if caller.cuda_stream != 0 else self.side_stream
            for earlier in (caller, self._reader):  # the input is ready; the last output read
                if earlier is not None and earlier != run_on:
                    run_on.wait_stream(earlier)
            self._execute(run_on)
            if run_on != caller:
                # The caller's next kernels see this output; they also come after the launch,
                # so the caller's allocator cannot reuse the input's memory too early.
                caller.wait_stream(run_on)
            self._reader = caller
            return self.output

    def _execute(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise VlmError("TensorRT execute_async_v3 failed")


class TensorRTVisionEncoder:
    """VisionEncoder (vision.py) over a TensorRTVision. Records the stage as "vision"."""

    def __init__(self, model: VlmModel, engine: TensorRTVision):
        self.engine = engine
        self.num_image_tokens = model.num_image_tokens
        param = next(model.language_model.parameters())
        self.dtype = param.dtype

    def encode(self, pixel_values: torch.Tensor, timer: Any) -> torch.Tensor:
        with timer.stage("vision"):
            embeds = self.engine(pixel_values)  # [1, N, hidden]
            if embeds.shape[1] != self.num_image_tokens:
                raise VlmError(
                    f"engine produced {embeds.shape[1]} image tokens, expected "
                    f"{self.num_image_tokens}"
                )
            return embeds.to(self.dtype)  # a no-op when the engine's output is the decoder's


def expected_identity(
    model: VlmModel, onnx_file: Path, precision: str, device: str | torch.device | None = None
) -> EngineIdentity:
    """What an engine for ``model`` on this GPU (``device``, default the current one) and this
    TensorRT must have been built from/for."""
    version = require_tensorrt()
    name, capability = current_gpu(device)
    onnx_hash = sha256_file(onnx_file) if onnx_file.is_file() else "missing"
    return EngineIdentity(
        structure_fingerprint(model), onnx_hash, version, name, capability, precision
    )


def onnx_path_for(engine_dir: str | Path, model: str, precision: str) -> Path:
    """Where build-engines keeps the ONNX an engine was built from (next to the engine)."""
    return Path(engine_dir) / f"vision-{model}-{precision}.onnx"


def probe_weights(model: VlmModel, engine: TensorRTVision, engine_file: Path) -> float:
    """Run a seeded probe image through the engine and the PyTorch stage: the sidecar proves
    shapes, GPU and TensorRT; this proves the engine computes THIS model's weights (same-shape
    checkpoints share an engine name). Costs one vision pass at load."""
    pixels = torch.randn(engine.input_shape, generator=torch.Generator().manual_seed(0))
    param = next(model.vision_tower.parameters())
    with torch.inference_mode():
        expected = VisionStage(model)(pixels.to(param.device, param.dtype)).float()
        got = engine(pixels.to(engine.device)).float()
    error = relative_error(got.cpu(), expected.cpu())
    limit = 2 * TOLERANCE["fp16"]  # fp16 engine vs a bf16/fp16/fp32 PyTorch stage
    if error > limit:
        raise EngineMismatchError(
            f"TensorRT engine {engine_file} does not compute this model's vision stage "
            f"(relative error {error:.2e} > {limit:.0e}: built from other weights); rebuild "
            f"it with: {rebuild_hint(None)}"
        )
    return error


def built_precision(engine_dir: str | Path, model: str) -> str:
    """The precision of the engine ``build-engines`` left for ``model``: fp16 where both exist
    (the default build), fp32 where only that was built (``--precision fp32``), else fp16 (and
    the missing engine is then reported with the command that builds it)."""
    for precision in PRECISIONS:
        if engine_path(engine_dir, model, precision).is_file():
            return precision
    return PRECISIONS[0]


def make_encoder(model: VlmModel, runtime: RuntimeConfig) -> TensorRTVisionEncoder:
    """Factory registered in vision.BACKENDS["tensorrt"]: the engine for this model, this GPU
    and this TensorRT from ``runtime.engine_dir``, or EngineMismatchError with the rebuild
    command."""
    name = structure_fingerprint(model)
    precision = built_precision(runtime.engine_dir, name)
    engine_file = engine_path(runtime.engine_dir, name, precision)
    onnx_file = onnx_path_for(runtime.engine_dir, name, precision)
    check_sidecar(engine_file, expected_identity(model, onnx_file, precision, runtime.device))
    engine = TensorRTVision(engine_file, runtime.device)
    probe_weights(model, engine, engine_file)
    return TensorRTVisionEncoder(model, engine)
