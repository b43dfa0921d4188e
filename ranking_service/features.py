"""User features for one request: Redis (one pipelined round trip) or the artifact, plus request overrides.

``FeatureStore`` owns the feature-store connection. With Redis configured, a user read is the
4-command pipeline of ``recsys_contracts.feature_store.queue_user_read`` under
``RANKING_REDIS_TIMEOUT_MS``; an error or timeout answers the request from the served version's
in-memory tables, flagged FEATURES_FROM_ARTIFACT, and counts towards the circuit breaker
(``recsys_serving.breaker``): after ``RANKING_REDIS_BREAKER_FAILURES`` in a row, requests skip Redis
for ``RANKING_REDIS_BREAKER_COOLDOWN_MS`` (same answer, no timeout to wait out), then one probe
tries it. Recording interactions while the breaker is open fails at once (UNAVAILABLE).
A known user whose keys are missing (Redis flushed) takes the same path and wakes the refiller.
Without Redis, fresh interactions live in ``InProcessFreshStore`` (see ``ranking_service.fresh``).

``build_user_view`` turns what was read into the DCN's user inputs: the row (overridden by
request-time features), the history (artifact history + fresh interactions + request recent ids,
oldest first, the last H known items, left-padded with 0) and the item ids to exclude.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ranking_service import metrics
from ranking_service.config import RankingConfig
from ranking_service.fresh import InProcessFreshStore
from ranking_service.state import ServingState
from recsys_contracts import feature_store
from recsys_contracts.feature_store import FreshInteraction, KeyFormat, UserRecord
from recsys_contracts.feature_spec import FeatureSpec
from recsys_contracts.ids import sorted_unique
from recsys_contracts.v1 import common_pb2
from recsys_serving import features
from recsys_serving.breaker import CircuitBreaker

log = logging.getLogger(__name__)
_EMPTY_IDS = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class UserOverrides:
    """Request-time user features, encoded: positions of the row to overwrite and their values."""

    cat_positions: np.ndarray      # (c,) int64 positions in the (Cu,) categorical row
    cat_values: np.ndarray         # (c,) int64 vocabulary indices
    num_positions: np.ndarray      # (n,) int64 positions in the (Nu,) numeric row
    num_values: np.ndarray         # (n,) float32 standardised values
    recent_item_ids: np.ndarray    # (r,) int64 external item ids, oldest first

    @property
    def has_features(self) -> bool:
        return bool(self.cat_positions.size or self.num_positions.size)


NO_OVERRIDES = UserOverrides(_EMPTY_IDS, _EMPTY_IDS, _EMPTY_IDS, np.zeros(0, np.float32), _EMPTY_IDS)


def encode_overrides(spec: FeatureSpec, categorical: Mapping[str, str], numeric: Mapping[str, float],
                     recent_item_ids: Sequence[int]) -> UserOverrides:
    """Encodes request-time features with the version's spec; ValueError names an unknown or bad feature."""
    if not (categorical or numeric or len(recent_item_ids)):
        return NO_OVERRIDES                          # the common request: nothing to encode
    cat, num = spec.encode_user(categorical, numeric)
    cat_pos = [i for i, column in enumerate(spec.user_categorical) if column.name in categorical]
    num_pos = [i for i, column in enumerate(spec.user_numeric) if column.name in numeric]
    return UserOverrides(np.asarray(cat_pos, np.int64), cat[cat_pos], np.asarray(num_pos, np.int64),
                         num[num_pos], np.asarray(recent_item_ids, dtype=np.int64))


@dataclass(frozen=True, eq=False)
class UserView:
    """The DCN's user inputs for one request and the items the user already interacted with."""

    user_idx: int                  # 0 = not in the version's vocabulary
    cat: np.ndarray                # (Cu,) int64
    num: np.ndarray                # (Nu,) float32
    history: np.ndarray            # (H,) int64 item indices, oldest first, left-padded with 0
    exclude_ids: np.ndarray        # (e,) int64 sorted unique external item ids: seen + fresh + recent
    degraded: frozenset[int]       # common_pb2.DegradedPath values


@dataclass(frozen=True, eq=False)
class UserRead:
    """What a feature read produced: the store's record (None when it failed) and where it came from."""

    record: UserRecord | None
    from_redis: bool               # False = no Redis configured (fresh from the in-process store)


def redis_breaker(failures: int, cool_down_s: float) -> CircuitBreaker:
    """The Redis breaker, reporting to this service's metrics."""
    return CircuitBreaker("ranking-redis", failures, cool_down_s, state_gauge=metrics.REDIS_BREAKER_STATE,
                          transitions=metrics.REDIS_BREAKER_TRANSITIONS)


class FeatureStore:
    """Reads users' features and records interactions, through Redis when configured."""

    def __init__(self, redis_url: str | None, namespace: str, timeout_ms: int,
                 local: InProcessFreshStore | None = None, breaker: CircuitBreaker | None = None) -> None:
        self.keys = KeyFormat(namespace)
        self.redis_url = redis_url
        self.timeout_s = timeout_ms / 1000
        self.redis = features.redis_client(redis_url, self.timeout_s)
        self.local = local if local is not None else (InProcessFreshStore() if redis_url is None else None)
        self.refill_wanted = asyncio.Event()   # set when a read found a known user's keys missing
        self.breaker = breaker if breaker is not None else redis_breaker(
            RankingConfig.redis_breaker_failures, RankingConfig.redis_breaker_cooldown_ms / 1000)

    def mark_down(self, operation: str, error: BaseException) -> None:
        metrics.REDIS_ERRORS.labels(operation).inc()
        self.breaker.record_failure(error)

    def mark_up(self) -> None:
        """Redis took a bulk refill: it is healthy, stop skipping it."""
        self.breaker.reset()

    async def read_user(self, version: int, user_id: str) -> UserRead:
        if self.redis is None:
            fresh = self.local.get(user_id)
            return UserRead(UserRecord(row=None, history=_EMPTY_IDS, seen=_EMPTY_IDS, fresh=fresh), False)
        if not self.breaker.allow():
            metrics.REDIS_SKIPPED.inc()
            return UserRead(None, True)
        started = time.perf_counter()
        try:
            pipe = self.redis.pipeline(transaction=False)
            feature_store.queue_user_read(pipe, self.keys, version, user_id)
            async with asyncio.timeout(self.timeout_s):        # no extra task, unlike wait_for
                results = await pipe.execute()
        except (Exception, TimeoutError) as error:  # any store failure degrades, never fails the request
            self.mark_down("read", error)
            return UserRead(None, True)
        finally:
            metrics.STAGE_SECONDS.labels("feature_fetch").observe(time.perf_counter() - started)
        self.breaker.record_success()
        try:
            record = feature_store.parse_user_read(results)
        except ValueError as error:   # Redis answered: a bad value is a data error, not an outage
            metrics.REDIS_ERRORS.labels("read").inc()
            log.warning("feature store record unreadable, using the artifact: %s", error)
            return UserRead(None, True)
        return UserRead(record, True)

    async def user_view(self, state: ServingState, user_id: str, overrides: UserOverrides) -> UserView:
        """One read, assembled; a known user missing from a reachable Redis wakes the refiller."""
        read = await self.read_user(state.version, user_id)
        view = build_user_view(state, user_id, read, overrides)
        if read.record is not None and read.from_redis and \
                common_pb2.DEGRADED_PATH_FEATURES_FROM_ARTIFACT in view.degraded:
            self.refill_wanted.set()
        return view

    async def record(self, pairs: list[tuple[str, FreshInteraction]], timeout_s: float) -> int:
        """Stores the interactions; raises ``StoreUnavailable`` when Redis is configured but failing."""
        if self.redis is None:
            return self.local.record(pairs)
        if not self.breaker.allow():
            raise StoreUnavailable(f"the feature store is being skipped after failures (circuit breaker open; "
                                   f"retry after {self.breaker.cool_down_s:g} s)")
        try:
            pipe = self.redis.pipeline(transaction=False)
            count = feature_store.queue_record_interactions(pipe, self.keys, pairs)
            await asyncio.wait_for(pipe.execute(), timeout_s)
        except (Exception, TimeoutError) as error:
            self.mark_down("record", error)
            raise StoreUnavailable(f"the feature store did not take the interactions: {error!r}") from error
        self.breaker.record_success()
        return count

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()


class StoreUnavailable(Exception):
    """Redis is configured but did not answer; the interactions were not stored."""


def _stored_row(state: ServingState, record: UserRecord | None) -> tuple[np.ndarray, np.ndarray] | None:
    if record is None or record.row is None:
        return None
    cat, num = record.row
    if cat.shape != (state.spec.user_cat_dim,) or num.shape != (state.spec.user_num_dim,):
        return None  # a row of another feature layout: not this version's, use the artifact's
    return cat.copy(), num.copy()


def build_user_view(state: ServingState, user_id: str, read: UserRead, overrides: UserOverrides) -> UserView:
    """Combines the store's record, the artifact and the request's features into the DCN's user inputs."""
    tables, spec = state.tables, state.spec
    user_idx = state.user_index.get(user_id, 0)
    flags: set[int] = set()
    row = _stored_row(state, read.record)
    if row is not None:
        (cat, num), history_ids, seen_ids = row, read.record.history, read.record.seen
    elif user_idx > 0:
        cat, num = tables.user_cat[user_idx].copy(), tables.user_num[user_idx].copy()
        history = tables.history[user_idx]
        history_ids, seen_ids = tables.item_ids[history[history > 0]], tables.item_ids[tables.seen(user_idx)]
    else:
        (cat, num), history_ids, seen_ids = spec.default_user_row(), _EMPTY_IDS, _EMPTY_IDS
    if read.from_redis and (read.record is None or (row is None and user_idx > 0)):
        flags.add(common_pb2.DEGRADED_PATH_FEATURES_FROM_ARTIFACT)
    if user_idx == 0:
        flags.add(common_pb2.DEGRADED_PATH_COLD_START_USER)
        if not overrides.has_features:
            flags.add(common_pb2.DEGRADED_PATH_DEFAULT_FEATURES)
    cat[overrides.cat_positions] = overrides.cat_values
    num[overrides.num_positions] = overrides.num_values
    fresh_ids = np.asarray([f.item_id for f in read.record.fresh] if read.record is not None else [], np.int64)
    interacted = np.concatenate([history_ids, fresh_ids, overrides.recent_item_ids]).astype(np.int64)  # oldest first
    known = state.items.indices(interacted)
    known = known[known > 0][-spec.history_length:]
    padded = np.zeros(spec.history_length, dtype=np.int64)
    padded[spec.history_length - known.size:] = known
    exclude = sorted_unique(np.concatenate([seen_ids, fresh_ids, overrides.recent_item_ids]).astype(np.int64))
    return UserView(user_idx=user_idx, cat=cat, num=num, history=padded, exclude_ids=exclude,
                    degraded=frozenset(flags))
