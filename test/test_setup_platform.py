"""scripts/setup.sh's platform branch (scripts/platform.sh), on a faked Jetson.

No Jetson is here, so the branch is driven by what setup.sh reads: a fake root holding
etc/nv_tegra_release (VLM_ROS_SYSROOT), or a fake dpkg-query that knows nvidia-l4t-core, a fake
`uname -m` = aarch64, and a fake torch (and tensorrt) package first on PYTHONPATH. The dry run
(VLM_ROS_SETUP_DRY_RUN=1) prints the commands setup.sh would run and runs the platform checks
with the base interpreter; it must create nothing. Each case checks which commands it would
run, which it refuses with one line, and how an x86-64 desktop with a CUDA GPU differs (it does
not: PyPI's x86-64 torch is the CUDA build)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
R36_4_3 = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n"  # noqa: E501
JETPACK_TORCH = "2.5.0a0+872d972e41.nv24.08"


def _fake_torch(where: Path, kind: str) -> None:
    """kind: "cuda" (JetPack's build), "cpu" (a PyPI aarch64 wheel), "missing" (this test's
    own torch hidden: importing it fails as it would with none installed)."""
    (where / "torch").mkdir(parents=True)
    if kind == "missing":
        (where / "torch/__init__.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
        return
    cuda = kind == "cuda"
    (where / "torch/__init__.py").write_text(
        f"__version__ = {JETPACK_TORCH!r}\n"
        "class version:\n    cuda = '12.6'\n"
        f"class cuda:\n    is_available = staticmethod(lambda: {cuda})\n"
    )


def _script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def _run(tmp_path: Path, *, release: str | None = R36_4_3, machine: str = "aarch64",
         ros: str | None = "humble", torch: str = "cuda", tensorrt: bool = True,
         l4t_package: str | None = None, nvidia_smi: bool = False):  # fmt: skip
    root, bin_dir, site = tmp_path / "root", tmp_path / "bin", tmp_path / "site"
    for d in (root / "etc", bin_dir, site):
        d.mkdir(parents=True, exist_ok=True)
    if release is not None:
        (root / "etc/nv_tegra_release").write_text(release)
    _script(bin_dir / "uname", f'[ "$1" = -m ] && echo {machine} || exec /bin/uname "$@"\n')
    if l4t_package is not None:
        _script(bin_dir / "dpkg-query", f'case "$*" in *nvidia-l4t-core*) printf %s '
                f'{l4t_package};; *) exit 1;; esac\n')  # fmt: skip
    else:  # this host's dpkg must not decide (it has no nvidia-l4t-core either way)
        _script(bin_dir / "dpkg-query", "exit 1\n")
    if nvidia_smi:
        _script(bin_dir / "nvidia-smi", "echo 'NVIDIA GeForce RTX 4090'\n")
    _fake_torch(site, torch)
    if tensorrt:
        (site / "tensorrt").mkdir()
        (site / "tensorrt/__init__.py").write_text("__version__ = '10.3.0'\n")
    env = {k: v for k, v in os.environ.items() if k not in ("ROS_DISTRO", "PYTHON")}
    env |= {"VLM_ROS_SETUP_DRY_RUN": "1", "VLM_ROS_SYSROOT": str(root),
            "VLM_ROS_VENV": str(tmp_path / "venv"), "PATH": f"{bin_dir}:{env['PATH']}",
            "PYTHONPATH": str(site), "PYTHON": sys.executable}  # fmt: skip
    if ros:
        env["ROS_DISTRO"] = ros
    done = subprocess.run(["bash", str(ROOT / "scripts/setup.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert not (tmp_path / "venv").exists(), "the dry run created the venv"
    return done, done.stdout + done.stderr


def _error_line(out: str) -> str:
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 1, out
    return errors[0]


def test_jetson_keeps_jetpacks_torch_and_never_tries_the_ros_wheels(tmp_path):
    done, out = _run(tmp_path)
    assert done.returncode == 0, out
    assert "Jetson: L4T R36.4.3 (JetPack 6.2), aarch64" in out
    assert f"keeping JetPack's torch {JETPACK_TORCH}" in out
    assert "--system-site-packages" in out and f"interpreter {sys.executable}" in out
    install = next(line for line in out.splitlines() if "would run:" in line and "pip" in line)
    assert "-c constraints-jetson.txt" in install and "requirements-ros" not in install
    requirements = next(line for line in out.splitlines() if "requirements-jetson.txt:" in line)
    assert "torch" not in requirements.replace("requirements-jetson.txt:", "")
    assert "transformers" in requirements
    assert f"constraints-jetson.txt: torch=={JETPACK_TORCH} numpy<2" in out
    assert "would not run: pip install torch" in out


def test_jetson_found_by_the_l4t_package_alone(tmp_path):
    done, out = _run(tmp_path, release=None, l4t_package="36.3.0-20240506102626")
    assert done.returncode == 0, out
    assert "L4T R36.3.0 (JetPack 6.0)" in out


def test_jetson_without_a_sourced_ros_stops_with_one_line(tmp_path):
    done, out = _run(tmp_path, ros=None)
    assert done.returncode == 1
    line = _error_line(out)
    assert "source ROS 2 Humble first" in line and "x86-64 CPython 3.11 only" in line
    assert "would run" not in out


@pytest.mark.parametrize(("torch", "expected"), [
    ("missing", "no torch in"),
    ("cpu", "does not see the GPU: not JetPack's build"),
])  # fmt: skip
def test_jetson_without_jetpacks_cuda_torch_stops_naming_the_wheel(tmp_path, torch, expected):
    done, out = _run(tmp_path, torch=torch)
    assert done.returncode == 1
    line = _error_line(out)
    assert expected in line and "NVIDIA's PyTorch wheel for JetPack 6.2" in line, line
    assert "would run" not in out  # stopped before any install


def test_jetson_without_tensorrt_names_the_jetpack_package(tmp_path):
    done, out = _run(tmp_path, tensorrt=False)
    assert done.returncode == 1
    line = _error_line(out)
    assert "'import tensorrt' fails" in line and "sudo apt install python3-libnvinfer" in line


def test_jetpack_5_is_refused(tmp_path):
    release = R36_4_3.replace("R36", "R35").replace("REVISION: 4.3", "REVISION: 6.0")
    done, out = _run(tmp_path, release=release)
    assert done.returncode == 1
    assert "L4T R35.6.0 is JetPack 5.1.x" in _error_line(out)


def test_other_arm64_without_ros_stops(tmp_path):
    done, out = _run(tmp_path, release=None, ros=None)
    assert done.returncode == 1
    assert "no ROS 2 sourced on aarch64" in _error_line(out)


@pytest.mark.parametrize("nvidia_smi", [False, True], ids=["x86-cpu", "x86-desktop-cuda"])
def test_x86_installs_as_before_cuda_or_not(tmp_path, nvidia_smi):
    """x86-64 (CI's path): the ROS 2 wheels and PyPI's torch pin, which on x86-64 is the CUDA
    build: a desktop GPU changes nothing, and no Jetson check runs."""
    done, out = _run(tmp_path, release=None, machine="x86_64", ros=None, torch="cpu",
                     tensorrt=False, nvidia_smi=nvidia_smi)  # fmt: skip
    assert done.returncode == 0, out
    assert "platform x86_64, mode wheels" in out
    assert "pip install -r requirements.txt -r requirements-ros.txt" in out
    assert "torch==2.13.0" in out and "Jetson" not in out and "ERROR" not in out
