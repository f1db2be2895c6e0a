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
from dataclasses import replace
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
    *text_lines, timing_line = result.stdout.strip().splitlines()
    for stage in STAGES:
        assert re.search(rf"{stage} \d+\.\d ms", timing_line), timing_line
    assert "5 tokens, stop: max_new_tokens" in timing_line
    # The streamed text is the seeded sample the API gives for the same settings (so the seed
    # and the sampling options reached the decoder), and not the greedy answer.
    from vlm_ros.config import GenerationConfig
    from vlm_ros.infer.pipeline import Assistant

    image = np.asarray(Image.open(png).convert("RGB"))
    sample = GenerationConfig(max_new_tokens=5, do_sample=True, temperature=1.5, seed=4)
    with Assistant.load(model, generation=sample) as assistant:
        expected = assistant.answer(image, "Is it clear?").text
        greedy = assistant.answer(image, "Is it clear?", generation=GenerationConfig()).text
        other_seeds = {
            assistant.answer(image, "Is it clear?", generation=replace(sample, seed=s)).text
            for s in (5, 6, 7)
        }
    assert "\n".join(text_lines).strip() == expected.strip() != ""
    assert expected != greedy and other_seeds != {expected}, (expected, greedy, other_seeds)


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


@pytest.mark.parametrize("size", [8192, 20000])
def test_huge_declared_png_is_one_line_exit_2_subprocess(size, tmp_path, model):
    """A small PNG declaring 8192x8192 (over the 16 MP cap) or 20000x20000 (Pillow's
    DecompressionBombError): refused from the header, one line, exit 2, no traceback."""
    from vlm_ros.bench.hostile_images import bomb_png

    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(size, size))
    for command in ("ask", "rank"):
        args = [command, "--model", model, "--image", str(path)]
        result = vlm_ros(*args, *(["q"] if command == "ask" else []))
        line = _one_error_line(result.returncode, result.stderr, command)
        assert f"file {path} image is too large" in line, line


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
        (["--device", "bogus", "q"], "unknown device 'bogus'; expected cpu, cuda or cuda:N"),
        (["--device", "cuda", "q"], "device 'cuda' requested, but torch sees no CUDA GPU"),
        (["--device", "cuda:1", "q"], "device 'cuda:1' requested, but torch sees no CUDA GPU"),
    ],
)
def test_ask_errors_are_one_line(args, words, model, png, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only machine
    args = [a.format(nowhere=tmp_path / "x") for a in args]
    if "--model" not in args:
        args = ["--model", model, *args]
    code, _, err = in_process(capsys, "ask", "--image", str(png), *args)
    assert words in _one_error_line(code, err, "ask")


def test_bad_device_subprocess(model, png):
    """Without the check, torch's own error escaped as a traceback."""
    result = vlm_ros("rank", "--model", model, "--image", str(png), "--device", "cpu:x:1")
    assert "unknown device 'cpu:x:1'" in _one_error_line(result.returncode, result.stderr, "rank")


# ---- legacy TinyLLaVA's vision tower elsewhere: --vision-tower -------------------------------


@pytest.fixture(scope="module")
def moved_tower(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny legacy TinyLLaVA whose config still names ``vision_tower`` (relative), with the
    tower directory moved out of the checkpoint."""
    from tiny_models import copy_tiny_checkpoint

    from vlm_ros.model import tiny

    root = tmp_path_factory.mktemp("legacy")
    ckpt = copy_tiny_checkpoint("tiny_llava_phi", root / "TinyLLaVA-3.1B")
    tower = root / "elsewhere" / "TinyLLaVA-3.1B-SigLIP"
    tower.parent.mkdir()
    (ckpt / tiny.LEGACY_TOWER_DIR).rename(tower)
    return ckpt, tower


def test_vision_tower_option_for_ask_and_rank(moved_tower, png, capsys):
    ckpt, tower = moved_tower
    base = ["--image", str(png)]
    code, _, err = in_process(capsys, "ask", "--model", str(ckpt), *base, "q")
    assert "mm_vision_tower 'vision_tower'" in _one_error_line(code, err, "ask")

    original = str(tiny_checkpoint("tiny_llava_phi"))
    ask = [*base, "--max-new-tokens", "4", "Clear?"]
    code, expected, err = in_process(capsys, "ask", "--model", original, *ask)
    assert code == 0, err
    code, out, err = in_process(
        capsys, "ask", "--model", str(ckpt), "--vision-tower", str(tower), *ask
    )
    assert code == 0, err
    assert out.splitlines()[0] == expected.splitlines()[0]  # the same answer text

    rows = {}
    for name in (original, str(ckpt)):
        tower_args = ["--vision-tower", str(tower)] if name == str(ckpt) else []
        code, out, err = in_process(capsys, "rank", "--model", name, *tower_args, *base)
        assert code == 0, err
        rows[name] = [ln for ln in out.splitlines() if "p=" in ln]
    assert rows[str(ckpt)] == rows[original] and len(rows[original]) == 5


def test_vision_tower_errors_are_one_line(moved_tower, model, png, tmp_path, capsys):
    ckpt, _ = moved_tower
    code, _, err = in_process(
        capsys, "ask", "--model", str(ckpt), "--vision-tower", str(tmp_path / "none"),
        "--image", str(png), "q",
    )  # fmt: skip
    assert "vision tower directory" in _one_error_line(code, err, "ask")
    code, _, err = in_process(
        capsys, "rank", "--model", model, "--vision-tower", str(tmp_path), "--image", str(png)
    )
    assert "llava_phi keeps its vision tower inside" in _one_error_line(code, err, "rank")


def test_node_parameter_vision_tower_reaches_the_loader(moved_tower, png):
    from vlm_ros.infer.pipeline import Assistant
    from vlm_ros.ros.node_config import PARAMETERS, NodeConfig

    ckpt, tower = moved_tower
    values = {name: default for name, (default, _) in PARAMETERS.items()}
    assert NodeConfig.from_values(values).vision_tower is None  # "" = mm_vision_tower
    config = NodeConfig.from_values(values | {"model": str(ckpt), "vision_tower": str(tower)})
    with Assistant.load(
        config.model, config.runtime, config.generation, vision_tower=config.vision_tower
    ) as assistant:
        assert assistant.loaded.vision_tower_path == tower
