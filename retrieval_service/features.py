"""A user's tower inputs and seen items: Redis first, the artifact's in-memory tables as the fallback.

``FeatureStore.read`` makes ONE Redis command per user (features, history, seen, fresh in one script:
``recsys_serving.features.UserReader``),
bounded by ``min(redis_timeout, the caller's budget)``; a failure or timeout returns ``None`` and
the caller answers from the artifact (flag FEATURES_FROM_ARTIFACT). A circuit breaker
(``recsys_serving.breaker``) in front of it skips Redis after a few consecutive failures, so a
frozen Redis stops costing every request its timeout; skipped reads also return ``None``. No Redis
configured is the normal path, not a degradation.

``resolve_user`` is pure: the user view both services share (``recsys_serving.features.user_view``:
stored record or artifact, fresh interactions, request features -> row, history, exclusions, flags)
as the tower inputs (``UserRow``) and the item indices to exclude.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np
import redis
import redis.asyncio

from recsys_contracts import feature_store
from recsys_contracts.ids import sorted_unique
from recsys_contracts.v1 import common_pb2
from recsys_serving.breaker import CircuitBreaker
from recsys_serving.features import UserReader, encode_overrides, user_view
from retrieval_service import metrics
from retrieval_service.config import RetrievalConfig
from retrieval_service.state import ServingState, UserRow
from retrieval_service.validation import InvalidRequest, Query

log = logging.getLogger(__name__)
# the order flags are reported in (the view holds a set)
_FLAG_ORDER = (common_pb2.DEGRADED_PATH_FEATURES_FROM_ARTIFACT, common_pb2.DEGRADED_PATH_COLD_START_USER,
               common_pb2.DEGRADED_PATH_DEFAULT_FEATURES)


def redis_breaker(failures: int, cool_down_s: float) -> CircuitBreaker:
    """The Redis breaker, reporting to this service's metrics."""
    return CircuitBreaker("retrieval-redis", failures, cool_down_s, state_gauge=metrics.REDIS_BREAKER_STATE,
                          transitions=metrics.REDIS_BREAKER_TRANSITIONS)


class FeatureStore:
    """Reads one user's record from Redis within a time budget; ``client`` None = no Redis."""

    def __init__(self, client: redis.asyncio.Redis | None, keys: feature_store.KeyFormat,
                 timeout_s: float, breaker: CircuitBreaker | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.client, self.keys, self.timeout_s = client, keys, timeout_s
        self.read_command = None if client is None else UserReader(client, keys)
        self.breaker = breaker if breaker is not None else redis_breaker(
            RetrievalConfig.redis_breaker_failures, RetrievalConfig.redis_breaker_cooldown_ms / 1000)

    @property
    def configured(self) -> bool:
        return self.client is not None

    async def read(self, version: int, user_id: str, budget_s: float) -> feature_store.UserRecord | None:
        """The user's record, or None when Redis failed, did not answer within the budget, or is skipped."""
        if self.client is None or budget_s <= 0:
            return None
        if not self.breaker.allow():
            metrics.FEATURE_STORE_SKIPPED.inc()
            return None
        try:
            async with asyncio.timeout(min(self.timeout_s, budget_s)):
                results = await self.read_command(version, user_id)
        except (redis.RedisError, OSError, TimeoutError) as error:
            self.breaker.record_failure(error)
            metrics.FEATURE_STORE_ERRORS.inc()
            log.warning("feature store read failed, using the artifact: %s: %s", type(error).__name__, error)
            return None
        self.breaker.record_success()     # Redis answered; a bad value below is a data error, not an outage
        try:
            return feature_store.parse_user_read(results)
        except ValueError as error:
            metrics.FEATURE_STORE_ERRORS.inc()
            log.warning("feature store record unreadable, using the artifact: %s", error)
            return None

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


@dataclass(frozen=True)
class ResolvedUser:
    """Tower inputs (None = unknown user without features: answer from popular items), seen indices, flags."""

    row: UserRow | None
    seen: np.ndarray               # (s,) int64 item indices, sorted, unique
    degraded: tuple[int, ...]


def resolve_user(state: ServingState, query: Query, record: feature_store.UserRecord | None,
                 store_failed: bool) -> ResolvedUser:
    """The shared user view (``recsys_serving.features.user_view``) as tower inputs and seen indices.

    ``store_failed`` = Redis was configured but failed. An unknown user without request features
    or known fresh items gets no tower row (popular items answer, so DEFAULT_FEATURES is not flagged:
    no model ran on the default row)."""
    try:
        overrides = encode_overrides(state.tables.spec, query.categorical, query.numeric, query.recent_item_ids)
    except ValueError as error:
        raise InvalidRequest(f"user_features: {error}") from None
    view = user_view(state.tables, state.user_index, state.items, query.user_id, record,
                     store_failed or record is not None, overrides)
    seen = state.items.indices(view.exclude_ids)
    seen = sorted_unique(seen[seen > 0])
    flags = tuple(flag for flag in _FLAG_ORDER if flag in view.degraded)
    if view.user_idx == 0 and not (query.has_request_features or (state.items.indices(view.fresh_ids) > 0).any()):
        return ResolvedUser(None, seen, tuple(f for f in flags if f != common_pb2.DEGRADED_PATH_DEFAULT_FEATURES))
    return ResolvedUser(UserRow(view.user_idx, view.cat, view.num, view.history, query.timestamp), seen, flags)
