"""User tower + index search for a batch of users, and the micro-batcher that forms the batches.

``run_batch`` embeds B users with one tower forward and searches the index once for all of them.
``MicroBatcher.search`` lets concurrent requests share that work: a request waits at most
``max_wait_s`` for up to ``max_size`` requests to gather, then one worker thread runs the batch
(requests of different versions are run as separate groups). The default ``max_wait_s`` is 0: no
request waits for company, and those that arrive while a batch runs form the next one. With ``enabled=False`` every request
runs its own batch of one (the benchmark's baseline). A request cancelled before its batch starts
is dropped from it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from retrieval_service import metrics
from retrieval_service.state import ServingState, UserRow, embed


@dataclass(frozen=True)
class BatchResult:
    """Scores (B, k) float32 (inner products), item indices (B, k) int64 (-1 = none), stage seconds.

    ``started`` is the ``time.perf_counter()`` instant the batch began (requests waited until then).
    """

    scores: np.ndarray
    ids: np.ndarray
    tower_s: float
    search_s: float
    started: float


def run_batch(state: ServingState, rows: list[UserRow], k: int) -> BatchResult:
    """One tower forward and one index search for ``rows`` (blocking: runs in a worker thread)."""
    started = time.perf_counter()
    queries = embed(state, rows)                                  # (B, D)
    embedded = time.perf_counter()
    scores, ids = state.index.search(queries, min(k, max(1, state.index.size)))
    searched = time.perf_counter()
    metrics.STAGE_SECONDS.labels("tower").observe(embedded - started)
    metrics.STAGE_SECONDS.labels("search").observe(searched - embedded)
    metrics.BATCH_SIZE.observe(len(rows))
    return BatchResult(scores, ids, embedded - started, searched - embedded, started)


@dataclass
class _Job:
    state: ServingState
    row: UserRow
    k: int
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Shares tower forwards and index searches between concurrent requests (see the module docstring)."""

    def __init__(self, max_size: int, max_wait_s: float, enabled: bool = True) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size!r}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s!r}")
        self.max_size, self.max_wait_s, self.enabled = max_size, max_wait_s, enabled
        self._pending: list[_Job] = []
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()
        self._worker: asyncio.Task | None = None

    async def search(self, state: ServingState, row: UserRow, k: int) -> tuple[np.ndarray, np.ndarray, BatchResult]:
        """(scores (k',), item indices (k',), the batch it ran in) for one user; k' = min(k, index size)."""
        if not self.enabled:
            result = await asyncio.to_thread(run_batch, state, [row], k)
            return result.scores[0], result.ids[0], result
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="microbatcher")
        job = _Job(state, row, k, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._wakeup.set()
        if len(self._pending) >= self.max_size:
            self._full.set()
        return await job.future

    async def _gather(self) -> list[_Job]:
        await self._wakeup.wait()
        if self.max_wait_s > 0 and len(self._pending) < self.max_size:
            try:
                async with asyncio.timeout(self.max_wait_s):
                    await self._full.wait()
            except TimeoutError:
                pass
        batch, self._pending = self._pending[:self.max_size], self._pending[self.max_size:]
        self._full.clear()
        if not self._pending:
            self._wakeup.clear()
        elif len(self._pending) >= self.max_size:
            self._full.set()
        return [job for job in batch if not job.future.done()]   # done = cancelled by its caller

    async def _run(self) -> None:
        while True:
            batch = await self._gather()
            groups: dict[int, list[_Job]] = {}
            for job in batch:
                groups.setdefault(id(job.state), []).append(job)
            for jobs in groups.values():
                await self._run_group(jobs)

    async def _run_group(self, jobs: list[_Job]) -> None:
        try:
            result = await asyncio.to_thread(run_batch, jobs[0].state, [j.row for j in jobs], max(j.k for j in jobs))
        except Exception as error:  # hand the failure to every waiting request, keep batching
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        for i, job in enumerate(jobs):
            if not job.future.done():
                take = min(job.k, result.ids.shape[1])
                job.future.set_result((result.scores[i, :take], result.ids[i, :take], result))

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        for job in self._pending:
            job.future.cancel()
        self._pending = []
