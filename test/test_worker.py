"""serving.worker with plain callables: one thread, priorities, bound, coalescing, deadlines."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import CancelledError

import pytest

from vlm_ros.serving.worker import (
    PERIODIC,
    QUERY,
    InferenceWorker,
    QueueFullError,
    StaleJobError,
    WorkerStoppedError,
)


@pytest.fixture
def worker():
    w = InferenceWorker(max_queue=3)
    yield w
    w.shutdown()


def block(worker: InferenceWorker) -> threading.Event:
    """Occupy the worker until the returned event is set."""
    gate, started = threading.Event(), threading.Event()
    worker.submit(lambda: (started.set(), gate.wait(5)))
    assert started.wait(5)
    return gate


def test_one_thread_runs_queries_before_periodic_work(worker):
    gate = block(worker)
    order, threads = [], set()

    def job(name):
        def run():
            order.append(name)
            threads.add(threading.get_ident())
            return name

        return run

    futures = [
        worker.submit(job("p1"), PERIODIC),
        worker.submit(job("q1"), QUERY),
        worker.submit(job("q2"), QUERY),
    ]
    gate.set()
    assert [f.result(5) for f in futures] == ["p1", "q1", "q2"]
    assert order == ["q1", "q2", "p1"] and len(threads) == 1


def test_full_queue_refuses_at_once_but_a_query_evicts_periodic_work(worker):
    gate = block(worker)
    periodic = [worker.submit(lambda: "p", PERIODIC, key=f"k{i}") for i in range(3)]
    # Refused at once: the worker is still blocked (its gate opens only below, in this thread),
    # so a submit that waited for room would never return. No wall-clock bound is needed.
    with pytest.raises(QueueFullError, match="3/3"):
        worker.submit(lambda: "p", PERIODIC)
    assert not gate.is_set() and worker.depth == 3
    query = worker.submit(lambda: "q")
    with pytest.raises(QueueFullError, match="evicted"):
        periodic[2].result(1)
    gate.set()
    assert query.result(5) == "q" and periodic[0].result(5) == "p"
    assert worker.depth == 0 and worker.stats["evicted"] == 1


def test_same_key_replaces_the_queued_job(worker):
    gate = block(worker)
    first = worker.submit(lambda: 1, PERIODIC, key="scene")
    assert worker.pending("scene")
    second = worker.submit(lambda: 2, PERIODIC, key="scene")
    assert first.cancelled() and worker.depth == 1
    gate.set()
    assert second.result(5) == 2 and not worker.pending("scene")


def test_stale_jobs_are_refused_and_errors_delivered(worker):
    gate = block(worker)
    stale = worker.submit(lambda: "late", deadline=time.monotonic() + 0.05)
    boom = worker.submit(lambda: 1 / 0)
    time.sleep(0.1)
    gate.set()
    with pytest.raises(StaleJobError, match="expired"):
        stale.result(5)
    with pytest.raises(ZeroDivisionError):
        boom.result(5)
    assert worker.submit(lambda: "alive").result(5) == "alive"


def test_cancel_before_start_and_clean_shutdown():
    w = InferenceWorker(max_queue=2)
    gate = block(w)
    cancelled = w.submit(lambda: "never")
    assert cancelled.cancel()
    queued = w.submit(lambda: "never")
    threading.Timer(0.1, gate.set).start()
    w.shutdown()
    with pytest.raises((WorkerStoppedError, CancelledError)):
        queued.result(1)
    assert not w._thread.is_alive()
    with pytest.raises(WorkerStoppedError):
        w.submit(lambda: 1)


@pytest.mark.parametrize("fails", [False, True])
def test_a_finished_job_is_freed_without_the_cycle_collector(worker, fails):
    """The worker holds nothing of a finished job once its caller lets go: not as the last
    job run (the loop's variable while the queue waits), and not through a failure's
    traceback (its frames' locals held the job, whose Future held the failure: a cycle). A
    node's job holds its camera frame, up to 6 MB at 1080p."""
    import gc
    import weakref

    class Payload:  # stands for the job's Result and its frame
        pass

    alive: list[weakref.ref] = []

    def job() -> Payload:
        payload = Payload()
        alive.append(weakref.ref(payload))
        if fails:
            raise ValueError("bad frame")
        return payload

    gc.disable()
    try:
        future = worker.submit(job)
        with pytest.raises(ValueError) if fails else contextlib.nullcontext():
            future.result(5)
        del future
        end = time.monotonic() + 5  # the worker returns to its empty queue (a loaded host: late)
        while alive[0]() is not None and time.monotonic() < end:
            time.sleep(0.01)
        assert alive[0]() is None
    finally:
        gc.enable()
