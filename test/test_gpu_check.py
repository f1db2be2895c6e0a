"""scripts/gpu-check.sh is the one prepared run for a lent GPU machine (device time is scarce:
it must work the first time). Here it is dry-run on CPU with the tiny preset: every step runs,
the files come out flat under OUTDIR, and a failing step makes the exit code non-zero while the
later steps still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(out: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "VLM_ROS_GPU_DEVICE": "cpu",
            "VLM_ROS_GPU_PRESET": "tiny", "VLM_ROS_GPU_ITERS": "1", "VLM_ROS_GPU_WHEELS": "none",
            "VLM_ROS_GPU_TESTS": "test/test_trt.py", **env}  # fmt: skip
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh"), str(out)],
        cwd=ROOT, env=full, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_dry_run_writes_every_result_file(tmp_path):
    done = _dry_run(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = {p.name for p in tmp_path.iterdir()}
    assert {"environment.txt", "gpu-tests.log", "gpu-tests.xml", "bench.log", "cpu-tiny.json",
            "cpu-tiny.md"} <= names  # fmt: skip
    assert len(names) <= 8 and all(p.is_file() for p in tmp_path.iterdir())  # the device's limit
    assert "torch" in (tmp_path / "environment.txt").read_text()
    assert "passed" in (tmp_path / "gpu-tests.log").read_text()
    # the TensorRT-vision bench runs only on CUDA with tensorrt importable, and says so
    assert "TensorRT vision bench: skipped" in (tmp_path / "bench.log").read_text()
    result = json.loads((tmp_path / "cpu-tiny.json").read_text())
    assert result["preset"] == "tiny" and result["speedup"]["image_to_16_tokens"] > 0


def test_a_failing_step_fails_the_run_but_not_the_others(tmp_path):
    done = _dry_run(tmp_path, VLM_ROS_GPU_PRESET="no-such-preset")
    assert done.returncode != 0
    assert "CUDA tests: exit 0" in done.stdout  # the step before still ran and passed
    assert "bench no-such-preset: exit" in done.stdout


def test_on_cuda_only_the_gpu_marked_tests_run(tmp_path):
    """On CUDA the test step selects the tests marked gpu (CI runs their CPU siblings). Here,
    without a GPU, that selection must be exactly the CUDA tests, each skipped with its reason;
    the CUDA bench then fails on its own, without hiding the test step's result."""
    done = _dry_run(
        tmp_path, VLM_ROS_GPU_DEVICE="cuda", VLM_ROS_GPU_TESTS="test/test_static_decode.py"
    )
    log = (tmp_path / "gpu-tests.log").read_text()
    assert "CUDA tests: exit 0" in done.stdout
    assert "4 skipped" in log and "passed" not in log, log[-2000:]
    assert "no CUDA device" in log
    assert done.returncode != 0 and "bench tiny: exit" in done.stdout
