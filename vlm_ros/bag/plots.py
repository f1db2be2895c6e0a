"""The report's PNGs: latency over time with budget lines, and a CDF per stage.

matplotlib's Agg backend (no display needed on a robot or in CI); small figures at 80 dpi so the
README can embed one. Each figure is built by a function that returns it (``latency_figure``,
``cdf_figure``: what the tests inspect) and saved and closed by its writer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

STAGE_PLOTS = ("preprocess", "vision", "projector", "prefill", "decode", "total")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def latency_over_time(outputs, budgets_ms: dict[str, float], path: Path, title: str = "") -> Path:
    return _save(latency_figure(outputs, budgets_ms, title), path)


def latency_figure(outputs, budgets_ms: dict[str, float], title: str = ""):
    """image->answer and total inference time against time since the first output, with a
    horizontal line (labelled ``budget <name>``) for the image_to_output and total budgets."""
    plt = _pyplot()
    t0 = min(o.log_ns for o in outputs)
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=80)
    for i, (topic, outs) in enumerate(sorted(_by_topic(outputs).items())):
        t = [(o.log_ns - t0) / 1e9 for o in outs]
        colour = f"C{i}"
        ax.plot(
            t,
            [o.image_to_answer_ms for o in outs],
            "o-",
            ms=3,
            lw=1,
            color=colour,
            label=f"{topic} image→answer",
        )
        ax.plot(
            t,
            [o.latency_ms["total"] for o in outs],
            "--",
            lw=1,
            color=colour,
            alpha=0.6,
            label=f"{topic} inference total",
        )
    for name, style in (("image_to_output", "r-"), ("total", "r:")):
        if budgets_ms.get(name):
            ax.axhline(budgets_ms[name], color=style[0], ls=style[1:], lw=1, label=f"budget {name}")
    ax.set_xlabel("time since first answer [s]")
    ax.set_ylabel("latency [ms]")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    fig.tight_layout()
    return fig


def stage_cdf(outputs, budgets_ms: dict[str, float], path: Path) -> Path:
    return _save(cdf_figure(outputs, budgets_ms), path)


def cdf_figure(outputs, budgets_ms: dict[str, float]):
    """Empirical CDF per stage (one panel each, titled with the stage), one line per output
    topic, the stage's budget as a vertical line (image_to_answer: the image_to_output one)."""
    plt = _pyplot()
    stages = [s for s in STAGE_PLOTS if any(o.latency_ms[s] > 0 for o in outputs)]
    stages.append("image_to_answer")
    cols = 4
    rows = (len(stages) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(10, 2.4 * rows), dpi=80, squeeze=False)
    for ax, stage in zip(axes.flat, stages, strict=False):  # spare panels are blanked below
        for i, (topic, outs) in enumerate(sorted(_by_topic(outputs).items())):
            vals = np.sort(
                [
                    o.image_to_answer_ms if stage == "image_to_answer" else o.latency_ms[stage]
                    for o in outs
                ]
            )
            frac = np.arange(0, len(vals) + 1) / len(vals)  # starts at 0 below the fastest sample
            ax.step(
                np.concatenate([vals[:1], vals]),
                frac,
                where="post",
                color=f"C{i}",
                lw=1,
                label=topic.rsplit("/", 1)[-1],
            )
        budget = budgets_ms.get("image_to_output" if stage == "image_to_answer" else stage)
        if budget:
            ax.axvline(budget, color="r", lw=1, gid="budget")  # gid: found by the tests
        ax.set_title(stage, fontsize=9)
        ax.set_xlabel("ms", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(stages) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.subplots_adjust(
        left=0.05, right=0.98, top=0.93, bottom=0.12, hspace=0.55, wspace=0.25
    )  # tight_layout costs seconds on 7 panels
    return fig


def write_plots(
    outputs, budgets_ms: dict[str, float], out_dir: Path, frames: dict[str, int] | None = None
) -> list[Path]:
    """Both figures; ``frames`` (the report's counters) titles the time plot."""
    title = ", ".join(f"{v} {k}" for k, v in frames.items()) if frames else ""
    return [
        latency_over_time(
            outputs,
            budgets_ms,
            out_dir / "latency_over_time.png",
            f"frames: {title}" if title else "",
        ),
        stage_cdf(outputs, budgets_ms, out_dir / "stage_cdf.png"),
    ]
