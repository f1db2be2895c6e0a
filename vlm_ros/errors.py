"""Errors the core raises. Each message names the problem so a node can log it and keep serving."""


class VlmError(Exception):
    """Base class of every error vlm_ros raises on purpose."""


class InputError(VlmError, ValueError):
    """A request the model cannot serve: malformed image, empty or huge question, bad candidates."""


class ContextOverflowError(InputError):
    """Prompt (+ image tokens + requested new tokens) longer than the model's context."""


class CheckpointError(VlmError):
    """A checkpoint that is missing, corrupt, of an unknown layout, or does not fill the model."""


class NoWeightsError(CheckpointError):
    """A directory holds no weight files at all (legacy TinyLLaVA's tower directory may hold
    only a config: the loader catches this class, never the message's wording)."""


class EngineMismatchError(VlmError):
    """A compiled engine built for another model, GPU or TensorRT version."""


class NonFiniteLogitsError(VlmError):
    """The decoder produced inf/nan logits: a dtype too narrow for the model (float16
    overflow), or weights that already hold inf/nan. Nothing is returned for the request."""


# ---- the serving queue (serving/worker.py raises these; the node counts them by class) -------


class QueueFullError(VlmError):
    """The worker's queue is full; the request was refused without waiting."""


class EvictedError(QueueFullError):
    """A queued periodic job pushed out of a full queue by a query; it never ran."""


class StaleJobError(VlmError):
    """The job's deadline passed while it waited in the queue."""


class WorkerStoppedError(VlmError):
    """The worker was shut down before the job ran."""
