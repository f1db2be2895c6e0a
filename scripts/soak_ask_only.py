"""The soak (`vlm-ros soak`) with Ask clients only: 25 of them, as many requests a burst as the
full soak's 20 Ask + 5 Describe clients, no Describe goals. It tells whether the node's RSS
climb comes with the Ask service path (docs/NODE.md, the soak).

    .venv/bin/python scripts/soak_ask_only.py --duration 300 --out /tmp/soak-askonly.json
"""

from __future__ import annotations

import runpy
import sys

from vlm_ros.ros import soak


def main() -> None:
    soak.ASK_CLIENTS, soak.DESCRIBE_CLIENTS = 25, 0  # read when the soak spawns its clients
    sys.argv = ["vlm_ros", "soak", *sys.argv[1:]]
    runpy.run_module("vlm_ros", run_name="__main__")


if __name__ == "__main__":
    main()
