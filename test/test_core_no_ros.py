"""The core never imports rclpy: a fresh interpreter imports the ROS-free modules (pipeline,
command line, benchmark, rosbag evaluation with every submodule) and must not even try.

rclpy may or may not be installed here, so ``'rclpy' not in sys.modules`` alone could pass for
the wrong reason; a meta-path spy also records every attempt to import it. A module known to
import rclpy (the synthetic camera node) is imported last as a control: the spy must see it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import importlib, json, pkgutil, sys

attempts = []

class Spy:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "rclpy":
            attempts.append(name)
        return None  # let the real finders decide

sys.meta_path.insert(0, Spy())
core = ["vlm_ros.infer.pipeline", "vlm_ros.cli", "vlm_ros.bench.measure", "vlm_ros.bag",
        "vlm_ros.commands.ask", "vlm_ros.commands.rank", "vlm_ros.commands.make_tiny"]
for name in core:
    importlib.import_module(name)
import vlm_ros.bag
bag = sorted(m.name for m in pkgutil.walk_packages(vlm_ros.bag.__path__, "vlm_ros.bag."))
for name in bag:
    importlib.import_module(name)
result = {"imported": core + bag, "attempts": list(attempts),
          "in_sys_modules": "rclpy" in sys.modules}
try:
    importlib.import_module("vlm_ros.ros.synthetic_camera")
except ImportError:  # no ROS here: the attempt is what counts
    pass
result["control_attempts"] = attempts[len(result["attempts"]):]
print(json.dumps(result))
"""


def test_core_modules_do_not_import_rclpy():
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=REPO, env=env,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"vlm_ros.bag.evaluate", "vlm_ros.bag.replay"} <= set(result["imported"])
    assert result["attempts"] == [], f"the core tried to import {result['attempts']}"
    assert not result["in_sys_modules"]
    assert "rclpy" in result["control_attempts"]  # the spy does see a real rclpy import
