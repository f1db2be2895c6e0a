"""The report's PNGs: latency over bag time, a CDF per stage, and frames beside their answers.

matplotlib's Agg backend (no display needed on a robot or in CI). Figures are sized to be read at
100% zoom (about 1200 px wide, 10 pt text and up). The x axis of the time plot is bag time:
seconds since the bag's first message, the clock Foxglove and PlotJuggler show for the same bag,
so a spike here is found there at the same second. Each figure is built by a function that
returns it (``latency_figure``, ``cdf_figure``, ``frames_figure``: what the tests inspect) and
saved and closed by its writer.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

STAGE_PLOTS = ("preprocess", "vision", "projector", "prefill", "decode", "total")
DPI = 100
FONT = 10


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {"font.size": FONT, "axes.titlesize": FONT + 1, "legend.fontsize": FONT - 1}
    )
    return plt


def _by_topic(outputs) -> dict[str, list]:
    groups: dict[str, list] = {}
    for o in outputs:
        groups.setdefault(o.topic, []).append(o)
    return groups


def _save(fig, path: Path) -> Path:
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def latency_over_time(outputs, budgets_ms, path: Path, title: str = "", start_ns=None) -> Path:
    return _save(latency_figure(outputs, budgets_ms, title, start_ns), path)


def latency_figure(outputs, budgets_ms: dict[str, float], title: str = "", start_ns=None):
    """Two panels over bag time (seconds since ``start_ns``, default the first output): top,
    image->answer per output topic with the ``image_to_output`` budget; bottom, the inference
    total with the ``total`` budget. Separate panels because at ``--rate max`` the two are
    nearly equal and one line would hide the other. Budget lines are labelled
    ``budget <name> (<ms> ms)`` in the legend."""
    plt = _pyplot()
    t0 = min(o.log_ns for o in outputs) if start_ns is None else start_ns
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 6.5), dpi=DPI, sharex=True)
    for i, (topic, outs) in enumerate(sorted(_by_topic(outputs).items())):
        t = [(o.log_ns - t0) / 1e9 for o in outs]
        style = {"color": f"C{i}", "lw": 1.2, "ms": 4}
        top.plot(t, [o.image_to_answer_ms for o in outs], "o-", label=f"{topic} image→answer",
                 **style)  # fmt: skip
        bottom.plot(t, [o.latency_ms["total"] for o in outs], "s-",
                    label=f"{topic} inference total", **style)  # fmt: skip
    for ax, name in ((top, "image_to_output"), (bottom, "total")):
        if budgets_ms.get(name):
            ms = budgets_ms[name]
            ax.axhline(ms, color="r", ls="--", lw=1.2, label=f"budget {name} ({ms:g} ms)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    top.set_ylabel("image→answer [ms]")
    bottom.set_ylabel("inference total [ms]")
    bottom.set_xlabel("bag time [s] (since the bag's first message)")
    fig.suptitle(f"Latency over bag time — {title}" if title else "Latency over bag time")
    fig.tight_layout()
    return fig


def stage_cdf(outputs, budgets_ms: dict[str, float], path: Path) -> Path:
    return _save(cdf_figure(outputs, budgets_ms), path)


def cdf_figure(outputs, budgets_ms: dict[str, float]):
    """Empirical CDF per stage (one panel each, titled with the stage), one line per output
    topic, the stage's budget as a vertical red line named in the legend (image_to_answer:
    the image_to_output budget). y: fraction of outputs at or under x."""
    plt = _pyplot()
    stages = [s for s in STAGE_PLOTS if any(o.latency_ms[s] > 0 for o in outputs)]
    stages.append("image_to_answer")
    cols = 4
    rows = (len(stages) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(14, 3.4 * rows), dpi=DPI, squeeze=False)
    for ax, stage in zip(axes.flat, stages, strict=False):  # spare panels are blanked below
        for i, (topic, outs) in enumerate(sorted(_by_topic(outputs).items())):
            vals = np.sort(
                [
                    o.image_to_answer_ms if stage == "image_to_answer" else o.latency_ms[stage]
                    for o in outs
                ]
            )
            frac = np.arange(0, len(vals) + 1) / len(vals)  # starts at 0 below the fastest sample
            ax.step(np.concatenate([vals[:1], vals]), frac, where="post", color=f"C{i}", lw=1.4,
                    label=topic.rsplit("/", 1)[-1])  # fmt: skip
        budget = budgets_ms.get("image_to_output" if stage == "image_to_answer" else stage)
        if budget:
            ax.axvline(budget, color="r", ls="--", lw=1.2, gid="budget",
                       label=f"budget {budget:g} ms")  # fmt: skip
        ax.set_title(stage)
        ax.set_xlabel(f"{stage} [ms]")
        ax.set_ylabel("fraction of outputs ≤ x")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    for ax in list(axes.flat)[len(stages) :]:
        ax.axis("off")
    fig.suptitle("Latency distribution per stage (empirical CDF)")
    fig.subplots_adjust(
        left=0.06, right=0.98, top=0.9, bottom=0.1, hspace=0.6, wspace=0.3
    )  # tight_layout costs seconds on 7 panels
    return fig


def frames_figure(thumbs):
    """A strip of (frame, answer, hint) thumbnails: what the robot saw beside what it said."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(thumbs), figsize=(3.2 * len(thumbs), 3.9), dpi=DPI,
                             squeeze=False)  # fmt: skip
    for ax, (pixels, answer, hint) in zip(axes.flat, thumbs, strict=True):
        ax.imshow(pixels)
        ax.set_xticks([])
        ax.set_yticks([])
        caption = textwrap.fill(answer, 34) if answer else ""
        if hint:
            caption += f"\nhint: {hint}"
        ax.set_xlabel(caption, fontsize=FONT - 1, loc="left")
    fig.suptitle("Frames and their answers")
    fig.tight_layout()
    return fig


def write_plots(outputs, budgets_ms: dict[str, float], out_dir: Path,
                frames: dict[str, int] | None = None, start_ns: int | None = None,
                thumbs=()) -> list[Path]:  # fmt: skip
    """The figures; ``frames`` (the report's counters) titles the time plot; ``thumbs`` (from
    report.thumbnails) adds frames.png when the bag holds camera frames."""
    title = ", ".join(f"{v} {k}" for k, v in frames.items()) if frames else ""
    paths = [
        latency_over_time(
            outputs,
            budgets_ms,
            out_dir / "latency_over_time.png",
            f"frames: {title}" if title else "",
            start_ns,
        ),
        stage_cdf(outputs, budgets_ms, out_dir / "stage_cdf.png"),
    ]
    if thumbs:
        paths.append(_save(frames_figure(list(thumbs)), out_dir / "frames.png"))
    return paths
