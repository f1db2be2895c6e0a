"""Remote against local latency for the same model: what ``backend: remote`` adds, split into
encode, network and the server's queue and stages.

    vlm-ros serve --model demo --replicas 1 --threads 1 --port 8000 &
    python -m vlm_ros.bench.remote_overhead --server-url http://127.0.0.1:8000 \\
        --out bench/results/remote-overhead-cpu-demo.json

One process loads the model locally (the baseline, measured in the same run) and also talks to
the server; requests alternate local, remote PNG, remote JPEG on the same frame and question,
one at a time, so the two never compete for the CPU at once. Per path: the median and p90 of
the whole request (``timings.total``), of the server's own total, and of encode, network and
server_queue; the ratio of each remote median to the local one; and whether the remote greedy
answer equals the local one (PNG: it must; JPEG: it may differ).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import numpy as np

from vlm_ros.config import RemoteConfig, RuntimeConfig

QUESTION = "Describe the scene in front of the robot."
SIZES = {"320x240": (320, 240), "720p": (1280, 720)}
KEYS = ("total", "encode", "network", "server_queue", "vision", "prefill", "decode")


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "p90": float(np.percentile(values, 90))}


def run(server_url: str, model: str, iters: int, max_new_tokens: int, threads: int) -> dict:
    from vlm_ros.demo.world import render_frame
    from vlm_ros.infer.backends import load_assistant

    local = load_assistant(model, RuntimeConfig(threads=threads))
    remotes = {
        enc: load_assistant(model, RuntimeConfig(backend="remote", remote=RemoteConfig(
            server_url=server_url, image_encoding=enc, jpeg_quality=90, health_period_s=0.0,
            request_timeout_s=300.0)))
        for enc in ("png", "jpeg")
    }  # fmt: skip
    cases = []
    for size, (w, h) in SIZES.items():
        image = np.ascontiguousarray(render_frame(5, w, h)[:, :, :3])
        rows: dict[str, list] = {"local": [], "png": [], "jpeg": []}
        same = {"png": True, "jpeg": True}
        for i in range(iters + 1):  # the first round warms up both sides, not recorded
            want = local.answer(image, QUESTION, max_new_tokens=max_new_tokens)
            got = {e: r.answer(image, QUESTION, max_new_tokens=max_new_tokens)
                   for e, r in remotes.items()}  # fmt: skip
            if i == 0:
                continue
            rows["local"].append(want.timings.as_dict())
            for enc, ans in got.items():
                rows[enc].append(ans.timings.as_dict())
                same[enc] &= ans.token_ids == want.token_ids
        local_total = statistics.median(r["total"] for r in rows["local"])
        paths = {}
        for path, samples in rows.items():
            out: dict[str, object] = {k: _stats([s[k] for s in samples]) for k in KEYS}
            out["total_vs_local"] = statistics.median(s["total"] for s in samples) / local_total
            if path != "local":
                server = [s["total"] - s["encode"] - s["network"] - s["server_queue"]
                          for s in samples]  # fmt: skip
                out["server_inference"] = _stats(server)
                out["greedy_equal_to_local"] = same[path]
            paths[path] = out
        cases.append({"size": size, "paths": paths})
    for assistant in (local, *remotes.values()):
        assistant.close()
    return {
        "what": "remote (vlm-ros serve over HTTP) against local latency, same model and frame",
        "model": model, "server_url": server_url, "iters": iters,
        "max_new_tokens": max_new_tokens, "question": QUESTION, "local_threads": threads,
        "note": "server and client share this host: network is loopback, no real link",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                 "loadavg_1m_before": os.getloadavg()[0], "python": platform.python_version()},
        "cases": cases,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-url", required=True)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1, help="local torch threads")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    result = run(args.server_url, args.model, args.iters, args.max_new_tokens, args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for case in result["cases"]:
        for path, p in case["paths"].items():
            extra = ""
            if path != "local":
                extra = (f" encode {p['encode']['median']:.1f} network {p['network']['median']:.1f}"
                         f" queue {p['server_queue']['median']:.1f}"
                         f" equal={p['greedy_equal_to_local']}")  # fmt: skip
            print(f"{case['size']:>8} {path:<6} total {p['total']['median']:8.1f} ms "
                  f"(x{p['total_vs_local']:.2f}){extra}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
