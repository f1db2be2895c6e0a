"""Latency report from a bag of the node's outputs (live ``ros2 bag record`` or eval-bag).

Everything comes from the bag, so a live run and an offline replay are measured the same way:

* per stage p50/p90/p99/max from each output's StageLatency;
* image->answer latency = the output's *answer time* minus its header stamp (the source image's
  stamp). The answer time is the bag's log time of the output message: for a live recording that
  is when ``ros2 bag record`` received it (so it includes DDS transport to the recorder); for an
  eval-bag replay it is the virtual answer time (frame arrival + wait for the model + measured
  inference). Clocks: the image stamp and the recorder must share a clock (same machine, or
  synchronised), as for any ROS latency measurement;
* frames received/processed/dropped from the last ``/diagnostics`` counters;
* budget misses per stage from each output's ``budget_misses``; budget lines from ``--budgets``
  or, failing that, from the ``budget_<stage>_ms`` values in ``/diagnostics``. image->answer has
  no budget of its own: it is judged against the end-to-end (``image_to_output``) budget, and
  its misses are counted here from the values;
* times on the plots are bag time (seconds since the bag's first message), the clock Foxglove
  and PlotJuggler show for the same bag.

A damaged bag is reported as far as it could be read, marked partial with the reason; one of
which nothing could be read still gets a report that says so (0 outputs, and why).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlm_ros.bag import BagDamageError, BagError
from vlm_ros.bag.diagnostics import RUN_STATUS_NAME
from vlm_ros.bag.io import iter_messages, open_reader, topics_text
from vlm_ros.bag.output import prepare_out_dir
from vlm_ros.bag.types import (
    ACTION_HINT,
    DIAGNOSTIC_ARRAY,
    IMAGE_TYPES,
    SCENE_ANSWER,
    normalize_msgtype,
)
from vlm_ros.errors import InputError
from vlm_ros.ros.imaging import image_from_msg
from vlm_ros.serving.latency import E2E, percentiles

LATENCY_FIELDS = (
    "queue",
    "preprocess",
    "vision",
    "projector",
    "prefill",
    "decode",
    "total",
    "image_to_output",
)
IMAGE_TO_ANSWER = "image_to_answer"
# image->answer is judged against the end-to-end budget (the node's image_to_output)
BUDGET_OF = {IMAGE_TO_ANSWER: E2E}
OUTPUT_TYPES = {SCENE_ANSWER: "SceneAnswer", ACTION_HINT: "ActionHint"}
ANSWER_TIME = (
    "bag log time of the output: receive time when recorded live with ros2 bag record; "
    "virtual answer time (arrival + wait + measured inference) for eval-bag replays"
)
COUNTER_KEYS = ("received", "processed", "dropped", "rejected")


@dataclass(frozen=True)
class Output:
    """One SceneAnswer/ActionHint as read from the bag."""

    topic: str
    kind: str
    log_ns: int
    stamp_ns: int
    latency_ms: dict[str, float]
    within_budget: bool
    misses: tuple[str, ...]
    text: str = ""  # the answer, or the chosen action with its probability (thumbnails)

    @property
    def image_to_answer_ms(self) -> float:
        return (self.log_ns - self.stamp_ns) / 1e6


def stamp_ns(header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def to_output(topic: str, msgtype: str, log_ns: int, msg) -> Output:
    lat = msg.latency
    values = {f: float(getattr(lat, f"{f}_ms", 0.0)) for f in LATENCY_FIELDS}
    return Output(
        topic,
        OUTPUT_TYPES[msgtype],
        log_ns,
        stamp_ns(msg.header),
        values,
        bool(msg.within_budget),
        tuple(str(m) for m in msg.budget_misses),
        _output_text(msgtype, msg),
    )


def _output_text(msgtype: str, msg) -> str:
    if msgtype == SCENE_ANSWER:
        return str(msg.answer)
    return f"{msg.action} ({float(msg.confidence):.2f})"


def stats(values: Iterable[float]) -> dict[str, float]:
    """count, mean, p50/p90/p99 (serving.latency's, as /diagnostics and the bench) and max."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {"count": 0}
    return {"count": int(arr.size), "mean": float(arr.mean()), **percentiles(arr),
            "max": float(arr.max())}  # fmt: skip


# ---- reading the bag ---------------------------------------------------------------------------


@dataclass
class BagContents:
    outputs: list[Output]
    diagnostics: list[tuple[int, dict[str, dict[str, str]]]]  # (log ns, {status name: values})
    topics: str
    read_error: str | None
    start_ns: int  # the bag's first message (bag time 0 on the plots)


def read_outputs(bag: str | Path) -> BagContents:
    """The node's outputs and diagnostics in ``bag``; a failure part-way keeps what was read."""
    errors: list[str] = []
    with open_reader(bag) as reader:
        wanted = [
            c
            for c in reader.connections
            if normalize_msgtype(c.msgtype) in (*OUTPUT_TYPES, DIAGNOSTIC_ARRAY)
        ]
        outputs, diags = [], []
        if wanted:
            for conn, ts, msg in iter_messages(reader, wanted, errors.append):
                msgtype = normalize_msgtype(conn.msgtype)
                if msgtype == DIAGNOSTIC_ARRAY:
                    diags.append(
                        (ts, {s.name: {kv.key: kv.value for kv in s.values} for s in msg.status})
                    )
                else:
                    outputs.append(to_output(conn.topic, msgtype, ts, msg))
        start = getattr(reader, "start_time", None)
        times = [o.log_ns for o in outputs] + [ts for ts, _ in diags]
        start_ns = min([*times, *([start] if start else [])], default=0)
        error = errors[0] if errors else None
        return BagContents(outputs, diags, topics_text(reader), error, int(start_ns))


def frame_counters(diags: list[tuple[int, dict[str, dict[str, str]]]]) -> dict[str, int] | None:
    """The latest frame counters (frames_received/processed/dropped/rejected) summed over the
    statuses that carry them (one per node when several nodes were recorded)."""
    for _, statuses in reversed(diags):
        found: dict[str, int] = {}
        for values in statuses.values():
            for key in COUNTER_KEYS:
                if f"frames_{key}" in values:
                    found[key] = found.get(key, 0) + int(float(values[f"frames_{key}"]))
        if found:
            return found
    return None


def diag_budgets(diags) -> dict[str, float]:
    """``budget_<stage>_ms`` values the node (or eval-bag) published; 0 (no budget) left out."""
    for _, statuses in reversed(diags):
        found = {
            k[len("budget_") : -len("_ms")]: float(v)
            for values in statuses.values()
            for k, v in values.items()
            if k.startswith("budget_") and k.endswith("_ms")
        }
        if found:
            return {k: v for k, v in found.items() if v > 0}
    return {}


def run_info(diags) -> dict[str, str]:
    for _, statuses in reversed(diags):
        if RUN_STATUS_NAME in statuses:
            return dict(statuses[RUN_STATUS_NAME])
    return {}


# ---- the report -------------------------------------------------------------------------------


def topic_summary(outputs: list[Output], budgets_ms: dict[str, float] | None = None) -> dict:
    """Stats of one output topic: per latency field, image->answer, budget misses (the
    messages' own, plus image->answer's against the end-to-end budget)."""
    misses: dict[str, int] = {}
    for o in outputs:
        for m in o.misses:
            misses[m] = misses.get(m, 0) + 1
    e2e_budget = (budgets_ms or {}).get(BUDGET_OF[IMAGE_TO_ANSWER])
    answer_misses = sum(o.image_to_answer_ms > e2e_budget for o in outputs) if e2e_budget else 0
    return {
        "type": outputs[0].kind,
        "count": len(outputs),
        "within_budget": sum(o.within_budget for o in outputs),
        "latency_ms": {f: stats(o.latency_ms[f] for o in outputs) for f in LATENCY_FIELDS},
        f"{IMAGE_TO_ANSWER}_ms": stats(o.image_to_answer_ms for o in outputs),
        "budget_misses": misses,  # as the node judged them, from each message
        f"{IMAGE_TO_ANSWER}_misses": answer_misses,  # against the end-to-end budget, here
    }


def build_report(bag: str | Path, budgets_ms: dict[str, float] | None = None) -> dict:
    """The report of ``bag`` as a JSON-able dict; a BagError when there is nothing to report."""
    contents = read_outputs(bag)
    if not contents.outputs:
        text = f"no SceneAnswer/ActionHint messages in {bag}"
        if contents.read_error:  # damaged before the first output
            raise BagDamageError(f"{text}; reading stopped at: {contents.read_error}")
        raise BagError(f"{text}; the bag has: {contents.topics}")
    by_topic: dict[str, list[Output]] = {}
    for o in contents.outputs:
        by_topic.setdefault(o.topic, []).append(o)
    budgets = budgets_ms or diag_budgets(contents.diagnostics)
    return {
        "bag": str(bag),
        "answer_time": ANSWER_TIME,
        "bag_start_ns": contents.start_ns,
        "run": run_info(contents.diagnostics),
        "frames": frame_counters(contents.diagnostics),
        "budgets_ms": budgets,
        "topics": {t: topic_summary(outs, budgets) for t, outs in sorted(by_topic.items())},
        "read_error": contents.read_error,
        "_outputs": contents.outputs,  # for the plots; dropped before writing JSON
        "_thumbnails": thumbnails(bag, contents.outputs),
    }


def unread_report(
    bag: str | Path,
    reason: str,
    frames: dict[str, int] | None = None,
    run: dict[str, str] | None = None,
) -> dict:
    """The report of a bag nothing could be measured in: no outputs, ``frames`` as counted
    (eval-bag: all zeros when the bag could not be opened) and ``reason`` as the read error."""
    return {
        "bag": str(bag),
        "answer_time": ANSWER_TIME,
        "run": run or {},
        "frames": frames,
        "budgets_ms": {},
        "topics": {},
        "read_error": reason,
    }


def report_bag(
    bag: str | Path, out_dir: str | Path, budgets_ms: dict[str, float] | None, force: bool = False
) -> dict:
    """`vlm-ros report`: write the report of ``bag``; a damaged bag gets the report of what was
    read and then raises a BagDamageError naming it, so the CLI exits 2 with one line.
    ``out_dir`` is checked first (output.prepare_out_dir: same policy as eval-bag)."""
    prepare_out_dir(out_dir, force)
    partial = str(Path(out_dir) / "report.md")
    try:
        report = build_report(bag, budgets_ms=budgets_ms)
    except BagDamageError as exc:
        write_report(unread_report(bag, exc.detail), out_dir)
        raise BagDamageError(exc.detail, partial_report=partial) from None
    write_report(report, out_dir)
    if report["read_error"]:
        raise BagDamageError(
            f"bag {bag} could not be read to the end: {report['read_error']}", partial
        )
    return report


def write_report(report: dict, out_dir: str | Path) -> Path:
    """report.json, report.md, latency_over_time.png and stage_cdf.png into ``out_dir``."""
    from vlm_ros.bag import plots  # matplotlib (the optional `bag` extra) only when plotting

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    outputs = report.get("_outputs", [])
    data = {k: v for k, v in report.items() if not k.startswith("_")}
    images = []
    if outputs:
        start = data.get("bag_start_ns") or min(o.log_ns for o in outputs)
        images = plots.write_plots(outputs, data["budgets_ms"], out, data["frames"], start,
                                   report.get("_thumbnails") or [])  # fmt: skip
    data["plots"] = [p.name for p in images]
    (out / "report.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(data), encoding="utf-8")
    return out


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown(data: dict) -> str:
    """The human-readable report: one table per output topic, then frames and budgets."""
    lines = [f"# Latency report: `{data['bag']}`", ""]
    damage = data.get("read_error") or (data.get("run") or {}).get("read_error")
    if damage:
        lines += [f"**Partial report: {damage.rstrip('.')}.**", ""]
    if data.get("run"):
        lines += ["Run: " + ", ".join(f"{k}={v}" for k, v in data["run"].items()), ""]
    frames = data.get("frames")
    lines += [
        "Frames: "
        + (
            ", ".join(f"{k} {v}" for k, v in frames.items())
            if frames
            else "no frame counters in /diagnostics"
        ),
        "",
    ]
    budgets = data.get("budgets_ms") or {}
    if not data["topics"]:
        lines += ["**Nothing to measure: no SceneAnswer/ActionHint message was read.**", ""]
    for topic, s in data["topics"].items():
        lines += [
            f"## {topic} ({s['type']}, {s['count']} messages, {s['within_budget']} within budget)",
            "",
            "| stage | p50 ms | p90 ms | p99 ms | max ms | budget ms | misses |",
            "|---|---|---|---|---|---|---|",
        ]
        rows = list(s["latency_ms"].items()) + [(IMAGE_TO_ANSWER, s[f"{IMAGE_TO_ANSWER}_ms"])]
        for name, st in rows:
            if not st.get("count") or (name != IMAGE_TO_ANSWER and st["max"] == 0.0):
                continue  # a stage this output never runs (e.g. decode for some hints)
            lines.append(
                f"| {name} | {_fmt(st['p50'])} | {_fmt(st['p90'])} | {_fmt(st['p99'])} | "
                f"{_fmt(st['max'])} | {_fmt(budget_for(budgets, name))} | {misses_of(s, name)} |"
            )
        lines.append("")
    lines += [
        f"image_to_answer = answer time - image header stamp; answer time = {data['answer_time']}.",
        "image_to_output is the node's own figure (publish time - stamp), carried in each message.",
        "image_to_answer is judged against the image_to_output budget.",
        "",
    ]
    lines += [f"![{p}]({p})" for p in data.get("plots", [])]
    return "\n".join(lines) + "\n"


def misses_of(summary: dict, name: str) -> int:
    """Misses of one report row (topic_summary's)."""
    if name == IMAGE_TO_ANSWER:
        return int(summary.get(f"{IMAGE_TO_ANSWER}_misses", 0))
    return int(summary["budget_misses"].get(name, 0))


def budget_for(budgets: dict[str, float], name: str) -> float | None:
    """The budget a report row is judged by (image_to_answer: the end-to-end one)."""
    return budgets.get(BUDGET_OF.get(name, name))


# ---- frames beside answers -----------------------------------------------------------------

THUMBNAILS = 6


def thumbnails(bag: str | Path, outputs: list[Output], count: int = THUMBNAILS) -> list:
    """Up to ``count`` (frame RGB, answer text, hint text) triples, evenly spread over the scene
    answers, from the camera frames the bag holds (eval-bag writes them; a live recording has
    them when the camera topic was recorded). No frames in the bag: an empty list."""
    scenes = [o for o in outputs if o.kind == "SceneAnswer"] or outputs
    if not scenes:
        return []
    picks = [scenes[round(i * (len(scenes) - 1) / max(count - 1, 1))] for i in range(count)]
    wanted = {o.stamp_ns: o for o in picks}
    found: dict[int, object] = {}
    with open_reader(bag) as reader:
        conns = [c for c in reader.connections if normalize_msgtype(c.msgtype) in IMAGE_TYPES]
        if not conns:
            return []
        for _conn, _, msg in iter_messages(reader, conns, lambda _: None):
            stamp = stamp_ns(msg.header)
            if stamp in wanted and stamp not in found:
                found[stamp] = _pixels(msg)
    texts = _texts_by_stamp(outputs)
    return [(found[s], *texts.get(s, ("", ""))) for s in sorted(found) if found[s] is not None]


def _texts_by_stamp(outputs: list[Output]) -> dict[int, tuple[str, str]]:
    out: dict[int, list[str]] = {}
    for o in outputs:
        slot = out.setdefault(o.stamp_ns, ["", ""])
        slot[0 if o.kind == "SceneAnswer" else 1] = o.text
    return {k: (v[0], v[1]) for k, v in out.items()}


def _pixels(msg):
    """RGB pixels of a bag image through the node's converter; None when it cannot convert."""
    try:
        return image_from_msg(msg)
    except InputError:
        return None


# ---- terminal summary --------------------------------------------------------------------------


def summary_text(data: dict) -> str:
    """The report in the spirit of ``ros2 bag info``: frames, then per output topic its count
    and p50/p90/p99 of each stage against its budget, with misses."""
    budgets = data.get("budgets_ms") or {}
    lines = [f"{'Bag:':<12}{data['bag']}"]
    frames = data.get("frames")
    if frames:
        lines.append(f"{'Frames:':<12}" + ", ".join(f"{k} {v}" for k, v in frames.items()))
    why = (data.get("run") or {}).get("rejected_why")
    if why:
        lines.append(f"{'Rejected:':<12}{why}")
    damage = data.get("read_error")
    if damage:
        lines.append(f"{'Partial:':<12}{damage}")
    if not data["topics"]:
        lines.append("Outputs:    none (no SceneAnswer/ActionHint message was read)")
    for topic, s in data["topics"].items():
        lines.append(
            f"{'Topic:':<12}{topic} | Type: {s['type']} | Count: {s['count']} | "
            f"Within budget: {s['within_budget']}"
        )
        lines.append(f"    {'stage':<16}{'p50':>9}{'p90':>9}{'p99':>9}{'budget':>9}{'misses':>8}")
        rows = list(s["latency_ms"].items()) + [(IMAGE_TO_ANSWER, s[f"{IMAGE_TO_ANSWER}_ms"])]
        for name, st in rows:
            if not st.get("count") or (name != IMAGE_TO_ANSWER and st["max"] == 0.0):
                continue
            budget = budget_for(budgets, name)
            lines.append(
                f"    {name:<16}{st['p50']:>9.1f}{st['p90']:>9.1f}{st['p99']:>9.1f}"
                f"{_budget_text(budget):>9}{misses_of(s, name):>8}"
            )
    lines.append("(milliseconds)")
    return "\n".join(lines)


def _budget_text(ms: float | None) -> str:
    if not ms:
        return "-"
    return f"{ms:.0f}" if ms >= 1 else f"{ms:g}"
