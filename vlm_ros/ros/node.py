"""The rclpy lifecycle node `vlm_assistant`: cameras in; scene answers, action hints, the Ask
service, the Describe action and /diagnostics out. The only module that imports rclpy.

The node only stores messages and submits work: callbacks keep the latest frame per camera
(message + receive time, nothing converted), timers and requests submit jobs to the one
InferenceWorker (serving.worker), and the worker converts the frame (ros.imaging), calls the
ROS-free core (infer.pipeline.Assistant) and publishes.

Every request gets a response (docs/NODE.md, "Requests under load"): the Ask service and the
Describe action's services keep every request (KEEP_ALL, reliable), and their callbacks are
coroutines that await the worker's result instead of holding an executor thread, so a burst of
requests is answered, or refused at once naming why (queue full, not active, still loading),
however many arrive. A watchdog timer fails a request still waiting at ``query_timeout_s``.

Lifecycle: configure reads the parameters (vlm_ros.ros.node_config) and loads the model; activate
creates the camera subscriptions and timers; deactivate destroys them (periodic jobs still
queued then return without running); cleanup stops the worker and frees the model. The
lifecycle publishers, the Ask service and the Describe action server live as long as the node:
they publish only while active, and while not active an Ask gets success=false with an error
saying so ("loading model ..." while configure runs) and a Describe goal is rejected, instead
of a client waiting for a service that is gone. (Also, rclpy can raise InvalidHandle in a
MultiThreadedExecutor's wait-set build when a waitable (an action server, a QoS event handler)
is destroyed while the executor spins, which kills the executor; for the same reason the
camera subscriptions have no QoS event handlers.) ``run()`` spins first and configures and
activates on a thread of its own when the ``autostart`` parameter is true (the default), so
the node is reachable while the model loads and no lifecycle manager is needed.

Cameras: subscribed with sensor-data QoS (best effort, keep last 5) that ``qos_overrides.<topic>.
subscription.{reliability,history,depth}`` parameters change (rclpy QoSOverridingOptions).
Outputs, logs and Ask/Describe use the resolved (namespaced, remapped) topic; requests may also
name the camera as configured. /diagnostics has a status per camera that goes WARN when a
publisher is matched but no frame arrived for CAMERA_SILENCE_S (a QoS or transport mismatch:
vlm_ros.ros.transport).

Frame accounting is vlm_ros.serving.frames.FrameStore, the same class as the offline replay
(vlm_ros.bag.replay): a frame is *taken* when the first job starts on it (and converted, once;
a failed conversion is remembered); the first job to finish gives it its verdict:
``frames_rejected`` (+ ``frames_rejected_<reason>``) when the conversion failed or the core
refused it (too small/large, context overflow), else ``frames_processed``; ``frames_dropped``
counts frames replaced by a newer one before any job took them. So frames_received =
processed + dropped + rejected + held. ``periodic_skipped`` counts periodic jobs not run (the
previous one still queued, queue full, evicted by a query, expired).

Parameters (vlm_ros.ros.node_config) are checked at configure and on every set; LIVE ones
(rates, prompts, candidates, budgets, max_new_tokens, ...) apply at once through an
on-set-parameters callback, the others are refused on a configured node with the reason.

Frame age (``max_frame_age_ms``) is measured from when the node *received* the frame, so it does
not depend on the camera's clock; ``image_to_output_ms`` in every output is the publish time
minus the source header stamp (true end to end, needs synchronised clocks).

Shutdown (SIGINT/SIGTERM): running inference is cancelled at the next token, the lifecycle
shuts down, rclpy stops, the logs are flushed and the entry points leave with ``exit_now``
(os._exit), skipping the interpreter's final garbage collection over the model's objects, which
took seconds and made ``ros2 launch`` escalate to SIGTERM after its 5 s.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.signals import SignalHandlerOptions
from rclpy.task import Future as RosFuture
from rclpy.time import Time
from sensor_msgs.msg import CompressedImage, Image

from vlm_ros.action import Describe
from vlm_ros.demo import data as demo_data
from vlm_ros.errors import EvictedError, InputError, RemoteError, VlmError
from vlm_ros.msg import ActionHint, SceneAnswer, StageLatency
from vlm_ros.ros import annotate, imaging, names, outputs
from vlm_ros.ros.node_config import (
    DOUBLES,
    LIVE,
    PARAMETERS,
    RECONFIGURE,
    Camera,
    NodeConfig,
    check_values,
)
from vlm_ros.ros.node_messages import RCLPY_TYPES, latency_status, server_status
from vlm_ros.ros.synthetic_camera import SyntheticCamera
from vlm_ros.ros.transport import use_large_frame_profile
from vlm_ros.serving.frames import Frame, FrameStore, StaleFrameError
from vlm_ros.serving.latency import LatencyMonitor
from vlm_ros.serving.ticks import TickPlan
from vlm_ros.serving.worker import (
    PERIODIC,
    QUERY,
    InferenceWorker,
    StaleJobError,
    WorkerStoppedError,
)
from vlm_ros.srv import Ask
from vlm_ros.types import Request

try:
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # Humble: the same class lived in rclpy.qos_event
    from rclpy.qos_event import SubscriptionEventCallbacks

NODE_NAME = names.NODE_NAME
# Camera default: ROS's sensor-data profile (best effort, keep last 5, as image_transport
# subscribers use), so a frame is not overwritten in the reader while the executor is busy for
# a moment; the node itself keeps only the latest. qos_overrides parameters change it.
SENSOR_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.BEST_EFFORT
)
# Ask and the Describe action's goal/cancel/result services: keep every request until a callback
# takes it. The default (KEEP_LAST 10) overwrote requests of a burst before any callback saw
# them, and those clients never got a response. Reliable KEEP_ALL applies flow control instead.
REQUEST_QOS = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)
OUTPUT_QOS = 10
# ~/annotated_image: reliable (a viewer's default QoS matches it), only the newest frames kept
ANNOTATED_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=2, reliability=ReliabilityPolicy.RELIABLE
)
EXECUTOR_THREADS = 4  # callbacks never wait on the model (coroutines), so a few threads suffice
WATCHDOG_PERIOD_S = 0.25  # how often waiting requests are checked against query_timeout_s
CAMERA_SILENCE_S = 3.0  # /diagnostics warns when a matched camera sends nothing this long
QUERY_GRACE_S = 5.0  # past query_timeout_s, for a stage that cannot stop at a token
SHUTDOWN_JOIN_S = 1.0  # at process exit, wait this long for a running inference to stop
SCENE, HINT = "scene", "hint"
ANNOTATED, ANNOTATED_COMPRESSED = "annotated", "annotated_compressed"
# `vlm-ros node --demo`: the demo model, asked what it was trained on (vlm_ros.demo.data), and
# its outputs logged so the console shows the chain working.
DEMO_OVERRIDES = {
    "model": "demo",
    "scene_prompt": demo_data.CAPTION_PROMPT,
    "hint_instruction": demo_data.ACTION_INSTRUCTION,
    "max_new_tokens": demo_data.CAPTION_MAX_NEW_TOKENS,  # the default 32 cut the longest captions
    "log_outputs": True,
}
WAIT_ERRORS = (concurrent.futures.TimeoutError, concurrent.futures.CancelledError)
# a command-line flag in a core error ("use --device cpu") -> the node's parameter
CLI_FLAG = re.compile(r"--(device|dtype|decoder|quantize|threads|vision-tower) (\S+)")


def drop_tracebacks(exc: BaseException | None) -> None:
    """Drop the tracebacks of a job's failure (and of its cause and context) once it is
    answered or counted. A traceback keeps its frames' locals, and those frames hold what holds
    the exception: the worker's job, the Ask coroutine's ``job``, the awaited rclpy Future's
    ``self``, and the camera frame whose conversion failed. Each was a reference cycle keeping
    the failed job's Result and camera frame until Python's cycle collector ran
    (test_node.py)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        stack += [e.__cause__, e.__context__]


@dataclass(eq=False)
class Waiting:
    """A request coroutine awaiting a worker job: ``done`` (an rclpy Future, which the coroutine
    awaits) completes with the job's outcome, or with TimeoutError at ``give_up``."""

    job: concurrent.futures.Future | None  # None once claimed (see _job_finished)
    done: RosFuture
    give_up: float  # time.monotonic()
    cancel: threading.Event | None = None  # a Describe goal's cancel


@dataclass(frozen=True)
class Work:
    """What one job asks of the core about its camera's frame: an answer to ``question`` (None:
    no answer) and/or an action hint. The core's Request is built from it on the worker, once
    the frame is taken and converted."""

    question: str | None = None
    rank: bool = False
    max_new_tokens: int | None = None  # None: the node's max_new_tokens
    on_text: Callable[[str], None] | None = None
    cancel: threading.Event | None = None  # None: the node's shutdown event
    deadline: float | None = None  # time.monotonic(); decoding stops there


@dataclass
class Result:
    """One inference on one frame, as the worker hands it back."""

    frame: Frame
    queue_ms: float
    image_age_ms: float
    answer: object = None  # vlm_ros.types.Answer
    hint: object = None  # vlm_ros.types.ActionHint
    misses: tuple[str, ...] = field(default_factory=tuple)


class AssistantNode(LifecycleNode):
    """See the module docstring. Parameters: vlm_ros.ros.node_config.PARAMETERS."""

    def __init__(self, node_name: str = NODE_NAME, loader=None, **kwargs):
        """``loader(config) -> Assistant`` replaces Assistant.load (tests load a bench preset)."""
        super().__init__(node_name, **kwargs)
        for name, (default, description) in PARAMETERS.items():
            # doubles take integers too (-p scene_rate_hz:=2); NodeConfig checks and converts
            descriptor = ParameterDescriptor(
                description=description, dynamic_typing=name in DOUBLES
            )
            self.declare_parameter(name, default, descriptor)
        self.config: NodeConfig | None = None
        self.assistant = None
        self.worker: InferenceWorker | None = None
        self.monitor: LatencyMonitor | None = None
        self.frames = FrameStore(self._count_frame)
        self.last_error = ""  # why the last configure failed (also logged)
        self._params_fixed = False  # configure read them: only LIVE ones may change now
        self._loader = loader
        self._loading = ""  # "loading model ..." while configure runs: requests are refused so
        self._loading_since = 0.0
        self._autostarting = False  # run()'s autostart: "loading" from spin until activated
        self._stopping = threading.Event()  # process exit: running inference stops at a token
        self._exiting = False  # shutdown for process exit: do not wait for a running inference
        self._waits: set[Waiting] = set()  # requests awaiting the worker (see _await_job)
        self._waits_lock = threading.Lock()
        self._goal_cancels: dict[bytes, threading.Event] = {}  # Describe goal id -> its cancel
        self._subs: dict[str, object] = {}  # configured topic -> subscription (while active)
        self._resolved: dict[str, str] = {}  # configured topic -> resolved topic name
        self._last_frame: dict[str, float] = {}  # configured topic -> monotonic receive time
        self._silent_since: dict[str, float] = {}  # configured topic -> when the watch began
        self._used: dict[str, int] = {}  # "kind:camera" -> seq of the frame last used
        self._shown: dict[str, dict[str, tuple[int, object]]] = {}  # camera -> kind -> (seq, msg)
        self._renderer: annotate.Renderer | None = None  # draws ~/annotated_image (configured)
        self._saver: annotate.Saver | None = None  # annotated_save_dir
        self._group = ReentrantCallbackGroup()
        self._active: list = []  # subscriptions and the diagnostics timer: made on activate
        self._plan = TickPlan({})  # which periodic kinds each tick runs (rates are live)
        self._periodic_timer = None  # the one periodic timer, at the plan's period
        self._is_active = False
        make = self.create_lifecycle_publisher
        self._pubs = {
            SCENE: make(SceneAnswer, names.SCENE_ANSWER, OUTPUT_QOS),
            HINT: make(ActionHint, names.ACTION_HINT, OUTPUT_QOS),
            "diagnostics": make(DiagnosticArray, names.DIAGNOSTICS, OUTPUT_QOS),
            ANNOTATED: make(Image, names.ANNOTATED_IMAGE, ANNOTATED_QOS),
            ANNOTATED_COMPRESSED: make(CompressedImage, names.ANNOTATED_COMPRESSED, ANNOTATED_QOS),
        }
        self._describe = ActionServer(
            self,
            Describe,
            names.DESCRIBE,
            self._on_describe,
            callback_group=self._group,
            goal_callback=self._on_goal,
            cancel_callback=self._on_cancel,
            goal_service_qos_profile=REQUEST_QOS,
            result_service_qos_profile=REQUEST_QOS,
            cancel_service_qos_profile=REQUEST_QOS,
        )
        self._ask = self.create_service(
            Ask, names.ASK, self._on_ask, qos_profile=REQUEST_QOS, callback_group=self._group
        )
        # Also wakes the executor, so awaiting coroutines resume (see _await_job).
        self._watchdog = self.create_timer(WATCHDOG_PERIOD_S, self._expire_waits, self._group)
        self.add_on_set_parameters_callback(self._on_set_parameters)

    # ---- parameters ------------------------------------------------------------------------

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """``ros2 param set``: check the values; on a configured node apply LIVE ones at once
        and refuse the rest with the reason (they need a reconfigure)."""
        changed = {p.name: p.value for p in params if p.name in PARAMETERS}
        try:
            check_values(changed)
            fixed = sorted(
                n for n, v in changed.items() if n not in LIVE and v != self.get_parameter(n).value
            )
            if self._params_fixed and fixed:
                raise InputError(
                    f"{', '.join(fixed)} cannot change on a configured node: {RECONFIGURE}"
                )
        except InputError as exc:
            self.get_logger().warning(f"parameter change refused: {exc}")
            return SetParametersResult(successful=False, reason=str(exc))
        live = {n: v for n, v in changed.items() if n in LIVE}
        if self.config is not None and live:
            self._apply_live(live)
        return SetParametersResult(successful=True)

    def _apply_live(self, changed: dict[str, object]) -> None:
        """Swap in the config with ``changed``; new budgets and timer rates take effect now."""
        old, self.config = self.config, self.config.with_values(changed)
        self.monitor.budgets = self.config.budgets
        if self._is_active and (old.scene_rate_hz, old.hint_rate_hz) != (
            self.config.scene_rate_hz,
            self.config.hint_rate_hz,
        ):
            self._start_timers()
        self.get_logger().info(f"parameters applied: {changed}")

    def _start_timers(self) -> None:
        """(Re)create the periodic timer from the config's rates: one timer at the faster rate,
        each tick running the kinds due (serving.ticks.TickPlan); rates of 0 have none."""
        self._stop_timer()
        cfg = self.config
        self._plan = TickPlan({SCENE: cfg.scene_rate_hz, HINT: cfg.hint_rate_hz})
        if self._plan.period is not None:
            self._periodic_timer = self.create_timer(self._plan.period, self._on_tick, self._group)

    def _stop_timer(self) -> None:
        if self._periodic_timer is not None:
            self._periodic_timer.destroy()
            self._periodic_timer = None

    def _count_frame(self, name: str, _at: float) -> None:
        """FrameStore's counts, as /diagnostics names them (frames_received, ...)."""
        if self.monitor is not None:
            self.monitor.count(f"frames_{name}")

    # ---- lifecycle -------------------------------------------------------------------------

    def on_configure(self, state) -> TransitionCallbackReturn:
        """Read and check the parameters, load the model, start the worker; FAILURE says why."""
        log, start = self.get_logger(), time.monotonic()
        self._params_fixed = True
        values = {n: self.get_parameter(n).value for n in PARAMETERS}
        log.info(f"configuring: model {values['model']!r}, device {values['device']!r}")
        try:
            config = NodeConfig.from_values(values)
            saver = self._make_saver(config)  # before the slow load: a bad folder fails at once
            self.monitor = LatencyMonitor(config.budgets, config.diagnostics_window)
            self._loading = f"loading model {config.model!r} on {config.runtime.device}"
            if config.runtime.backend == "remote":
                self._loading = f"connecting to {config.runtime.remote.server_url}"
            self._loading_since = time.monotonic()
            self.assistant = self._load(config, start)
        except Exception as exc:  # a robot must see why, not a traceback in a log file
            self._params_fixed = False
            self._loading = ""
            self.last_error = CLI_FLAG.sub(
                r"the \1 parameter (\1:=\2)", f"{type(exc).__name__}: {exc}"
            )
            log.error(f"configure failed: {self.last_error}")
            return TransitionCallbackReturn.FAILURE
        if not self._autostarting:  # else activate follows at once: still "loading" till then
            self._loading = ""
        # a LIVE parameter set while the model loaded was accepted: apply it now
        config = config.with_values({n: self.get_parameter(n).value for n in LIVE})
        self.config, self.last_error = config, ""
        self.monitor.budgets = config.budgets
        self.worker = InferenceWorker(config.queue_size, name=f"{self.get_name()}-inference")
        self._renderer = annotate.Renderer(self._render_annotated, f"{self.get_name()}-annotate")
        self._saver = saver
        log.info(
            f"configured: {self.assistant.family.name} from {config.model!r} "
            f"in {time.monotonic() - start:.1f} s"
        )
        return TransitionCallbackReturn.SUCCESS

    @staticmethod
    def _make_saver(config: NodeConfig) -> annotate.Saver | None:
        """The annotated-frame saver (annotated_save_dir; its folder is created), or None."""
        if not config.annotated_save_dir:
            return None
        return annotate.Saver(
            config.annotated_save_dir, config.annotated_save_period_s, config.annotated_save_keep
        )

    def _load(self, config: NodeConfig, start: float):
        """backends.load_assistant (or the test's ``loader``), logging each step with its time:
        the local model (torch) or, with backend remote, a client of its server (httpx)."""
        log = self.get_logger()
        if self._loader is not None:
            load = partial(self._loader, config)
        else:
            remote = config.runtime.backend == "remote"
            log.info(f"importing the {'HTTP client (httpx)' if remote else 'model runtime'}")
            # here, not at the top: the node's first log lines come before this ~5-30 s import
            from vlm_ros.infer.backends import load_assistant

            load = partial(
                load_assistant,
                config.model,
                runtime=config.runtime,
                generation=config.generation,
                vision_tower=config.vision_tower,
            )
        log.info(f"{self._loading} ({time.monotonic() - start:.1f} s)")
        return load()

    def begin_autostart(self) -> None:
        """run() is about to configure and activate on its own: from now until activate, a
        request hears "loading model ..." (not "not active"), also before configure starts."""
        self._autostarting = True
        self._loading = f"loading model {self.get_parameter('model').value!r}"
        self._loading_since = time.monotonic()

    def end_autostart(self) -> None:
        self._autostarting, self._loading = False, ""

    def on_activate(self, state) -> TransitionCallbackReturn:
        """Subscribe to the cameras and start the timers."""
        cfg, group = self.config, self._group
        for cam in cfg.cameras:
            self._subscribe(cam)
        self._start_timers()
        self._active.append(
            self.create_timer(cfg.diagnostics_period_s, self._publish_diagnostics, group)
        )
        self._is_active = True
        self.get_logger().info(f"active: cameras {self._camera_summary()}")
        return super().on_activate(state)

    def _subscribe(self, cam: Camera) -> None:
        """The camera's subscription: SENSOR_QOS unless qos_overrides parameters say otherwise;
        its resolved topic name becomes the camera's name in outputs and logs."""
        msg_type = CompressedImage if cam.compressed else Image
        sub = self.create_subscription(
            msg_type,
            cam.topic,
            partial(self._on_image, cam.topic),
            SENSOR_QOS,
            callback_group=self._group,
            event_callbacks=SubscriptionEventCallbacks(use_default_callbacks=False),
            qos_overriding_options=QoSOverridingOptions.with_default_policies(),
        )
        self._active.append(sub)
        self._subs[cam.topic], self._resolved[cam.topic] = sub, sub.topic_name
        self._silent_since[cam.topic] = time.monotonic()

    def _camera_summary(self) -> list[str]:
        """Each camera as resolved, with the QoS it was subscribed with."""
        return [f"{self._name(c)} ({self._camera_qos(c)})" for c in self.config.cameras]

    def _name(self, cam: Camera) -> str:
        """The camera's resolved topic (after namespace and remapping): its name everywhere."""
        return self._resolved.get(cam.topic, cam.topic)

    def _camera(self, name: str) -> Camera:
        """The camera a request names: as configured or as resolved; empty = the first."""
        try:
            return self.config.camera(name)
        except InputError:
            for cam in self.config.cameras:
                if name in (self._name(cam), self._name(cam).lstrip("/")):
                    return cam
            known = ", ".join(self._name(c) for c in self.config.cameras)
            raise InputError(f"unknown camera {name!r}; cameras: {known}") from None

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        """Stop taking input: destroy what activate made (queued work still completes)."""
        self._is_active = False
        self._destroy_active()
        return super().on_deactivate(state)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        """Stop the worker and free the model (and GPU memory)."""
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def stop_for_exit(self) -> None:
        """The process is about to exit: cancel running inference (it stops at the next
        token) and make the shutdown transition wait only SHUTDOWN_JOIN_S for it."""
        self._exiting = True
        self._stopping.set()
        for cancel in list(self._goal_cancels.values()):
            cancel.set()

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        self._is_active = False
        self._destroy_active()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _destroy_active(self) -> None:
        for entity in self._active:
            entity.destroy()
        self._stop_timer()
        self._active.clear()
        self._subs.clear()

    def _release(self) -> None:
        """Stop the worker and free the model. At process exit the model is not freed here:
        the exit frees it at once, while closing it (and its garbage collection) took 2.2 s for
        a full-size model; and a running inference (cancelled) gets only SHUTDOWN_JOIN_S, in
        case it is inside a stage that cannot stop (vision, prefill)."""
        stopped = True
        if self.worker is not None:
            stopped = self.worker.shutdown(SHUTDOWN_JOIN_S if self._exiting else 30.0)
        if self.assistant is not None and stopped and not self._exiting:
            self.assistant.close()
        elif self.assistant is not None and not stopped:
            self.get_logger().info("inference still running at exit: the model goes with it")
        if self._renderer is not None:
            self._renderer.stop(SHUTDOWN_JOIN_S)
        if self._exiting:
            self._held_for_exit = (self.assistant, self.worker)  # freed by the exit, not now
        self.worker = self.assistant = self.config = None
        self._renderer = self._saver = None
        self._params_fixed = False
        self.frames.clear()
        self._used, self._shown = {}, {}

    # ---- input -----------------------------------------------------------------------------

    def _on_image(self, topic: str, msg) -> None:
        """Keep only the latest frame; never convert or infer here (FrameStore counts it, and
        the frame it replaces as dropped unless a job took it)."""
        now = time.monotonic()
        self._last_frame[topic] = now  # the camera's /diagnostics status
        self.frames.put(topic, msg, now)

    def _fresh_frame(self, cam: Camera, take: bool = False) -> Frame:
        """The camera's latest frame, or InputError when there is none or it is too old;
        ``take`` marks it as used by a job (see the module docstring)."""
        max_age = self.config.max_frame_age_ms / 1000.0
        return self.frames.fresh(cam.topic, time.monotonic(), max_age, take, self._name(cam))

    def _convert(self, msg) -> object:
        """A frame message -> RGB pixels, its size checked against the core's limits and
        max_image_pixels before anything is decoded (FrameStore runs this once per frame)."""
        limits = imaging.SizeLimits.of(self.assistant.limits, self.config.max_image_pixels)
        return imaging.image_from_msg(msg, limits)

    def _settle(self, frame: Frame, exc: BaseException | None) -> None:
        """Give the frame its verdict from a finished job (once); log a new rejection."""
        reason = self.frames.settle(frame, exc, time.monotonic())
        if reason is not None:
            n = self.monitor.counters().get("frames_rejected", 0)
            self.get_logger().warning(f"rejected image ({reason}): {exc} [{n} rejected so far]")

    # ---- inference (runs on the worker thread) ---------------------------------------------

    def _infer(self, cam: Camera, submitted: float, work: Work) -> Result:
        """Latest fresh frame of ``cam`` -> answer and/or action hint, recorded in the monitor;
        the frame gets its verdict from the first job that finishes on it."""
        start = time.monotonic()
        frame = self._fresh_frame(cam, take=True)
        result = Result(frame, (start - submitted) * 1000.0, (start - frame.received) * 1000.0)
        return self._infer_on(result, work)

    def _infer_on(self, result: Result, work: Work) -> Result:
        """``work`` on the result's (taken) frame, its outcome added to ``result``."""
        try:
            self._run(result, work)
        except BaseException as exc:
            self._settle(result.frame, exc)
            raise
        self._settle(result.frame, None)
        return result

    def _run(self, result: Result, work: Work) -> None:
        """The core's work on one taken frame (converted once per frame by FrameStore)."""
        image = self.frames.image(result.frame, self._convert)
        cancel = work.cancel or self._stopping
        self._fault_delay(cancel)
        cfg = self.config  # one snapshot: a live parameter change lands between jobs
        if work.question is not None:
            budget = work.max_new_tokens or cfg.generation.max_new_tokens
            request = Request(
                image,
                work.question,
                max_new_tokens=budget,
                on_text=work.on_text,
                cancel=cancel,
                deadline=work.deadline,
            )
            result.answer = self.assistant.answer_request(request)
        if work.rank:
            result.hint = self.assistant.rank(image, cfg.hint_instruction, cfg.hint_candidates)

    def _fault_delay(self, cancel: threading.Event) -> None:
        """inference_delay_ms: simulate a slow model (tests); a cancel cuts it short."""
        delay = self.config.inference_delay_ms / 1000.0
        if delay > 0:
            cancel.wait(delay)

    def _on_tick(self) -> None:
        """The periodic timer: per camera with a new frame, one job for the kinds due now
        (TickPlan), so kinds due together run on one frame; skipped (counted per kind in
        periodic_skipped) while the camera's previous periodic job is still queued or when the
        queue is full."""
        plan, cfg = self._plan, self.config  # snapshots: rates may change live
        due = plan.due(time.monotonic())
        if not due or cfg is None:
            return
        for cam in cfg.cameras:
            frame = self.frames.latest(cam.topic)
            if frame is None:
                continue
            kinds = tuple(k for k in due if self._used.get(f"{k}:{cam.topic}") != frame.seq)
            if not kinds:
                continue  # nothing new to look at
            key = f"periodic:{cam.topic}"
            if self.worker.pending(key):
                self.monitor.count("periodic_skipped", len(kinds))
                continue
            for kind in kinds:
                self._used[f"{kind}:{cam.topic}"] = frame.seq
            job = partial(self._periodic, kinds, cam, time.monotonic())
            deadline = time.monotonic() + 2 * max(plan.periods[k] for k in kinds)
            try:
                future = self.worker.submit(job, PERIODIC, key=key, deadline=deadline)
            except VlmError:
                self.monitor.count("periodic_skipped", len(kinds))
                continue
            future.add_done_callback(partial(self._periodic_done, len(kinds)))

    def _periodic(self, kinds: tuple[str, ...], cam: Camera, submitted: float) -> None:
        """The action hint and/or scene answer of one frame, each published with the source
        image header as soon as it is ready (the hint first: it is quick, and a robot acts on
        it); nothing (no frame taken) once the node was deactivated."""
        if not self._is_active:
            return
        cfg, result = self.config, None
        if HINT in kinds:
            result = self._infer(cam, submitted, Work(rank=True))
            self._publish(cam, HINT, self._hint_msg(cam, result), result.frame)
        if SCENE in kinds:
            work = Work(question=cfg.scene_prompt)
            if result is None:
                result = self._infer(cam, submitted, work)
            else:  # the same frame as the hint
                result = self._infer_on(result, work)
            if result.answer is not None and result.answer.stop_reason == "cancelled":
                # cut short by the process's exit (stop_for_exit): what was generated so far
                # (often nothing) is not a scene answer, and a robot must not act on it
                self.monitor.count("periodic_skipped")
                return
            self._publish(cam, SCENE, self._scene_msg(cam, cfg.scene_prompt, result), result.frame)
        self._annotate(cam, result.frame)

    def _publish(self, cam: Camera, kind: str, msg, frame: Frame) -> None:
        """Publish a periodic output, remember it for the annotated image, log it (demo)."""
        self._pubs[kind].publish(msg)
        self._shown.setdefault(cam.topic, {})[kind] = (frame.seq, msg)
        if self.config.log_outputs:
            self._log_output(cam, kind, msg)

    # ---- annotated image (drawn on the renderer's thread) ----------------------------------

    def _annotate(self, cam: Camera, frame: Frame) -> None:
        """Hand ``frame`` with its camera's latest outputs to the renderer, only while someone
        subscribes to ~/annotated_image (or its /compressed) or a saved frame is due: no
        drawing otherwise."""
        raw, compressed = self._pubs[ANNOTATED], self._pubs[ANNOTATED_COMPRESSED]
        wanted = raw.get_subscription_count() > 0 or compressed.get_subscription_count() > 0
        renderer = self._renderer  # None once released (a job finishing at exit)
        if renderer is None or not (wanted or (self._saver is not None and self._saver.due())):
            return
        renderer.offer((frame, self._overlay(cam, frame)))

    def _overlay(self, cam: Camera, frame: Frame) -> annotate.Overlay:
        """What to draw on ``frame``: its camera's latest scene answer and action hint."""
        stamp = frame.msg.header.stamp
        fields: dict[str, object] = {}
        shown = self._shown.get(cam.topic, {})
        if SCENE in shown:
            seq, msg = shown[SCENE]
            fields.update(
                answer=msg.answer,
                answer_ms=msg.latency.image_to_output_ms,
                answer_same_frame=seq == frame.seq,
            )
        if HINT in shown:
            seq, msg = shown[HINT]
            fields.update(
                action=msg.action,
                candidates=tuple(msg.candidates),
                probabilities=tuple(float(p) for p in msg.probabilities),
                hint_ms=msg.latency.image_to_output_ms,
                hint_same_frame=seq == frame.seq,
            )
        camera, stamp_s = self._name(cam), stamp.sec + stamp.nanosec * 1e-9
        return annotate.Overlay(camera, stamp_s, **fields)  # type: ignore[arg-type]

    def _render_annotated(self, item: tuple[Frame, annotate.Overlay]) -> None:
        """The renderer's work: draw, then publish (to the topics with subscribers) and save.
        Every message carries the source frame's header."""
        frame, overlay = item
        image = annotate.draw(frame.image, overlay)
        header = frame.msg.header
        raw, compressed = self._pubs[ANNOTATED], self._pubs[ANNOTATED_COMPRESSED]
        if self._is_active and raw.get_subscription_count() > 0:
            height, width = image.shape[:2]
            raw.publish(
                Image(
                    header=header,
                    height=height,
                    width=width,
                    encoding="rgb8",
                    step=width * 3,
                    data=image.tobytes(),
                )
            )
        if self._is_active and compressed.get_subscription_count() > 0:
            compressed.publish(
                CompressedImage(
                    header=header, format=annotate.COMPRESSED_FORMAT, data=annotate.jpeg(image)
                )
            )
        saver = self._saver
        if saver is not None:
            saver.save(image, overlay.stamp_s)

    def _log_output(self, cam: Camera, kind: str, msg) -> None:
        """One info line per published output (``log_outputs``: the demo's console)."""
        if kind == SCENE:
            text = f"scene: {msg.answer!r}"
        else:
            pairs = zip(msg.candidates, msg.probabilities, strict=True)
            text = f"action hint: {msg.action} ({', '.join(f'{a} {p:.2f}' for a, p in pairs)})"
        latency = msg.latency.image_to_output_ms
        self.get_logger().info(f"{self._name(cam)}: {text} [{latency:.0f} ms image->output]")

    def _periodic_done(self, kinds: int, future: concurrent.futures.Future) -> None:
        """Count what happened to a periodic job (of ``kinds`` kinds) that did not publish."""
        if future.cancelled() or isinstance(future.exception(), WorkerStoppedError):
            self.monitor.count("periodic_skipped", kinds)
            return
        exc = future.exception()
        if isinstance(exc, (StaleJobError, EvictedError)):
            self.monitor.count("periodic_skipped", kinds)
        elif isinstance(exc, StaleFrameError):
            self.monitor.count("frames_stale")
        elif isinstance(exc, InputError):
            pass  # the frame's rejection: counted and logged once, in _settle
        elif exc is not None:
            self.monitor.count("failed")
            # a server that is down fails every tick: say so every 5 s, not at the camera's rate
            throttle = {"throttle_duration_sec": 5.0} if isinstance(exc, RemoteError) else {}
            self.get_logger().error(
                f"periodic inference failed: {type(exc).__name__}: {exc}", **throttle
            )
        drop_tracebacks(exc)  # its frames held this job's frame in a cycle (see the function)

    # ---- output messages -------------------------------------------------------------------

    def _latency(self, result: Result, timings) -> tuple[StageLatency, tuple[str, ...]]:
        """StageLatency of ``timings`` (and the end-to-end time now), recorded once."""
        ms = timings.as_dict()
        e2e = self._image_to_output_ms(result.frame)
        latency = outputs.stage_latency(RCLPY_TYPES, ms, result.queue_ms, e2e)
        return latency, self.monitor.record(ms, e2e)

    def _image_to_output_ms(self, frame: Frame) -> float:
        """Now minus the image's header stamp; from receive time when the image is unstamped."""
        stamp = frame.msg.header.stamp
        if stamp.sec == 0 and stamp.nanosec == 0:
            return (time.monotonic() - frame.received) * 1000.0
        return (self.get_clock().now() - Time.from_msg(stamp)).nanoseconds / 1e6

    def _scene_msg(self, cam: Camera, question: str, result: Result) -> SceneAnswer:
        latency, misses = self._latency(result, result.answer.timings)
        header, name = result.frame.msg.header, self._name(cam)
        return outputs.scene_answer(
            RCLPY_TYPES, header, name, question, result.answer, latency, misses
        )

    def _hint_msg(self, cam: Camera, result: Result) -> ActionHint:
        latency, misses = self._latency(result, result.hint.timings)
        header, instruction = result.frame.msg.header, self.config.hint_instruction
        return outputs.action_hint(
            RCLPY_TYPES, header, self._name(cam), instruction, result.hint, latency, misses
        )

    # ---- Ask service and Describe action ---------------------------------------------------

    def _submit_query(self, cam: Camera, work: Work) -> tuple[concurrent.futures.Future, float]:
        """Check the frame now (a clean error at once), then queue the query; returns the job
        and when its waiter gives up. The answer's own deadline is query_timeout_s: decoding
        stops there (stop_reason "deadline"); QUERY_GRACE_S more covers a stage that cannot
        stop (vision, prefill, ranking) before the request fails."""
        self._fresh_frame(cam)
        now = time.monotonic()
        deadline = now + self.config.query_timeout_s
        job = partial(self._infer, cam, now, replace(work, deadline=deadline))
        return self.worker.submit(job, QUERY, deadline=deadline), deadline + QUERY_GRACE_S

    def _await_job(self, job: concurrent.futures.Future, give_up: float, cancel=None) -> RosFuture:
        """An rclpy Future the request coroutine awaits: completed by the worker thread with the
        job's outcome, or by the watchdog with TimeoutError. Its no-op done callback makes the
        completion schedule a task, which wakes the executor so the coroutine resumes at once
        (rclpy resumes a waiting coroutine only when the executor wakes)."""
        done = RosFuture(executor=self.executor)
        done.add_done_callback(lambda _done: None)
        waiting = Waiting(job, done, give_up, cancel)
        with self._waits_lock:
            self._waits.add(waiting)
        job.add_done_callback(partial(self._job_finished, waiting))
        return done

    def _claim(self, waiting: Waiting) -> bool:
        """Whether this caller completes ``waiting`` (the worker and the watchdog race)."""
        with self._waits_lock:
            if waiting not in self._waits:
                return False
            self._waits.discard(waiting)
            return True

    def _job_finished(self, waiting: Waiting, job: concurrent.futures.Future) -> None:
        """Worker thread (or the submitter, for a cancelled job): hand the outcome over.
        ``waiting.job`` is dropped once claimed: the job's done callbacks (kept by the Future
        after they ran) hold ``waiting``, so job -> callback -> waiting -> job was a reference
        cycle holding the job's result and its frame until Python's cycle collector ran. With
        a 1080p camera that was 6 MB an answered request, +800 MB of RSS over 10 000 Asks in
        one run (docs/NODE.md, the soak)."""
        if not self._claim(waiting):
            return
        waiting.job = None
        if job.cancelled():
            waiting.done.set_exception(concurrent.futures.CancelledError())
        elif job.exception() is not None:
            waiting.done.set_exception(job.exception())
        else:
            waiting.done.set_result(job.result())

    def _expire_waits(self) -> None:
        """Watchdog timer: fail requests still waiting past their give-up time."""
        now = time.monotonic()
        with self._waits_lock:
            late = [w for w in self._waits if now > w.give_up]
        for waiting in late:
            if self._claim(waiting):
                job, waiting.job = waiting.job, None  # no cycle (see _job_finished)
                job.cancel()  # still queued: never runs
                waiting.done.set_exception(concurrent.futures.TimeoutError())

    def _refused(self, what: str, exc: BaseException) -> str:
        """The one-line error a failed request gets; counted, and logged (a burst's refusals
        at most once a second per kind, with the running count; a bug with its traceback).
        The traceback is then dropped (see drop_tracebacks)."""
        text = str(exc) or type(exc).__name__
        timeout = self.config.query_timeout_s if self.config else 0.0
        if isinstance(exc, imaging.ImageFormatError):
            text = f"bad image ({exc.reason}): {text}"
        elif isinstance(exc, concurrent.futures.TimeoutError):
            text = f"no answer within query_timeout_s ({timeout} s) + {QUERY_GRACE_S} s"
        elif isinstance(exc, concurrent.futures.CancelledError):
            text = "cancelled"
        if isinstance(exc, (VlmError, *WAIT_ERRORS)):
            n = self._count("requests_refused")
            self.get_logger().warning(
                f"{what} refused: {text} [{n} refused so far]", throttle_duration_sec=1.0
            )
        else:  # a bug or a model failure: still answer the caller, and make /diagnostics ERROR
            self._count("failed")
            text = f"inference failed: {type(exc).__name__}: {text}"
            trace = "".join(traceback.format_exception(exc)).rstrip()
            self.get_logger().error(f"{what}: {text}\n{trace}")
        drop_tracebacks(exc)
        return text

    def _count(self, name: str) -> int:
        """Count on the monitor (none before the first configure); returns the new total."""
        monitor = self.monitor
        if monitor is None:
            return 0
        monitor.count(name)
        return monitor.counters()[name]

    def _not_serving(self, what: str) -> str:
        """Why a request cannot be served now ("" when active): still loading the model, or
        not active. Counted and logged as a refusal."""
        if self._is_active:
            return ""
        name = self.get_name()
        if self._loading:
            elapsed = time.monotonic() - self._loading_since
            text = f"{name} is {self._loading} ({elapsed:.0f} s so far); {what} is served once "
            text += "it is active"
        else:
            text = f"{name} is not active (deactivated or not configured); {what} is "
            text += "served only in the active lifecycle state"
        n = self._count("requests_refused")
        self.get_logger().warning(
            f"{what} refused: {text} [{n} refused so far]", throttle_duration_sec=1.0
        )
        return text

    async def _on_ask(self, request, response):
        """Ask: answer (and optionally rank) on the camera's latest frame. A coroutine: it
        waits for the worker without holding an executor thread."""
        refusal = self._not_serving("Ask")
        if refusal:
            response.success, response.error_message = False, refusal
            return response
        try:
            cam = self._camera(request.camera)
            work = Work(request.question, request.want_action_hint, request.max_new_tokens or None)
            job, give_up = self._submit_query(cam, work)
            result = await self._await_job(job, give_up)
            scene = self._scene_msg(cam, request.question, result)
            hint = self._hint_msg(cam, result) if result.hint is not None else None
        except Exception as exc:  # every failure becomes an error response (see _refused)
            response.success, response.error_message = False, self._refused("Ask", exc)
            return response
        response.success, response.answer = True, scene.answer
        response.stop_reason = scene.stop_reason
        response.latency, response.image_stamp = scene.latency, scene.header.stamp
        response.image_age_ms = float(result.image_age_ms)
        if hint is not None:
            response.hint = hint
        return response

    def _on_goal(self, _goal) -> GoalResponse:
        """Describe goals are accepted only while active (a rejection is logged with why)."""
        return GoalResponse.REJECT if self._not_serving("Describe") else GoalResponse.ACCEPT

    def _on_cancel(self, goal_handle) -> CancelResponse:
        """Stop the goal's inference at the next token (or before it starts)."""
        cancel = self._goal_cancels.get(bytes(goal_handle.goal_id.uuid))
        if cancel is not None:
            cancel.set()
            with self._waits_lock:
                jobs = [w.job for w in self._waits if w.cancel is cancel]
            for job in jobs:
                job.cancel()  # still queued: never runs
        return CancelResponse.ACCEPT

    async def _on_describe(self, goal_handle):
        """Describe: stream partial text as feedback; a cancel stops at the next token."""
        req, cancel, count = goal_handle.request, threading.Event(), [0]
        goal = bytes(goal_handle.goal_id.uuid)
        self._goal_cancels[goal] = cancel  # found by _on_cancel and at shutdown
        try:
            return await self._describe_goal(goal_handle, req, cancel, count)
        finally:
            self._goal_cancels.pop(goal, None)

    async def _describe_goal(self, goal_handle, req, cancel: threading.Event, count: list[int]):
        """One goal's work; the result message always says what happened."""

        def on_text(text: str) -> None:
            count[0] += 1
            goal_handle.publish_feedback(
                Describe.Feedback(partial_text=text, tokens_generated=count[0])
            )

        result_msg = Describe.Result()
        try:
            cam = self._camera(req.camera)
            question = req.question or self.config.scene_prompt
            work = Work(
                question, max_new_tokens=req.max_new_tokens or None, on_text=on_text, cancel=cancel
            )
            job, give_up = self._submit_query(cam, work)
            if goal_handle.is_cancel_requested:  # cancelled before the job existed
                cancel.set()
                job.cancel()
            result = await self._await_job(job, give_up, cancel)
            scene = self._scene_msg(cam, question, result)
        except Exception as exc:  # every failure becomes an error result (see _refused)
            result_msg.error_message = self._refused("Describe", exc)
            result_msg.stop_reason = "cancelled" if cancel.is_set() else ""
            (goal_handle.canceled if cancel.is_set() else goal_handle.abort)()
            return result_msg
        result_msg.answer, result_msg.stop_reason = scene.answer, scene.stop_reason
        result_msg.latency, result_msg.image_stamp = scene.latency, scene.header.stamp
        if cancel.is_set():
            result_msg.error_message = "cancelled"
            goal_handle.canceled()
        else:
            result_msg.success = True
            goal_handle.succeed()
        return result_msg

    # ---- diagnostics -----------------------------------------------------------------------

    def _publish_diagnostics(self) -> None:
        """/diagnostics: stage p50/p90/p99/max over the window, counters, queue, verdict; and
        one status per camera (see _camera_status)."""
        extra = {"queue_depth": self.worker.depth, "model": self.config.model}
        renderer = self._renderer
        if renderer is not None:  # ~/annotated_image: 0 drawn while nobody watches
            extra.update(annotated_drawn=renderer.rendered, annotated_failed=renderer.failed)
        status = latency_status(
            names.latency_status(self.get_name()),
            self.get_fully_qualified_name(),
            self.monitor.report(),
            self.config.budgets.as_dict(),
            extra,
        )
        cameras = [
            self._camera_status(cam) for cam in self.config.cameras if cam.topic in self._subs
        ]
        server = getattr(self.assistant, "server_status", None)  # backend remote only
        if server is not None:
            node, hardware_id = self.get_name(), self.get_fully_qualified_name()
            cameras.append(server_status(node, hardware_id, server()))
        msg = DiagnosticArray(status=[status, *cameras])
        msg.header.stamp = self.get_clock().now().to_msg()
        self._pubs["diagnostics"].publish(msg)

    def _camera_status(self, cam: Camera) -> DiagnosticStatus:
        """WARN, with a hint, when the camera sends nothing for CAMERA_SILENCE_S: no publisher,
        or a publisher matched whose frames do not arrive (QoS, or a large frame's transport)."""
        now, name = time.monotonic(), self._name(cam)
        publishers = self._subs[cam.topic].get_publisher_count()
        last = self._last_frame.get(cam.topic)
        since = max(last or 0.0, self._silent_since[cam.topic])
        silent_s = now - since
        level, text = DiagnosticStatus.OK, f"receiving from {publishers} publisher(s)"
        if silent_s > CAMERA_SILENCE_S and publishers == 0:
            level, text = (
                DiagnosticStatus.WARN,
                (
                    f"no publisher on {name} for {silent_s:.0f} s: is the camera running, and is "
                    "the topic right (camera_topic / remapping)?"
                ),
            )
        elif silent_s > CAMERA_SILENCE_S:
            level, text = (
                DiagnosticStatus.WARN,
                (
                    f"{publishers} publisher(s) matched on {name} but no frame for "
                    f"{silent_s:.0f} s: frames over ~512 KB from another process need the camera "
                    "process to run with FASTDDS_DEFAULT_PROFILES_FILE=<vlm_ros>/config/"
                    "fastdds_large_frames.xml (docs/NODE.md, Camera transport); otherwise check "
                    "the camera's QoS against qos_overrides"
                ),
            )
        values = {
            "publishers": publishers,
            "seconds_since_last_frame": f"{now - last:.1f}" if last else "never",
            "qos": self._camera_qos(cam),
        }
        return DiagnosticStatus(
            level=level,
            name=f"{self.get_name()}: camera {name}",
            message=text,
            hardware_id=self.get_fully_qualified_name(),
            values=[KeyValue(key=k, value=str(v)) for k, v in values.items()],
        )

    def _camera_qos(self, cam: Camera) -> str:
        qos = self._subs[cam.topic].qos_profile
        return f"{qos.reliability.name.lower()}, {qos.history.name.lower()} {qos.depth}"


# ---- entry points ------------------------------------------------------------------------------


def run(
    args: list[str] | None = None,
    demo: bool = False,
    camera_rate_hz: float = 10.0,
    loader=None,
    scene_hold_s: float = 3.0,
) -> int:
    """Run the node (and, with ``demo``, the synthetic camera) until Ctrl-C. ``args`` are ROS
    arguments (``--ros-args --params-file F -p model:=demo``); ``loader`` replaces
    Assistant.load (AssistantNode). Ctrl-C (SIGINT) and SIGTERM arrive as KeyboardInterrupt
    (rclpy's own handler would invalidate the context first), so the node shuts down through
    its lifecycle while it can still publish and log; returns 0, or 1 when autostart's
    configure failed. The executor spins from the start; autostart runs on a thread of its own,
    so the node answers "loading model ..." while the model loads."""
    _interrupt_on_stop_signals()
    transport = use_large_frame_profile()
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    overrides = [Parameter(k, value=v) for k, v in DEMO_OVERRIDES.items()] if demo else []
    node = AssistantNode(parameter_overrides=overrides, loader=loader)
    node.get_logger().info(transport)
    executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS)
    executor.add_node(node)
    if demo:
        executor.add_node(SyntheticCamera(rate_hz=camera_rate_hz, scene_hold_s=scene_hold_s))
    outcome: list[int] = []  # autostart's exit status, once it failed
    if node.get_parameter("autostart").value:
        node.begin_autostart()
        threading.Thread(
            target=_autostart, args=(node, executor, outcome), name="autostart", daemon=True
        ).start()
    try:
        while not outcome and rclpy.ok():
            executor.spin_once(timeout_sec=0.5)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        _stop(node, executor)
    return outcome[0] if outcome else 0


def _interrupt_on_stop_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread. Set explicitly because
    Python leaves SIGINT ignored when the process started with it ignored (a background job of a
    non-interactive shell, as in many CI and launch setups), where rclpy's handler would still
    catch it."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.default_int_handler)


def _stop(node: AssistantNode, executor) -> None:
    """Cancel running inference, shut the node down through its lifecycle, then the executor;
    logs how long it took."""
    start = time.monotonic()
    node.get_logger().info("shutting down")
    node.stop_for_exit()
    try:
        node.trigger_shutdown()
    except Exception as exc:  # already finalized, still configuring, or the context is gone
        node.get_logger().info(f"shutdown transition skipped: {exc}")
    executor.shutdown(timeout_sec=1.0)
    node.get_logger().info(f"shut down in {time.monotonic() - start:.2f} s")
    node.destroy_node()
    if rclpy.ok():
        rclpy.shutdown()


def _autostart(node: AssistantNode, executor, outcome: list[int]) -> None:
    """configure + activate without a lifecycle manager; on failure, exit status 1 and the
    executor stops (run() returns)."""
    try:
        if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            node.trigger_activate()
            return
        node.get_logger().fatal(f"cannot start: {node.last_error}")
    except Exception as exc:  # interrupted by shutdown, or the context is gone
        if not node._stopping.is_set():
            node.get_logger().fatal(f"cannot start: {type(exc).__name__}: {exc}")
    finally:
        node.end_autostart()
    if not node._stopping.is_set():
        outcome.append(1)
        executor.wake()  # run()'s loop sees the outcome


def exit_now(rc: int) -> None:
    """Leave the process with ``rc`` once the logs are flushed, skipping the interpreter's
    teardown: its final garbage collection over the model's and torch's objects took seconds
    (2.7 s for the demo model, more for a full-size one), past ``ros2 launch``'s 5 s before
    SIGTERM. Call after run() returned, when nothing else in the process needs an orderly exit."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing to keep
            pass
    try:
        ctypes.CDLL(None).fflush(None)  # C stdio: rcutils console output
    except (OSError, AttributeError):
        pass
    os._exit(rc)


def main(args: list[str] | None = None) -> int:
    """``assistant_node`` executable (ros2 run / launch); exits the process (exit_now)."""
    exit_now(run(sys.argv if args is None else args))
    return 0  # not reached
