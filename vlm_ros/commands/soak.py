"""``vlm-ros soak``: the node under request bursts, a camera flood and bad frames for a while,
each party a process of its own over real DDS; writes the figures as JSON (vlm_ros.ros.soak).

    vlm-ros soak --duration 600 --out bench/results/soak-600s.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds of bursts and camera frames")  # fmt: skip
    parser.add_argument("--burst-period", type=float, default=30.0,
                        help="seconds between request bursts")  # fmt: skip
    parser.add_argument("--model", default="demo", help="the node's model (default: demo)")
    parser.add_argument("--ask-clients", type=int,
                        help="Ask client processes, 10 requests a burst each (20)")  # fmt: skip
    parser.add_argument("--describe-clients", type=int,
                        help="Describe client processes, 10 goals a burst each (5)")  # fmt: skip
    parser.add_argument("--out", default="soak.json", help="JSON file to write")


def run(args: argparse.Namespace) -> int:
    from vlm_ros.ros import soak  # rclpy only when the command runs

    clients = (
        soak.ASK_CLIENTS if args.ask_clients is None else args.ask_clients,
        soak.DESCRIBE_CLIENTS if args.describe_clients is None else args.describe_clients,
    )
    if min(clients) < 0 or not sum(clients):
        print("vlm-ros soak: --ask-clients and --describe-clients must be >= 0, not both 0")
        return 2
    figures = soak.run(args.duration, Path(args.out), args.burst_period, args.model, clients)
    print(json.dumps(summary(figures), indent=2))
    print(f"wrote {args.out}")
    problems = verdict(figures)
    for problem in problems:
        print(f"FAILED: {problem}")
    return 1 if problems else 0


def verdict(figures: dict) -> list[str]:
    """What makes the soak a failure, one line each (empty: it passed): a request with no
    response in the wait (lost; one after the node's promise is counted as late, not failed),
    a client process that failed or had to be killed, a camera that never delivered (it found
    no subscription, or failed: that transport went untested), or a node that did not exit
    cleanly on SIGINT."""
    problems = []
    for kind in ("ask", "describe"):
        tally = figures["requests"][kind]
        if tally["lost"]:  # late ones are counted, not failed: a loaded host's promise
            problems.append(f"{tally['lost']} {kind} requests lost")
        for error in tally.get("client_errors", []):
            problems.append(f"a {kind} client failed: {error}")
        if tally.get("clients_hung_at_exit"):
            problems.append(f"{len(tally['clients_hung_at_exit'])} {kind} clients hung at exit")
    for camera in figures["frames"]["cameras"]:
        if "error" in camera:
            problems.append(f"camera {camera.get('topic', '?')}: {camera['error']}")
    status = figures["shutdown"]["exit_status"]
    if status != 0:
        problems.append(f"the node exited {status} on SIGINT")
    return problems


def summary(figures: dict) -> dict:
    """The headline figures (the JSON has the rest)."""
    return {
        "requests": {k: {n: v[n] for n in ("sent", "answered", "refused", "lost", "late")}
                     for k, v in figures["requests"].items()},
        "ask_latency_ms": figures["ask_latency_ms"]["answered"],
        "frames": {k: v for k, v in figures["frames"].items() if k != "cameras"},
        "rss_mb": figures["rss_mb"],
        "shutdown": figures["shutdown"],
    }  # fmt: skip
