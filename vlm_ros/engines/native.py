"""The float32 one-row decode kernels of csrc/decode_kernels.cpp, built for this CPU on first
use: ``torch.ops.vlm_ros.gemv`` and ``torch.ops.vlm_ros.attend_one``.

Why hand-written: a full-size decode token reads ~11 GB of weights, so it can go no faster than
the memory. In the host's fast state (~85 GB/s for a plain sum) inductor's one-row GEMV loop
read 82-83% of what a plain ``sum`` of the same weights read, and SDPA read a layer's live
keys and values at a third of their sum (docs/performance.md, "The same bytes read by plain
sums"). Out of cache, one loop per row with a single chain of multiply-adds (inductor's
reduction) holds a core below the memory's pace; the same loop with four independent
accumulators reads as fast as the sum (scripts/native_kernels.py). MKL's and oneDNN's GEMVs
read slower still, and no library here has a one-query CPU attention, so these are ours:
- ``gemv(x [.., K] one row, weight [N, K], bias [N] or None) -> [.., N]``: rows split across
  ATen's threads, each row one dot product of four accumulators;
- ``attend_one(q [1, H, 1, D], k, v [1, KVH, 1, D], keys, values [1, KVH, S, D], position)
  -> [1, H, 1, D]``: the new token's key and value written into a static cache at
  ``position``, then the softmax attention of its query over the live slots 0..position
  (grouped-query heads allowed), no mask: what the uncompiled step's cache write and SDPA
  call compute, in one call (each Python-level slice assignment costs ~10 µs a layer).

They are written with ATen's ``at::vec::Vectorized``, built with the CPU_CAPABILITY macro and
flags inductor picks for this CPU (AVX-512, AVX2, NEON or SVE), so the same source serves x86
and a Jetson's ARM cores; only x86 with AVX-512 and AVX2 kernels was built and run here. The
build (torch.utils.cpp_extension, ~10 s, needs a C++ compiler and ninja, cached by torch under
~/.cache/torch_extensions) happens once per machine; the ops are then registered for the
process. A build that fails leaves inductor's loops serving (``load`` says why). Users are the
uncompiled decode step's compiled regions (infer/regional_step.py), checked at load against
the library step's output, as every fast step is; the references are cpu_kernels'
gemv_by_reduction and F.scaled_dot_product_attention (test/test_native_kernels.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import torch

_log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "decode_kernels.cpp"

_lock = threading.Lock()
_state: dict[str, str | None] = {}  # "refused" -> None (loaded) or why not, once tried


def build_flags() -> tuple[str, list[str]]:
    """The extension's name and compiler flags for this CPU: inductor's vector ISA (its
    CPU_CAPABILITY macro and -m flags), OpenMP for ATen's parallel_for (without -fopenmp
    its pragma is ignored and every kernel runs on one thread), -O3. The ISA is in the name,
    so a build for another CPU never serves this one."""
    from torch._inductor import cpu_vec_isa

    isa = cpu_vec_isa.pick_vec_isa()
    if not isa:
        raise RuntimeError("inductor finds no vector instruction set on this CPU")
    macros = [f"-D{macro}" for macro in isa.build_macro()]
    flags = ["-O3", "-fopenmp", *macros, *isa.build_arch_flags().split()]
    return f"vlm_ros_decode_kernels_{type(isa).__name__.lower()}", flags


def load() -> str | None:
    """Build (first use on a machine) and register the kernels; None where they serve, else
    why not (no C++ compiler or ninja, an unknown CPU). Tried once per process."""
    with _lock:
        if "refused" not in _state:
            _state["refused"] = _build()
        return _state["refused"]


def _build() -> str | None:
    try:
        from torch.utils import cpp_extension

        name, flags = build_flags()
        if shutil.which("ninja") is None:  # torch runs `ninja` from PATH; pip's has its own bin
            _ninja_from_pip()
        cpp_extension.load(
            name, [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
            is_python_module=False, verbose=False,
        )  # fmt: skip
    except Exception as error:  # no compiler, no ninja, a build error
        lines = str(error).strip().splitlines() or [""]
        compiler = [line for line in lines if "error:" in line]  # the compiler's own words
        line = (compiler or lines)[0][:300]
        why = f"building the native decode kernels failed: {type(error).__name__}: {line}"
        _log.warning("%s; inductor's loops serve", why)
        return why
    return None


def _ninja_from_pip() -> None:
    """Put the ``ninja`` pip package's binary on this process's PATH, where it is installed
    (scripts/requirements.txt has it; a ROS install may have none on PATH)."""
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return
    os.environ["PATH"] = os.pathsep.join((ninja.BIN_DIR, os.environ.get("PATH", "")))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` for one float32 row, through the native kernel (``load`` first)."""
    return torch.ops.vlm_ros.gemv(x, weight, bias)


def attend_one(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    position: int,
) -> torch.Tensor:
    """``keys[:, :, position] = k[:, :, 0]`` (and ``values``), then one query's softmax
    attention over the cache's slots 0..position (the native kernel; ``load`` first):
    F.scaled_dot_product_attention(q, keys[:, :, :live], values[:, :, :live],
    enable_gqa=True) with live = position + 1."""
    return torch.ops.vlm_ros.attend_one(q, k, v, keys, values, position)
