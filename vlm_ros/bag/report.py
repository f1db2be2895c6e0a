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
  or, failing that, from the ``budget_<stage>_ms`` values in ``/diagnostics``.

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
from vlm_ros.bag.types import ACTION_HINT, DIAGNOSTIC_ARRAY, SCENE_ANSWER, normalize_msgtype

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
PERCENTILES = (50, 90, 99)
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
    )


def stats(values: Iterable[float]) -> dict[str, float]:
    """count, mean, p50/p90/p99 (numpy's linear interpolation) and max."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {"count": 0}
    out = {"count": int(arr.size), "mean": float(arr.mean())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(arr, p))
    out["max"] = float(arr.max())
    return out


# ---- reading the bag ---------------------------------------------------------------------------


@dataclass
class BagContents:
    outputs: list[Output]
    diagnostics: list[tuple[int, dict[str, dict[str, str]]]]  # (log ns, {status name: values})
    topics: str
    read_error: str | None


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
        return BagContents(outputs, diags, topics_text(reader), errors[0] if errors else None)


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


def topic_summary(outputs: list[Output]) -> dict:
    """Stats of one output topic: per latency field, image->answer, budget misses."""
    misses: dict[str, int] = {}
    for o in outputs:
        for m in o.misses:
            misses[m] = misses.get(m, 0) + 1
    return {
        "type": outputs[0].kind,
        "count": len(outputs),
        "within_budget": sum(o.within_budget for o in outputs),
        "latency_ms": {f: stats(o.latency_ms[f] for o in outputs) for f in LATENCY_FIELDS},
        f"{IMAGE_TO_ANSWER}_ms": stats(o.image_to_answer_ms for o in outputs),
        "budget_misses": misses,
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
    return {
        "bag": str(bag),
        "answer_time": ANSWER_TIME,
        "run": run_info(contents.diagnostics),
        "frames": frame_counters(contents.diagnostics),
        "budgets_ms": budgets_ms or diag_budgets(contents.diagnostics),
        "topics": {t: topic_summary(outs) for t, outs in sorted(by_topic.items())},
        "read_error": contents.read_error,
        "_outputs": contents.outputs,  # for the plots; dropped before writing JSON
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


def report_bag(bag: str | Path, out_dir: str | Path, budgets_ms: dict[str, float] | None) -> dict:
    """`vlm-ros report`: write the report of ``bag``; a damaged bag gets the report of what was
    read and then raises a BagDamageError naming it, so the CLI exits 2 with one line."""
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
    images = plots.write_plots(outputs, data["budgets_ms"], out, data["frames"]) if outputs else []
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
                f"{_fmt(st['max'])} | {_fmt(budgets.get(name))} | "
                f"{s['budget_misses'].get(name, 0)} |"
            )
        lines.append("")
    lines += [
        f"image_to_answer = answer time - image header stamp; answer time = {data['answer_time']}.",
        "image_to_output is the node's own figure (publish time - stamp), carried in each message.",
        "",
    ]
    lines += [f"![{p}]({p})" for p in data.get("plots", [])]
    return "\n".join(lines) + "\n"
