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


# ---- the remote backend (infer/remote.py raises these; each names the server's URL) ----------


class RemoteError(VlmError):
    """A remote server could not serve the request (the subclasses say why)."""


class ServerUnreachableError(RemoteError):
    """No connection to the server (down, wrong URL, network): "server unreachable at URL"."""


class RemoteTimeoutError(RemoteError):
    """The server took longer than request_timeout_s (or answered 504: its deadline passed)."""


class ServerBusyError(RemoteError):
    """The server refused the request for now (HTTP 503: overloaded or draining)."""


class ModelNotFoundError(RemoteError):
    """The server does not serve the requested model name (HTTP 404 model_not_found)."""


class RemoteAuthError(RemoteError):
    """The server refused the API key (HTTP 401/403)."""


class BadResponseError(RemoteError):
    """HTTP 5xx, or a response or stream the contract does not allow (malformed, truncated)."""


class UnsupportedByServerError(RemoteError):
    """The server lacks what the request needs (action hints without /v1/rank or logprobs)."""


class RemoteInputError(InputError, RemoteError):
    """The server refused the request's input (HTTP 400/413: bad or oversized image, ...)."""
