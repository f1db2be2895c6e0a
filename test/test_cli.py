"""``vlm-ros ask`` / ``rank`` / ``make-tiny`` as a user runs them, and their errors: one line on
stderr, exit code 2, never a traceback.

A few runs go through a real subprocess (``python -m vlm_ros``: entry point, argument parsing,
exit code, stderr); each costs a fresh torch + transformers import (10-20 s on the 2 shared CI
cores), so the other cases call ``vlm_ros.cli.main`` in-process, which is the same code path
below the interpreter start.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_models import tiny_checkpoint

from vlm_ros.cli import main

REPO = Path(__file__).resolve().parents[1]
STAGES = ("preprocess", "vision", "projector", "prefill", "decode", "total")


def vlm_ros(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run(
        [sys.executable, "-m", "vlm_ros", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "scene.png"
    rgb = np.random.default_rng(2).integers(0, 256, (36, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture(scope="module")
def model() -> str:
    return str(tiny_checkpoint("llava_phi"))


def _one_error_line(code: int, stderr: str, command: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("vlm-ros")]
    assert len(lines) == 1 and lines[0].startswith(f"vlm-ros {command}: error: "), stderr
    return lines[0]


# ---- subprocess runs --------------------------------------------------------------------------


def test_ask_subprocess_streams_a_seeded_sample(model, png):
    result = vlm_ros(
        "ask", "--model", model, "--image", str(png), "--max-new-tokens", "5",
        "--sample", "--temperature", "1.5", "--seed", "4", "--stream", "Is it clear?",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    timing_line = result.stdout.strip().splitlines()[-1]
    for stage in STAGES:
        assert re.search(rf"{stage} \d+\.\d ms", timing_line), timing_line
    assert "5 tokens, stop: max_new_tokens" in timing_line


def test_rank_subprocess_prints_probabilities(model, png):
    result = vlm_ros("rank", "--model", model, "--image", str(png))
    assert result.returncode == 0, result.stderr
    rows = [ln for ln in result.stdout.splitlines() if "p=" in ln]
    names = {ln[2:].split()[0] for ln in rows}
    assert names == {"continue", "slow_down", "stop", "turn_left", "turn_right"}
    probs = [float(re.search(r"p=([\d.]+)", ln).group(1)) for ln in rows]
    assert sum(probs) == pytest.approx(1.0, abs=1e-3)
    assert rows[0].startswith("* ") and probs == sorted(probs, reverse=True)


def test_make_tiny_subprocess_then_ask(tmp_path, png, capsys):
    out = tmp_path / "mipha"
    made = vlm_ros("make-tiny", "--family", "mipha_phi", "--out", str(out))
    assert made.returncode == 0, made.stderr
    code, stdout, err = in_process(
        capsys, "ask", "--model", str(out), "--image", str(png), "--max-new-tokens", "2", "Hi?"
    )
    assert code == 0, err
    assert "2 tokens" in stdout


@pytest.mark.parametrize("which", ["missing", "text"])
def test_bad_image_file_subprocess(which, tmp_path, model):
    path = tmp_path / ("no.png" if which == "missing" else "not-an-image.png")
    if which == "text":
        path.write_text("hello")
    result = vlm_ros("ask", "--model", model, "--image", str(path), "q")
    line = _one_error_line(result.returncode, result.stderr, "ask")
    assert ("does not exist" if which == "missing" else "cannot read image") in line


def test_error_after_loading_subprocess(model, png):
    """An error raised with torch and the model loaded is still one line, no traceback."""
    result = vlm_ros("rank", "--model", model, "--image", str(png), "--candidates", "go", "go")
    assert "duplicate candidates: go" in _one_error_line(result.returncode, result.stderr, "rank")


# ---- in-process runs --------------------------------------------------------------------------


def test_ask_prints_answer_and_stage_milliseconds(model, png, capsys):
    code, out, err = in_process(
        capsys, "ask", "--model", model, "--image", str(png), "--max-new-tokens", "3", "Clear?"
    )
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) >= 2 and all(f"{s} " in lines[-1] for s in STAGES)
    assert "3 tokens, stop: max_new_tokens" in lines[-1]


def test_rank_custom_candidates(model, png, capsys):
    code, out, err = in_process(
        capsys, "rank", "--model", model, "--image", str(png),
        "--instruction", "Where to go?", "--candidates", "left", "right",
    )  # fmt: skip
    assert code == 0, err
    assert len([ln for ln in out.splitlines() if "p=" in ln]) == 2


@pytest.mark.parametrize(
    "args, words",
    [
        (["--model", "{nowhere}", "q"], "no checkpoint directory"),
        (["  "], "question is empty"),
        (["--max-new-tokens", "5000", "q"], "does not fit the context"),
        (["--max-new-tokens", "0", "q"], "max_new_tokens must be a positive integer"),
    ],
)
def test_ask_errors_are_one_line(args, words, model, png, tmp_path, capsys):
    args = [a.format(nowhere=tmp_path / "x") for a in args]
    if "--model" not in args:
        args = ["--model", model, *args]
    code, _, err = in_process(capsys, "ask", "--image", str(png), *args)
    assert words in _one_error_line(code, err, "ask")
