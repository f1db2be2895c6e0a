"""Errors the core raises. Each message names the problem so a node can log it and keep serving."""


class VlmError(Exception):
    """Base class of every error vlm_ros raises on purpose."""


class InputError(VlmError, ValueError):
    """A request the model cannot serve: malformed image, empty or huge question, bad candidates."""


class ContextOverflowError(InputError):
    """Prompt (+ image tokens + requested new tokens) longer than the model's context."""


class CheckpointError(VlmError):
    """A checkpoint that is missing, corrupt, of an unknown layout, or does not fill the model."""


class EngineMismatchError(VlmError):
    """A compiled engine built for another model, GPU or TensorRT version."""


class NonFiniteLogitsError(VlmError):
    """The decoder produced inf/nan logits: a dtype too narrow for the model (float16
    overflow), or weights that already hold inf/nan. Nothing is returned for the request."""
