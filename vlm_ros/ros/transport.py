"""The DDS transport setting camera-sized frames need, applied before rclpy starts. ROS-free.

Fast DDS (the default RMW of Humble, Jazzy and Kilted) puts each sample of a publisher into that
process's shared-memory segment, about 512 KB by default. A larger sample (a 1280x720 rgb8 frame
is 2.7 MB) falls back to fragmented UDP, and at 30 Hz best effort lost 90-95% of them on
loopback here. ``config/fastdds_large_frames.xml`` keeps the default transports (shared memory +
UDPv4) with a 64 MB segment; with it in the *camera's* process 100% arrived. Fast DDS's own
``FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA`` preset was measured too and delivered about 10%
(docs/NODE.md). The same file gives service replies (Ask, and the Describe action's services) 1 s
instead of 100 ms to match a new client's reply reader before Fast DDS drops the reply: under load
the server side of discovery lagged past 100 ms and a burst reply was lost.

``use_large_frame_profile`` points FASTDDS_DEFAULT_PROFILES_FILE at that profile unless the user
chose a transport already (any Fast DDS profile or builtin-transport variable set, or another
RMW), so a robot's own DDS configuration always wins. Call it before ``rclpy.init``: Fast DDS
reads the environment when the participant is created.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path
from xml.etree import ElementTree

PROFILE_NAME = "fastdds_large_frames.xml"
PROFILE_VARIABLE = "FASTDDS_DEFAULT_PROFILES_FILE"
# Any of these set means the user configured Fast DDS's transports themselves.
USER_SETTINGS = (PROFILE_VARIABLE, "FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_BUILTIN_TRANSPORTS")


def profile_path() -> Path | None:
    """The packaged profile: the repository's config/ or the colcon install's share/ folder."""
    candidates = [Path(__file__).resolve().parents[2] / "config" / PROFILE_NAME]
    try:  # installed with colcon (ament_index is not rclpy)
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory("vlm_ros")) / "config" / PROFILE_NAME)
    except Exception:  # no ament index, or the package is not installed
        pass
    return next((p for p in candidates if p.is_file()), None)


def use_large_frame_profile(env: MutableMapping[str, str] | None = None) -> str:
    """Set the large-frame profile in ``env`` (default os.environ) where nothing else is set;
    returns one line saying what was done, for the node's log."""
    env = os.environ if env is None else env
    rmw = env.get("RMW_IMPLEMENTATION", "")
    if rmw and not rmw.startswith("rmw_fastrtps"):
        return f"DDS transport: {rmw}'s own settings (the large-frame profile is for Fast DDS)"
    chosen = [name for name in USER_SETTINGS if env.get(name)]
    if chosen:
        return f"DDS transport: the user's {chosen[0]}={env[chosen[0]]}"
    path = profile_path()
    if path is None:
        return f"DDS transport: Fast DDS defaults ({PROFILE_NAME} not found; see docs/NODE.md)"
    env[PROFILE_VARIABLE] = str(path)
    return f"DDS transport: {PROFILE_VARIABLE}={path} ({profile_summary(path)})"


def profile_summary(path: Path) -> str:
    """What the profile at ``path`` sets, read from it (so the log says what the file says,
    not what it said when this line was written): the shared-memory segment and the service
    reply writer's wait for a match."""
    ns = {"dds": "http://www.eprosima.com"}
    try:
        root = ElementTree.parse(path).getroot()
        segment = root.findtext(".//dds:transport_descriptor/dds:segment_size", None, ns)
        wait = root.find(".//dds:data_writer[@profile_name='service']//dds:max_blocking_time", ns)
        parts = []
        if segment:
            parts.append(f"{int(segment) / 2**20:g} MB shared memory for camera frames")
        if wait is not None:
            seconds = int(wait.findtext("dds:sec", "0", ns))
            seconds += int(wait.findtext("dds:nanosec", "0", ns)) / 1e9
            parts.append(f"{seconds:g} s for a service reply to match")
        return ", ".join(parts) or "no segment size or reply wait in it"
    except (ElementTree.ParseError, OSError, ValueError) as error:
        return f"unreadable: {error}"
