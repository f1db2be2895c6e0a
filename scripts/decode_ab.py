"""Decode ms/token of two versions of the token loop, measured alternately in one run (CPU).

    .venv/bin/python scripts/decode_ab.py --old 12766c6 --preset small --rounds 6 \
        --out bench/results/cpu-decode-ab-small.json

The old revision's ``vlm_ros/`` is extracted with ``git archive`` into a temporary directory;
the new side is this checkout. Each round runs one child process per side, old and new
alternating (a shared machine's load changes over minutes; alternating gives both the same
conditions). A child builds the bench preset's random-weight model (seed 0, identical on both
sides), a StaticDecoder, and times ``decode.generate`` through each side's own signature: the
wall time of an answer of ``--tokens`` tokens minus that of a 1-token answer, per decoded
token (prefill cancels out), and the same in process CPU time: with one torch thread on a
shared, oversubscribed machine, CPU time counts the work done and much less of the waiting.
The JSON holds every sample, medians and the new/old ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import inspect, json, sys, time
import torch
from vlm_ros.bench.measure import PRESETS, build_model
from vlm_ros.config import GenerationConfig
from vlm_ros.infer import decode
from vlm_ros.infer.static_decode import StaticDecoder
from vlm_ros.timing import StageTimer

preset, tokens, reps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if threads > 0:
    torch.set_num_threads(threads)
model = build_model(preset, "cpu", torch.float32)
decoder = StaticDecoder(model.language_model, 1024)
hidden = model.text_config.hidden_size
length = PRESETS[preset].text_tokens + model.num_image_tokens
embeds = torch.randn(1, length, hidden, generator=torch.Generator().manual_seed(0))
new_style = "request" in inspect.signature(decode.generate).parameters

def answer(n):
    timer = StageTimer("cpu")
    if new_style:
        from vlm_ros.types import Request
        import numpy as np
        request = Request(np.zeros((0, 0, 3), np.uint8), "", max_new_tokens=n,
                          generation=GenerationConfig())
        gen = decode.generate(decoder, embeds, request, stop_token_id=-1, timer=timer)
    else:
        gen = decode.generate(decoder, embeds, config=GenerationConfig(), max_new_tokens=n,
                              stop_token_id=-1, timer=timer)
    decoder.reset()
    return gen

def clocks(n):
    w0, c0 = time.perf_counter(), time.process_time()
    gen = answer(n)
    return (time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3, gen.token_ids

with torch.inference_mode():
    answer(tokens)  # warm-up
    wall, cpu, ids = [], [], None
    for _ in range(reps):
        wall_one, cpu_one, _ = clocks(1)
        wall_full, cpu_full, ids = clocks(tokens)
        wall.append((wall_full - wall_one) / (tokens - 1))
        cpu.append((cpu_full - cpu_one) / (tokens - 1))
out = {"ms_per_token": wall, "cpu_ms_per_token": cpu, "token_ids": ids,
       "threads": torch.get_num_threads()}
print(json.dumps(out))
"""


def extract(rev: str, into: Path) -> Path:
    """``vlm_ros/`` of ``rev`` under ``into`` (models/ is not needed: random weights)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "vlm_ros"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def child(tree: Path, preset: str, tokens: int, reps: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, preset, str(tokens), str(reps), str(threads)],
        env=env,
        cwd=str(tree),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default="12766c6", help="git revision of the old loop")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3, help="timed answers per child")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from vlm_ros.bench.measure import machine_facts  # this checkout's machine description

    with tempfile.TemporaryDirectory(prefix="decode_ab_") as tmp:
        sides = {"old": extract(args.old, Path(tmp)), "new": ROOT}
        runs: dict[str, list[dict]] = {"old": [], "new": []}
        for round_ in range(args.rounds):
            for name in ("old", "new") if round_ % 2 == 0 else ("new", "old"):
                run = child(sides[name], args.preset, args.tokens, args.reps, args.threads)
                run["load_average_1min"] = os.getloadavg()[0]
                runs[name].append(run)
                print(f"round {round_} {name}: {run['ms_per_token']} {run['cpu_ms_per_token']}")
    result = summarise(args, runs)
    result["machine"] = machine_facts("cpu")
    text = json.dumps(result, indent=2) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


def summarise(args: argparse.Namespace, runs: dict[str, list[dict]]) -> dict:
    samples = {name: [s for r in rs for s in r["ms_per_token"]] for name, rs in runs.items()}
    cpu = {name: [s for r in rs for s in r["cpu_ms_per_token"]] for name, rs in runs.items()}
    medians = {name: statistics.median(v) for name, v in samples.items()}
    cpu_medians = {name: statistics.median(v) for name, v in cpu.items()}
    same = {tuple(r["token_ids"]) for rs in runs.values() for r in rs}
    return {
        "what": "decode ms/token, old vs new token loop, alternating child processes, CPU fp32",
        "old_revision": args.old,
        "new_revision": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip(),
        "preset": args.preset,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "reps_per_round": args.reps,
        "load_average_1min": {n: [r["load_average_1min"] for r in rs] for n, rs in runs.items()},
        "ms_per_token": samples,
        "median_ms_per_token": medians,
        "new_over_old": medians["new"] / medians["old"],
        "cpu_ms_per_token": cpu,
        "median_cpu_ms_per_token": cpu_medians,
        "cpu_new_over_old": cpu_medians["new"] / cpu_medians["old"],
        "same_tokens": len(same) == 1,
    }


if __name__ == "__main__":
    raise SystemExit(main())
