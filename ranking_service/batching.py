"""DCN micro-batching: concurrent scoring jobs share one forward pass (``recsys_serving.batching``).

Each job is one request's chunk: its user row and candidate rows (``state.ranker_inputs``); a
batch holds at most ``max_jobs`` jobs and ``max_rows`` candidate rows, all scored by the same ranker
(jobs of different versions, during a hot swap, are never mixed). ``forward`` stacks them
(``state.concat_inputs``), runs ONE forward pass in the batcher's worker thread and hands each job
its slice. ``max_jobs == 1`` turns batching off: every
job is its own forward pass, still off the event loop.
"""

from __future__ import annotations

import time

import numpy as np

from ranking_service import metrics
from ranking_service.state import concat_inputs, run_ranker
from recsys_contracts.programs import Program
from recsys_serving import batching

# The exported ranker accepts at most 8192 rows per call (trainer/export.py RANKER_MAX_BATCH).
MAX_ROWS = 8192

Job = tuple[Program, dict[str, np.ndarray]]


def _rows(job: Job) -> int:
    return int(job[1]["item_idx"].shape[0])


def forward(jobs: list[Job]) -> list[tuple[np.ndarray, np.ndarray]]:
    """One forward pass over the jobs' rows (blocking: runs in the worker thread); (ctr, rating) per job."""
    started = time.perf_counter()
    ranker = jobs[0][0]
    try:
        if len(jobs) == 1:
            ctr, rating = run_ranker(ranker, jobs[0][1])
        else:
            ctr, rating = run_ranker(ranker, concat_inputs([inputs for _, inputs in jobs]))   # (sum N,)
    except Exception as error:
        raise RuntimeError(f"DCN forward pass failed: {error!r}") from error
    metrics.DCN_BATCH_JOBS.observe(len(jobs))
    metrics.STAGE_SECONDS.labels("dcn").observe(time.perf_counter() - started)
    bounds = np.cumsum([0] + [_rows(job) for job in jobs])
    return [(ctr[lo:hi], rating[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


class MicroBatcher(batching.MicroBatcher[Job, tuple[np.ndarray, np.ndarray]]):
    """``await score(ranker, inputs) -> (ctr (N,), rating (N,))``, batched across concurrent callers."""

    def __init__(self, max_jobs: int, max_wait_s: float, max_rows: int = MAX_ROWS, thread_nice: int = 0) -> None:
        if not 0 <= max_wait_s <= 1:
            raise ValueError(f"max_wait_s must be in [0, 1] seconds, got {max_wait_s!r}")
        if not 1 <= max_rows <= MAX_ROWS:
            raise ValueError(f"max_rows must be in [1, {MAX_ROWS}], got {max_rows!r}")
        super().__init__(forward, max_jobs=max_jobs, max_wait_s=max_wait_s, name="dcn",
                         key=lambda job: job[0], rows=_rows, max_rows=max_rows, thread_nice=thread_nice)

    async def score(self, ranker: Program, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        rows = int(inputs["item_idx"].shape[0])
        if not 1 <= rows <= self.max_rows:
            raise ValueError(f"rows must be in [1, {self.max_rows}], got {rows}")
        return await self.submit((ranker, inputs))
