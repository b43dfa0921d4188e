"""The candidate generator: the domain object behind ``Retrieve`` (the servicer only translates).

For one validated ``Query`` on one ``ServingState``: read the user's record from the feature
store within the caller's deadline (or take the caller's read of it, ``Query.stored``, when it was
read under this version: ranking passes its own, so a Recommend reads Redis once) -> merge with the artifact and the request (``resolve_user``)
-> user tower + index search (micro-batched) over-fetching ``k + |seen|`` -> drop padding, index 0
and seen items -> external item ids with scores ``dot / temperature``. Unknown users without any
features get the version's popular items (score = log training count).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from recsys_contracts.ids import in_sorted
from recsys_contracts.v1 import common_pb2
from retrieval_service import metrics
from retrieval_service.batching import MicroBatcher
from retrieval_service.features import FeatureStore, ResolvedUser, resolve_user
from retrieval_service.state import ServingState
from retrieval_service.validation import Query

# Share of the remaining deadline the Redis read may use; the rest is kept for the artifact
# fallback, the tower and the search, so a frozen Redis still leaves time to answer.
REDIS_BUDGET_SHARE = 0.5


class DeadlineExceeded(Exception):
    """No time is left for the request."""


@dataclass(frozen=True)
class Candidates:
    """The answer: external item ids (n,) int64 best first, scores (n,) float32, flags, stage seconds.

    ``stages``: features, and when the tower ran batch_wait (queued for a batch), tower and search.
    """

    version: int
    item_ids: np.ndarray
    scores: np.ndarray
    degraded: tuple[int, ...]
    stages: dict[str, float]


class CandidateGenerator:
    """Produces candidates with its collaborators injected: the feature store and the batcher."""

    def __init__(self, features: FeatureStore, batcher: MicroBatcher) -> None:
        self.features, self.batcher = features, batcher

    async def generate(self, state: ServingState, query: Query, deadline: float,
                       pause: Callable[[], Awaitable[None]] | None = None) -> Candidates:
        """Candidates for ``query``; ``deadline`` is a ``time.monotonic()`` instant. ``pause`` is awaited
        between the steps (after the feature read, after the search): a background call waits there
        while live requests run (``recsys_serving.rpc.Call.pause_for_live``)."""
        started = time.monotonic()
        if deadline <= started:
            raise DeadlineExceeded("no time left before the deadline")
        if query.stored is not None and query.stored.version == state.version:
            record, store_failed = query.stored.record, query.stored.record is None
            metrics.FEATURE_READS.labels("caller").inc()
        else:
            record = await self.features.read(state.version, query.user_id, (deadline - started) * REDIS_BUDGET_SHARE)
            store_failed = self.features.configured and record is None
            metrics.FEATURE_READS.labels("own").inc()
        fetched = time.monotonic()
        metrics.STAGE_SECONDS.labels("features").observe(fetched - started)
        if pause is not None:
            await pause()
        resolved = resolve_user(state, query, record, store_failed=store_failed)
        stages = {"features": fetched - started}
        degraded = resolved.degraded
        if resolved.row is None:
            item_idx, scores = self._popular(state, query, resolved)
        else:
            item_idx, scores = await self._search(state, query, resolved, stages)
            if pause is not None:
                await pause()
            if not np.isfinite(scores).all():      # a non-finite user embedding: never stream NaN scores
                item_idx, scores = self._popular(state, query, resolved)
                degraded = (*degraded, common_pb2.DEGRADED_PATH_MODEL_FALLBACK)
        for flag in degraded:
            metrics.DEGRADED.labels(common_pb2.DegradedPath.Name(flag)).inc()
        return Candidates(state.version, state.tables.item_ids[item_idx], scores, degraded, stages)

    async def _search(self, state: ServingState, query: Query, resolved: ResolvedUser,
                      stages: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
        excluded = resolved.seen[:0] if query.include_seen else resolved.seen     # (e,) sorted item indices
        fetch = min(query.k + excluded.size, state.index.size)
        submitted = time.perf_counter()
        scores, ids, batch = await self.batcher.search(state, resolved.row, max(fetch, 1))
        stages.update(batch_wait=max(0.0, batch.started - submitted), tower=batch.tower_s, search=batch.search_s)
        keep = ids > 0
        if excluded.size:
            keep &= ~in_sorted(ids, excluded)
        item_idx = ids[keep][:query.k]
        return item_idx, (scores[keep][:query.k] / state.temperature).astype(np.float32)

    @staticmethod
    def _popular(state: ServingState, query: Query, resolved: ResolvedUser) -> tuple[np.ndarray, np.ndarray]:
        popular = state.tables.popular_items                              # (m,) item indices
        keep = popular > 0
        if resolved.seen.size and not query.include_seen:
            keep &= ~in_sorted(popular, resolved.seen)
        return popular[keep][:query.k], state.popular_scores[keep][:query.k]
