"""Features from real Redis: materialised rows, fresh interactions, and the degraded paths (down, frozen)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import numpy as np
import pytest
import redis

from recsys_contracts import feature_store
from recsys_contracts.feature_store import FreshInteraction, KeyFormat
from recsys_contracts.v1 import common_pb2, retrieval_pb2
from retrieval_service.features import FeatureStore, resolve_user
from retrieval_service.validation import Query
from tests.processes import free_port
from tests.retrieval.harness import cached_holder, config, items, retrieve, sample, serve
from trainer.publish import materialize_features

FROM_ARTIFACT = common_pb2.DEGRADED_PATH_FEATURES_FROM_ARTIFACT


def _materialize(url: str, namespace: str, version: int, tiny) -> redis.Redis:
    client = redis.Redis.from_url(url)
    materialize_features(client, KeyFormat(namespace), version, tiny.tables)
    return client


def test_fresh_interaction_is_excluded_and_enters_the_history(published, loaded, tiny, redis_url, redis_namespace):
    root, version = published
    client = _materialize(redis_url, redis_namespace, version, tiny)
    user = str(loaded.tables.user_ids[2])

    async def body():
        cfg = config(root, redis_url=redis_url, redis_namespace=redis_namespace, redis_timeout_ms=2000)
        async with serve(cfg, holder=cached_holder(root, loaded)) as (stub, _, app):
            first = await retrieve(stub, user_id=user, num_candidates=10)
            top = items(first)[0]
            pipe = client.pipeline(transaction=False)
            feature_store.queue_record_interactions(pipe, KeyFormat(redis_namespace),
                                                    [(user, FreshInteraction(top, int(time.time()), 5.0))])
            pipe.execute()
            second = await retrieve(stub, user_id=user, num_candidates=10)
            record = await app.generator.features.read(version, user, budget_s=2.0)
            return first, second, top, record

    first, second, top, record = asyncio.run(body())
    client.close()
    assert all(list(c.degraded) == [] for c in first + second)
    assert top not in items(second) and len(items(second)) == 10
    resolved = resolve_user(loaded, Query(user, 10, {}, {}, (), 1, False), record, store_failed=False)
    (top_idx,) = loaded.items.indices(np.array([top])).tolist()
    assert resolved.row.history[-1] == top_idx
    assert top_idx in resolved.seen
    # The stored history comes first, oldest first, left-padded.
    stored = loaded.items.indices(np.array(record.history)).tolist()
    assert resolved.row.history[-1 - len(stored[-9:]):-1].tolist() == stored[-9:]


def test_redis_without_the_version_answers_from_the_artifact_flagged(published, loaded, redis_url, redis_namespace):
    root, _ = published

    async def body():
        cfg = config(root, redis_url=redis_url, redis_namespace=redis_namespace, redis_timeout_ms=2000)
        async with serve(cfg, holder=cached_holder(root, loaded)) as (stub, _, _):
            return await retrieve(stub, user_id=str(loaded.tables.user_ids[1]), num_candidates=5)

    chunks = asyncio.run(body())
    assert items(chunks) and all(list(c.degraded) == [FROM_ARTIFACT] for c in chunks)


def test_redis_down_answers_from_the_artifact_and_counts_it(published, loaded):
    root, _ = published
    dead = f"redis://127.0.0.1:{free_port()}/0"   # nothing listens there

    async def body():
        before = (sample("retrieval_feature_store_errors_total"),
                  sample("retrieval_degraded_total", path="DEGRADED_PATH_FEATURES_FROM_ARTIFACT"))
        async with serve(config(root, redis_url=dead, redis_timeout_ms=200), holder=cached_holder(root, loaded)) \
                as (stub, _, _):
            chunks = await retrieve(stub, user_id=str(loaded.tables.user_ids[1]), num_candidates=5)
        after = (sample("retrieval_feature_store_errors_total"),
                 sample("retrieval_degraded_total", path="DEGRADED_PATH_FEATURES_FROM_ARTIFACT"))
        return chunks, np.subtract(after, before)

    chunks, counted = asyncio.run(body())
    assert len(items(chunks)) == 5 and all(list(c.degraded) == [FROM_ARTIFACT] for c in chunks)
    assert counted.tolist() == [1, 1]


def test_frozen_redis_still_answers_within_the_deadline(published, loaded, tiny, private_redis):
    # Redis's own timeout (5 s) is far beyond the caller's 1 s deadline: the deadline bounds the read.
    root, version = published
    url, pid = private_redis
    _materialize(url, "recsys", version, tiny).close()
    user = str(loaded.tables.user_ids[1])

    async def body():
        cfg = config(root, redis_url=url, redis_timeout_ms=5000)
        async with serve(cfg, holder=cached_holder(root, loaded)) as (stub, _, _):
            when = common_pb2.Context(timestamp_s=1_700_000_000)
            healthy = await retrieve(stub, user_id=user, num_candidates=5, context=when)
            os.kill(pid, signal.SIGSTOP)
            try:
                frozen = [await retrieve(stub, timeout=1.0, user_id=user, num_candidates=5, context=when)
                          for _ in range(3)]
            finally:
                os.kill(pid, signal.SIGCONT)
            return healthy, frozen

    healthy, frozen = asyncio.run(body())
    assert all(list(c.degraded) == [] for c in healthy)
    for chunks in frozen:
        assert items(chunks) == items(healthy)   # same features: Redis holds the artifact's rows
        assert all(list(c.degraded) == [FROM_ARTIFACT] for c in chunks)


def test_feature_store_rejects_a_non_positive_timeout():
    with pytest.raises(ValueError, match="timeout_s must be > 0, got 0"):
        FeatureStore(None, KeyFormat(), 0)


def test_frozen_redis_opens_the_breaker_and_it_closes_after_resume(published, loaded, tiny, private_redis):
    # While Redis is frozen only the reads the breaker lets through (the 2 that open it, then one probe
    # per 300 ms cool-down) wait out the 500 ms Redis timeout; every other read skips Redis.
    root, version = published
    url, pid = private_redis
    _materialize(url, "recsys", version, tiny).close()
    user = str(loaded.tables.user_ids[1])
    errors, skipped = "retrieval_feature_store_errors_total", "retrieval_feature_store_skipped_total"
    transitions = "retrieval_redis_breaker_transitions_total"

    def counters() -> dict[str, float]:
        return {"errors": sample(errors), "skipped": sample(skipped),
                **{to: sample(transitions, to=to) for to in ("open", "half_open", "closed")}}

    async def body():
        cfg = config(root, redis_url=url, redis_timeout_ms=500, redis_breaker_failures=2,
                     redis_breaker_cooldown_ms=300)
        async with serve(cfg, holder=cached_holder(root, loaded)) as (stub, _, _):
            await retrieve(stub, user_id=user, num_candidates=5)
            before = counters()
            os.kill(pid, signal.SIGSTOP)
            try:
                frozen = [await retrieve(stub, timeout=5.0, user_id=user, num_candidates=5) for _ in range(30)]
                state_while_frozen = sample("retrieval_redis_breaker_state")
                during = counters()
            finally:
                os.kill(pid, signal.SIGCONT)
            for _ in range(200):          # the next probe after the cool-down finds Redis back
                chunks = await retrieve(stub, user_id=user, num_candidates=5)
                if all(list(c.degraded) == [] for c in chunks):
                    break
                await asyncio.sleep(0.05)
            return frozen, state_while_frozen, before, during, counters(), chunks

    frozen, state_while_frozen, before, during, after, last = asyncio.run(body())
    delta = {key: during[key] - before[key] for key in before}
    assert all(list(c.degraded) == [FROM_ARTIFACT] for chunks in frozen for c in chunks)
    assert delta["open"] >= 1 and state_while_frozen in (1, 2)
    assert delta["errors"] + delta["skipped"] == 30          # every frozen read failed or skipped Redis
    assert delta["errors"] == 2 + delta["half_open"]         # only the opening reads and the probes waited
    assert delta["skipped"] >= 30 - 2 - delta["half_open"] and delta["skipped"] > delta["errors"]
    assert all(list(c.degraded) == [] for c in last)
    assert after["closed"] - during["closed"] >= 1 and sample("retrieval_redis_breaker_state") == 0


def test_admission_refuses_at_once_while_the_only_slot_is_held(published, loaded, private_redis):
    # A frozen Redis (breaker never opening) holds the only slot for the read's 1 s timeout.
    root, _ = published
    url, pid = private_redis
    user = str(loaded.tables.user_ids[1])

    async def body():
        cfg = config(root, redis_url=url, redis_timeout_ms=1000, redis_breaker_failures=1000,
                     max_concurrency=1, max_in_flight=1)
        async with serve(cfg, holder=cached_holder(root, loaded)) as (stub, _, app):
            await retrieve(stub, user_id=user, num_candidates=5)
            refused = sample("retrieval_refused_total", reason="full")
            os.kill(pid, signal.SIGSTOP)
            try:
                held = asyncio.ensure_future(retrieve(stub, timeout=5.0, user_id=user, num_candidates=5))
                while sample("retrieval_in_flight") < 1:
                    await asyncio.sleep(0.01)
                call = stub.Retrieve(retrieval_pb2.RetrieveRequest(user_id=user, num_candidates=5), timeout=5.0)
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    [chunk async for chunk in call]
                at_once = not held.done()
                trailers = dict(await call.trailing_metadata())
            finally:
                os.kill(pid, signal.SIGCONT)
            held_chunks = await held
            return error.value, at_once, trailers, sample("retrieval_refused_total", reason="full") - refused, \
                held_chunks

    error, at_once, trailers, counted, held_chunks = asyncio.run(body())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "too many requests in flight" in error.details()
    assert at_once and counted == 1
    assert int(trailers["grpc-retry-pushback-ms"]) >= 1     # it would fit after the wait: retry then
    assert all(list(c.degraded) == [FROM_ARTIFACT] for c in held_chunks)
