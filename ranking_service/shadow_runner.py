"""Inside the shadow worker process (``ranking_service.shadow_worker``): the candidate it holds and the runs.

``CandidateHolder`` follows the arms file and loads only its candidate, with the service's check
and both stages' loaders (``shadow_retrieval.load_candidate``); it is also the ``Pipeline``'s
holder. A run retrieves from the candidate in this process (``shadow_retrieval.LocalCandidates``:
the retrieval service never sees shadow work) and ranks with it. ``ShadowRunner.run`` scores one
job into an ``Outcome``; ``serve`` is the worker's event loop: it polls the arms file and takes at most ``MAX_IN_FLIGHT``
jobs at once from the queue until a ``None`` job, or exits when the serving process is gone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from pathlib import Path
from typing import Callable

from ranking_service import validation
from ranking_service.batching import MicroBatcher
from ranking_service.config import RankingConfig
from ranking_service.features import FeatureStore
from ranking_service.pipeline import Pipeline
from ranking_service.retrieval_client import CandidateSource
from ranking_service.shadow import kendall_tau, overlap_at_k
from ranking_service.shadow_retrieval import CandidateStates, LocalCandidates, load_candidate
from ranking_service.shadow_worker import MAX_IN_FLIGHT, SHADOW_DEADLINE_S, Job, Outcome, Status
from ranking_service.state import ServingState
from recsys_contracts import artifacts
from recsys_contracts.arms import read_arms
from recsys_contracts.signing import Trust
from recsys_contracts.v1 import ranking_pb2
from recsys_serving import env
from recsys_serving.breaker import CircuitBreaker
from recsys_serving.reload import load_verified
from recsys_serving.workers import leave_with_the_parent

log = logging.getLogger(__name__)


class CandidateHolder:
    """The arms file's candidate version, loaded as the service loads versions (``load_verified``);
    None while no arm names one. Offers the part of ``VersionHolder`` the pipeline reads (``held``, ``held_versions``,
    ``candidate_version``, ``used``). ``load`` builds a ``shadow_retrieval.CandidateStates``: ``state`` is
    its ranking state, ``retrieval`` its retrieval state."""

    def __init__(self, root: Path, load: Callable[[Path, int], CandidateStates], trust: Trust) -> None:
        self.root, self.load, self.trust = Path(root), load, trust
        self.state: ServingState | None = None
        self.retrieval = None                     # retrieval_service.state.ServingState of the candidate
        self.refused: set[int] = set()
        self.fallback_versions: list[int] = []    # the live versions of the job being run

    @property
    def candidate_version(self) -> int | None:
        return None if self.state is None else self.state.version

    def held(self, version: int) -> ServingState | None:
        return self.state if self.state is not None and version == self.state.version else None

    @property
    def held_versions(self) -> list[int]:
        """The candidate, then the live versions retrieval may answer from instead (not held here:
        an answer from one of them is counted not_candidate)."""
        return ([] if self.state is None else [self.state.version]) + self.fallback_versions

    def used(self, version: int) -> None:
        """Nothing to keep: this holder drops a version only when the arms file stops naming it."""

    async def refresh(self) -> bool:
        """Loads the arms' candidate when it changed; True when the held candidate changed."""
        try:
            arms = read_arms(self.root)
        except (ValueError, OSError) as error:     # the serving process logs and counts it
            log.info("cannot read the arms file, keeping the candidate: %s", error)
            return False
        wanted = None if arms is None else arms.candidate
        if wanted == self.candidate_version or wanted in self.refused:
            return False
        if wanted is None:
            self.state = self.retrieval = None
            return True
        try:
            loaded = await asyncio.to_thread(load_verified, self.root, wanted, self.trust, self.load)
        except artifacts.IncompleteVersionError:
            return False                             # retried on the next poll
        except Exception as error:  # a refused candidate is never retried; the service refuses it too
            self.refused.add(wanted)
            log.warning("shadow worker refused candidate %d: %s", wanted, str(error)[:300])
            return False
        self.state, self.retrieval = loaded.ranking, loaded.retrieval
        return True


def build_pipeline(config: RankingConfig, holder: CandidateHolder, candidates: CandidateSource) -> Pipeline:
    """The shadow's pipeline: its own DCN batcher, Redis client and retrieval breaker; no popular fallback."""
    return Pipeline(features=FeatureStore.from_config(config),
                    batcher=MicroBatcher(config.microbatch_max_size, config.microbatch_max_wait_ms / 1000),
                    candidates=candidates, fallback="unavailable",
                    breaker=CircuitBreaker("ranking-shadow-retrieval", config.retrieval_breaker_failures,
                                           config.retrieval_breaker_cooldown_ms / 1000),
                    holder=holder)


class ShadowRunner:
    """Runs jobs on the held candidate."""

    def __init__(self, config: RankingConfig, holder: CandidateHolder, pipeline: Pipeline) -> None:
        self.config, self.holder, self.pipeline = config, holder, pipeline

    async def run(self, job: Job) -> Outcome:
        candidate = self.holder.held(job.candidate)
        if candidate is None:
            return Outcome("skipped", job.request_id)       # still loading it (or the arms moved on)
        try:
            request = ranking_pb2.RecommendRequest.FromString(job.request)
            query = validation.recommend_query(request, candidate.spec, self.config)
            self.holder.fallback_versions = [v for v in job.fallback_versions if v != candidate.version]
            deadline = asyncio.get_running_loop().time() + SHADOW_DEADLINE_S
            async with asyncio.timeout_at(deadline):
                answer = await self.pipeline.recommend(candidate, query, deadline, f"{job.request_id}-shadow")
        except Exception as error:  # a shadow run never affects serving; it is counted failed
            return Outcome("failed", job.request_id, error=repr(error)[:300])
        if answer.items is None or answer.retrieval_version != candidate.version or \
                answer.ranking_version != candidate.version:
            return Outcome("not_candidate", job.request_id)  # retrieval did not answer from the candidate
        shadow = answer.items.item_ids.tolist()
        return Outcome("scored", job.request_id, overlap=overlap_at_k(job.served, shadow, len(job.served)),
                       tau=kendall_tau(job.served, shadow))


async def serve(config: RankingConfig, jobs, outcomes, policy: str) -> None:
    """The worker's loop (``shadow_worker.main``): follows the arms file every ``poll_interval_s`` and
    runs the queue's jobs, at most ``MAX_IN_FLIGHT`` at once, until a ``None`` job."""
    holder = CandidateHolder(config.artifact_root,
                             functools.partial(load_candidate, default_score_mode=config.score_mode), env.trust(config))
    candidates = LocalCandidates(holder)     # the candidate's retrieval, here at idle priority
    runner = ShadowRunner(config, holder, build_pipeline(config, holder, candidates))
    outcomes.put(Status(os.getpid(), policy, None))
    _leave_with_the_parent()
    follow = asyncio.create_task(_follow(holder, outcomes, policy, config.poll_interval_s))
    slots = asyncio.Semaphore(MAX_IN_FLIGHT)
    runs: set[asyncio.Task] = set()

    async def run(job: Job) -> None:
        try:
            outcomes.put(await runner.run(job))
        finally:
            slots.release()

    try:
        while True:
            await slots.acquire()
            job = await asyncio.to_thread(jobs.get)
            if job is None:
                break
            task = asyncio.create_task(run(job))
            runs.add(task)
            task.add_done_callback(runs.discard)
        await asyncio.gather(*runs, return_exceptions=True)
    finally:
        follow.cancel()
        await candidates.close()
        await runner.pipeline.batcher.close()
        await runner.pipeline.features.close()


def _leave_with_the_parent() -> None:
    """Exits this process at once when the serving process is gone (SIGKILLed, it never stopped us):
    its queue would never close, and an orphan would keep a copy of the candidate loaded. Nothing is
    watched outside a multiprocessing child (tests call serve directly)."""
    def gone() -> None:
        log.warning("shadow worker: the serving process is gone; exiting")
        os._exit(0)                    # a thread may be blocked on the queue: no orderly shutdown to wait for

    leave_with_the_parent(gone)


async def _follow(holder: CandidateHolder, outcomes, policy: str, poll_interval_s: float) -> None:
    while True:
        try:
            if await holder.refresh():
                outcomes.put(Status(os.getpid(), policy, holder.candidate_version))
        except Exception:  # keep following whatever happens
            log.exception("shadow worker: arms refresh failed")
        await asyncio.sleep(poll_interval_s)
