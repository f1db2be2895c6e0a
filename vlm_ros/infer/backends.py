"""The one place a backend is chosen: ``load_assistant`` gives the node, the ``ask``/``rank``
commands and ``eval-bag`` either a local ``pipeline.Assistant`` (the model in this process) or
a ``remote.RemoteAssistant`` (an OpenAI-compatible server), by ``RuntimeConfig.backend``.

Both are imported here, in the function, never at module level: a local run never imports
httpx, and a remote one never imports torch or transformers.
"""

from __future__ import annotations

from pathlib import Path

from vlm_ros.config import GenerationConfig, ImageLimits, RuntimeConfig


def load_assistant(
    model: str,
    runtime: RuntimeConfig = RuntimeConfig(),
    generation: GenerationConfig = GenerationConfig(),
    limits: ImageLimits = ImageLimits(),
    *,
    vision_tower: str | Path | None = None,
):
    """Assistant.load(model, ...) for backend "local"; for "remote", a RemoteAssistant asking
    the server for ``runtime.remote.model`` (or ``model`` when that is empty). Connects to
    nothing: a server that is down at start is reported by the first request and the probe."""
    if runtime.backend == "remote":
        from vlm_ros.infer.remote import RemoteAssistant  # httpx: remote runs only

        return RemoteAssistant(runtime.remote, runtime.remote.model or model, generation, limits)
    from vlm_ros.infer.pipeline import Assistant  # torch + transformers: local runs only

    return Assistant.load(model, runtime, generation, limits, vision_tower=vision_tower)
