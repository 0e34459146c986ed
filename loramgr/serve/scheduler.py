"""The request queue and its single worker: adapter-set grouping with a bound on overtaking.

One worker thread runs jobs one at a time (swap + generate), so no two generations
ever share the runner. Which queued job runs next:

* ``fifo``: the oldest.
* ``grouping`` (default): the oldest job whose adapter set is the one the runner holds
  now (no swap), else the oldest job. Every time a job is picked ahead of older jobs,
  each of those older jobs counts one *overtake*; when the oldest job has been overtaken
  ``max_overtake`` times it runs next whatever its set. Counts never decrease along the
  queue (an older job was in the queue whenever a younger one was, so it was overtaken
  at least as often), so checking the oldest job is enough. The bound: **a request is
  overtaken by at most ``max_overtake`` requests that arrived after it**; it starts after
  at most (requests queued ahead of it on arrival) + ``max_overtake`` generations.

A full queue (``max_queue`` waiting jobs) refuses new jobs with :class:`QueueFull`, whose
``retry_after`` is the expected time until the running job ends (a slot frees then);
after :meth:`Scheduler.drain` new jobs get :class:`Draining` while the accepted ones finish.
:meth:`Scheduler.cancel` takes a job whose client went away out of the queue.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

logger = logging.getLogger("loramgr.serve")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry after {retry_after} s (the expected rest of the running "
                         "generation)")
        self.retry_after = retry_after


class Cancelled(Exception):
    """Raised in the worker (from the job's step hook) when the job's client went away."""


class Draining(Exception):
    """The server is shutting down: accepted jobs finish, new ones are refused."""


@dataclass
class _Item:
    seq: int
    key: tuple
    job: object
    future: Future
    enqueued: float
    overtaken: int = 0


@dataclass
class SchedulerStats:
    queued: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0
    max_overtaken: int = 0  # the most any finished job was overtaken: never above max_overtake
    picked_out_of_order: int = 0


class Scheduler:
    """Runs ``execute(job)`` for submitted jobs on one worker thread.

    ``current_key()`` tells which adapter set the runner holds now (its key), so the
    grouping policy can prefer jobs that need no swap; ``steps(job)`` tells how far a
    running job is (completed, total), for :meth:`expected_wait`.
    """

    def __init__(self, execute: Callable[[object], object], current_key: Callable[[], tuple], *,
                 policy: str = "grouping", max_queue: int = 64, max_overtake: int = 8,
                 steps: Callable[[object], tuple[int, int]] = lambda job: (0, 0)):
        if policy not in ("grouping", "fifo"):
            raise ValueError(f"unknown scheduling policy {policy!r}")
        self.execute = execute
        self.current_key = current_key
        self.policy = policy
        self.max_queue = max_queue
        self.max_overtake = max_overtake
        self.steps = steps
        self.stats = SchedulerStats()
        self._queue: list[_Item] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._accepting = True
        self._stop = False
        self._run_seconds = 0.0  # moving average of run times, for Retry-After
        self._running: tuple[_Item, float] | None = None  # the running item and when it started
        self._worker = threading.Thread(target=self._loop, name="loramgr-worker", daemon=True)
        self._worker.start()

    # -- submitting ----------------------------------------------------------------------

    def submit(self, job: object, key: tuple) -> Future:
        """Queue ``job``; its future gets ``execute(job)``'s result (with ``queue_wait`` set on it)."""
        with self._cond:
            if not self._accepting:
                raise Draining()
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self.retry_after())
            item = _Item(next(self._seq), key, job, Future(), time.perf_counter())
            self._queue.append(item)
            self.stats.queued = len(self._queue)
            self._cond.notify()
        return item.future

    def expected_wait(self) -> float:
        """Seconds until the running job ends, i.e. until the next queued job starts.

        From the running job's own pace when it has made steps (time per step so far times
        the steps left), else from the average run time, else (no job finished yet) as long
        again as it has run: a job is not expected to end the moment it is looked at.
        """
        running = self._running
        if running is None:
            return 0.0
        item, started = running
        elapsed = time.perf_counter() - started
        done, total = self.steps(item.job)
        if 0 < done <= total:
            return elapsed / done * (total - done)
        return max(0.0, self._run_seconds - elapsed) if self._run_seconds else elapsed

    def retry_after(self) -> int:
        """Whole seconds until the queue has room again (at least 1): :meth:`expected_wait`."""
        return max(1, math.ceil(self.expected_wait()))

    def cancel(self, future: Future) -> bool:
        """Take the queued job of ``future`` out of the queue (its client went away); False if not queued."""
        with self._cond:
            for index, item in enumerate(self._queue):
                if item.future is future:
                    del self._queue[index]
                    self.stats.queued = len(self._queue)
                    future.cancel()
                    self._cond.notify_all()
                    return True
        return False

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._queue and self.stats.running == 0

    # -- choosing ------------------------------------------------------------------------

    def _pick(self) -> _Item:
        """Remove and return the next item (the queue is not empty)."""
        head = self._queue[0]
        index = 0
        if self.policy == "grouping" and head.overtaken < self.max_overtake:
            key = self.current_key()
            index = next((i for i, it in enumerate(self._queue) if it.key == key), 0)
        for older in self._queue[:index]:
            older.overtaken += 1
        if index:
            self.stats.picked_out_of_order += 1
        return self._queue.pop(index)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if not self._queue and self._stop:
                    return
                item = self._pick()
                self.stats.queued = len(self._queue)
                self.stats.running = 1
            if not item.future.set_running_or_notify_cancel():
                with self._cond:
                    self.stats.running = 0
                    self._cond.notify_all()
                continue
            start = time.perf_counter()
            wait = start - item.enqueued
            self._running = (item, start)
            try:
                result = self.execute(item.job)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                self.stats.failed += 1
                item.future.set_exception(exc)
            else:  # only whole runs make the average (a failed or cancelled one stops early)
                elapsed = time.perf_counter() - start
                self._run_seconds = elapsed if not self._run_seconds else 0.8 * self._run_seconds + 0.2 * elapsed
                self.stats.completed += 1
                item.future.set_result((result, wait))
            with self._cond:
                self._running = None
                self.stats.running = 0
                self.stats.max_overtaken = max(self.stats.max_overtaken, item.overtaken)
                self._cond.notify_all()

    # -- stopping ------------------------------------------------------------------------

    def drain(self) -> None:
        """Refuse new jobs from now on; queued and running ones still finish."""
        with self._cond:
            self._accepting = False

    def wait_idle(self, timeout: float | None = None) -> bool:
        """After :meth:`drain`: wait until every accepted job finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self.stats.running:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float | None = None) -> None:
        """Drain, finish the accepted jobs, stop the worker."""
        self.drain()
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._worker.join(timeout)
