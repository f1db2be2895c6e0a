"""One inference worker thread serving a bounded priority queue. ROS-free.

The model (and the GPU) is serial, so exactly one thread runs inference; everything else (ROS
callbacks, timers) only submits jobs and waits on the returned concurrent.futures.Future, never
on the model. Rules, each there so a robot's queries are served promptly under load:

* priority: QUERY jobs (Ask, Describe) run before PERIODIC ones (scene answers, hints);
  first-in first-out within a priority;
* bounded: a full queue refuses at once (QueueFullError) instead of letting latency grow; a
  query arriving at a full queue evicts the newest queued periodic job instead of being refused;
* coalescing: a job submitted with a ``key`` replaces a still-queued job with the same key (the
  older one's future is cancelled), so periodic work never piles up;
* deadline: a job whose absolute ``time.monotonic()`` deadline has passed when it reaches the
  front is refused (StaleJobError) without running;
* ``shutdown()`` cancels what is queued, lets the running job finish, and joins the thread
  (with a timeout, saying whether it finished).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from vlm_ros.errors import EvictedError, QueueFullError, StaleJobError, WorkerStoppedError

QUERY, PERIODIC = 0, 1  # lower runs first


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    fn: Callable[[], Any] = field(compare=False)
    future: Future = field(compare=False)
    key: str | None = field(compare=False, default=None)
    deadline: float | None = field(compare=False, default=None)
    dead: bool = field(compare=False, default=False)  # removed lazily from the heap


class InferenceWorker:
    """A single daemon thread running submitted callables in priority order."""

    def __init__(self, max_queue: int = 4, name: str = "vlm-inference"):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.max_queue = max_queue
        self._heap: list[_Job] = []
        self._by_key: dict[str, _Job] = {}
        self._live = 0  # queued jobs that are not dead
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self.stats: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ---- submitting ------------------------------------------------------------------------

    def submit(
        self,
        fn: Callable[[], Any],
        priority: int = QUERY,
        key: str | None = None,
        deadline: float | None = None,
    ) -> Future:
        """Queue ``fn()``; its result or exception arrives on the returned Future.
        Raises QueueFullError (queue full) or WorkerStoppedError (after shutdown) at once."""
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise WorkerStoppedError("the inference worker is shut down")
            if key is not None and key in self._by_key:
                self._kill(self._by_key[key], None)
                self.stats["coalesced"] += 1
            if self._live >= self.max_queue and not self._evict_for(priority):
                self.stats["rejected_full"] += 1
                raise QueueFullError(
                    f"inference queue is full ({self._live}/{self.max_queue} jobs waiting)"
                )
            job = _Job(priority, next(self._seq), fn, future, key, deadline)
            heapq.heappush(self._heap, job)
            self._live += 1
            if key is not None:
                self._by_key[key] = job
            self.stats["submitted"] += 1
            self._cond.notify()
        return future

    def _evict_for(self, priority: int) -> bool:
        """Make room for a job of ``priority`` by evicting the newest queued job of a lower
        priority (a larger number). Called with the lock held."""
        victims = [j for j in self._heap if not j.dead and j.priority > priority]
        if not victims:
            return False
        victim = max(victims, key=lambda j: (j.priority, j.seq))
        self._kill(victim, EvictedError("evicted from the inference queue by a query"))
        self.stats["evicted"] += 1
        return True

    def _kill(self, job: _Job, error: BaseException | None) -> None:
        """Remove a queued job: cancel its future, or fail it with ``error``. Lock held."""
        job.dead = True
        self._live -= 1
        if job.key is not None and self._by_key.get(job.key) is job:
            del self._by_key[job.key]
        if error is None or not job.future.set_running_or_notify_cancel():
            job.future.cancel()
        else:
            job.future.set_exception(error)

    # ---- inspecting ------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the one running)."""
        with self._cond:
            return self._live

    def pending(self, key: str) -> bool:
        """Whether a job with ``key`` is still queued (not yet running)."""
        with self._cond:
            return key in self._by_key

    # ---- running ---------------------------------------------------------------------------

    def _next(self) -> _Job | None:
        """Block until a live job is queued (returned, removed) or shutdown (None)."""
        with self._cond:
            while True:
                while self._heap and self._heap[0].dead:
                    heapq.heappop(self._heap)
                if self._stopping:
                    return None
                if self._heap:
                    job = heapq.heappop(self._heap)
                    self._live -= 1
                    if job.key is not None and self._by_key.get(job.key) is job:
                        del self._by_key[job.key]
                    return job
                self._cond.wait()

    def _loop(self) -> None:
        """Run jobs until shutdown. No job stays bound here while the queue waits: the last
        one's result (an answer and its camera frame) is freed when its caller lets go."""
        while True:
            job = self._next()
            if job is None:
                return
            self._run(job)
            del job

    def _run(self, job: _Job) -> None:
        """Run one job unless cancelled by its submitter or stale."""
        if not job.future.set_running_or_notify_cancel():
            self.stats["cancelled"] += 1
            return
        if job.deadline is not None and time.monotonic() > job.deadline:
            late_ms = (time.monotonic() - job.deadline) * 1000.0
            self.stats["expired"] += 1
            job.future.set_exception(
                StaleJobError(f"request expired in the queue ({late_ms:.0f} ms past its deadline)")
            )
            return
        try:
            result = job.fn()
        except Exception as exc:  # delivered to the submitter, never kills the worker
            self.stats["failed"] += 1
            job.future.set_exception(exc)
            # exc's traceback keeps this frame, and the frame kept ``job``: job -> future ->
            # exc -> traceback -> job was a cycle holding the failed job's locals (its camera
            # frame) until the cycle collector ran (concurrent.futures' own worker does this).
            del job
        else:
            self.stats["completed"] += 1
            job.future.set_result(result)

    def shutdown(self, timeout: float | None = 30.0) -> bool:
        """Cancel queued jobs, let the running one finish, join the thread (up to ``timeout``).
        Idempotent. Returns whether the thread has finished (False: a job is still running,
        and the caller must not free what it uses)."""
        with self._cond:
            self._stopping = True
            for job in self._heap:
                if not job.dead:
                    self._kill(job, WorkerStoppedError("the inference worker was shut down"))
            self._heap.clear()
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive()
