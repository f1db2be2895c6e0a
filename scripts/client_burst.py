"""Responses lost by one client that sends a burst of Asks at once, with ROS's default client
QoS (KEEP_LAST 10) against KEEP_ALL. docs/NODE.md ("Requests under load") cites the result.

Start a node first (``bash scripts/demo.sh``, same ROS_DOMAIN_ID), then:

    .venv/bin/python scripts/client_burst.py --out bench/results/client-burst.json

Each repetition runs one client process per QoS, in turn; a process sends ``--burst`` Asks
without waiting, waits up to 20 s for their responses, and repeats ``--rounds`` times. A
response not there after 20 s is counted lost (a refusal is a response: the demo's queue
refuses most of a burst at once).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from vlm_ros.engines import cpuinfo

CLIENT = """
import os, sys, threading, time
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from vlm_ros.srv import Ask

qos, burst, rounds, service = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rclpy.init()
node = rclpy.create_node("client_burst_" + qos)
kwargs = {}
if qos == "keep_all":
    kwargs["qos_profile"] = QoSProfile(
        history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE
    )
client = node.create_client(Ask, service, **kwargs)
executor = SingleThreadedExecutor()
executor.add_node(node)
threading.Thread(target=executor.spin, daemon=True).start()
if not client.wait_for_service(30):
    sys.exit("no service " + service)
time.sleep(1.0)  # matched both ways (docs/NODE.md: a response needs the client's reader)
got = 0
for _ in range(rounds):
    futures = [client.call_async(Ask.Request(question="Is the path clear?")) for _ in range(burst)]
    end = time.monotonic() + 20
    while time.monotonic() < end and not all(f.done() for f in futures):
        time.sleep(0.01)
    got += sum(f.done() for f in futures)
    for f in futures:
        if not f.done():
            client.remove_pending_request(f)
print(got, flush=True)
os._exit(0)  # the tally is out; rclpy's teardown beside a spinning thread can abort
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--service", default="/vlm_assistant/ask")
    parser.add_argument("--burst", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeats):
        for qos in ("default", "keep_all"):
            cmd = [sys.executable, "-c", CLIENT, qos, str(args.burst), str(args.rounds)]
            out = subprocess.run([*cmd, args.service], capture_output=True, text=True)
            if out.returncode != 0 or not out.stdout.split():
                sys.exit(f"client ({qos}) exited {out.returncode}: {out.stderr[-2000:]}")
            got = int(out.stdout.split()[-1])
            sent = args.burst * args.rounds
            runs.append({"client_qos": qos, "sent": sent, "responses": got, "lost": sent - got})
            print(runs[-1], flush=True)
    totals = {
        qos: {k: sum(r[k] for r in runs if r["client_qos"] == qos) for k in ("sent", "lost")}
        for qos in ("default", "keep_all")
    }
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": cpuinfo.model_name(),
        "burst": args.burst,
        "rounds": args.rounds,
        "runs": runs,
        "totals": totals,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
