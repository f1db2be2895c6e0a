"""scripts/jetson-check.sh is the one command a Jetson user runs on the device; nothing here is a
Jetson, so it is dry-run on CPU the way test_gpu_check.py runs gpu-check.sh: a fake /proc says
"Orin Nano 8GB" (VLM_ROS_SYSROOT), the device is the CPU, the model a tiny checkpoint and the
bench preset the tiny one. Every step must run, its files come out under OUTDIR, and
jetson-check.json must hold the device, the tests' counts, the profile run against the params
file's budgets and the bench; the bench a Nano cannot hold is skipped, saying why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_models import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
QUICK_TEST = "test/test_memory_plan.py::test_chunked_quantization_is_exact"


def _nano_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "proc/device-tree/model").write_bytes(
        b"NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\x00"
    )
    (root / "proc/meminfo").write_text("MemTotal: 7800000 kB\nMemAvailable: 6000000 kB\n")
    (root / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.3, GCID: 1\n")
    return root


def _dry_run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    full = {**os.environ, "PYTHON": sys.executable, "VLM_ROS_JETSON_DEVICE": "cpu",
            "VLM_ROS_SYSROOT": str(_nano_root(tmp_path)), "VLM_ROS_JETSON_ITERS": "1",
            "VLM_ROS_JETSON_PRESET": "tiny", "VLM_ROS_JETSON_TESTS": QUICK_TEST, **env}  # fmt: skip
    done = subprocess.run(["bash", str(ROOT / "scripts/jetson-check.sh"), str(out)], cwd=ROOT,
                          env=full, capture_output=True, text=True, timeout=900)  # fmt: skip
    return done, out


def test_dry_run_writes_one_json_with_every_part(tmp_path):
    done, out = _dry_run(tmp_path, VLM_ROS_JETSON_MODEL=str(tiny_checkpoint("llava_phi")))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "jetson-check.json").read_text())
    env = report["environment"]
    assert env["board"] == "orin-nano-8gb" and env["l4t"] == "36.4.3" and env["jetpack"] == "6.2"
    assert "power_mode" in env and "devfreq" in env and env["torch"]
    assert report["gpu_tests"] == {"tests": 1, "failures": 0, "errors": 0, "skipped": 0}
    steps = report["steps"]
    assert steps["environment"] == 0 and steps["GPU tests"] == 0 and steps["bench tiny"] == 0
    # the Nano profile is the default here; it runs PyTorch vision, so no engines to build
    assert steps["profile config/llava_phi_orin_nano.yaml"] == 0
    assert steps["build-engines"].startswith("skipped: config/llava_phi_orin_nano.yaml")
    profile = report["profile"]
    assert profile["runtime"]["quantize"] == "int8_weight_only" and profile["tokens_per_s"] > 0
    assert set(profile["budgets"]) == {"vision", "prefill", "decode", "total"}
    assert profile["budgets"]["total"]["budget_ms"] == 9303.0
    assert profile["memory"]["board"].startswith("Jetson Orin Nano 8GB")
    assert report["bench"]["bench-tiny"]["decode_tokens_per_s"] > 0


def test_a_nano_skips_the_bench_it_cannot_hold_and_a_failure_fails_the_run(tmp_path):
    done, out = _dry_run(tmp_path, VLM_ROS_JETSON_PRESET="llava-phi-full",
                         VLM_ROS_JETSON_TESTS="test/no_such_test.py")  # fmt: skip
    assert done.returncode != 0  # the failed test step
    steps = json.loads((out / "jetson-check.json").read_text())["steps"]
    assert steps["GPU tests"] != 0 and steps["environment"] == 0  # later steps still ran
    assert steps["profile"] == "skipped: no VLM_ROS_JETSON_MODEL (a checkpoint directory)"
    assert steps["bench llava-phi-full"].startswith("skipped: no: bf16 llava-phi-full needs")
