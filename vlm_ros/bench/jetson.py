"""The Python half of scripts/jetson-check.sh: what the board is, how a params file's settings
run on it, and one JSON that puts it all together.

    python -m vlm_ros.bench.jetson environment OUT.json
    python -m vlm_ros.bench.jetson profile --params config/llava_phi_orin_nano.yaml \
        --model DIR [--device cuda] [--iters 5] OUT.json
    python -m vlm_ros.bench.jetson summary OUTDIR          # -> OUTDIR/jetson-check.json

``profile`` runs the product path (Assistant.load with the params file's runtime settings, the
memory plan checked first, then answers on a camera-sized image) and sets its p50 latency per
stage and its tokens/s beside the file's budgets, and the memory it took beside the plan. It is
the board's own figure where the random-weight bench cannot run (the Orin Nano has no room for
a half-precision Phi-2, which that bench builds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vlm_ros.model import boards, memory_plan

QUESTION = "Is the path ahead clear? Describe what is in front of the robot."


# ---- the board -----------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip("\x00\n ")
    except OSError:
        return None


def _command(*argv: str) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout + done.stderr).strip() if done.returncode == 0 else None


def _devfreq() -> dict[str, dict[str, str | None]]:
    """Current/max frequency of each devfreq device (the GPU and EMC on an Orin)."""
    found = {}
    for dev in sorted(Path("/sys/class/devfreq").glob("*")):
        found[dev.name] = {k: _read(str(dev / k)) for k in ("cur_freq", "max_freq", "governor")}
    return found


def environment() -> dict:
    """Device, JetPack, power mode, clocks, memory and the software stack, as far as readable
    (every field None where this machine has no such thing)."""
    import torch

    board = boards.detect_board()
    info: dict = {
        "board": board.key if board else None,
        "model": _read("/proc/device-tree/model"),
        "l4t": os.environ.get("VLM_ROS_L4T") or None,  # from scripts/platform.sh
        "jetpack": os.environ.get("VLM_ROS_JETPACK") or None,
        "power_mode": _command("nvpmodel", "-q"),
        "jetson_clocks": _command("sudo", "-n", "jetson_clocks", "--show"),
        "devfreq": _devfreq(),
        "cpu0_freq_khz": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq"),
        "mem_total_gib": boards.meminfo_gib(Path("/"), "MemTotal"),
        "mem_available_gib": boards.meminfo_gib(Path("/"), "MemAvailable"),
        "swap_total_gib": boards.meminfo_gib(Path("/"), "SwapTotal"),
        "zram": sorted(p.name for p in Path("/sys/block").glob("zram*")),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    except ImportError as exc:
        info["tensorrt"] = f"not importable: {exc}"
    return info


# ---- a params file's settings, run ----------------------------------------------------------


def load_params(path: Path):
    """The node's configuration from a params file (the node's own defaults underneath)."""
    import yaml

    from vlm_ros.ros.node_config import PARAMETERS, NodeConfig

    values = {name: default for name, (default, _) in PARAMETERS.items()}
    values |= yaml.safe_load(path.read_text())["/**"]["ros__parameters"]
    return NodeConfig.from_values(values)


def profile(model: str, params: Path, device: str | None = None, iters: int = 5) -> dict:
    """Load ``model`` as ``params`` says (``device`` overrides, for a CPU dry run), answer
    ``iters`` times on a 640x480 image, and compare with the file's budgets and the plan."""
    import dataclasses

    import numpy as np
    import torch

    from vlm_ros.infer.pipeline import Assistant

    config = load_params(params)
    runtime = config.runtime
    if device is not None:
        runtime = dataclasses.replace(runtime, device=device)
    start = time.perf_counter()
    assistant = Assistant.load(model, runtime=runtime, generation=config.generation)
    load_s = time.perf_counter() - start
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    assistant.answer(image, QUESTION)  # warm-up: kernels, caches, a compiled step
    answers = [assistant.answer(image, QUESTION) for _ in range(iters)]
    names = ("preprocess", "vision", "projector", "prefill", "decode", "total")
    stages = {n: statistics.median(getattr(a.timings, n) for a in answers) for n in names}
    budgets = dataclasses.asdict(config.budgets)
    verdicts = {name: {"p50_ms": stages[name], "budget_ms": budgets[name],
                       "within": stages[name] <= budgets[name]}
                for name in stages if budgets.get(name, 0) > 0}  # fmt: skip
    model_ = assistant.model
    arch = memory_plan.Architecture.of(model_.spec, model_.vision_config, model_.text_config)
    board = boards.resolve_board(runtime)
    plan = memory_plan.make_plan(
        arch, runtime, str(assistant.loaded.dtype).removeprefix("torch."),
        board or boards.Board("none", "no board", 0.0),
    )  # fmt: skip
    memory = {"plan_need_gib": plan.need / memory_plan.GiB,
              "plan_model_gib": plan.steady / memory_plan.GiB,
              "board": plan.where, "board_gib": plan.capacity / memory_plan.GiB}  # fmt: skip
    if runtime.device.startswith("cuda"):
        memory["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / memory_plan.GiB
        memory["cuda_max_reserved_gib"] = torch.cuda.max_memory_reserved() / memory_plan.GiB
    memory["mem_available_gib_after"] = boards.meminfo_gib(Path("/"), "MemAvailable")
    return {
        "params": str(params), "model": model, "family": assistant.family.name,
        "runtime": dataclasses.asdict(runtime), "iters": iters, "load_s": load_s,
        "tokens_per_s": statistics.median(a.tokens_per_second for a in answers),
        "answer_tokens": statistics.median(len(a.token_ids) for a in answers),
        "image_to_answer_ms": stages["total"], "stages_p50_ms": stages,
        "budgets": verdicts, "within_budgets": all(v["within"] for v in verdicts.values()),
        "memory": memory, "answer": answers[-1].text,
    }  # fmt: skip


# ---- one JSON ------------------------------------------------------------------------------


def junit_summary(path: Path) -> dict | None:
    """tests / failures / errors / skipped of a pytest JUnit XML."""
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def summary(outdir: Path) -> dict:
    """OUTDIR/jetson-check.json: environment, the tests' counts, each step's exit code, the
    profile run and the bench's headline figures."""

    def load(name: str):
        path = outdir / name
        return json.loads(path.read_text()) if path.is_file() else None

    steps = {}
    steps_log = outdir / "steps.txt"
    if steps_log.is_file():  # "NAME<tab>EXIT CODE or why skipped", from jetson-check.sh
        for line in steps_log.read_text().splitlines():
            name, _, code = line.partition("\t")
            steps[name] = int(code) if code.lstrip("-").isdigit() else code
    bench = {}
    for path in sorted(outdir.glob("bench-*.json")):
        result = json.loads(path.read_text())
        bench[path.stem] = {
            "preset": result.get("preset"), "dtype": result.get("dtype"),
            "decode_tokens_per_s": result.get("decode_tokens_per_s"),
            "image_to_16_tokens_ms": result.get("fast", {}).get("answer_16", {}).get("p50"),
            "speedup": result.get("speedup"),
        }  # fmt: skip
    report = {
        "environment": load("environment.json"), "steps": steps,
        "gpu_tests": junit_summary(outdir / "gpu-tests.xml"), "profile": load("profile.json"),
        "bench": bench,
    }  # fmt: skip
    (outdir / "jetson-check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_ros.bench.jetson")
    sub = parser.add_subparsers(dest="stage", required=True)
    sub.add_parser("environment").add_argument("out", type=Path)
    run = sub.add_parser("profile")
    run.add_argument("--params", type=Path, required=True)
    run.add_argument("--model", required=True)
    run.add_argument("--device", default=None)
    run.add_argument("--iters", type=int, default=5)
    run.add_argument("out", type=Path)
    sub.add_parser("summary").add_argument("outdir", type=Path)
    args = parser.parse_args(argv)
    if args.stage == "environment":
        result = environment()
    elif args.stage == "profile":
        result = profile(args.model, args.params, args.device, args.iters)
    else:
        print(json.dumps(summary(args.outdir), indent=1, default=str))
        return 0
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
