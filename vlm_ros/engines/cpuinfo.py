"""The CPU as ``/proc/cpuinfo`` describes it, read in one place (no torch, no ROS).

What depends on it: the inductor cache's directory, one per CPU kind (compile_cache), the
float32 kernel chosen by vendor (cpu_kernels), and the machine record of every benchmark and
soak result, whose figures differ 2-3x between an AVX2 and an AVX-512 host. Each read the file
its own way before; a reading that differs between them would file a result under one CPU and
cache its code under another.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

CPUINFO = Path("/proc/cpuinfo")


@functools.lru_cache(maxsize=8)
def fields(cpuinfo: Path = CPUINFO) -> Mapping[str, str]:
    """The first processor's ``key: value`` lines (the keys read here are the same for every
    processor of a machine, and do not change while it runs: read once); empty where the
    system has no such file (another OS)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return MappingProxyType({})
    found: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if found:
                break  # the first processor's block has ended
            continue
        key, sep, value = line.partition(":")
        if sep:
            found.setdefault(key.strip(), value.strip())
    return MappingProxyType(found)


def flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The feature flags: x86's ``flags``, Arm's ``Features``."""
    info = fields(cpuinfo)
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def model_name(cpuinfo: Path = CPUINFO) -> str:
    """x86's ``model name`` ("AMD EPYC", "Intel(R) Xeon(R) ..."); else what Python knows."""
    return fields(cpuinfo).get("model name") or platform.processor() or platform.machine()


def vendor(cpuinfo: Path = CPUINFO) -> str:
    """The x86 vendor id ("GenuineIntel", "AuthenticAMD", ...); "" where there is none (another
    OS, an Arm CPU)."""
    return fields(cpuinfo).get("vendor_id", "")
