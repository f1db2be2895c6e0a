"""scripts/arm64-emulated-check.sh, the aarch64 run under qemu user-mode emulation (minutes
and ~5 GB: a command whose JSON is committed, bench/results/arm64-qemu-tests.json, not a CI
step). Here, on the host: the script is valid bash and the probe it runs in the emulator still
matches weight_int4's API. This file is not in the script's own list: under qemu without
binfmt_misc the emulated Python cannot start a subprocess of itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "arm64-emulated-check.sh"


def probe_source() -> str:
    """The probe the script writes and runs inside the emulator, cut from the script's
    here-document (test_avx2_limited.py runs it too, on torch's AVX2 kernels)."""
    text = SCRIPT.read_text()
    start = text.index("cat > \"$S/plugins/arm64_probe.py\" <<'PY'\n")
    body = text[text.index("\n", start) + 1 :]
    return body[: body.index("\nPY\n")] + "\n"


def test_the_arm64_check_script_parses_and_its_probe_passes_here(tmp_path):
    """The script is valid bash, and the probe it runs inside the emulator, cut from the
    script, passes natively here: it matches weight_int4's API and its bounds hold on x86."""
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    probe = tmp_path / "arm64_probe.py"
    probe.write_text(probe_source())
    root = str(SCRIPT.parents[1])
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(probe)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"] and len(result["int4_checks"]) == 4
    assert all(check["max_abs_error"] <= check["bound"] for check in result["int4_checks"])
