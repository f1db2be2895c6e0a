"""The boards the memory plan targets, and which one this is.

A Jetson Orin's CPU and GPU share one memory, so what a model may use is the board's memory
less what must keep running beside it. ``resolve_board`` turns RuntimeConfig.board ("auto", a
name, "none") into a Board: on a Jetson from its device tree and MemTotal, elsewhere from the
CUDA GPU's free memory or the host's available memory. Files are read under VLM_ROS_SYSROOT
(default /), so tests point detection at a faked /proc.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from vlm_ros.config import RuntimeConfig
from vlm_ros.errors import InputError

GiB = 1024**3


@dataclass(frozen=True)
class Board:
    """A device the plan can target.

    memory_gib: what Linux reports as MemTotal (unified CPU+GPU memory on a Jetson): the board's
    LPDDR5 minus the firmware carve-outs, rounded down from what JetPack 6 boards commonly
    report (``free``/jtop); ``detect_board`` reads the real MemTotal on the device instead.
    runtime_gib: CUDA context + cuBLAS/cuDNN kernels loaded by torch (0.5-1 GiB on Orin,
    shared/facts/performance.md; the high end, as the plan must not be optimistic).
    reserve_gib: everything else that must keep running: Ubuntu/L4T headless (~0.9 GiB), the
    ROS 2 daemon, DDS and the other nodes, a camera driver and its buffers. A desktop session
    (GNOME) takes ~0.7 GiB more: raise memory_reserve_mb, or boot to multi-user.target.
    """

    key: str
    title: str
    memory_gib: float
    unified: bool = True
    runtime_gib: float = 1.0
    reserve_gib: float = 1.5


BOARDS: dict[str, Board] = {
    b.key: b
    for b in (
        Board("orin-nano-8gb", "Jetson Orin Nano 8GB", 7.3),
        Board("orin-nx-8gb", "Jetson Orin NX 8GB", 7.3),
        Board("orin-nx-16gb", "Jetson Orin NX 16GB", 15.2),
        Board("agx-orin-32gb", "Jetson AGX Orin 32GB", 30.4),
        Board("agx-orin-64gb", "Jetson AGX Orin 64GB", 61.3),
    )
}
# The device-tree model string of each board (/proc/device-tree/model), with MemTotal telling
# the 8 GB NX from the 16 GB one and the 32 GB AGX from the 64 GB one.
_MODEL_NAMES = (("orin nano", "orin-nano"), ("orin nx", "orin-nx"), ("agx orin", "agx-orin"))


def detect_board(root: Path | None = None) -> Board | None:
    """The Jetson this runs on, from /proc/device-tree/model and MemTotal (both under
    ``root``, default VLM_ROS_SYSROOT or /, so tests point it at a fake tree), or None where
    this is not a Jetson Orin."""
    root = root or _sysroot()
    try:
        model = (root / "proc/device-tree/model").read_bytes().decode(errors="replace")
    except OSError:
        return None
    model = model.strip("\x00\n ").lower()
    memory = meminfo_gib(root, "MemTotal")
    prefix = next((key for name, key in _MODEL_NAMES if name in model), None)
    if prefix is None or memory is None:
        return None
    # The board variants of one module differ by memory: the one nearest MemTotal
    variants = [b for b in BOARDS.values() if b.key.startswith(prefix)]
    best = min(variants, key=lambda b: abs(b.memory_gib - memory))
    return replace(best, memory_gib=memory, title=f"{best.title} ({model.strip()})")


def _sysroot() -> Path:
    return Path(os.environ.get("VLM_ROS_SYSROOT") or "/")


def meminfo_gib(root: Path, field: str) -> float | None:
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0]) * 1024 / GiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_board(device: str, root: Path = Path("/")) -> Board | None:
    """What a non-Jetson device offers: a CUDA GPU's free memory (nothing else of the host
    runs in it, so no reserve), or for the CPU the host's MemAvailable; None if unknown."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None  # the loader's device check says so, in its own words
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        name = torch.cuda.get_device_name(torch.device(device))
        return Board("cuda", f"GPU {name} (free)", free / GiB, False, 0.5, 0.0)
    available = meminfo_gib(root, "MemAvailable")
    if available is None:
        return None
    return Board("cpu", "host (MemAvailable)", available, False, 0.0, 0.0)


def resolve_board(runtime: RuntimeConfig, root: Path | None = None) -> Board | None:
    """The Board the plan checks against: ``runtime.board`` by name, "auto" = this Jetson or
    this host, "none" = no check (None). memory_reserve_mb > 0 replaces the board's reserve.
    root: the file system root to read /proc from (tests: a fake tree; else VLM_ROS_SYSROOT
    or /)."""
    root = root or _sysroot()
    name = runtime.board
    if name == "none":
        return None
    if name == "auto":
        board = detect_board(root) or host_board(runtime.device, root)
    elif name in BOARDS:
        board = BOARDS[name]
    else:
        raise InputError(f"board must be auto, none or one of {', '.join(BOARDS)}; got {name!r}")
    if board is not None and runtime.memory_reserve_mb > 0:
        board = replace(board, reserve_gib=runtime.memory_reserve_mb / 1024)
    return board
