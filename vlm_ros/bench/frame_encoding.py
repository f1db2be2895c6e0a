"""What one camera frame costs on the wire with ``backend: remote``: bytes and encode time.

    python -m vlm_ros.bench.frame_encoding --out bench/results/frame-encoding.json

For 1280x720 and 1920x1080 frames, encodes each with the product's encoder
(``infer.wire_image.encode_frame``: JPEG at several qualities, PNG at zlib level 1) and
records, per case: the encoded bytes and the base64 data-URL bytes that actually cross the
network (4/3 of them), the ratio against the raw rgb8 frame (the sensor_msgs/Image payload, the
baseline of the same run), the median and p90 encode milliseconds over ``--iters`` runs, the
server's decode milliseconds (PIL, as a server decodes it), the JPEG's PSNR against the
original, and the transfer time this size takes at 100 Mbit/s and 1 Gbit/s (computed from the
bytes, not measured: no network here).

Frames: ``scene`` (the demo world's rendered scene, flat colours), ``scene_noisy`` (the same
with Gaussian sensor noise, sigma 3: closer to a real camera, and PNG's worst realistic case)
and ``bars`` (the synthetic camera's colour bars). No real camera photograph is used.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vlm_ros.bag.make_bag import pattern_frame
from vlm_ros.engines import cpuinfo
from vlm_ros.infer.wire_image import PNG_COMPRESS_LEVEL, encode_frame

SIZES = {"720p": (1280, 720), "1080p": (1920, 1080)}
JPEG_QUALITIES = (50, 75, 90, 95)
LINKS_MBIT = (100, 1000)


def frames(width: int, height: int) -> dict[str, np.ndarray]:
    from vlm_ros.demo.world import render_frame  # the demo world: numpy only

    scene = np.ascontiguousarray(render_frame(3, width, height)[:, :, :3])
    noise = np.random.default_rng(0).normal(0.0, 3.0, scene.shape)
    noisy = np.clip(scene.astype(np.float64) + noise, 0, 255).astype(np.uint8)
    return {"scene": scene, "scene_noisy": noisy, "bars": pattern_frame(3, 0.5, width, height)}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def measure(rgb: np.ndarray, encoding: str, quality: int, iters: int) -> dict:
    times = []
    for _ in range(iters):
        frame = encode_frame(rgb, encoding, quality)  # type: ignore[arg-type]
        times.append(frame.encode_ms)
    decode = []
    for _ in range(iters):
        t = time.perf_counter()
        decoded = np.asarray(Image.open(io.BytesIO(frame.data)).convert("RGB"))
        decode.append((time.perf_counter() - t) * 1000.0)
    wire = len(frame.data_url())
    return {
        "encoding": encoding,
        "quality": quality if encoding == "jpeg" else None,
        "bytes": len(frame.data),
        "wire_bytes": wire,
        "ratio_to_raw": len(frame.data) / rgb.nbytes,
        "encode_ms_median": statistics.median(times),
        "encode_ms_p90": float(np.percentile(times, 90)),
        "server_decode_ms_median": statistics.median(decode),
        "psnr_db": psnr(decoded, rgb),
        "transfer_ms_computed": {f"{m}mbit": wire * 8 / (m * 1e3) for m in LINKS_MBIT},
    }


def run(iters: int) -> dict:
    load = os.getloadavg()[0]  # a shared machine: the times scale with what else runs
    cases = []
    for size, (w, h) in SIZES.items():
        for name, rgb in frames(w, h).items():
            raw = rgb.nbytes
            rows = [measure(rgb, "jpeg", q, iters) for q in JPEG_QUALITIES]
            rows.append(measure(rgb, "png", 0, iters))
            png_ms = rows[-1]["encode_ms_median"]
            for row in rows:
                row["encode_time_vs_png"] = row["encode_ms_median"] / png_ms
            cases.append({"size": size, "width": w, "height": h, "frame": name,
                          "raw_rgb8_bytes": raw, "results": rows})  # fmt: skip
    return {
        "what": "frame encoding for backend remote (vlm_ros.infer.wire_image.encode_frame)",
        "iters": iters,
        "threads": "1 (Pillow encodes a frame on one thread)",
        "png_compress_level": PNG_COMPRESS_LEVEL,
        "host": {
            "machine": platform.machine(),
            "processor": _cpu_name(),
            "python": platform.python_version(),
            "pillow": Image.__version__,
            "cpus": os.cpu_count(),
            "loadavg_1m_before": load,
        },  # fmt: skip
        "cases": cases,
    }


def _cpu_name() -> str:
    return cpuinfo.model_name()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--iters", type=int, default=15)
    args = parser.parse_args(argv)
    result = run(args.iters)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for case in result["cases"]:
        for r in case["results"]:
            label = f"{r['encoding']}{r['quality'] or ''}"
            size = f"{case['size']:>5} {case['frame']:<11} {label:<7} {r['bytes']:>9} B"
            ms = (
                f"encode {r['encode_ms_median']:6.1f} ms decode {r['server_decode_ms_median']:6.1f}"
            )
            print(f"{size} ({r['ratio_to_raw']:.3f} of raw) {ms} ms PSNR {r['psnr_db']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
