"""Shadow scoring: the arms file's candidate also answers a sample of live Recommend calls, off the
answer path, and only metrics come out.

After a live answer is built, ``Shadow.maybe_start`` draws the request into the sample with
probability ``shadow_percent`` / 100 and, when this service holds the candidate, starts a background
task that runs the whole Recommend pipeline on the candidate (its own Retrieve call, asking retrieval
for the candidate version) and compares the two lists:

- ``ranking_shadow_overlap_at_k``: |served ∩ shadow| / k over the first k items of each;
- ``ranking_shadow_rank_correlation``: Kendall's tau over the items both lists hold (their order in
  each), observed only when at least two are shared.

The caller's answer is never changed or delayed by it. At most ``MAX_IN_FLIGHT`` shadow runs go at
once; a sampled request beyond that is skipped and counted, so a slow candidate cannot pile up work.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine, Sequence

from ranking_service import metrics, validation
from ranking_service.config import RankingConfig
from ranking_service.pipeline import Answer, Pipeline
from ranking_service.state import ServingState
from recsys_contracts.v1 import ranking_pb2
from recsys_serving.reload import VersionHolder

log = logging.getLogger(__name__)
MAX_IN_FLIGHT = 4


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


class Shadow:
    """Starts shadow runs of the candidate version for a sample of live answers."""

    def __init__(self, pipeline: Pipeline, config: RankingConfig, holder: VersionHolder[ServingState],
                 spawn: Callable[[Coroutine], None], draw: Callable[[], float] = random.random) -> None:
        self.pipeline, self.config, self.holder, self.spawn, self.draw = pipeline, config, holder, spawn, draw
        self.in_flight = 0

    def maybe_start(self, request: ranking_pb2.RecommendRequest, served: Answer, request_id: str) -> None:
        """Starts a shadow run when the request is drawn into the sample and the candidate is held."""
        arms = self.holder.arms
        if arms is None or arms.shadow_percent <= 0 or served.items is None or \
                self.draw() * 100 >= arms.shadow_percent:
            return
        candidate = self.holder.held(arms.candidate)
        if candidate is None or candidate.version == served.ranking_version:
            return
        if self.in_flight >= MAX_IN_FLIGHT:
            metrics.SHADOW_RUNS.labels("skipped").inc()
            return
        self.in_flight += 1
        self.spawn(self._run(candidate, request, served.items.item_ids.tolist(), request_id))

    async def _run(self, candidate: ServingState, request: ranking_pb2.RecommendRequest, served: list[int],
                   request_id: str) -> None:
        try:
            query = validation.recommend_query(request, candidate.spec, self.config)
            deadline = asyncio.get_running_loop().time() + self.config.default_deadline_ms / 1000
            async with asyncio.timeout_at(deadline):
                answer = await self.pipeline.recommend(candidate, query, deadline, f"{request_id}-shadow")
            if answer.ranking_version != candidate.version or answer.items is None:
                metrics.SHADOW_RUNS.labels("not_candidate").inc()   # retrieval did not hold the candidate
                return
            shadow = answer.items.item_ids.tolist()
            metrics.SHADOW_OVERLAP.observe(overlap_at_k(served, shadow, len(served)))
            tau = kendall_tau(served, shadow)
            if tau is not None:
                metrics.SHADOW_RANK_CORRELATION.observe(tau)
            metrics.SHADOW_RUNS.labels("scored").inc()
        except Exception as error:  # a shadow run never affects serving; count it and go on
            metrics.SHADOW_RUNS.labels("failed").inc()
            log.info("shadow run failed: %r", error, extra={"request_id": request_id})
        finally:
            self.in_flight -= 1
