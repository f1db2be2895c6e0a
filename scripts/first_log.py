"""Seconds from `vlm-ros node --demo` starting to the node's first log line and to "active".

    .venv/bin/python scripts/first_log.py [--baseline SRC] [--runs N] [--out FILE.json]

SRC is another source tree of the package (e.g. ``git archive layout | tar -x -C /tmp/base``)
run in the same interpreter, for a before/after pair in one run on one machine. Wall times on a
shared machine are noisy: read the ratio, not the absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(src: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), PYTHONUNBUFFERED="1")
    env.setdefault("ROS_DOMAIN_ID", "77")
    command = [
        sys.executable,
        "-m",
        "vlm_ros",
        "node",
        "--demo",
        "--namespace",
        "first_log",
        "--ros-args",
        "-p",
        "threads:=1",
    ]
    start, first, active = time.monotonic(), None, None
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=src
    )
    try:
        for line in proc.stdout or ():
            if "vlm_assistant]" in line and first is None:
                first = (time.monotonic() - start, line.split("]: ", 1)[-1].strip())
            if "vlm_assistant]" in line and "active" in line:
                active = time.monotonic() - start
                break
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert first is not None and active is not None, "the node never became active"
    return {"first_log_s": first[0], "first_line": first[1], "active_s": active}


def summary(src: Path, runs: int) -> dict:
    results = [one_run(src) for _ in range(runs)]
    return {
        "src": str(src),
        "first_line": results[0]["first_line"],
        "first_log_s_median": round(statistics.median(r["first_log_s"] for r in results), 2),
        "active_s_median": round(statistics.median(r["active_s"] for r in results), 2),
        "runs": runs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another source tree to time the same way")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {"this": summary(ROOT, args.runs)}
    if args.baseline:
        result["baseline"] = summary(args.baseline, args.runs)
        result["first_log_ratio"] = round(
            result["this"]["first_log_s_median"] / result["baseline"]["first_log_s_median"], 3
        )
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
