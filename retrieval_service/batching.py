"""User tower + index search for a batch of users, and the micro-batcher that forms the batches.

``run_batch`` embeds B users with one tower forward and searches the index once for all of them.
``MicroBatcher.search`` lets concurrent requests share that work through ``recsys_serving.batching``:
a request waits at most ``max_wait_s`` for up to ``max_size`` requests to gather, then the worker
thread runs the batch (requests of different versions never share one). The default ``max_wait_s``
is 0: no request waits for company, and those that arrive while a batch runs form the next one.
With ``enabled=False`` every request runs its own batch of one (the benchmark's baseline). A request
cancelled before its batch starts is dropped from it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from recsys_serving import batching
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


class MicroBatcher(batching.MicroBatcher[tuple[ServingState, UserRow, int], tuple[np.ndarray, np.ndarray, BatchResult]]):
    """Shares tower forwards and index searches between concurrent requests (see the module docstring)."""

    def __init__(self, max_size: int, max_wait_s: float, enabled: bool = True, thread_nice: int = 0) -> None:
        super().__init__(_search_batch, max_jobs=max_size, max_wait_s=max_wait_s, name="tower",
                         key=lambda job: job[0], enabled=enabled, thread_nice=thread_nice)

    async def search(self, state: ServingState, row: UserRow, k: int) -> tuple[np.ndarray, np.ndarray, BatchResult]:
        """(scores (k',), item indices (k',), the batch it ran in) for one user; k' = min(k, index size)."""
        return await self.submit((state, row, k))


def _search_batch(jobs: list[tuple[ServingState, UserRow, int]]) -> list[tuple[np.ndarray, np.ndarray, BatchResult]]:
    """``run_batch`` for jobs of one version, each job's top k cut out of the batch's."""
    result = run_batch(jobs[0][0], [row for _, row, _ in jobs], max(k for _, _, k in jobs))
    take = [min(k, result.ids.shape[1]) for _, _, k in jobs]
    return [(result.scores[i, :n], result.ids[i, :n], result) for i, n in enumerate(take)]
