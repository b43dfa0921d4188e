"""Shadow scoring: the arms file's candidate also answers a sample of live Recommend calls, off the
answer path and off the serving process's CPU, and only metrics come out.

After a live answer is built, ``Shadow.maybe_start`` draws the request into the sample with
probability ``shadow_percent`` / 100 and, when this service holds the candidate, only enqueues a
``shadow_worker.Job`` (the request's bytes, the served ids, the request id) for the shadow worker
PROCESS (``ranking_service.shadow_worker``), which runs the whole Recommend pipeline on its own copy
of the candidate at idle CPU priority and sends back each run's outcome. A reader thread hands the
outcomes to the event loop, which updates the metrics (Prometheus lives in this process):

- ``ranking_shadow_runs{result}``: scored; not_candidate (retrieval did not answer from the
  candidate); failed; skipped (the queue was full, the worker was down or still loading the
  candidate): the work was not done;
- ``ranking_shadow_overlap_at_k``: |served ∩ shadow| / k over the first k items of each;
- ``ranking_shadow_rank_correlation``: Kendall's tau over the items both lists hold (their order in
  each), observed only when at least two are shared;
- ``ranking_shadow_worker_priority{policy}`` (1 for the policy the worker took: idle = SCHED_IDLE,
  nice19) and ``ranking_shadow_worker_exits`` (the worker died and was restarted).

The caller's answer is never changed or delayed by it: the queue holds at most ``QUEUE_SIZE`` jobs
and a put never blocks (full = skipped), the worker runs at most ``shadow_worker.MAX_IN_FLIGHT`` at
once, so a slow candidate cannot pile up work. The worker is started on the first sampled request
(a service without a shadow arm never starts one), restarted with a growing backoff
(``RESTART_BACKOFF_S``) when it dies, and stopped by ``close``. Memory: the worker holds one more
copy of the candidate version beside the serving process's own.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import random
import threading
from collections.abc import Sequence

from ranking_service import metrics, shadow_worker
from ranking_service.config import RankingConfig
from ranking_service.pipeline import Answer
from ranking_service.shadow_worker import Job, Outcome, Status
from ranking_service.state import ServingState
from recsys_contracts.v1 import ranking_pb2
from recsys_serving.reload import VersionHolder

log = logging.getLogger(__name__)
QUEUE_SIZE = 8                     # sampled requests waiting for the worker; beyond that one is skipped
RESTART_BACKOFF_S = (0.5, 30.0)    # the first and the longest wait before restarting a dead worker
STABLE_S = 60.0                    # a worker that lived this long restarts after the first wait again
STOP_GRACE_S = 2.0                 # close() waits this long for the worker to finish, then terminates it


def overlap_at_k(served: Sequence[int], shadow: Sequence[int], k: int) -> float:
    """Share of the first ``k`` served items that are among the first ``k`` shadow items, in [0, 1]."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return len(set(served[:k]) & set(shadow[:k])) / k


def kendall_tau(served: Sequence[int], shadow: Sequence[int]) -> float | None:
    """Kendall's tau of the items both lists hold, ordered as in each: (concordant - discordant) /
    pairs, in [-1, 1]; None when fewer than two items are shared."""
    position = {item: i for i, item in enumerate(shadow)}
    common = [position[item] for item in served if item in position]     # shadow positions in served order
    pairs = len(common) * (len(common) - 1) // 2
    if pairs == 0:
        return None
    concordant = sum(1 for i in range(len(common)) for j in range(i + 1, len(common)) if common[i] < common[j])
    return (2 * concordant - pairs) / pairs


class _Worker:
    """One worker process, its two queues (new ones for every start: a killed worker may leave a
    queue's lock held) and the thread that hands its messages to the event loop."""

    def __init__(self, config: RankingConfig, queue_size: int, loop: asyncio.AbstractEventLoop, on_message) -> None:
        context = multiprocessing.get_context("spawn")     # no fork of a process with threads and a loop
        self.jobs = context.Queue(queue_size)
        self.outcomes = context.Queue()
        self.process = context.Process(target=shadow_worker.main, args=(config, self.jobs, self.outcomes),
                                       name="ranking-shadow-worker", daemon=True)
        self.process.start()
        self._done = threading.Event()
        self._reader = threading.Thread(target=self._read, args=(loop, on_message), name="ranking-shadow-reader",
                                        daemon=True)
        self._reader.start()

    def _read(self, loop: asyncio.AbstractEventLoop, on_message) -> None:
        while not self._done.is_set():
            try:
                message = self.outcomes.get(timeout=0.2)
            except queue.Empty:
                continue
            except (EOFError, OSError, ValueError) as error:   # a message cut short by the worker's death
                log.info("shadow worker message unreadable: %r", error)
                continue
            try:
                loop.call_soon_threadsafe(on_message, self, message)
            except RuntimeError:           # the loop closed
                return

    async def exited(self) -> int | None:
        """Waits (without a thread) until the process ends; its exit code."""
        loop = asyncio.get_running_loop()
        ended = loop.create_future()
        loop.add_reader(self.process.sentinel, lambda: ended.done() or ended.set_result(None))
        try:
            await ended
        finally:
            loop.remove_reader(self.process.sentinel)
        self.process.join()
        return self.process.exitcode

    async def stop(self) -> None:
        """Asks the worker to finish, terminates it after ``STOP_GRACE_S``, and releases the queues."""
        if self.process.is_alive():
            try:
                self.jobs.put_nowait(None)
            except queue.Full:
                pass
            await asyncio.to_thread(self.process.join, STOP_GRACE_S)
            if self.process.is_alive():
                self.process.terminate()
                await asyncio.to_thread(self.process.join, STOP_GRACE_S)
            if self.process.is_alive():
                self.process.kill()
                await asyncio.to_thread(self.process.join)
        self.release()

    def release(self) -> None:
        self._done.set()
        for q in (self.jobs, self.outcomes):
            q.cancel_join_thread()         # never wait at exit to flush jobs a dead worker will not read
            q.close()


class Shadow:
    """Samples live answers into the shadow worker's queue and turns its outcomes into metrics."""

    def __init__(self, config: RankingConfig, holder: VersionHolder[ServingState], *,
                 draw=random.random, queue_size: int = QUEUE_SIZE) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.config, self.holder, self.draw, self.queue_size = config, holder, draw, queue_size
        self.worker: _Worker | None = None
        self.worker_pid: int | None = None          # as the worker reported it (None until it did)
        self.worker_candidate: int | None = None    # the candidate the worker holds
        self.pending = 0                            # jobs enqueued whose outcome has not come back
        self._supervisor: asyncio.Task | None = None

    def start(self) -> None:
        """Starts the worker (and keeps it running) unless already started; ``maybe_start`` calls it."""
        if self._supervisor is None:
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise(), name="shadow-supervisor")

    def maybe_start(self, request: ranking_pb2.RecommendRequest, served: Answer, request_id: str) -> None:
        """Enqueues a shadow run when the request is drawn into the sample and the candidate is held."""
        arms = self.holder.arms
        if arms is None or arms.shadow_percent <= 0 or served.items is None or \
                self.draw() * 100 >= arms.shadow_percent:
            return
        if arms.candidate == served.ranking_version or self.holder.held(arms.candidate) is None:
            return
        self.start()
        worker = self.worker
        if worker is None or self.worker_candidate != arms.candidate:
            metrics.SHADOW_RUNS.labels("skipped").inc()       # starting, restarting or still loading it
            return
        job = Job(request=request.SerializeToString(), served=served.items.item_ids.tolist(), request_id=request_id,
                  candidate=arms.candidate,
                  fallback_versions=[v for v in self.holder.held_versions if v != arms.candidate])
        try:
            worker.jobs.put_nowait(job)
        except queue.Full:
            metrics.SHADOW_RUNS.labels("skipped").inc()
            return
        self.pending += 1

    def _on_message(self, worker: _Worker, message: Outcome | Status) -> None:
        if worker is not self.worker:
            return                                 # from a worker that has since died
        if isinstance(message, Status):
            if message.pid != self.worker_pid:
                log.info("shadow worker %d runs at CPU priority %s", message.pid, message.policy)
                metrics.SHADOW_WORKER_PRIORITY.labels(message.policy).set(1)
            self.worker_pid, self.worker_candidate = message.pid, message.candidate
            return
        self.pending -= 1
        metrics.SHADOW_RUNS.labels(message.result).inc()
        if message.overlap is not None:
            metrics.SHADOW_OVERLAP.observe(message.overlap)
        if message.tau is not None:
            metrics.SHADOW_RANK_CORRELATION.observe(message.tau)
        if message.error:
            log.info("shadow run failed: %s", message.error, extra={"request_id": message.request_id})

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        backoff_s = RESTART_BACKOFF_S[0]
        while True:
            started = loop.time()
            try:
                self.worker = _Worker(self.config, self.queue_size, loop, self._on_message)
            except Exception as error:  # cannot start a process now (e.g. out of memory): try again later
                code = repr(error)
            else:
                code = await self.worker.exited()
                self.worker.release()
            self.worker, self.worker_pid, self.worker_candidate, self.pending = None, None, None, 0
            metrics.SHADOW_WORKER_EXITS.inc()
            if loop.time() - started >= STABLE_S:
                backoff_s = RESTART_BACKOFF_S[0]
            log.warning("shadow worker exited (%s); restarting it in %.1f s", code, backoff_s)
            await asyncio.sleep(backoff_s)
            backoff_s = min(2 * backoff_s, RESTART_BACKOFF_S[1])

    async def close(self) -> None:
        """Stops the supervisor, then the worker (``_Worker.stop``)."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        if self.worker is not None:
            await self.worker.stop()
            self.worker = None
