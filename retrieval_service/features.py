"""A user's tower inputs and seen items: Redis first, the artifact's in-memory tables as the fallback.

``FeatureStore.read`` makes ONE pipelined round trip per user (features, history, seen, fresh),
bounded by ``min(redis_timeout, the caller's budget)``; a failure or timeout returns ``None`` and
the caller answers from the artifact (flag FEATURES_FROM_ARTIFACT). A circuit breaker
(``recsys_serving.breaker``) in front of it skips Redis after a few consecutive failures, so a
frozen Redis stops costing every request its timeout; skipped reads also return ``None``. No Redis
configured is the normal path, not a degradation.

``resolve_user`` is pure: it merges what the store returned (or the artifact) with the request's
features into the tower inputs (``UserRow``) and the item indices to exclude. Fresh interactions
recorded online count as seen and enter the history (after the stored history, before the
request's ``recent_item_ids``, keeping the last H, left-padded with 0).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import redis
import redis.asyncio

from recsys_contracts import feature_store
from recsys_contracts.ids import sorted_unique
from recsys_contracts.v1 import common_pb2
from recsys_serving.breaker import CircuitBreaker
from retrieval_service import metrics
from retrieval_service.config import RetrievalConfig
from retrieval_service.state import ServingState, UserRow, table_row
from retrieval_service.validation import InvalidRequest, Query

log = logging.getLogger(__name__)
_NO_ITEMS = np.zeros(0, dtype=np.int64)


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
        pipe = self.client.pipeline(transaction=False)
        feature_store.queue_user_read(pipe, self.keys, version, user_id)
        try:
            async with asyncio.timeout(min(self.timeout_s, budget_s)):
                results = await pipe.execute()
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


def _to_indices(state: ServingState, item_ids: np.ndarray | Sequence[int]) -> np.ndarray:
    """External item ids -> (n,) int64 item indices, unknown ids dropped, order kept."""
    indices = state.items.indices(np.asarray(item_ids, dtype=np.int64))
    return indices[indices > 0]


def _history(base: np.ndarray, fresh: np.ndarray, recent: np.ndarray, length: int) -> np.ndarray:
    """(H,) int64: the last ``length`` of base + fresh + recent, oldest first, left-padded with 0."""
    items = np.concatenate([base, fresh, recent])[-length:]
    history = np.zeros(length, dtype=np.int64)
    history[length - items.size:] = items
    return history


def _overrides(state: ServingState, query: Query, cat: np.ndarray, num: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The row with the request's named features replacing the stored ones."""
    spec = state.tables.spec
    if not (query.categorical or query.numeric):
        return cat.copy(), num.copy()
    try:
        req_cat, req_num = spec.encode_user(query.categorical, query.numeric)
    except ValueError as error:
        raise InvalidRequest(f"user_features: {error}") from None
    cat, num = cat.copy(), num.copy()
    for i, column in enumerate(spec.user_categorical):
        if column.name in query.categorical:
            cat[i] = req_cat[i]
    for i, column in enumerate(spec.user_numeric):
        if column.name in query.numeric:
            num[i] = req_num[i]
    return cat, num


def _stored_row(state: ServingState, record: feature_store.UserRecord | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The store's (cat, num) when present and shaped like this version's spec, else None."""
    if record is None or record.row is None:
        return None
    cat, num = record.row
    spec = state.tables.spec
    if cat.shape != (spec.user_cat_dim,) or num.shape != (spec.user_num_dim,):
        log.warning("stored user row has shapes %s, %s; the spec wants (%d,), (%d,): using the artifact",
                    cat.shape, num.shape, spec.user_cat_dim, spec.user_num_dim)
        return None
    return cat, num


def resolve_user(state: ServingState, query: Query, record: feature_store.UserRecord | None,
                 store_failed: bool) -> ResolvedUser:
    """Merges store, artifact and request into tower inputs; ``store_failed`` = Redis was configured but failed."""
    tables = state.tables
    user_idx = state.user_index.get(query.user_id, 0)
    flags: list[int] = []
    fresh = _to_indices(state, [f.item_id for f in record.fresh] if record is not None else ())
    recent = _to_indices(state, query.recent_item_ids)
    stored = _stored_row(state, record) if user_idx > 0 else None
    if stored is not None:
        cat, num = stored
        base, stored_seen = _to_indices(state, record.history), _to_indices(state, record.seen)
    else:
        artifact = table_row(tables, user_idx, query.timestamp)
        cat, num = artifact.cat, artifact.num
        base, stored_seen = artifact.history[artifact.history > 0].astype(np.int64), _NO_ITEMS
    # Flag when Redis failed, or answered without this known user's row (the artifact filled in).
    if store_failed or (user_idx > 0 and record is not None and stored is None):
        flags.append(common_pb2.DEGRADED_PATH_FEATURES_FROM_ARTIFACT)
    cat, num = _overrides(state, query, cat, num)
    seen = sorted_unique(np.concatenate([stored_seen, tables.seen(user_idx).astype(np.int64), fresh, recent]))
    if user_idx == 0:
        flags.append(common_pb2.DEGRADED_PATH_COLD_START_USER)
        if not (query.has_request_features or fresh.size):
            return ResolvedUser(None, seen, tuple(flags))
    row = UserRow(user_idx, cat, num, _history(base, fresh, recent, tables.spec.history_length), query.timestamp)
    return ResolvedUser(row, seen, tuple(flags))
