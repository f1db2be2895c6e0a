"""Public import path kept for users and older install scripts: ``vlm_ros.node:main``.

The node lives in ``vlm_ros.ros.node``; this module only re-exports its entry point."""

from vlm_ros.ros.node import main

__all__ = ["main"]
