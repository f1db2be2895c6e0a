"""The package's interfaces as rosbags types, so bags can be written and read without ROS.

rosbags serialises CDR from message definitions it knows. The standard types (sensor_msgs,
diagnostic_msgs, std_msgs) ship in its ROS 2 stores; ours are parsed from the package's own
``msg/*.msg`` files, never from a copy, so a bag written here matches what ``rosidl`` builds for
the node. The files are looked up in the source tree first (``<repo>/msg``) and then in the
installed share folder (``share/vlm_ros/msg``, as ``colcon build`` / ``ament_cmake`` lays it out).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from vlm_ros.bag import BagError

PACKAGE = "vlm_ros"
SCENE_ANSWER = "vlm_ros/msg/SceneAnswer"
ACTION_HINT = "vlm_ros/msg/ActionHint"
STAGE_LATENCY = "vlm_ros/msg/StageLatency"
DIAGNOSTIC_ARRAY = "diagnostic_msgs/msg/DiagnosticArray"
DIAGNOSTIC_STATUS = "diagnostic_msgs/msg/DiagnosticStatus"
KEY_VALUE = "diagnostic_msgs/msg/KeyValue"
IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE, COMPRESSED_IMAGE)
# ROS 1 bags name the same types without the "/msg/" part.
ROS1_IMAGE_TYPES = {"sensor_msgs/Image": IMAGE, "sensor_msgs/CompressedImage": COMPRESSED_IMAGE}

# Kilted is the distribution the PyPI wheels install; the CDR layout of every type used here is
# the same from Humble on, so a bag written with this store plays on Humble/Jazzy/Kilted.
DEFAULT_STORE = "ros2_kilted"


def msg_dir_candidates() -> list[Path]:
    """Where the package's .msg files may live, most specific first (source tree, then installs)."""
    here = Path(__file__).resolve()
    # <repo>/msg for a checkout; <prefix>/share/vlm_ros/msg for <prefix>/lib/pythonX.Y/
    # site-packages/vlm_ros/bag/types.py as colcon installs it, even without a sourced setup file
    candidates = [here.parents[2] / "msg"]
    if len(here.parents) > 5:
        candidates.append(here.parents[5] / "share" / PACKAGE / "msg")
    for prefix in _ament_prefixes():
        candidates.append(prefix / "share" / PACKAGE / "msg")
    candidates.append(Path(sys.prefix) / "share" / PACKAGE / "msg")
    return candidates


def _ament_prefixes() -> Iterable[Path]:
    """Install prefixes of a sourced ROS 2 workspace (AMENT_PREFIX_PATH), in search order."""
    for entry in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if entry:
            yield Path(entry)


def find_msg_dir(msg_dir: str | Path | None = None) -> Path:
    """The folder holding SceneAnswer.msg; raises a BagError naming every place looked in."""
    candidates = [Path(msg_dir)] if msg_dir else msg_dir_candidates()
    for folder in candidates:
        if (folder / "SceneAnswer.msg").is_file():
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise BagError(f"cannot find the vlm_ros message definitions (SceneAnswer.msg) in: {looked}")


def package_types(msg_dir: str | Path | None = None) -> dict:
    """rosbags type definitions of the package's ``msg/*.msg``, keyed ``vlm_ros/msg/Name``."""
    from rosbags.typesys import get_types_from_msg

    folder = find_msg_dir(msg_dir)
    types: dict = {}
    for path in sorted(folder.glob("*.msg")):
        types.update(
            get_types_from_msg(path.read_text(encoding="utf-8"), f"{PACKAGE}/msg/{path.stem}")
        )
    return types


@lru_cache(maxsize=4)
def typestore(store: str = DEFAULT_STORE, msg_dir: str | None = None):
    """A rosbags Typestore that knows the ROS 2 standard types plus this package's messages.

    Cached because parsing the definitions is the slow part and the result never changes within a
    process; callers must not register further types on the returned store.
    """
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores(store))
    ts.register(package_types(msg_dir))
    return ts


def ros1_typestore():
    """The ROS 1 Noetic store, for writing ROS 1 camera bags (make-bag ``.bag`` outputs)."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS1_NOETIC)


def normalize_msgtype(msgtype: str) -> str:
    """``sensor_msgs/Image`` (ROS 1) and ``sensor_msgs/msg/Image`` (ROS 2) as the ROS 2 name."""
    return ROS1_IMAGE_TYPES.get(msgtype, msgtype)
