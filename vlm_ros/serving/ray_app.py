"""``vlm-ros serve``'s Ray Serve application: a FastAPI ingress in front of model replicas.

Two deployments, and nothing of our own for the cluster, the RPC or the queue:

* ``VlmModel``: one project ``Assistant`` per replica (one replica per GPU, ``num_gpus: 1``, or
  CPU replicas), ``num_replicas`` or an ``autoscaling_config``, ``max_ongoing_requests`` (1: the
  decoder is a batch-1 static-KV-cache decoder, a replica runs one request at a time),
  ``max_queued_requests`` (Ray Serve's bounded queue: past it the handle raises BackPressureError
  and the client gets 503 "overloaded" with Retry-After), ``check_health`` and
  ``graceful_shutdown_timeout_s`` (a replica being stopped finishes its requests first).
* ``VlmIngress``: the HTTP side of the wire contract (serving/wire.py): parses and checks the
  body and the image's header, calls a replica through a DeploymentHandle (streaming through
  ``handle.options(stream=True)``), and turns the replica's dicts into OpenAI JSON or SSE.

No @serve.batch: generation cannot be batched across requests (one static KV cache of batch 1
per replica), so throughput scales with replicas, not with a batch (docs/SERVING.md).

``build(args)`` is the application builder named by config/serve.yaml (``serve run`` /
``serve deploy``); ``vlm-ros serve`` builds the same application from its flags.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime.

import asyncio
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields

# ray[serve] (the `serve` extra, which brings fastapi): imported only here and by the command
# that starts the app, so importing vlm_ros stays light.
import ray.exceptions
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from vlm_ros.config import DTYPE_NAMES, RuntimeConfig
from vlm_ros.serving import wire

APP_NAME = "vlm_ros"
MODEL_DEPLOYMENT, INGRESS_DEPLOYMENT = "VlmModel", "VlmIngress"
# A replica that died (killed, out of memory, node lost) or is being replaced.
REPLICA_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


@dataclass(frozen=True)
class ServeOptions:
    """Everything the application is built from (the flags of ``vlm-ros serve``, the ``args``
    of config/serve.yaml). replicas: fixed count, or the minimum when max_replicas is set
    (Ray Serve autoscaling on ongoing requests); gpus_per_replica 1 on a GPU cluster."""

    model: str = "demo"
    served_name: str = "demo"
    replicas: int = 1
    max_replicas: int | None = None
    max_ongoing: int = 1
    max_queued: int = 8
    retry_after_s: float = 1.0
    device: str = "cpu"
    dtype: str | None = None
    threads: int = 0
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_image_bytes: int = wire.MAX_IMAGE_BYTES
    max_pixels: int = wire.MAX_PIXELS
    api_key_sha256: str | None = None
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 30.0
    ingress_replicas: int = 1
    extra: dict = field(default_factory=dict)  # RuntimeConfig fields beyond device/dtype/threads

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")
        for name in ("replicas", "max_ongoing", "ingress_replicas"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < replicas ({self.replicas})")

    @classmethod
    def from_args(cls, args: dict) -> "ServeOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown serve option(s) {unknown}; known: {sorted(known)}")
        return cls(**args)

    @property
    def limits(self) -> wire.WireLimits:
        return wire.WireLimits(self.max_image_bytes, self.max_pixels)

    def runtime(self) -> RuntimeConfig:
        return RuntimeConfig(
            device=self.device, dtype=self.dtype, threads=self.threads, **self.extra
        )


# ---- the model replicas ----------------------------------------------------------------------


@serve.deployment(name=MODEL_DEPLOYMENT)
class VlmModel:
    """One Assistant. Inference runs in a worker thread (the replica's event loop stays free
    for health checks and cancellation); a cancelled request stops its decoder within a token."""

    def __init__(self, options: dict):
        from vlm_ros.serving.model_server import ModelServer  # torch: in the replica only

        opts = ServeOptions(**options)
        self.server = ModelServer.load(opts.model, opts.runtime(), limits=opts.limits)

    async def answer(self, job: wire.ChatJob) -> dict:
        cancel = threading.Event()
        try:
            return await asyncio.to_thread(self.server.answer, job, None, cancel)
        finally:
            cancel.set()  # the request was cancelled (client gone): stop the decoder

    async def stream(self, job: wire.ChatJob):
        """Events of ModelServer.stream, as they happen (a streaming handle call)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(event: dict) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        work = loop.run_in_executor(None, self.server.stream, job, emit, cancel)
        try:
            while True:
                event = await events.get()
                yield event
                if "done" in event or "error" in event:
                    break
        finally:
            cancel.set()
            await asyncio.shield(work)  # the Assistant is free again before the next request

    async def rank(self, job: wire.RankJob) -> dict:
        return await asyncio.to_thread(self.server.rank, job)

    def check_health(self) -> None:
        self.server.check()


# ---- the HTTP ingress -------------------------------------------------------------------------

api = FastAPI(title="vlm_ros", description="OpenAI-compatible chat completions (docs/SERVING.md)")


def error_response(err: wire.WireError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


def _overloaded(exc: BackPressureError) -> wire.WireError:
    return wire.WireError(
        exc.status_code,
        f"server overloaded: every replica is busy and the queue is full ({exc.message})",
        "overloaded",
        "server_error",
        exc.retry_after_s,
    )


def _lost(exc: Exception) -> wire.WireError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return wire.WireError(
        503,
        f"the replica serving this request failed ({type(exc).__name__}: "
        f"{first[:200]}); Ray Serve restarts it, retry",
        "replica_failed",
        "server_error",
        1.0,
    )


@serve.deployment(name=INGRESS_DEPLOYMENT, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class VlmIngress:
    """The wire contract over HTTP. A request whose replica dies before it produced anything
    is retried once on another replica (answers are deterministic for a seed or greedy); one
    that dies mid-stream ends with an error event."""

    def __init__(self, model: DeploymentHandle, options: dict):
        opts = ServeOptions(**options)
        self.model, self.streaming = model, model.options(stream=True)
        self.name, self.limits, self.key = opts.served_name, opts.limits, opts.api_key_sha256
        self.created = int(time.time())

    @api.get("/health")
    async def health(self) -> Response:
        """200 while at least one model replica is RUNNING (Ray Serve's health checks decide)."""
        app = serve.get_replica_context().app_name
        status = await asyncio.to_thread(serve.status)
        application = status.applications.get(app)
        deployment = application.deployments.get(MODEL_DEPLOYMENT) if application else None
        running = deployment.replica_states.get("RUNNING", 0) if deployment else 0
        body = {
            "status": "ok" if running else "unavailable",
            "replicas_running": running,
            "deployment_status": str(deployment.status.value) if deployment else "missing",
        }
        return JSONResponse(body, status_code=200 if running else 503)

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            wire.check_auth(request.headers.get("authorization"), self.key)
        except wire.WireError as err:
            return error_response(err)
        return JSONResponse(wire.models_list(self.name, self.created))

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        arrival = time.time()
        try:
            job = wire.parse_chat(await self._body(request), self.name, self.limits, arrival)
            if job.stream:
                return await self._stream(job)
            result = await self._call(lambda: self.model.answer.remote(job))
        except wire.WireError as err:
            return error_response(err)
        return JSONResponse(wire.completion(wire.completion_id(), self.name, result, arrival))

    @api.post("/v1/rank")
    async def rank(self, request: Request) -> Response:
        arrival = time.time()
        try:
            job = wire.parse_rank(await self._body(request), self.name, self.limits, arrival)
            result = await self._call(lambda: self.model.rank.remote(job))
        except wire.WireError as err:
            return error_response(err)
        return JSONResponse(wire.rank_response(self.name, result, arrival))

    async def _body(self, request: Request) -> dict:
        wire.check_auth(request.headers.get("authorization"), self.key)
        return wire.parse_json(await request.body())

    async def _call(self, call) -> dict:
        """One replica call, retried once if its replica was lost; errors become WireError."""
        for attempt in (1, 2):
            try:
                result = await call()
            except BackPressureError as exc:
                raise _overloaded(exc) from None
            except DeploymentUnavailableError as exc:
                raise wire.WireError(503, exc.message, "unavailable", "server_error") from None
            except REPLICA_LOST as exc:
                if attempt == 2:
                    raise _lost(exc) from None
                continue
            if "error" in result:
                raise wire.WireError.from_dict(result["error"])
            return result
        raise AssertionError("unreachable")

    async def _stream(self, job: wire.ChatJob) -> Response:
        """Wait until a replica took the request (so refusals keep their HTTP status), then
        stream its text as chat.completion.chunk events."""
        for attempt in (1, 2):
            events = self.streaming.stream.remote(job)
            try:
                first = await events.__anext__()
            except BackPressureError as exc:
                raise _overloaded(exc) from None
            except REPLICA_LOST as exc:
                if attempt == 2:
                    raise _lost(exc) from None
                continue
            if "error" in first:
                raise wire.WireError.from_dict(first["error"])
            break
        return StreamingResponse(
            self._sse(events, job),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def _sse(self, events, job: wire.ChatJob):
        cid, created = wire.completion_id(), int(job.arrival)
        yield wire.sse(wire.chunk(cid, self.name, created, {"role": "assistant", "content": ""}))
        sent = ""
        try:
            async for event in events:
                if "text" in event:
                    text = event["text"]
                elif "done" in event:
                    result = event["done"]
                    text = result["text"]
                else:
                    yield wire.sse(wire.WireError.from_dict(event["error"]).body())
                    break
                if text.startswith(sent) and len(text) > len(sent):
                    yield wire.sse(
                        wire.chunk(cid, self.name, created, {"content": text[len(sent) :]})
                    )
                    sent = text
                if "done" in event:
                    last = wire.chunk(
                        cid, self.name, created, {}, wire.FINISH[result["stop_reason"]]
                    )
                    last["vlm_ros"] = wire.extension(result, job.arrival)
                    yield wire.sse(last)
                    break
        except REPLICA_LOST as exc:
            yield wire.sse(_lost(exc).body())
        except asyncio.CancelledError:  # the client went away: the replica's request is cancelled
            events.cancel()
            raise
        yield wire.SSE_DONE


# ---- building the application ---------------------------------------------------------------


def build_app(opts: ServeOptions):
    """The application (``serve.run`` target) for ``opts``, every knob a Ray Serve option."""
    scaling: dict = {"num_replicas": opts.replicas}
    if opts.max_replicas is not None:
        scaling = {
            "autoscaling_config": {
                "min_replicas": opts.replicas,
                "max_replicas": opts.max_replicas,
                "target_ongoing_requests": opts.max_ongoing,
            }
        }
    model = VlmModel.options(
        **scaling,
        max_ongoing_requests=opts.max_ongoing,
        max_queued_requests=opts.max_queued,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=opts.retry_after_s),
        ray_actor_options={"num_cpus": opts.cpus_per_replica, "num_gpus": opts.gpus_per_replica},
        health_check_period_s=opts.health_check_period_s,
        health_check_timeout_s=opts.health_check_timeout_s,
        graceful_shutdown_timeout_s=opts.graceful_shutdown_timeout_s,
    )
    # The ingress only awaits: many requests at once, and no queue of its own in front.
    ingress = VlmIngress.options(num_replicas=opts.ingress_replicas, max_ongoing_requests=1000)
    return ingress.bind(model.bind(asdict(opts)), asdict(opts))


def build(args: dict):
    """The application builder config/serve.yaml names (vlm_ros.serving.ray_app:build)."""
    return build_app(ServeOptions.from_args(dict(args)))


# ---- running it (vlm-ros serve) ---------------------------------------------------------------


def connect(address: str | None, **init_kwargs) -> dict[str, float]:
    """Join a Ray cluster (``ray://HEAD:10001``, ``auto``, or None: the cluster that
    ``ray start`` made on this host, else a new local one); returns its resources.

    A ``ray start`` head has token authentication on by default, and Ray sends its token to
    an explicit address only under ``RAY_AUTH_MODE=token``; without it a Ray Client connection
    just times out, so that error names the fix (docs/SERVING.md)."""
    try:
        _init_retrying_client_server(address, init_kwargs)
    except ConnectionError as exc:
        if not (address or "").startswith("ray://") or os.environ.get("RAY_AUTH_MODE"):
            raise
        raise ConnectionError(
            f"{exc} at {address}: if the cluster uses token authentication (the default of "
            "`ray start --head`), set RAY_AUTH_MODE=token and the cluster's token in "
            "RAY_AUTH_TOKEN or ~/.ray/auth_token (see docs/SERVING.md)"
        ) from exc
    return ray.cluster_resources()


CLIENT_SERVER_TRIES = 3  # Ray Client connections tried when the head's server for it dies
_CLIENT_SERVER_DIED = "Starting Ray client server failed"  # ray/util/client/server/proxier.py


def _init_retrying_client_server(address: str | None, init_kwargs: dict) -> None:
    """ray.init, tried again when Ray Client's head could not start the server process it
    forks for each connection: that child dies now and then at fork() (a gRPC race in Ray's
    proxier, ray-project/ray#63202, open; it failed two local CI runs here). A new
    connection gets a new process, so trying again is what a user would do by hand."""
    for attempt in range(1, CLIENT_SERVER_TRIES + 1):
        try:
            ray.init(address=address, **init_kwargs)
            return
        except (ConnectionError, RuntimeError) as exc:
            if _CLIENT_SERVER_DIED not in str(exc) or attempt == CLIENT_SERVER_TRIES:
                raise
            print(
                f"Ray Client: the head's server for this connection failed to start "
                f"(ray-project/ray#63202); trying again ({attempt + 1}/{CLIENT_SERVER_TRIES})",
                file=sys.stderr,
                flush=True,
            )
            ray.shutdown()
            time.sleep(1.0)


def deploy(opts: ServeOptions, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Start Serve's HTTP proxy on host:port (a no-op if Serve already runs there) and deploy
    the application; returns once every replica passed its first health check."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(opts), name=APP_NAME, route_prefix="/")


def undeploy() -> None:
    """Delete the application: Serve stops routing to it and each replica finishes its
    requests first (graceful_shutdown_timeout_s)."""
    serve.delete(APP_NAME)


def disconnect() -> None:
    ray.shutdown()
