"""Where inductor keeps what it compiled: a directory that survives a reboot.

Why: torch keeps inductor's compiled kernels (its FX graph cache and the C++ it built) under
``/tmp/torchinductor_<user>`` by default, and many robots clear ``/tmp`` at every boot (tmpfs,
or systemd-tmpfiles on Ubuntu). The decoder compiles at configure: on the `small` preset the
uncompiled step's regions (infer/regional_step.py) took 17.7 s with an empty cache and 4.2 s with
a warm one in a new process; the whole compiled step 36-50 s against 4-7 s
(docs/performance.md). So unless the user chose a directory (``TORCHINDUCTOR_CACHE_DIR``), it
is ``$XDG_CACHE_HOME/vlm_ros/inductor/<cpu kind>`` (``~/.cache/vlm_ros/inductor/...``), where
it is writable; else torch's default stays. inductor reads the variable at each use, so
setting it before the first compile is enough.

Why a directory per CPU kind (``cpu_kind``: the machine, the instruction set torch's kernels
use, a hash of the CPU's feature flags): torch 2.13's FX graph cache keys on the torch version
and the thread count but not on the vector instruction set the C++ was generated for. An entry
written with AVX-512 kernels and loaded where torch runs AVX2 ones (``ATEN_CPU_CAPABILITY=avx2``
on the same host here; a home directory or an image carried to another CPU in a fleet) gave
NaN or wrong logits (its source is written for 16-lane vectors, AVX2's are 8; how the two
mix was not traced), reproduced with a LayerNorm and a GEMV (test/test_compile_cache.py). The
decoder's check at load caught every case (it refused the wrong step and served the
library's, slower), which is how this was first taken for a miscompile (docs/performance.md).
A directory the user chose is shared as they chose; torch's own default found in the variable
is not a choice (``torch_default``), and neither is another CPU kind's directory of ours: a
process sets the variable, and its children inherit it, also where they run other kernels (a
bench's AVX2 child gave a wrong float32 GEMV from its parent's AVX-512 directory).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from collections.abc import MutableMapping
from pathlib import Path

import torch

from vlm_ros.engines import cpuinfo

_log = logging.getLogger(__name__)
ENV = "TORCHINDUCTOR_CACHE_DIR"


def cpu_flags(info: Path = cpuinfo.CPUINFO) -> str:
    """The CPU's feature flags as one sorted line (x86 ``flags``, Arm ``Features``); empty
    where the system does not say."""
    return " ".join(sorted(cpuinfo.flags(info)))


def cpu_kind(flags: str | None = None) -> str:
    """What compiled CPU code is specific to beyond inductor's own key, as a directory name:
    the machine, the kernels torch runs (``ATEN_CPU_CAPABILITY`` can lower them) and a hash
    of the feature flags (a cache carried to another CPU model starts afresh), e.g.
    ``x86_64-avx512-3f9c0a1b2d``."""
    flags = cpu_flags() if flags is None else flags
    capability = torch.backends.cpu.get_cpu_capability().lower()
    digest = hashlib.sha256(flags.encode()).hexdigest()[:10]
    return f"{platform.machine().lower() or 'unknown'}-{capability}-{digest}"


def default_dir(environ: MutableMapping[str, str]) -> Path:
    base = environ.get("XDG_CACHE_HOME") or os.path.join(environ.get("HOME") or "~", ".cache")
    return Path(base).expanduser() / "vlm_ros" / "inductor" / cpu_kind()


def torch_default() -> str:
    """torch's own default directory (``/tmp/torchinductor_<user>``). torch writes it into
    ``TORCHINDUCTOR_CACHE_DIR`` when ``torch._dynamo`` is imported (torch 2.13; transformers
    imports it with its generation code, before any decoder is built), so finding it there
    is not a user's choice. Until this was seen, every process kept torch's default."""
    try:  # torch's own answer where this torch has it (a private module)
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return os.path.abspath(default_cache_dir())
    except ImportError:  # its rule in the torch versions that lack the module
        import getpass
        import tempfile

        return os.path.abspath(
            os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
        )


def _this_kinds_sibling(chosen: str) -> Path | None:
    """Where ``chosen`` is another CPU kind's directory of ours (``.../vlm_ros/inductor/
    <kind>``, inherited from a process that ran other kernels, not a user's choice): this
    kind's directory beside it; else None."""
    path, kind = Path(os.path.abspath(chosen)), cpu_kind()
    ours = path.parent.name == "inductor" and path.parent.parent.name == "vlm_ros"
    return path.parent / kind if ours and path.name != kind else None


def use_persistent_cache(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Point inductor's cache at ``default_dir`` unless ``TORCHINDUCTOR_CACHE_DIR`` names
    another place than torch's own default or another CPU kind's directory of ours: the
    directory in use, or None where torch's default stays (the directory could not be made or
    written; the log says why, once per call)."""
    chosen = environ.get(ENV)
    if chosen and os.path.abspath(chosen) != torch_default():
        where = _this_kinds_sibling(chosen)
        if where is None:
            return chosen
    else:
        where = default_dir(environ)
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe = where / f".write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        _log.info("inductor cache: %s is not writable (%s); torch's default stays", where, error)
        return None
    environ[ENV] = str(where)
    return str(where)
