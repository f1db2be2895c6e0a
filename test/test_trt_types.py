"""CI type-checks the TensorRT module with mypy against tensorrt-stubs (TensorRT itself needs a
GPU and is not installable here; the stubs are). Same invocation as scripts/test.sh: the stubs
live in ``.venv/typestubs`` (installed --no-deps and repaired by scripts/setup.sh), never in
site-packages, where their pyi-only ``tensorrt/`` would import as an empty package.

A negative control proves mypy really reads the stubs (a wrong argument type must be caught),
so a silently skipped import can never pass as "clean"."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUBS = Path(os.environ.get("VLM_ROS_VENV", sys.prefix)) / "typestubs"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None or not (STUBS / "tensorrt").is_dir(),
    reason=f"mypy or tensorrt-stubs missing (expected in {STUBS}; run scripts/setup.sh)",
)


def _mypy(*paths: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MYPYPATH": str(STUBS)}
    return subprocess.run(
        [sys.executable, "-m", "mypy", *map(str, paths)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip


def test_trt_engine_is_mypy_clean_against_tensorrt_stubs():
    result = _mypy("vlm_ros/engines/trt_engine.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout


def test_mypy_really_checks_tensorrt_calls(tmp_path):
    bad = tmp_path / "bad_trt.py"
    bad.write_text(
        "import tensorrt as trt\n"
        "builder = trt.Builder(trt.Logger(trt.Logger.WARNING))\n"
        "config = builder.create_builder_config()\n"
        'config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, "4 GiB")\n'
    )
    result = _mypy(bad)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "set_memory_pool_limit" in result.stdout
