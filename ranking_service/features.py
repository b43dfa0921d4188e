"""User features for one request: Redis (one command) or the artifact, plus request overrides.

``FeatureStore`` owns the feature-store connection. With Redis configured, a user read is one
command (``recsys_serving.features.UserReader``: the four reads of ``recsys_contracts.feature_store``'s
user record in one script) under
``RANKING_REDIS_TIMEOUT_MS``; an error or timeout answers the request from the served version's
in-memory tables, flagged FEATURES_FROM_ARTIFACT, and counts towards the circuit breaker
(``recsys_serving.breaker``): after ``RANKING_REDIS_BREAKER_FAILURES`` in a row, requests skip Redis
for ``RANKING_REDIS_BREAKER_COOLDOWN_MS`` (same answer, no timeout to wait out), then one probe
tries it. Recording interactions while the breaker is open fails at once (UNAVAILABLE).
A known user whose keys are missing (Redis flushed) takes the same path and wakes the refiller.
Without Redis, fresh interactions live in ``InProcessFreshStore`` (see ``ranking_service.fresh``).

``build_user_view`` turns what was read into the DCN's user inputs with the user view both services
share (``recsys_serving.features.user_view``: row, history, exclusions, degraded flags).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np

from ranking_service import metrics
from ranking_service.config import RankingConfig
from ranking_service.fresh import InProcessFreshStore
from ranking_service.state import ServingState
from recsys_contracts import feature_store
from recsys_contracts.feature_store import FreshInteraction, KeyFormat, UserRecord
from recsys_contracts.v1 import common_pb2
from recsys_serving import features
from recsys_serving.features import UserOverrides, UserView
from recsys_serving.aio import within
from recsys_serving.breaker import CircuitBreaker

log = logging.getLogger(__name__)
_EMPTY_IDS = np.zeros(0, dtype=np.int64)


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
        self.read_command = None if self.redis is None else features.UserReader(self.redis, self.keys)
        self.local = local if local is not None else (InProcessFreshStore() if redis_url is None else None)
        self.refill_wanted = asyncio.Event()   # set when a read found a known user's keys missing
        self.breaker = breaker if breaker is not None else redis_breaker(
            RankingConfig.redis_breaker_failures, RankingConfig.redis_breaker_cooldown_ms / 1000)

    @classmethod
    def from_config(cls, config: RankingConfig) -> "FeatureStore":
        """The store ``config`` names (Redis URL, namespace, timeout) behind its own Redis breaker."""
        return cls(config.redis_url, config.redis_namespace, config.redis_timeout_ms,
                   breaker=redis_breaker(config.redis_breaker_failures, config.redis_breaker_cooldown_ms / 1000))

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
            async with asyncio.timeout(self.timeout_s):        # no extra task, unlike wait_for
                results = await self.read_command(version, user_id)
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
        """One read, assembled (``view``)."""
        return self.view(state, user_id, await self.read_user(state.version, user_id), overrides)

    def view(self, state: ServingState, user_id: str, read: UserRead, overrides: UserOverrides) -> UserView:
        """``read`` assembled; a known user missing from a reachable Redis wakes the refiller."""
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
            await within(pipe.execute(), timeout_s)
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


def build_user_view(state: ServingState, user_id: str, read: UserRead, overrides: UserOverrides) -> UserView:
    """The DCN's user inputs: ``recsys_serving.features.user_view`` over this version and the read."""
    return features.user_view(state.tables, state.user_index, state.items, user_id, read.record, read.from_redis,
                              overrides)
