"""Throughput and overhead of `vlm-ros serve` with 1, 2, 4 and 8 concurrent clients (CPU).

    .venv/bin/python scripts/bench_serve.py --out bench/results/serve-cpu-demo.json \
        --plot docs/img/serve-throughput.png

One local Ray cluster; the application is deployed with 1 and then 2 model replicas (one torch
thread each). For each replica count and each concurrency, that many client threads send
greedy "Describe the scene." requests (a demo scene as PNG, the answer 24 tokens) over HTTP on
loopback until ``--requests`` answers came back. The baseline is the same request to an
in-process ``Assistant`` (one thread, no HTTP), measured right before every cell (a shared
machine's load changes over minutes; each ratio compares a cell with the baseline next to it).
Each served answer's ``vlm_ros`` timings split a request's latency into

* model: the replica's own stages (``timings_ms.total``, as local),
* queue: arrival at the ingress -> inference start (``queue_ms``),
* serve: the rest of ``server_ms`` (ingress parsing, Ray handle calls, image decode),
* http: the client's latency minus ``server_ms`` (JSON + base64, HTTP on loopback, proxy).

There is no batching to compare: the decoder is batch-1 (docs/SERVING.md), so the "with
batching" column of the issue is the replica count. Everything shares this machine's cores with
the clients; the JSON records how many.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import threading
import time
import urllib.request
from pathlib import Path

from PIL import Image

QUESTION = "Describe the scene."
SEED = 2_000_003


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": statistics.median(values),
        "p90": percentile(values, 0.9),
        "mean": statistics.fmean(values),
    }


def local_baseline(assistant, image, requests: int) -> dict:
    """``requests`` answers from the in-process Assistant, one after another."""
    lat, model = [], []
    start = time.perf_counter()
    for _ in range(requests):
        t = time.perf_counter()
        answer = assistant.answer(image, QUESTION, max_new_tokens=48)
        lat.append((time.perf_counter() - t) * 1000)
        model.append(answer.timings.total)
    wall = time.perf_counter() - start
    return {
        "requests": requests,
        "requests_per_s": requests / wall,
        "latency_ms": summary(lat),
        "model_ms": summary(model),
        "tokens": len(answer.token_ids),
    }


def run_clients(url: str, body: bytes, concurrency: int, requests: int) -> dict:
    """``concurrency`` threads share ``requests`` requests; every reply is recorded."""
    lock, left = threading.Lock(), [requests]
    rows: list[dict] = []
    refused: list[int] = []

    def client() -> None:
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=300) as r:
                    reply = json.loads(r.read())
            except urllib.error.HTTPError as err:
                refused.append(err.code)
                continue
            ext = reply["vlm_ros"]
            rows.append(
                {
                    "latency_ms": (time.perf_counter() - t) * 1000,
                    "server_ms": ext["server_ms"],
                    "queue_ms": ext["queue_ms"],
                    "model_ms": ext["timings_ms"]["total"],
                    "tokens": len(ext["token_ids"]),
                }
            )

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    col = lambda key: [r[key] for r in rows]  # noqa: E731
    serve = [r["server_ms"] - r["queue_ms"] - r["model_ms"] for r in rows]
    http = [r["latency_ms"] - r["server_ms"] for r in rows]
    return {
        "concurrency": concurrency,
        "answered": len(rows),
        "refused": refused,
        "requests_per_s": len(rows) / wall,
        "tokens_per_s": sum(col("tokens")) / wall,
        "latency_ms": summary(col("latency_ms")),
        "split_ms_p50": {
            "model": statistics.median(col("model_ms")),
            "queue": statistics.median(col("queue_ms")),
            "serve": statistics.median(serve),
            "http": statistics.median(http),
        },
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib  # the bag extra's plotting library, only when a plot is asked for

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    local = result["local"]
    for run in result["served"]:
        xs = [c["concurrency"] for c in run["cells"]]
        label = f"{run['replicas']} replica(s)"
        ax1.plot(xs, [c["requests_per_s"] for c in run["cells"]], "o-", label=label)
        ax2.plot(xs, [c["latency_ms"]["p50"] for c in run["cells"]], "o-", label=label)
    ax1.axhline(local["requests_per_s"], color="grey", ls="--", label="local, in process (median)")
    ax2.axhline(local["latency_ms_p50"], color="grey", ls="--", label="local, in process (median)")
    for ax, title in ((ax1, "throughput (answers/s)"), (ax2, "latency p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"vlm-ros serve, demo model, CPU ({result['host']['cpus']} cores shared with "
        "the clients), greedy 24-token answers"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--requests", type=int, default=48, help="answers per cell")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()

    import ray
    from ray import serve

    from vlm_ros.config import RuntimeConfig
    from vlm_ros.demo import world
    from vlm_ros.infer.pipeline import Assistant
    from vlm_ros.serving import ray_app

    image = world.render(world.scene_from_seed(SEED))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    url = f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"
    content = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]
    body = json.dumps(
        {
            "model": "demo",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 48,
            "temperature": 0,
        }
    ).encode()

    assistant = Assistant.load("demo", RuntimeConfig(threads=1))
    assistant.answer(image, QUESTION, max_new_tokens=48)  # warm-up
    baselines = []
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    served = []
    port = 18000 + os.getpid() % 1000
    try:
        for replicas in args.replicas:
            opts = ray_app.ServeOptions(replicas=replicas, threads=1, max_queued=64)
            ray_app.deploy(opts, "127.0.0.1", port)
            endpoint = f"http://127.0.0.1:{port}/v1/chat/completions"
            run_clients(endpoint, body, 2, 2 * replicas)  # warm-up: every replica answered once
            cells = []
            for concurrency in args.concurrency:
                local = local_baseline(assistant, image, max(8, args.requests // 2))
                baselines.append(local)
                cell = run_clients(endpoint, body, concurrency, args.requests)
                cell["local_requests_per_s"] = local["requests_per_s"]
                cell["local_latency_ms_p50"] = local["latency_ms"]["p50"]
                cell["throughput_vs_local"] = cell["requests_per_s"] / local["requests_per_s"]
                cells.append(cell)
                print(
                    f"{replicas} replica(s), {concurrency} clients: "
                    f"{cell['requests_per_s']:.1f} answers/s, p50 "
                    f"{cell['latency_ms']['p50']:.1f} ms, split {cell['split_ms_p50']}",
                    flush=True,
                )
            served.append({"replicas": replicas, "cells": cells})
            ray_app.undeploy()
    finally:
        serve.shutdown()
        ray.shutdown()

    result = {
        "what": "vlm-ros serve throughput and latency split, demo model on CPU, HTTP on loopback",
        "batching": "none: the decoder is batch-1 (static KV cache); replicas are the scaling axis",
        "request": {
            "question": QUESTION,
            "image": f"PNG {image.shape[1]}x{image.shape[0]}, {len(buf.getvalue())} bytes",
            "body_bytes": len(body),
            "max_tokens": 48,
            "temperature": 0,
            "answer_tokens": baselines[0]["tokens"],
        },
        "host": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads_per_replica": 1,
            "python": platform.python_version(),
        },
        "local": {
            "requests_per_s": statistics.median(b["requests_per_s"] for b in baselines),
            "latency_ms_p50": statistics.median(b["latency_ms"]["p50"] for b in baselines),
            "model_ms_p50": statistics.median(b["model_ms"]["p50"] for b in baselines),
            "runs": baselines,
        },
        "served": served,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
