"""Arguments and helpers shared by the ``ask`` and ``rank`` commands (not a command itself)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from vlm_ros.config import DECODERS, IMAGE_ENCODINGS, ImageLimits, RemoteConfig, RuntimeConfig
from vlm_ros.errors import InputError
from vlm_ros.ros import imaging
from vlm_ros.types import REMOTE_STAGES, STAGES, TIMING_NAMES, StageTimings


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="demo", help="checkpoint directory, hub id, or 'demo' (default)"
    )
    parser.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="default: the family's safe choice for the device (fp32 on CPU)",
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument(
        "--vision-tower",
        metavar="DIR",
        help="legacy TinyLLaVA only: the SigLIP tower's directory "
        "(default: config.json's mm_vision_tower)",
    )
    parser.add_argument(
        "--decoder",
        choices=DECODERS,
        default=RuntimeConfig.decoder,
        help="KV cache: static (allocated once) or eager (transformers' dynamic cache); "
        f"default {RuntimeConfig.decoder}",
    )

    add_remote_arguments(parser)


def add_remote_arguments(parser: argparse.ArgumentParser) -> None:
    """--server-url and its companions: answer through a server (backend remote) instead of
    loading --model here; the node's parameters of the same names (docs/SERVING.md)."""
    group = parser.add_argument_group("remote backend (an OpenAI-compatible server answers)")
    group.add_argument("--server-url", help="e.g. http://gpu-box:8000; given: backend remote")
    group.add_argument(
        "--remote-model", default="", help="model name on the server (default: --model)"
    )
    group.add_argument("--api-key-env", default="", help="environment variable holding the API key")
    group.add_argument("--image-encoding", choices=IMAGE_ENCODINGS, default="jpeg")
    group.add_argument("--jpeg-quality", type=int, default=RemoteConfig.jpeg_quality)
    group.add_argument("--request-timeout-s", type=float, default=RemoteConfig.request_timeout_s)


def remote_from_args(args: argparse.Namespace) -> RemoteConfig | None:
    """The RemoteConfig of --server-url ..., or None without --server-url."""
    if not args.server_url:
        return None
    return RemoteConfig(
        server_url=args.server_url, model=args.remote_model, api_key_env=args.api_key_env,
        image_encoding=args.image_encoding, jpeg_quality=args.jpeg_quality,
        request_timeout_s=args.request_timeout_s, health_period_s=0.0,
    )  # fmt: skip


def runtime_from_args(args: argparse.Namespace) -> RuntimeConfig:
    remote = remote_from_args(args)
    return RuntimeConfig(
        device=args.device, dtype=args.dtype, threads=args.threads, decoder=args.decoder,
        backend="remote" if remote else "local", remote=remote or RemoteConfig(),
    )  # fmt: skip


# the node's limits: the core's side limits and the 16 MP cap (parameter max_image_pixels)
CLI_LIMITS = imaging.SizeLimits.of(ImageLimits())


def read_image(path: str) -> np.ndarray:
    """An image file -> HxWx3 RGB uint8, opened like the references (PIL, convert("RGB")), with
    the node's size checks from the header first: a small file declaring a huge image (or one
    Pillow calls a decompression bomb) is refused before a pixel is decoded."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"image file {path} does not exist")
    try:
        return imaging.decode(file, f"file {path}", CLI_LIMITS)
    except imaging.ImageFormatError as exc:
        if exc.reason == "decode_failed":
            raise InputError(f"cannot read image {path}: {exc.__cause__ or exc}") from exc
        raise


def format_timings(timings: StageTimings) -> str:
    """The pipeline's stages; with a remote backend also encode / network / server_queue."""
    ms = timings.as_dict()
    shown = STAGES if not any(ms[n] for n in REMOTE_STAGES) else TIMING_NAMES
    return " | ".join(f"{name} {ms[name]:.1f} ms" for name in shown)
