"""Public import path kept for users and older install scripts: ``vlm_ros.synthetic_camera:main``.

The camera lives in ``vlm_ros.ros.synthetic_camera``; this module only re-exports it."""

from vlm_ros.ros.synthetic_camera import main

__all__ = ["main"]
