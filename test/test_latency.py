"""serving.latency: budget misses, window percentiles, counters and the OK/WARN/ERROR rule."""

from __future__ import annotations

import pytest

from vlm_ros.serving.latency import ERROR, OK, WARN, Budgets, LatencyMonitor


def stages(total: float, vision: float = 1.0) -> dict[str, float]:
    return {
        "preprocess": 1.0,
        "vision": vision,
        "projector": 0.5,
        "prefill": 2.0,
        "decode": total - 4.5,
        "total": total,
    }


def test_budget_misses_in_pipeline_order_and_zero_means_none():
    b = Budgets.from_mapping({"vision_ms": 5, "total": 100, "image_to_output": 150})
    assert b.misses(stages(50), 60) == ()
    assert b.misses(stages(120, vision=9), 200) == ("vision", "total", "image_to_output")
    assert Budgets().misses(stages(1e6), 1e6) == ()
    with pytest.raises(ValueError, match="totl"):
        Budgets.from_mapping({"totl": 5})


def test_window_percentiles_cover_the_last_n_outputs():
    mon = LatencyMonitor(Budgets(), window=10)
    for i in range(100):
        mon.record(stages(float(i + 10)), float(i + 20))
    rep = mon.report()
    assert rep.window_outputs == 10
    assert rep.stats["total"].max == 109.0
    assert rep.stats["total"].p50 == pytest.approx(104.5)
    # the last 10 totals are 100..109: p90 = 100 + 0.9 * 9, p99 = 100 + 0.99 * 9
    assert rep.stats["total"].p90 == pytest.approx(108.1)
    assert rep.stats["total"].p99 == pytest.approx(108.91)
    assert rep.stats["image_to_output"].p50 == pytest.approx(114.5)
    assert rep.counters["outputs"] == 100


def test_verdict_rule():
    mon = LatencyMonitor(Budgets(total=100), window=4)
    assert mon.report().level == OK  # idle is not an error
    assert mon.record(stages(50), 60) == ()
    assert mon.report().level == OK
    assert mon.record(stages(150), 160) == ("total",)
    rep = mon.report()
    assert rep.level == WARN and "1/2" in rep.message
    mon.record(stages(150), 160)
    assert mon.report().level == ERROR  # 2/3 missed
    for _ in range(4):
        mon.record(stages(50), 60)
    assert mon.report().level == OK  # misses left the window
    mon.count("frames_dropped", 3)  # a fast camera: by design, not a warning
    assert mon.report().level == OK
    mon.count("periodic_skipped", 3)
    rep = mon.report()
    assert rep.level == WARN and "3 periodic skipped" in rep.message
    assert mon.report().level == OK  # judged since the previous report only
    mon.count("failed")
    assert mon.report().level == ERROR
    assert mon.counters()["frames_dropped"] == 3 and mon.counters()["budget_misses"] == 2
