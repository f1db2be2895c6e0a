"""eval-bag: replay a camera bag through the assistant as the node would, write its outputs as a
rosbag2 (MCAP) and report on that bag.

Per frame the model takes (see replay.py for which), it answers one question (the scene prompt
and the questions file's lines, in turn) and, with hints on, ranks the candidate actions, like
the node's periodic scene answer and action hint. Outputs carry the source image's header
(stamp, frame_id) and are written at their *virtual answer time* (the frame's arrival in the
bag plus the time it waited for the model plus the measured inference time), so the output bag
reads exactly like a live ``ros2 bag record`` of the node, where the log time is when the answer
was received. One report function serves both (report.py), and the report of a replay is
computed from the bag it wrote, never from in-memory numbers.

The outputs are the live node's: the same topic names (vlm_ros.ros.names, resolved for
``node_name``/``namespace``), the same message mapping (vlm_ros.ros.outputs, here over the
typestore's classes), the same frame converter and size limits (vlm_ros.ros.imaging), and the
same frame accounting (vlm_ros.serving.frames, through replay.py).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

from vlm_ros.bag import BagDamageError, BagError
from vlm_ros.bag import diagnostics as diag
from vlm_ros.bag.io import OutMessage, iter_messages, open_reader, topics_text, write_bag
from vlm_ros.bag.output import OUTPUT_BAG, prepare_out_dir
from vlm_ros.bag.progress import Progress
from vlm_ros.bag.replay import Arrival, Counters, replay
from vlm_ros.bag.report import build_report, unread_report, write_report
from vlm_ros.bag.types import (
    ACTION_HINT,
    COMPRESSED_IMAGE,
    IMAGE_TYPES,
    SCENE_ANSWER,
    STAGE_LATENCY,
    normalize_msgtype,
    typestore,
)
from vlm_ros.config import ImageLimits, RemoteConfig, RuntimeConfig
from vlm_ros.errors import InputError
from vlm_ros.ros import names, outputs
from vlm_ros.ros.imaging import MAX_PIXELS, SizeLimits, image_from_msg
from vlm_ros.ros.node_config import PARAMETERS
from vlm_ros.serving.latency import Budgets
from vlm_ros.types import StageTimings

# the node's own defaults, so a replay asks what the live node asks unless told otherwise
DEFAULT_SCENE_PROMPT = str(PARAMETERS["scene_prompt"][0])
DEFAULT_INSTRUCTION = str(PARAMETERS["hint_instruction"][0])
DEFAULT_CANDIDATES: tuple[str, ...] = tuple(PARAMETERS["hint_candidates"][0])  # type: ignore
DEFAULT_MAX_NEW_TOKENS = int(PARAMETERS["max_new_tokens"][0])  # type: ignore
DIAGNOSTICS_TOPIC = names.DIAGNOSTICS
FRAME_JPEG_QUALITY = 90


@dataclass(frozen=True)
class EvalSettings:
    """Everything eval-bag needs; built once from the command line."""

    bag: str
    out_dir: str
    model: str = "demo"
    rate: str = "recorded"
    topic: str | None = None
    scene_prompt: str | None = DEFAULT_SCENE_PROMPT
    questions: tuple[str, ...] = ()
    hint: bool = True
    instruction: str = DEFAULT_INSTRUCTION
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    device: str = "cpu"
    budgets_ms: dict[str, float] = field(default_factory=dict)
    max_frames: int | None = None
    warmup: int = 1  # untimed runs on the first frame before the replay, as the node warms up
    diagnostics_period_s: float = 1.0
    frames: bool = True  # write the frames the model took into the output bag (frame_topic)
    force: bool = False  # replace a report already in out_dir
    node_name: str = names.NODE_NAME  # the outputs' topics, as the live node's would resolve
    namespace: str = ""
    max_image_pixels: int = MAX_PIXELS
    remote: RemoteConfig | None = None  # answer through this server (backend remote)

    @property
    def scene_topic(self) -> str:
        return names.resolve(names.SCENE_ANSWER, self.node_name, self.namespace)

    @property
    def hint_topic(self) -> str:
        return names.resolve(names.ACTION_HINT, self.node_name, self.namespace)

    def prompts(self) -> tuple[str, ...]:
        """Questions asked in turn, one per processed frame."""
        asked = ((self.scene_prompt,) if self.scene_prompt else ()) + self.questions
        return asked


@dataclass
class Frame:
    """One camera message as read from the bag (converted to pixels only if the model takes it)."""

    index: int
    topic: str
    msgtype: str
    arrival_ns: int
    msg: Any  # sensor_msgs Image or CompressedImage (rosbags dataclass)

    @property
    def stamp_ns(self) -> int:
        s = self.msg.header.stamp
        return int(s.sec) * 1_000_000_000 + int(s.nanosec)


@dataclass(frozen=True)
class EvalResult:
    out_bag: Path
    report_dir: Path
    counters: Counters


def frame_topic(camera_topic: str) -> str:
    """Where the output bag keeps the frames of ``camera_topic``: image_transport's compressed
    topic (``<camera>/compressed``), or the camera topic itself when it is compressed already."""
    return camera_topic if camera_topic.endswith("/compressed") else f"{camera_topic}/compressed"


def load_questions(path: str | Path) -> tuple[str, ...]:
    """Questions, one per line; blank lines and ``#`` comments skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    questions = tuple(q.strip() for q in lines if q.strip() and not q.lstrip().startswith("#"))
    if not questions:
        raise InputError(f"{path} holds no questions (one per line)")
    return questions


# ---- reading ---------------------------------------------------------------------------------


def image_connections(reader, topic: str | None) -> list:
    """Connections of the camera topic: the named one, or the only image topic in the bag."""
    images = [c for c in reader.connections if normalize_msgtype(c.msgtype) in IMAGE_TYPES]
    if topic:
        chosen = [c for c in images if c.topic == topic]
        if not chosen:
            why = (
                "is not an Image/CompressedImage topic"
                if topic in reader.topics
                else "is not in the bag"
            )
            raise _missing(reader, f"topic {topic} {why}; the bag has: {topics_text(reader)}")
        return chosen
    names = sorted({c.topic for c in images})
    if len(names) == 1:
        return images
    if not names:
        raise _missing(
            reader, f"no Image/CompressedImage topic in the bag; it has: {topics_text(reader)}"
        )
    raise BagError(f"several camera topics ({', '.join(names)}); choose one with --topic")


def _missing(reader, text: str) -> BagError:
    """A missing camera topic; in a salvaged bag the damage may be why, so it says so."""
    damage = getattr(reader, "damage", None)
    return BagDamageError(f"{text} (the bag is damaged: {damage})") if damage else BagError(text)


def read_frames(
    reader, connections: Sequence, on_error: Callable[[str], None], max_frames: int | None = None
) -> Iterator[Frame]:
    """Camera frames in arrival order, lazily (a long bag is never held in memory)."""
    for i, (conn, ts, msg) in enumerate(iter_messages(reader, connections, on_error)):
        if max_frames is not None and i >= max_frames:
            return
        yield Frame(i, conn.topic, normalize_msgtype(conn.msgtype), ts, msg)


CORE_LIMITS = SizeLimits.of(ImageLimits())  # the core's default side limits, 16 MP


def frame_pixels(frame: Frame, limits: SizeLimits = CORE_LIMITS) -> np.ndarray:
    """The frame as RGB uint8 (H, W, 3) through the node's own converter and size limits
    (vlm_ros.ros.imaging), so a frame the node would refuse is refused here, with the same
    ImageFormatError reason and message."""
    return image_from_msg(frame.msg, limits)


def check_first_frame(reader, connections: Sequence, topic_label: str) -> None:
    """Fail before loading the model when the camera's encoding cannot be converted."""
    errors: list[str] = []
    first = next(read_frames(reader, connections, errors.append, 1), None)
    if first is None and errors:
        raise BagDamageError(f"no frames could be read from {topic_label}: {errors[0]}")
    if first is None:
        raise BagError(f"no frames on {topic_label}")
    try:
        frame_pixels(first)
    except InputError as exc:
        raise BagError(f"cannot use {topic_label}: {exc}") from None


# ---- running the model on one frame ---------------------------------------------------------


class FrameRunner:
    """Runs the assistant on the frames replay() hands it and collects the output messages."""

    def __init__(self, assistant, settings: EvalSettings):
        self.assistant, self.settings = assistant, settings
        self.ts = typestore()
        self.types = outputs.MessageTypes(
            self.ts.types[SCENE_ANSWER], self.ts.types[ACTION_HINT], self.ts.types[STAGE_LATENCY]
        )
        self.limits = SizeLimits.of(assistant.limits, settings.max_image_pixels)
        self.prompts = settings.prompts()
        self.outputs: list[OutMessage] = []
        self.records: list[diag.Sample] = []  # for the periodic /diagnostics
        self.budgets = Budgets.from_mapping(settings.budgets_ms)
        self.rejections: dict[str, int] = {}
        self.asked = 0
        self.progress: Progress | None = None

    def __call__(
        self, frame: Frame, arrival_ns: int, start_ns: int
    ) -> tuple[int, InputError | None]:
        """Serve one frame starting at virtual ``start_ns``; returns (virtual end, refusal).
        A frame the converter or the model refuses (InputError) is counted, not fatal, as in
        the node; it still kept the model busy for as long as it took to refuse it."""
        t0 = time.perf_counter_ns()
        now = start_ns
        try:
            image = frame_pixels(frame, self.limits)
            now = start_ns + (time.perf_counter_ns() - t0)
            if self.prompts:
                now = self._answer(frame, image, now)
            if self.settings.hint:
                now = self._rank(frame, image, now)
        except InputError as exc:
            self._reject(exc)
            self._served(False)
            return max(now, start_ns + (time.perf_counter_ns() - t0)), exc
        if self.settings.frames:
            self._emit_frame(frame, image)
        self._served(True)
        return now, None

    def _served(self, ok: bool) -> None:
        if self.progress is not None:
            self.progress.served(ok)

    def _emit_frame(self, frame: Frame, image: np.ndarray) -> None:
        """The frame the model took, as the robot saw it, at its arrival time, with its own
        header: a compressed camera's message as recorded, a raw one JPEG-compressed (what
        Foxglove and rqt show; the raw frame would multiply the bag's size by ~10)."""
        src = frame.msg
        if frame.msgtype == COMPRESSED_IMAGE:
            fmt, data = str(src.format), np.asarray(src.data, dtype=np.uint8)
        else:
            fmt, data = f"{src.encoding}; jpeg compressed bgr8", jpeg_bytes(image)
        msg = self.ts.types[COMPRESSED_IMAGE](header=self._header(frame), format=fmt, data=data)
        self.outputs.append(OutMessage(frame_topic(frame.topic), COMPRESSED_IMAGE,
                                       frame.arrival_ns, msg))  # fmt: skip

    def _reject(self, exc: Exception) -> None:
        key = " ".join(str(exc).split())[:120]
        self.rejections[key] = self.rejections.get(key, 0) + 1

    def _answer(self, frame: Frame, image: np.ndarray, now: int) -> int:
        question = self.prompts[self.asked % len(self.prompts)]
        self.asked += 1
        t0 = time.perf_counter_ns()
        ans = self.assistant.answer(image, question, max_new_tokens=self.settings.max_new_tokens)
        done = now + (time.perf_counter_ns() - t0)
        latency, misses = self._latency(ans.timings, frame, now, done)
        header = self._header(frame)
        msg = outputs.scene_answer(self.types, header, frame.topic, question, ans, latency, misses)
        self._emit(self.settings.scene_topic, SCENE_ANSWER, done, msg, ans.timings, frame)
        return done

    def _rank(self, frame: Frame, image: np.ndarray, now: int) -> int:
        t0 = time.perf_counter_ns()
        hint = self.assistant.rank(image, self.settings.instruction, list(self.settings.candidates))
        done = now + (time.perf_counter_ns() - t0)
        latency, misses = self._latency(hint.timings, frame, now, done)
        header, instruction = self._header(frame), self.settings.instruction
        msg = outputs.action_hint(
            self.types, header, frame.topic, instruction, hint, latency, misses
        )
        self._emit(self.settings.hint_topic, ACTION_HINT, done, msg, hint.timings, frame)
        return done

    def _header(self, frame: Frame):
        """The source image's stamp and frame_id as a ROS 2 header (ROS 1 sources have a seq)."""
        src = frame.msg.header
        stamp = self.ts.types["builtin_interfaces/msg/Time"](
            sec=int(src.stamp.sec), nanosec=int(src.stamp.nanosec)
        )
        return self.ts.types["std_msgs/msg/Header"](stamp=stamp, frame_id=str(src.frame_id))

    def _latency(self, timings: StageTimings, frame: Frame, started: int, done: int):
        """StageLatency of one output plus its budget verdict, as the node fills them.
        queue_ms is arrival to start of this inference (a hint also waits for the answer)."""
        image_to_output_ms = (done - frame.stamp_ns) / 1e6
        stages = timings.as_dict()
        queue_ms = (started - frame.arrival_ns) / 1e6
        msg = outputs.stage_latency(self.types, stages, queue_ms, image_to_output_ms)
        return msg, self.budgets.misses(stages, image_to_output_ms)

    def _emit(self, topic, msgtype, done_ns, msg, timings, frame) -> None:
        self.outputs.append(OutMessage(topic, msgtype, done_ns, msg))
        self.records.append(
            diag.Sample(done_ns, timings.as_dict(), (done_ns - frame.stamp_ns) / 1e6)
        )


def jpeg_bytes(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> JPEG file bytes as uint8 (CompressedImage.data)."""
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="JPEG", quality=FRAME_JPEG_QUALITY)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def warm_up(runner: FrameRunner, reader, connections: Sequence, runs: int) -> None:
    """Run the first frame ``runs`` times and discard the outputs: the first inference pays for
    lazy initialisation (allocator, kernels, caches) that a configured live node has already paid,
    and would otherwise show up as a spurious first-frame outlier and extra drops."""
    first = next(read_frames(reader, connections, lambda _: None, 1), None)
    if first is None or runs <= 0:
        return
    for _ in range(runs):
        runner(first, first.arrival_ns, first.arrival_ns)
    runner.outputs.clear()
    runner.records.clear()
    runner.rejections.clear()
    runner.asked = 0


# ---- the whole evaluation --------------------------------------------------------------------


def load_assistant(settings: EvalSettings):
    """The node's backend choice (infer.backends): the model here, or settings.remote's server.
    Imported here, not at the top: a bag that cannot be read fails before torch/httpx load."""
    from vlm_ros.infer.backends import load_assistant as load

    remote = settings.remote
    runtime = RuntimeConfig(device=settings.device, backend="remote" if remote else "local",
                            remote=remote or RemoteConfig())  # fmt: skip
    return load(settings.model, runtime)


def evaluate(settings: EvalSettings, assistant=None, progress: bool | None = False) -> EvalResult:
    """Replay, write ``<out>/output_bag`` (MCAP) and ``<out>/report.*``; returns what was done.

    A bag that breaks part-way is still evaluated up to the break and reported; the error is then
    raised as a BagDamageError naming the report, so the CLI exits non-zero with one line. A bag
    too damaged to give a single frame, or whose every frame was rejected, gets a report of what
    was read (0 frames processed, and why) and the same kind of error.

    ``out_dir`` is checked (and, with ``force``, cleared) before the bag is even opened: a bad
    ``--out`` costs nothing. ``progress``: draw a progress bar on stderr (True), only when it
    is a terminal (None), or never (False).
    """
    if not settings.prompts() and not settings.hint:
        raise InputError("nothing to ask: give --scene-prompt, --questions or --hint")
    out_dir = prepare_out_dir(settings.out_dir, settings.force)
    out_bag = out_dir / OUTPUT_BAG
    read_errors: list[str] = []
    try:
        runner, counters, label = _replay_bag(settings, assistant, read_errors, progress)
    except BagDamageError as exc:  # not a single frame could be read
        info = _run_info(settings, None, None, [exc.detail])
        raise _unread(settings, exc.detail, Counters(), info, BagDamageError) from None
    run_info = _run_info(settings, label, runner, read_errors)
    if counters.processed == 0:
        why = read_errors[0] if read_errors else _rejections_text(runner)
        error = BagDamageError if read_errors else BagError
        raise _unread(
            settings, f"no frame of {label} could be used ({why})", counters, run_info, error
        )
    messages = runner.outputs + diag.diagnostic_messages(
        typestore(),
        runner.records,
        counters.events,
        runner.budgets,
        run_info,
        read_errors,
        DIAGNOSTICS_TOPIC,
        settings.diagnostics_period_s,
        (settings.node_name, settings.namespace),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bag(out_bag, messages, storage="mcap")
    _report(out_bag, out_dir, settings)
    if read_errors:
        raise BagDamageError(
            f"bag {settings.bag} is damaged after {counters.received} frames of {label}: "
            f"{read_errors[0]}",
            partial_report=str(out_dir / "report.md"),
        )
    return EvalResult(out_bag, out_dir, counters)


def _unread(
    settings: EvalSettings,
    reason: str,
    counters: Counters,
    run_info: dict[str, str],
    error: type[BagError],
) -> BagError:
    """Write the report of a replay that processed no frame (what was read: the counters, and
    why) and return the error naming it; no output bag is written, there is nothing in it."""
    report = unread_report(settings.bag, reason, counters.as_dict(), run_info)
    out = write_report(report, settings.out_dir)
    return error(reason, partial_report=str(out / "report.md"))


def _replay_bag(settings: EvalSettings, assistant, read_errors: list[str], progress=False):
    """Open the bag, check its camera, (load the model,) warm up and replay; the model is closed
    again only if it was loaded here."""
    with open_reader(settings.bag) as reader:
        conns = image_connections(reader, settings.topic)
        label = conns[0].topic
        check_first_frame(reader, conns, label)
        own = assistant is None
        assistant = load_assistant(settings) if own else assistant
        try:
            runner = FrameRunner(assistant, settings)
            warm_up(runner, reader, conns, settings.warmup)
            frames = read_frames(reader, conns, read_errors.append, settings.max_frames)
            bar = Progress(frame_total(conns, settings.max_frames), enabled=progress)
            runner.progress = bar
            try:
                arrivals = (Arrival(f, f.arrival_ns) for f in bar.track(frames))
                counters = replay(arrivals, runner, settings.rate)
            finally:
                bar.close()
        finally:
            if own:
                assistant.close()
    return runner, counters, label


def frame_total(connections: Sequence, max_frames: int | None) -> int | None:
    """Frames the replay will read (the bag's message counts), for the progress bar's ETA."""
    counts = [getattr(c, "msgcount", None) for c in connections]
    if any(n is None for n in counts):
        return max_frames
    total = sum(counts)
    return min(total, max_frames) if max_frames is not None else total


def _rejections_text(runner: FrameRunner) -> str:
    return "; ".join(f"{n}x {why}" for why, n in runner.rejections.items()) or "no frames"


def _run_info(
    settings: EvalSettings, topic: str | None, runner: FrameRunner | None, read_errors: list[str]
) -> dict[str, str]:
    """Settings and counters of the run, carried in the bag's /diagnostics so the report (which
    only reads the bag) can say what produced it. ``topic``/``runner`` None: the bag could not
    be read far enough to choose a camera or start the model."""
    info = {
        "source": "eval-bag",
        "input_bag": str(settings.bag),
        "camera_topic": topic or "-",
        "rate": settings.rate,
        "model": settings.model,
        "device": settings.device,
        "max_new_tokens": str(settings.max_new_tokens),
    }
    if runner is not None and runner.rejections:
        info["rejected_why"] = _rejections_text(runner)
    if read_errors:
        info["read_error"] = read_errors[0]
    return info


def _report(out_bag: Path, out_dir: Path, settings: EvalSettings) -> None:
    """The report of the bag just written (never of in-memory numbers), as `vlm-ros report`."""
    write_report(build_report(out_bag, budgets_ms=settings.budgets_ms or None), out_dir)
