"""The CPU decoder's weights and KV cache on transparent huge pages (2 MiB), not 4 KiB ones.

Why: a CPU decode step streams every weight once per token, so it runs at the speed the
memory system delivers a stream, and part of that cost is address translation. A stream over
4 KiB pages takes a TLB miss every 4 KiB; in a virtual machine each miss is a two-level page
walk (the guest's tables, then the hypervisor's). torch allocates with malloc, which gets
4 KiB pages unless the system's THP mode is "always"; the default on most distributions is
"madvise", as on the CI hosts: nothing gets huge pages unless a program asks. Measured on the
2-vCPU AMD EPYC (Zen 4) host, huge pages against 4 KiB pages: over Phi-2's Linear shapes in
one process, a plain read 1.05x, inductor's GEMVs 1.11x, oneDNN's 1.06x (medians,
scripts/gemv_layouts.py); the full-size decoder 1.00-1.17x by path and run
(docs/performance.md, "Huge pages for the decoder's weights"). Small gains, and no loss beyond
the host's noise.

How: each tensor of at least 2 MiB is copied into its own anonymous mapping that was
``madvise(MADV_HUGEPAGE)``-d before its first touch, 2 MiB-aligned, and the tensor object is
pointed at the copy (``tensor.data = copy``). Every module and view holding that tensor
object sees the new memory, the old memory is freed with the last reference to it, and a
tensor's mapping is freed with the tensor (one mapping per tensor, so replacing a weight,
as quantizing in place does, frees it). Values are unchanged: this is a copy.

Where it cannot apply (not Linux, THP "never", a kernel without MADV_HUGEPAGE) nothing moves
and ``reason`` says why; the decoder runs as before. The kernel may also give 4 KiB pages to
an madvise-d range when it finds no free 2 MiB ones; ``Placement.huge_bytes`` is what the
kernel reports (AnonHugePages) so logs and the benchmark show what happened, not what was
asked.

Not used on CUDA (device memory has its own large pages), and tensors below 2 MiB stay where
they are (a huge page for a LayerNorm's weights would waste most of it).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import mmap
import os
import sys
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

_log = logging.getLogger(__name__)

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _pmd_size() -> int:
    """The size of a transparent huge page here: 2 MiB on x86-64 and on arm64 with 4 KiB
    base pages (a Jetson's), 512 MiB on arm64 with 64 KiB pages (then few tensors qualify)."""
    try:
        return int(THP_SETTING.with_name("hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 2 << 20


HUGE_PAGE = _pmd_size()

# Set on a tensor once moved: a second decoder on the same model finds its weights in place.
# A deep copy carries the attribute to memory malloc gave it, so the check also wants the
# 2 MiB alignment only our mappings have.
_MARK = "_vlm_ros_huge_pages"


@dataclass(frozen=True)
class Placement:
    """What ``place`` did: tensors and bytes copied onto huge-page mappings, how many of those
    bytes the kernel backs with huge pages (AnonHugePages growth; -1 where unreadable), and
    why nothing was moved (None when it was, or when nothing was big enough)."""

    tensors: int = 0
    moved_bytes: int = 0
    huge_bytes: int = -1
    reason: str | None = None

    def summary(self) -> str:
        if self.reason is not None:
            return f"huge pages not used: {self.reason}"
        mib = 2**20
        huge = "unknown" if self.huge_bytes < 0 else f"{self.huge_bytes / mib:.0f} MiB"
        return (
            f"{self.tensors} tensors ({self.moved_bytes / mib:.0f} MiB) placed on huge-page "
            f"mappings; the kernel backs {huge} with huge pages"
        )


def unavailable() -> str | None:
    """Why huge pages cannot be asked for here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return f"transparent huge pages are Linux's ({sys.platform})"
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return "this Python's mmap has no MADV_HUGEPAGE"
    try:
        setting = THP_SETTING.read_text()
    except OSError as error:
        return f"{THP_SETTING} unreadable ({error.strerror}): no transparent huge pages"
    if "[never]" in setting:
        return f"transparent huge pages are off on this system ({THP_SETTING}: never)"
    return None


def anon_huge_bytes() -> int:
    """This process's anonymous memory on huge pages (AnonHugePages), or -1 if unreadable."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


class _Libc:
    """glibc's mmap, munmap, madvise and malloc_trim through ctypes, bound on first use."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]  # fmt: skip
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.mmap, self.munmap, self.madvise = libc.mmap, libc.munmap, libc.madvise
        self.malloc_trim = getattr(libc, "malloc_trim", None)  # glibc only


@functools.cache
def _libc() -> _Libc:
    return _Libc()


def _map_aligned(length: int) -> int:
    """An anonymous private mapping of exactly ``length`` bytes (whole base pages) starting on a
    huge-page boundary, advised for huge pages before any page is touched. Mapped with a huge
    page to spare, then the spare head and tail unmapped: a huge page is only used where a
    whole one lies inside the mapping, so the tensor's last partial 2 MiB takes 4 KiB pages
    rather than a huge page mostly past its end (measured with the tail left mapped: ~1 MiB
    more resident per tensor)."""
    libc = _libc()
    spare = length + HUGE_PAGE
    base = libc.mmap(None, spare, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)  # fmt: skip
    if base is None or base == ctypes.c_void_p(-1).value:
        raise MemoryError(f"mmap of {spare} bytes failed: {os.strerror(ctypes.get_errno())}")
    start = base + (-base % HUGE_PAGE)
    if start > base:
        libc.munmap(base, start - base)
    if base + spare > start + length:
        libc.munmap(start + length, base + spare - start - length)
    libc.madvise(start, length, mmap.MADV_HUGEPAGE)
    return start


def huge_page_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor on its own huge-page mapping (2 MiB-aligned). The
    mapping is unmapped when the last tensor viewing it is freed."""
    nbytes = math.prod(shape) * dtype.itemsize
    length = -(-max(nbytes, 1) // mmap.PAGESIZE) * mmap.PAGESIZE
    address = _map_aligned(length)
    area = (ctypes.c_uint8 * length).from_address(address)
    unmap = weakref.finalize(area, _libc().munmap, address, length)  # with the last reference
    unmap.atexit = False  # at exit the process's memory goes anyway; a late reader must not fault
    raw = torch.frombuffer(area, dtype=torch.uint8, count=nbytes)  # holds ``area``
    return raw.view(dtype).view(shape)


def release_freed_memory() -> None:
    """Hand memory malloc kept after frees back to the system (glibc's malloc_trim): the
    tensors ``place`` replaced were malloc's, and mid-sized freed blocks would otherwise stay
    in this process's resident memory."""
    trim = _libc().malloc_trim
    if trim is not None:
        trim(0)


def _movable(tensor: torch.Tensor, min_bytes: int) -> bool:
    """A plain CPU tensor of ``min_bytes`` or more that owns all of its memory (a view into a
    larger buffer is left: moving it would keep the buffer and its copy both)."""
    nbytes = tensor.numel() * tensor.element_size()
    return (
        tensor.device.type == "cpu"
        and tensor.layout == torch.strided
        and not tensor.is_quantized
        and tensor.is_contiguous()
        and nbytes >= min_bytes
        and tensor.untyped_storage().nbytes() == nbytes
        and not (getattr(tensor, _MARK, False) and tensor.data_ptr() % HUGE_PAGE == 0)
    )


def place(tensors: Iterable[torch.Tensor], min_bytes: int = HUGE_PAGE) -> Placement:
    """Copy every CPU tensor of at least ``min_bytes`` onto a huge-page mapping, in place (the
    tensor objects stay; their memory changes). Tensors already moved are left. One tensor at a
    time, its old memory freed and handed back before the next: the peak is the tensors plus
    the largest of them."""
    reason = unavailable()
    if reason is not None:
        return Placement(reason=reason)
    unique = {id(t): t for t in tensors}.values()  # a tied weight appears twice
    todo = [t for t in unique if _movable(t, min_bytes)]
    before = anon_huge_bytes()
    moved = 0
    with torch.no_grad():
        for tensor in todo:
            copy = huge_page_empty(tensor.shape, tensor.dtype)
            copy.copy_(tensor)
            tensor.data = copy  # the old memory is freed here unless something else holds it
            setattr(tensor, _MARK, True)
            moved += copy.numel() * copy.element_size()
            release_freed_memory()  # per tensor: the peak is the weights plus one tensor
    after = anon_huge_bytes()
    huge = after - before if before >= 0 and after >= 0 else -1
    return Placement(len(todo), moved, huge)


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``module`` (shared ones once)."""
    return [*module.parameters(), *module.buffers()]
