"""Public import path kept for users: ``from vlm_ros.pipeline import Assistant``.

The code lives in ``vlm_ros.infer.pipeline``; this module only re-exports it."""

from vlm_ros.infer.pipeline import Assistant

__all__ = ["Assistant"]
