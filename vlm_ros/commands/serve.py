"""``vlm-ros serve``: the model as an OpenAI-compatible server on Ray Serve (docs/SERVING.md).

Joins (or starts) a Ray cluster, deploys serving/ray_app.py's application with one replica per
GPU on a GPU cluster (or CPU replicas), prints the URL, and serves until Ctrl-C / SIGTERM, then
deletes the application (replicas drain their requests first). ``--detach`` leaves it running
on the cluster instead.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time
from pathlib import Path

from vlm_ros.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo", help="checkpoint dir, hub id or 'demo'")
    parser.add_argument("--served-name", help="model id of the API (default: from --model)")
    parser.add_argument(
        "--replicas", type=int, help="model replicas (default: one per GPU of the cluster, else 1)"
    )
    parser.add_argument(
        "--max-replicas", type=int, help="autoscale between --replicas and this many"
    )
    parser.add_argument(
        "--address",
        help="Ray cluster: ray://HEAD:10001 or auto (default: the one `ray start` made on this "
        "host, else a new local one)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--max-ongoing", type=int, default=1, help="requests a replica runs at once (default 1)"
    )
    parser.add_argument(
        "--max-queued",
        type=int,
        default=8,
        help="requests waiting for a replica before 503 'overloaded' (-1: unbounded)",
    )
    parser.add_argument("--api-key-env", metavar="VAR", help="require `Authorization: Bearer $VAR`")
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if the cluster has GPUs), cpu, cuda"
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads per CPU replica")
    parser.add_argument(
        "--max-image-bytes", type=int, default=8 << 20, help="encoded image limit (413 above)"
    )
    parser.add_argument(
        "--max-pixels", type=int, default=4096 * 4096, help="decoded image limit (413 above)"
    )
    parser.add_argument(
        "--detach", action="store_true", help="deploy and exit, leaving the app on the cluster"
    )


def served_name(model: str, name: str | None) -> str:
    """The API's model id: --served-name, else "demo", a checkpoint dir's name or the hub id."""
    if name:
        return name
    path = Path(model)
    return path.name if path.is_dir() else model


def api_key_sha256(var: str | None) -> str | None:
    if var is None:
        return None
    key = os.environ.get(var, "")
    if not key:
        raise InputError(f"--api-key-env {var}: the environment variable {var} is unset or empty")
    return hashlib.sha256(key.encode()).hexdigest()


def run(args: argparse.Namespace) -> int:
    key = api_key_sha256(args.api_key_env)  # before Ray starts: a missing key fails at once
    try:  # ray[serve]: the optional `serve` extra, imported only for this command
        from vlm_ros.serving import ray_app
    except ImportError as exc:
        raise InputError(
            f"vlm-ros serve needs Ray Serve: pip install 'vlm_ros[serve]' ({exc})"
        ) from None

    resources = ray_app.connect(args.address)
    gpus = resources.get("GPU", 0.0)
    device = args.device if args.device != "auto" else ("cuda" if gpus >= 1 else "cpu")
    replicas = args.replicas or (int(gpus) if device.startswith("cuda") else 1)
    opts = ray_app.ServeOptions(
        model=args.model,
        served_name=served_name(args.model, args.served_name),
        replicas=replicas,
        max_replicas=args.max_replicas,
        max_ongoing=args.max_ongoing,
        max_queued=args.max_queued,
        device=device,
        dtype=args.dtype,
        threads=args.threads,
        gpus_per_replica=1.0 if device.startswith("cuda") else 0.0,
        max_image_bytes=args.max_image_bytes,
        max_pixels=args.max_pixels,
        api_key_sha256=key,
    )
    print(
        f"[serve] deploying {opts.served_name!r}: {replicas} replica(s) on {device} "
        f"(cluster: {resources.get('CPU', 0):.0f} CPUs, {gpus:.0f} GPUs)",
        flush=True,
    )
    ray_app.deploy(opts, args.host, args.port)
    print(
        f"[serve] ready: http://{args.host}:{args.port}/v1 (model {opts.served_name!r})", flush=True
    )
    if args.detach:
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SIGTERM drains like Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        print("[serve] draining and stopping", flush=True)
    finally:
        ray_app.undeploy()
        ray_app.disconnect()
    return 0
