"""Hostile compressed images against the node's converter: the cost of refusing them.

    python -m vlm_ros.bench.hostile_images --out bench/results/hostile_images.json

Writes, for each small PNG that declares a huge image (the three of issue 15: 8192x8192 in
about 65 KB, 10000x10000 in about 97 KB, 20000x20000 in about 389 KB; all-zero 8-bit grey,
which zlib squeezes about 1000:1), the refusal reason, the milliseconds it took (first try and
median of 20) and how much the process's peak RSS grew; then, as the control that shows what
the refusal saved, the 8192x8192 PNG decoded with the pixel cap lifted. The peak
(VmHWM, reset before each case) shows a refusal that decoded pixels and freed them again too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import zlib
from pathlib import Path

from PIL import Image

from vlm_ros.ros.imaging import ImageFormatError, SizeLimits, image_from_compressed

SIZES = (8192, 10000, 20000)


def bomb_png(width: int, height: int) -> bytes:
    """A valid 8-bit greyscale PNG of ``width`` x ``height`` zero pixels, compressed row block
    by row block so building it never holds the pixels."""
    row = b"\0" * (width + 1)  # filter byte + one byte per pixel
    packer, blocks = zlib.compressobj(9), []
    step = max(1, (1 << 24) // len(row))
    for y in range(0, height, step):
        blocks.append(packer.compress(row * min(step, height - y)))
    blocks.append(packer.flush())
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", b"".join(blocks))
        + (_chunk(b"IEND", b""))
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data).to_bytes(4, "big")
    return len(data).to_bytes(4, "big") + kind + data + crc


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0  # kB
    raise OSError(f"no {field} in /proc/self/status")


def reset_peak() -> float:
    """Reset this process's RSS high-water mark to its current RSS (Linux clear_refs 5) and
    return that RSS in MB. Not ru_maxrss: Linux keeps that across fork and exec, so a child of
    a big process (pytest with models loaded) would start with its parent's peak."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """The high-water mark of this process's resident set since ``reset_peak``."""
    return _status_mb("VmHWM")


def refuse(data: bytes, limits: SizeLimits, repeats: int = 1) -> dict:
    """Convert ``data`` as the node would, ``repeats`` times; what happened, the milliseconds of
    the first try and the median of all, and the peak RSS growth over all of them."""
    before, times = reset_peak(), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        try:
            image = image_from_compressed("png", data, limits)
            outcome, message = f"decoded {image.shape}", ""
        except ImageFormatError as exc:
            outcome, message = exc.reason, str(exc)
        times.append((time.perf_counter() - t0) * 1000.0)
    return {
        "outcome": outcome,
        "message": message,
        "first_ms": round(times[0], 3),
        "median_ms": round(statistics.median(times), 3),
        "peak_rss_growth_mb": round(peak_rss_mb() - before, 1),
    }


def measure() -> dict:
    """Every case of the module docstring, refusals first (before any decode raised the peak)."""
    pngs = {size: bomb_png(size, size) for size in SIZES}
    Image.init()  # Pillow imports its format plugins once per process: not a per-image cost
    cases = []
    for size, data in pngs.items():
        case = {"declared": f"{size}x{size}", "png_bytes": len(data)}
        cases.append(case | refuse(data, SizeLimits(), repeats=20))
    control = refuse(pngs[SIZES[0]], SizeLimits(max_pixels=1 << 30))
    return {
        "what": "PNGs declaring huge images, converted as the node converts a CompressedImage",
        "max_pixels": SizeLimits().max_pixels,
        "refusals": cases,
        "control_decoded_8192": control,
        "python": sys.version.split()[0],
        "pillow": Image.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file to write (default: print)")
    args = parser.parse_args(argv)
    text = json.dumps(measure(), indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
