"""The micro-batcher both services use: concurrent jobs share one blocking call in one worker thread.

``MicroBatcher(run, ...)``: ``await submit(job)`` queues a job; a worker task takes the first
queued job, adds whatever else is queued (waiting at most ``max_wait_s`` for more) up to
``max_jobs`` jobs or ``max_rows`` rows, and hands the batch to ``run(jobs) -> results`` (one result
per job, in order) in a dedicated thread, so the event loop keeps serving meanwhile. With the
default ``max_wait_s`` of 0 a job never waits for company: an idle worker starts at once, and the
jobs that arrive while a batch runs form the next one (batches grow with load, latency does not).

The worker thread carries the batcher's ``name`` as its OS-level thread name too (``/proc/PID/task/TID/comm``,
``top -H``, the load harness's CPU by thread), so its CPU can be told apart from the event loop's and gRPC's.
``thread_nice`` > 0 lowers the worker thread's CPU priority (its nice value; Linux, per thread) so
that, when the cores are short, the event loop (admission, refusals, I/O) runs before the model: a
refusal then waits for no forward pass. A thread already at a lower priority (the shadow worker's
idle class) is left as it is.

Jobs with different ``key(job)`` (e.g. two versions during a hot swap) never share a batch. A job
whose caller was cancelled before its batch started is dropped from it. A failing ``run`` fails
the jobs of its batch with its exception and the worker goes on. ``enabled=False`` runs every job
as its own batch of one in a thread of its own (the benchmarks' baseline).

The domain (what a job is, what ``run`` computes, its metrics) stays in each service:
``retrieval_service.batching`` (user tower + index search) and ``ranking_service.batching`` (DCN).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from recsys_serving.aio import within

J = TypeVar("J")
R = TypeVar("R")
log = logging.getLogger(__name__)
MAX_NICE = 19
PR_SET_NAME = 15          # prctl(2): the calling thread's name, at most 15 bytes and a NUL


def name_native_thread(name: str) -> None:
    """Gives the calling thread ``name`` (its first 15 bytes) as its OS-level name. Python before 3.14
    names only its ``threading`` object, so every thread of a service reads "python" in ``/proc``. Linux
    only; elsewhere, or where the call fails, the thread keeps its name (a label, never a reason to fail)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError) as error:
        log.debug("could not name the %s thread: %s", name, error)


def start_compute_thread(name: str, nice: int) -> None:
    """The compute thread's initializer: its OS-level name, then its nice value (0 = left as it is)."""
    name_native_thread(name)
    if nice:
        lower_thread_priority(nice)


def lower_thread_priority(nice: int) -> None:
    """Raises the calling thread's nice value to ``nice`` (never lowers it). Linux only: there
    PRIO_PROCESS with who = 0 names the calling thread; elsewhere it would be the whole process."""
    if not sys.platform.startswith("linux"):
        log.warning("thread priorities are per thread only on Linux; the compute thread keeps its priority")
        return
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) < nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as error:             # e.g. a seccomp profile that forbids it: serve all the same
        log.warning("could not set the compute thread's nice value to %d: %s", nice, error)


@dataclass
class _Pending(Generic[J]):
    job: J
    rows: int
    future: asyncio.Future = field(repr=False)


class MicroBatcher(Generic[J, R]):
    """``await submit(job) -> result``, batched across concurrent callers (see the module docstring)."""

    def __init__(self, run: Callable[[list[J]], Sequence[R]], *, max_jobs: int, max_wait_s: float,
                 name: str, key: Callable[[J], object] = lambda job: None,
                 rows: Callable[[J], int] = lambda job: 1, max_rows: int | None = None,
                 enabled: bool = True, thread_nice: int = 0) -> None:
        if max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1, got {max_jobs!r}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s!r}")
        if isinstance(thread_nice, bool) or not isinstance(thread_nice, int) or not 0 <= thread_nice <= MAX_NICE:
            raise ValueError(f"thread_nice must be an int in [0, {MAX_NICE}], got {thread_nice!r}")
        self.run, self.name, self.key, self.rows, self.enabled = run, name, key, rows, enabled
        self.max_jobs, self.max_wait_s, self.max_rows = max_jobs, max_wait_s, max_rows
        # A deque plus an event rather than asyncio.Queue: waiting with a timeout on an event can
        # never lose a job, whereas cancelling a pending Queue.get() can race with a put.
        self._queue: collections.deque[_Pending[J]] = collections.deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name,
                                            initializer=start_compute_thread, initargs=(name, thread_nice))
        self._worker: asyncio.Task | None = None

    async def submit(self, job: J) -> R:
        if not self.enabled:
            return (await asyncio.to_thread(self.run, [job]))[0]
        loop = asyncio.get_running_loop()
        if self._worker is None:
            self._worker = loop.create_task(self._work(), name=f"{self.name}-batcher")
        pending = _Pending(job, self.rows(job), loop.create_future())
        self._queue.append(pending)
        self._arrived.set()
        return await pending.future

    async def _wait_for_job(self, timeout_s: float | None) -> bool:
        """True once a job is queued; False when ``timeout_s`` passed first."""
        while not self._queue:
            self._arrived.clear()
            try:
                await within(self._arrived.wait(), timeout_s)
            except TimeoutError:
                return bool(self._queue)
        return True

    async def _collect(self) -> list[_Pending[J]]:
        await self._wait_for_job(None)
        first = self._queue.popleft()
        batch, rows, key = [first], first.rows, self.key(first.job)
        give_up = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_jobs:
            if not self._queue:
                left = give_up - time.monotonic()
                try:
                    if left <= 0 or not await self._wait_for_job(left):
                        break
                except asyncio.CancelledError:          # closing: the jobs go back, ``close`` fails them
                    self._queue.extendleft(reversed(batch))
                    raise
            pending = self._queue[0]
            if self.key(pending.job) is not key or (self.max_rows is not None and rows + pending.rows > self.max_rows):
                break
            batch.append(self._queue.popleft())
            rows += pending.rows
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [p for p in await self._collect() if not p.future.done()]   # done = cancelled by its caller
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self.run, [p.job for p in batch])
            except (Exception, asyncio.CancelledError) as error:  # a failed batch fails its jobs, never the worker
                failure = RuntimeError(f"the {self.name} batcher is closed") \
                    if isinstance(error, asyncio.CancelledError) else error
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(failure)
                if isinstance(error, asyncio.CancelledError):
                    raise
                continue
            for pending, result in zip(batch, results):
                if not pending.future.done():
                    pending.future.set_result(result)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(RuntimeError(f"the {self.name} batcher is closed"))
        self._executor.shutdown(wait=True)
