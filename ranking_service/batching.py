"""DCN micro-batching: concurrent scoring jobs share one forward pass in one worker thread.

Each job is the aligned rows of one request's chunk (``state.ranker_inputs``). The batcher takes the
first queued job, adds whatever else is queued (waiting at most ``max_wait_s`` for more) up to
``max_jobs`` jobs or ``max_rows`` rows, concatenates them, runs ONE forward pass in a dedicated
thread (the event loop keeps serving meanwhile) and hands each job its slice. ``max_jobs == 1``
turns batching off: every job is its own forward pass, still off the event loop. With the default
``max_wait_s`` of 0 a job never waits for company: an idle worker starts at once, and the jobs that
arrive while a pass runs form the next batch (batches grow with load, latency does not).

Jobs scored by different versions (during a hot swap) are never mixed in one pass.
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ranking_service import metrics
from ranking_service.state import run_ranker
from recsys_contracts.programs import Program

# The exported ranker accepts at most 8192 rows per call (trainer/export.py RANKER_MAX_BATCH).
MAX_ROWS = 8192


@dataclass
class _Job:
    ranker: Program
    inputs: dict[str, np.ndarray]
    future: asyncio.Future = field(repr=False)

    @property
    def rows(self) -> int:
        return int(self.inputs["item_idx"].shape[0])


class MicroBatcher:
    """``await score(ranker, inputs) -> (ctr (N,), rating (N,))``, batched across concurrent callers."""

    def __init__(self, max_jobs: int, max_wait_s: float, max_rows: int = MAX_ROWS) -> None:
        if max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1, got {max_jobs!r}")
        if not 0 <= max_wait_s <= 1:
            raise ValueError(f"max_wait_s must be in [0, 1] seconds, got {max_wait_s!r}")
        if not 1 <= max_rows <= MAX_ROWS:
            raise ValueError(f"max_rows must be in [1, {MAX_ROWS}], got {max_rows!r}")
        self.max_jobs, self.max_wait_s, self.max_rows = max_jobs, max_wait_s, max_rows
        # A deque plus an event rather than asyncio.Queue: waiting with a timeout on an event can
        # never lose a job, whereas cancelling a pending Queue.get() can race with a put.
        self._queue: collections.deque[_Job] = collections.deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcn")
        self._worker: asyncio.Task | None = None

    async def score(self, ranker: Program, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        rows = int(inputs["item_idx"].shape[0])
        if not 1 <= rows <= self.max_rows:
            raise ValueError(f"rows must be in [1, {self.max_rows}], got {rows}")
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="dcn-batcher")
        job = _Job(ranker, inputs, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._arrived.set()
        return await job.future

    async def _wait_for_job(self, timeout_s: float | None) -> bool:
        """True once a job is queued; False when ``timeout_s`` passed first."""
        while not self._queue:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout_s)
            except TimeoutError:
                return bool(self._queue)
        return True

    async def _collect(self) -> list[_Job]:
        await self._wait_for_job(None)
        first = self._queue.popleft()
        batch, rows = [first], first.rows
        give_up = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_jobs:
            if not self._queue:
                left = give_up - time.monotonic()
                if left <= 0 or not await self._wait_for_job(left):
                    break
            job = self._queue[0]
            if job.ranker is not first.ranker or rows + job.rows > self.max_rows:
                break
            batch.append(self._queue.popleft())
            rows += job.rows
        return batch

    def _forward(self, batch: list[_Job]) -> tuple[np.ndarray, np.ndarray]:
        if len(batch) == 1:
            return run_ranker(batch[0].ranker, batch[0].inputs)
        names = batch[0].inputs.keys()
        inputs = {name: np.concatenate([job.inputs[name] for job in batch]) for name in names}  # (sum N, ...)
        return run_ranker(batch[0].ranker, inputs)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [job for job in await self._collect() if not job.future.done()]
            if not batch:
                continue
            started = time.perf_counter()
            try:
                ctr, rating = await loop.run_in_executor(self._executor, self._forward, batch)
            except (Exception, asyncio.CancelledError) as error:  # a failed pass fails its jobs, never the worker
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(RuntimeError(f"DCN forward pass failed: {error!r}"))
                if isinstance(error, asyncio.CancelledError):
                    raise
                continue
            metrics.DCN_BATCH_JOBS.observe(len(batch))
            metrics.STAGE_SECONDS.labels("dcn").observe(time.perf_counter() - started)
            offset = 0
            for job in batch:
                if not job.future.done():
                    job.future.set_result((ctr[offset:offset + job.rows], rating[offset:offset + job.rows]))
                offset += job.rows

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the DCN batcher is closed"))
        self._executor.shutdown(wait=True)
