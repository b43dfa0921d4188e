"""Refills Redis from the artifact when it comes back empty (killed and restarted, or flushed).

A background task checks the served version's ``complete`` marker every ``interval_s`` seconds, and
at once when a read found a known user's keys missing. When Redis answers and the marker is absent,
it writes the version's user and item keys with ``recsys_contracts.feature_store.write_tables`` in a
worker thread (a sync client with generous timeouts: this is bulk work, not the request path) and
then sets the marker. Requests are answered from the artifact meanwhile. Fresh interactions lost
with a flushed Redis cannot be refilled: the artifact never had them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from ranking_service import metrics
from ranking_service.features import FeatureStore
from ranking_service.state import ServingState
from recsys_contracts import feature_store
from recsys_serving.aio import within
from recsys_serving.reload import gil_shared_with_the_loop

log = logging.getLogger(__name__)
_BULK_TIMEOUT_S = 5.0  # per bulk round trip (1000 SETs)


def _write(url: str, store: FeatureStore, state: ServingState) -> int:
    client = feature_store.redis_client(url, socket_timeout_s=_BULK_TIMEOUT_S, connect_timeout_s=_BULK_TIMEOUT_S)
    try:
        return feature_store.write_tables(client, store.keys, state.version, state.tables,
                                          user_ids=state.tables.user_ids, item_ids=state.tables.item_ids)
    finally:
        client.close()


async def refill_if_empty(store: FeatureStore, state: ServingState) -> bool:
    """Writes the version into Redis when its complete marker is missing; True when it wrote."""
    try:
        pipe = store.redis.pipeline(transaction=False)
        feature_store.queue_is_complete(pipe, store.keys, state.version)
        (marker,) = await within(pipe.execute(), _BULK_TIMEOUT_S)
    except (Exception, TimeoutError) as error:
        log.debug("refill check: Redis unreachable: %r", error)
        return False
    if feature_store.parse_is_complete(marker):
        return False
    log.warning("Redis lacks version %d: refilling it from the artifact", state.version)
    with gil_shared_with_the_loop():   # the bulk write is Python work in a thread, like a version load
        written = await asyncio.to_thread(_write, store.redis_url, store, state)
    metrics.REDIS_REFILLS.inc()
    store.mark_up()
    log.info("refilled Redis with %d keys of version %d", written, state.version)
    return True


async def run_refiller(store: FeatureStore, current: Callable[[], ServingState | None], interval_s: float) -> None:
    """Loops forever (cancel to stop): refill checks every ``interval_s`` s or when a read asks for one."""
    while True:
        try:
            await within(store.refill_wanted.wait(), interval_s)
        except TimeoutError:
            pass
        store.refill_wanted.clear()
        state = current()
        if state is None:
            continue
        try:
            await refill_if_empty(store, state)
        except Exception:  # keep the loop alive whatever Redis does mid-refill
            log.exception("refilling Redis failed; will retry")
