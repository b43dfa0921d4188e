"""The feature store's side both services share: how a service's Redis client is built.

``redis_client(url, timeout_s)`` is the async client both services' ``FeatureStore`` read users
with: no retries (one slow try already spends the per-request budget; the artifact answers
instead), socket and connect timeouts of the budget (at least ``MIN_SOCKET_TIMEOUT_S``, so a
connect can succeed at all). Key format, codec and the batch read/write are
``recsys_contracts.feature_store``'s; what a service does with a user's record is its own.
"""

from __future__ import annotations

import redis.asyncio

from recsys_contracts import feature_store

MIN_SOCKET_TIMEOUT_S = 0.05


def redis_client(url: str | None, timeout_s: float) -> redis.asyncio.Redis | None:
    """The async client for ``url`` (None = no Redis configured: None)."""
    if not url:
        return None
    socket_timeout_s = max(timeout_s, MIN_SOCKET_TIMEOUT_S)
    return feature_store.redis_client(url, socket_timeout_s=socket_timeout_s, connect_timeout_s=socket_timeout_s,
                                      retries=0, asyncio=True)
