"""Public import path kept for users: ``from vlm_ros.checkpoint import load_checkpoint``.

The code lives in ``vlm_ros.model.checkpoint``; this module only re-exports it."""

from vlm_ros.model.checkpoint import LoadedCheckpoint, load_checkpoint

__all__ = ["LoadedCheckpoint", "load_checkpoint"]
