"""Where inductor keeps what it compiled: a directory that survives a reboot.

Why: torch keeps inductor's compiled kernels (its FX graph cache and the C++ it built) under
``/tmp/torchinductor_<user>`` by default, and many robots clear ``/tmp`` at every boot (tmpfs,
or systemd-tmpfiles on Ubuntu). The decoder compiles at configure: on the `small` preset the
uncompiled step's regions (infer/regional_step.py) took 17.7 s with an empty cache and 4.2 s with
a warm one in a new process; the whole compiled step 36-50 s against 4-7 s
(docs/performance.md). So unless the user chose a directory (``TORCHINDUCTOR_CACHE_DIR``), it
is ``$XDG_CACHE_HOME/vlm_ros/inductor`` (``~/.cache/vlm_ros/inductor``), where it is writable;
else torch's default stays. inductor reads the variable at each use, so setting it before the
first compile is enough. Its cache keys include the torch version and the CPU, so a changed
install compiles afresh instead of loading stale code.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from pathlib import Path

_log = logging.getLogger(__name__)
ENV = "TORCHINDUCTOR_CACHE_DIR"


def default_dir(environ: MutableMapping[str, str]) -> Path:
    base = environ.get("XDG_CACHE_HOME") or os.path.join(environ.get("HOME") or "~", ".cache")
    return Path(base).expanduser() / "vlm_ros" / "inductor"


def use_persistent_cache(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Point inductor's cache at ``default_dir`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set:
    the directory in use, or None where torch's default stays (the directory could not be
    made or written; the log says why, once per call)."""
    if environ.get(ENV):
        return environ[ENV]
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
