"""The rclpy lifecycle node `vlm_assistant`: cameras in; scene answers, action hints, the Ask
service, the Describe action and /diagnostics out. The only module that imports rclpy.

The node only stores messages and submits work: callbacks keep the latest frame per camera
(message + receive time, nothing converted), timers and requests submit jobs to the one
InferenceWorker (serving.worker), and the worker converts the frame (ros.imaging), calls the
ROS-free core (infer.pipeline.Assistant) and publishes. Service and action callbacks run in a
ReentrantCallbackGroup on a MultiThreadedExecutor and wait on the worker's Future with a
timeout, so subscriptions and other requests keep being served during inference.

Lifecycle: configure reads the parameters (vlm_ros.ros.node_config) and loads the model; activate
creates the camera subscriptions and timers; deactivate destroys them (periodic jobs still
queued then return without running); cleanup stops the worker and frees the model. The
lifecycle publishers, the Ask service and the Describe action server live as long as the node:
they publish only while active, and while not active an Ask gets success=false with an error
saying so and a Describe goal is rejected, instead of a client waiting for a service that is
gone. (Also, rclpy can raise InvalidHandle in a MultiThreadedExecutor's wait-set build when a
waitable (an action server, a QoS event handler) is destroyed while the executor spins, which
kills the executor; for the same reason the camera subscriptions have no QoS event handlers.)
``main()`` configures and activates by itself when the ``autostart`` parameter is true (the
default), so no lifecycle manager is needed.

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
"""

from __future__ import annotations

import concurrent.futures
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from rclpy.time import Time
from sensor_msgs.msg import CompressedImage, Image

from vlm_ros.action import Describe
from vlm_ros.demo import data as demo_data
from vlm_ros.errors import EvictedError, InputError, VlmError
from vlm_ros.msg import ActionHint, SceneAnswer, StageLatency
from vlm_ros.ros import imaging, names, outputs
from vlm_ros.ros.node_config import (
    DOUBLES,
    LIVE,
    PARAMETERS,
    RECONFIGURE,
    Camera,
    NodeConfig,
    check_values,
)
from vlm_ros.ros.node_messages import RCLPY_TYPES, latency_status
from vlm_ros.ros.synthetic_camera import SyntheticCamera
from vlm_ros.serving.frames import Frame, FrameStore, StaleFrameError
from vlm_ros.serving.latency import LatencyMonitor
from vlm_ros.serving.worker import (
    PERIODIC,
    QUERY,
    InferenceWorker,
    StaleJobError,
    WorkerStoppedError,
)
from vlm_ros.srv import Ask

try:
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # Humble: the same class lived in rclpy.qos_event
    from rclpy.qos_event import SubscriptionEventCallbacks

NODE_NAME = names.NODE_NAME
SENSOR_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT
)
OUTPUT_QOS = 10
SCENE, HINT = "scene", "hint"
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

    def __init__(self, node_name: str = NODE_NAME, **kwargs):
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
        self._used: dict[str, int] = {}  # "kind:camera" -> seq of the frame last used
        self._group = ReentrantCallbackGroup()
        self._active: list = []  # subscriptions and the diagnostics timer: made on activate
        self._periodic_timers: dict[str, object] = {}  # periodic timers by kind (rates are live)
        self._is_active = False
        make = self.create_lifecycle_publisher
        self._pubs = {
            SCENE: make(SceneAnswer, names.SCENE_ANSWER, OUTPUT_QOS),
            HINT: make(ActionHint, names.ACTION_HINT, OUTPUT_QOS),
            "diagnostics": make(DiagnosticArray, names.DIAGNOSTICS, OUTPUT_QOS),
        }
        self._describe = ActionServer(
            self,
            Describe,
            names.DESCRIBE,
            self._on_describe,
            callback_group=self._group,
            goal_callback=self._on_goal,
            cancel_callback=lambda _goal: CancelResponse.ACCEPT,
        )
        self._ask = self.create_service(Ask, names.ASK, self._on_ask, callback_group=self._group)
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
        """(Re)create the periodic timers from the config's rates; a rate of 0 has none."""
        for timer in self._periodic_timers.values():
            timer.destroy()
        self._periodic_timers.clear()
        cfg = self.config
        for kind, rate in ((SCENE, cfg.scene_rate_hz), (HINT, cfg.hint_rate_hz)):
            if rate > 0:
                tick = partial(self._on_tick, kind)
                self._periodic_timers[kind] = self.create_timer(1.0 / rate, tick, self._group)

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
            log.info("importing the model runtime (torch, transformers)")
            # here, not at the top: the node's first log lines come before this ~5-30 s import
            from vlm_ros.infer.pipeline import Assistant

            log.info(
                f"loading model {config.model!r} on {config.runtime.device} "
                f"({time.monotonic() - start:.1f} s)"
            )
            self.assistant = Assistant.load(
                config.model,
                runtime=config.runtime,
                generation=config.generation,
                vision_tower=config.vision_tower,
            )
        except Exception as exc:  # a robot must see why, not a traceback in a log file
            self._params_fixed = False
            self.last_error = CLI_FLAG.sub(
                r"the \1 parameter (\1:=\2)", f"{type(exc).__name__}: {exc}"
            )
            log.error(f"configure failed: {self.last_error}")
            return TransitionCallbackReturn.FAILURE
        # a LIVE parameter set while the model loaded was accepted: apply it now
        config = config.with_values({n: self.get_parameter(n).value for n in LIVE})
        self.config, self.last_error = config, ""
        self.worker = InferenceWorker(config.queue_size, name=f"{self.get_name()}-inference")
        self.monitor = LatencyMonitor(config.budgets, config.diagnostics_window)
        log.info(
            f"configured: {self.assistant.family.name} from {config.model!r} "
            f"in {time.monotonic() - start:.1f} s"
        )
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state) -> TransitionCallbackReturn:
        """Subscribe to the cameras and start the timers."""
        cfg, group = self.config, self._group
        no_events = SubscriptionEventCallbacks(use_default_callbacks=False)
        for cam in cfg.cameras:
            msg_type = CompressedImage if cam.compressed else Image
            callback = partial(self._on_image, cam.topic)
            self._active.append(
                self.create_subscription(
                    msg_type,
                    cam.topic,
                    callback,
                    SENSOR_QOS,
                    callback_group=group,
                    event_callbacks=no_events,
                )
            )
        self._start_timers()
        self._active.append(
            self.create_timer(cfg.diagnostics_period_s, self._publish_diagnostics, group)
        )
        self._is_active = True
        self.get_logger().info(f"active: cameras {[c.topic for c in cfg.cameras]}")
        return super().on_activate(state)

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        """Stop taking input: destroy what activate made (queued work still completes)."""
        self._is_active = False
        self._destroy_active()
        return super().on_deactivate(state)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        """Stop the worker and free the model (and GPU memory)."""
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        self._is_active = False
        self._destroy_active()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _destroy_active(self) -> None:
        for entity in [*self._active, *self._periodic_timers.values()]:
            entity.destroy()
        self._active.clear()
        self._periodic_timers.clear()

    def _release(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
        if self.assistant is not None:
            self.assistant.close()
        self.worker = self.assistant = self.config = None
        self._params_fixed = False
        self.frames.clear()
        self._used = {}

    # ---- input -----------------------------------------------------------------------------

    def _on_image(self, topic: str, msg) -> None:
        """Keep only the latest frame; never convert or infer here (FrameStore counts it, and
        the frame it replaces as dropped unless a job took it)."""
        self.frames.put(topic, msg, time.monotonic())

    def _fresh_frame(self, cam: Camera, take: bool = False) -> Frame:
        """The camera's latest frame, or InputError when there is none or it is too old;
        ``take`` marks it as used by a job (see the module docstring)."""
        max_age = self.config.max_frame_age_ms / 1000.0
        return self.frames.fresh(cam.topic, time.monotonic(), max_age, take)

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

    def _infer(
        self,
        cam: Camera,
        submitted: float,
        question: str | None = None,
        max_new_tokens: int | None = None,
        rank: bool = False,
        on_text=None,
        cancel: threading.Event | None = None,
    ) -> Result:
        """Latest fresh frame of ``cam`` -> answer and/or action hint, recorded in the monitor."""
        start = time.monotonic()
        frame = self._fresh_frame(cam, take=True)
        result = Result(frame, (start - submitted) * 1000.0, (start - frame.received) * 1000.0)
        try:
            self._run(result, question, max_new_tokens, rank, on_text, cancel)
        except BaseException as exc:
            self._settle(frame, exc)
            raise
        self._settle(frame, None)
        return result

    def _run(self, result: Result, question, max_new_tokens, rank, on_text, cancel) -> None:
        """The core's work on one taken frame (converted once per frame by FrameStore)."""
        image = self.frames.image(result.frame, self._convert)
        self._fault_delay(cancel)
        cfg = self.config  # one snapshot: a live parameter change lands between jobs
        if question is not None:
            budget = max_new_tokens or cfg.generation.max_new_tokens
            result.answer = self.assistant.answer(
                image, question, max_new_tokens=budget, on_text=on_text, cancel=cancel
            )
        if rank:
            result.hint = self.assistant.rank(image, cfg.hint_instruction, cfg.hint_candidates)

    def _fault_delay(self, cancel: threading.Event | None) -> None:
        """inference_delay_ms: simulate a slow model (tests); a cancel cuts it short."""
        delay = self.config.inference_delay_ms / 1000.0
        if delay > 0:
            (cancel or threading.Event()).wait(delay)

    def _on_tick(self, kind: str) -> None:
        """Timer: queue one periodic job per camera with a new frame; skip it (counted in
        periodic_skipped) when the previous one of the same kind is still queued or the queue
        is full."""
        cfg = self.config  # one snapshot: the rate may change live (a tick of the old timer)
        rate = cfg.scene_rate_hz if kind == SCENE else cfg.hint_rate_hz
        if rate <= 0:
            return
        period = 1.0 / rate
        for cam in cfg.cameras:
            frame, key = self.frames.latest(cam.topic), f"{kind}:{cam.topic}"
            if frame is None or self._used.get(key) == frame.seq:
                continue  # nothing new to look at
            if self.worker.pending(key):
                self.monitor.count("periodic_skipped")
                continue
            self._used[key] = frame.seq
            job = partial(self._periodic, kind, cam, time.monotonic())
            try:
                future = self.worker.submit(
                    job, PERIODIC, key=key, deadline=time.monotonic() + 2 * period
                )
            except VlmError:
                self.monitor.count("periodic_skipped")
                continue
            future.add_done_callback(self._periodic_done)

    def _periodic(self, kind: str, cam: Camera, submitted: float) -> None:
        """One scene answer or action hint, published with the source image header; nothing
        (no frame taken) once the node was deactivated."""
        if not self._is_active:
            return
        if kind == SCENE:
            result = self._infer(cam, submitted, self.config.scene_prompt)
            msg = self._scene_msg(cam, self.config.scene_prompt, result)
        else:
            result = self._infer(cam, submitted, rank=True)
            msg = self._hint_msg(cam, result)
        self._pubs[kind].publish(msg)
        if self.config.log_outputs:
            self._log_output(cam, kind, msg)

    def _log_output(self, cam: Camera, kind: str, msg) -> None:
        """One info line per published output (``log_outputs``: the demo's console)."""
        if kind == SCENE:
            text = f"scene: {msg.answer!r}"
        else:
            pairs = zip(msg.candidates, msg.probabilities, strict=True)
            text = f"action hint: {msg.action} ({', '.join(f'{a} {p:.2f}' for a, p in pairs)})"
        latency = msg.latency.image_to_output_ms
        self.get_logger().info(f"{cam.topic}: {text} [{latency:.0f} ms image->output]")

    def _periodic_done(self, future: concurrent.futures.Future) -> None:
        """Count what happened to a periodic job that did not publish."""
        if future.cancelled() or isinstance(future.exception(), WorkerStoppedError):
            self.monitor.count("periodic_skipped")
            return
        exc = future.exception()
        if isinstance(exc, (StaleJobError, EvictedError)):
            self.monitor.count("periodic_skipped")
        elif isinstance(exc, StaleFrameError):
            self.monitor.count("frames_stale")
        elif isinstance(exc, InputError):
            pass  # the frame's rejection: counted and logged once, in _settle
        elif exc is not None:
            self.monitor.count("failed")
            self.get_logger().error(f"periodic inference failed: {type(exc).__name__}: {exc}")

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
        header = result.frame.msg.header
        return outputs.scene_answer(
            RCLPY_TYPES, header, cam.topic, question, result.answer, latency, misses
        )

    def _hint_msg(self, cam: Camera, result: Result) -> ActionHint:
        latency, misses = self._latency(result, result.hint.timings)
        header, instruction = result.frame.msg.header, self.config.hint_instruction
        return outputs.action_hint(
            RCLPY_TYPES, header, cam.topic, instruction, result.hint, latency, misses
        )

    # ---- Ask service and Describe action ---------------------------------------------------

    def _submit_query(self, cam: Camera, **kwargs) -> concurrent.futures.Future:
        """Check the frame now (a clean error at once), then queue the query."""
        self._fresh_frame(cam)
        job = partial(self._infer, cam, time.monotonic(), **kwargs)
        deadline = time.monotonic() + self.config.query_timeout_s
        return self.worker.submit(job, QUERY, deadline=deadline)

    def _refused(self, what: str, exc: BaseException) -> str:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, imaging.ImageFormatError):
            text = f"bad image ({exc.reason}): {text}"
        elif isinstance(exc, concurrent.futures.TimeoutError):
            text = f"no answer within query_timeout_s ({self.config.query_timeout_s} s)"
        if isinstance(exc, (VlmError, *WAIT_ERRORS)):
            self.monitor.count("requests_refused")
            n = self.monitor.counters()["requests_refused"]
            self.get_logger().warning(f"{what} refused: {text} [{n} refused so far]")
        else:  # a bug or a model failure: still answer the caller, and make /diagnostics ERROR
            self.monitor.count("failed")
            text = f"inference failed: {type(exc).__name__}: {text}"
            self.get_logger().error(f"{what}: {text}")
        return text

    def _not_active(self, what: str) -> str:
        """The refusal of a request made while the node is not active (logged, counted)."""
        text = f"{self.get_name()} is not active (deactivated or not configured); {what} is "
        text += "served only in the active lifecycle state"
        if self.monitor is not None:
            self.monitor.count("requests_refused")
        self.get_logger().warning(f"{what} refused: {text}")
        return text

    def _on_ask(self, request, response):
        """Ask: answer (and optionally rank) on the camera's latest frame."""
        if not self._is_active:
            response.success, response.error_message = False, self._not_active("Ask")
            return response
        cfg = self.config
        future = None
        try:
            cam = cfg.camera(request.camera)
            future = self._submit_query(
                cam,
                question=request.question,
                rank=request.want_action_hint,
                max_new_tokens=request.max_new_tokens or None,
            )
            result = future.result(timeout=cfg.query_timeout_s)
        except Exception as exc:  # every failure becomes an error response (see _refused)
            if future is not None:
                future.cancel()
            response.success, response.error_message = False, self._refused("Ask", exc)
            return response
        scene = self._scene_msg(cam, request.question, result)
        response.success, response.answer = True, scene.answer
        response.stop_reason = scene.stop_reason
        response.latency, response.image_stamp = scene.latency, scene.header.stamp
        response.image_age_ms = float(result.image_age_ms)
        if result.hint is not None:
            response.hint = self._hint_msg(cam, result)
        return response

    def _on_goal(self, _goal) -> GoalResponse:
        """Describe goals are served only while active."""
        if self._is_active:
            return GoalResponse.ACCEPT
        self._not_active("Describe")
        return GoalResponse.REJECT

    def _on_describe(self, goal_handle):
        """Describe: stream partial text as feedback; a cancel stops at the next token."""
        req, cancel, count = goal_handle.request, threading.Event(), [0]

        def on_text(text: str) -> None:
            count[0] += 1
            goal_handle.publish_feedback(
                Describe.Feedback(partial_text=text, tokens_generated=count[0])
            )

        result_msg = Describe.Result()
        try:
            cam = self.config.camera(req.camera)
            question = req.question or self.config.scene_prompt
            future = self._submit_query(
                cam,
                question=question,
                on_text=on_text,
                cancel=cancel,
                max_new_tokens=req.max_new_tokens or None,
            )
            result = self._wait_cancellable(future, goal_handle, cancel)
        except Exception as exc:  # every failure becomes an error result (see _refused)
            result_msg.error_message = self._refused("Describe", exc)
            result_msg.stop_reason = "cancelled" if cancel.is_set() else ""
            (goal_handle.canceled if cancel.is_set() else goal_handle.abort)()
            return result_msg
        scene = self._scene_msg(cam, question, result)
        result_msg.answer, result_msg.stop_reason = scene.answer, scene.stop_reason
        result_msg.latency, result_msg.image_stamp = scene.latency, scene.header.stamp
        if cancel.is_set():
            result_msg.error_message = "cancelled"
            goal_handle.canceled()
        else:
            result_msg.success = True
            goal_handle.succeed()
        return result_msg

    def _wait_cancellable(self, future, goal_handle, cancel: threading.Event) -> Result:
        """Wait for the worker, turning a cancel request into the core's cancel Event."""
        give_up = time.monotonic() + self.config.query_timeout_s
        while True:
            try:
                return future.result(timeout=0.05)
            except concurrent.futures.TimeoutError:
                if goal_handle.is_cancel_requested and not cancel.is_set():
                    cancel.set()
                    future.cancel()  # still queued: never runs
                if time.monotonic() > give_up:
                    future.cancel()
                    raise

    # ---- diagnostics -----------------------------------------------------------------------

    def _publish_diagnostics(self) -> None:
        """/diagnostics: stage p50/p90/p99/max over the window, counters, queue, verdict."""
        extra = {"queue_depth": self.worker.depth, "model": self.config.model}
        status = latency_status(
            names.latency_status(self.get_name()),
            self.get_fully_qualified_name(),
            self.monitor.report(),
            self.config.budgets.as_dict(),
            extra,
        )
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self._pubs["diagnostics"].publish(msg)


# ---- entry points ------------------------------------------------------------------------------


def run(args: list[str] | None = None, demo: bool = False, camera_rate_hz: float = 10.0) -> int:
    """Run the node (and, with ``demo``, the synthetic camera) until Ctrl-C. ``args`` are ROS
    arguments (``--ros-args --params-file F -p model:=demo``). Ctrl-C (SIGINT) and SIGTERM
    arrive as KeyboardInterrupt (rclpy's own handler would invalidate the context first), so
    the node shuts down through its lifecycle while it can still publish and log; returns 0."""
    _interrupt_on_stop_signals()
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    overrides = [Parameter(k, value=v) for k, v in DEMO_OVERRIDES.items()] if demo else []
    node = AssistantNode(parameter_overrides=overrides)
    executor = MultiThreadedExecutor(num_threads=8)  # waiting queries must not starve callbacks
    executor.add_node(node)
    if demo:
        executor.add_node(SyntheticCamera(rate_hz=camera_rate_hz))
    rc = 0
    try:
        if node.get_parameter("autostart").value:
            rc = _autostart(node)
        if rc == 0:
            executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        _stop(node, executor)
    return rc


def _interrupt_on_stop_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread. Set explicitly because
    Python leaves SIGINT ignored when the process started with it ignored (a background job of a
    non-interactive shell, as in many CI and launch setups), where rclpy's handler would still
    catch it."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.default_int_handler)


def _stop(node: AssistantNode, executor) -> None:
    """Shut the node down through its lifecycle (frees the model), then the executor."""
    try:
        node.trigger_shutdown()
    except Exception as exc:  # already finalized, or the context is gone
        node.get_logger().debug(f"shutdown transition: {exc}")
    executor.shutdown()
    node.destroy_node()
    if rclpy.ok():
        rclpy.shutdown()


def _autostart(node: AssistantNode) -> int:
    """configure + activate without a lifecycle manager; 1 when configure fails."""
    if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
        node.get_logger().fatal(f"cannot start: {node.last_error}")
        return 1
    node.trigger_activate()
    return 0


def main(args: list[str] | None = None) -> int:
    """``assistant_node`` executable (ros2 run / launch)."""
    return run(sys.argv if args is None else args)
