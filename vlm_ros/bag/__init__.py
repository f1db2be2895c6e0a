"""Rosbag tooling: synthetic camera bags (make_bag), offline replay through the assistant
(evaluate) and latency reports from bags of the node's outputs (report).

Uses the pure-Python ``rosbags`` library, so none of it needs a ROS install. Reads rosbag2
(sqlite3 and MCAP) and ROS 1 bags; writes rosbag2 MCAP (sqlite3 and ROS 1 too, for test inputs).

rosbags, mcap and matplotlib are the optional ``bag`` extra (pyproject.toml), so they are
imported inside the functions that use them; everything else is imported at the top.
"""

from __future__ import annotations

from vlm_ros.errors import VlmError


class BagError(VlmError):
    """A bag that cannot be read or used: missing/corrupt/truncated file, missing topic,
    unsupported encoding. The message is one line naming the problem (and, for a missing topic,
    the topics that exist). ``partial_report`` is the path of the report written from what was
    read before the error, when there was anything to report."""

    def __init__(self, message: str, partial_report: str | None = None) -> None:
        super().__init__(
            message
            if not partial_report
            else f"{message} (report of what was read: {partial_report})"
        )
        self.detail = message  # without the report's path, for re-raising with one
        self.partial_report = partial_report


class BagDamageError(BagError):
    """The bag's files are there but cannot be read (truncated, corrupt): what eval-bag and
    report answer with a partial report of what was read (possibly nothing), unlike a wrong
    path, a missing topic or an unsupported encoding, which are the caller's to fix."""


def describe_error(exc: BaseException) -> str:
    """One line for a library exception: its text, or its type when the text is empty."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
