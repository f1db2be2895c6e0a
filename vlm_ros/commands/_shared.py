"""Arguments and helpers shared by the ``ask`` and ``rank`` commands (not a command itself)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from vlm_ros.config import DECODERS, ImageLimits, RuntimeConfig
from vlm_ros.errors import InputError
from vlm_ros.ros import imaging
from vlm_ros.types import STAGES, StageTimings


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


def runtime_from_args(args: argparse.Namespace) -> RuntimeConfig:
    return RuntimeConfig(
        device=args.device, dtype=args.dtype, threads=args.threads, decoder=args.decoder
    )


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
    ms = timings.as_dict()
    return " | ".join(f"{name} {ms[name]:.1f} ms" for name in STAGES)
