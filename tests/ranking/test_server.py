"""The gRPC surface: Rank, and every status code the servicer chooses (real servers on port 0)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ranking_service.state import ranker_inputs, retrieval_scores, run_ranker
from recsys_contracts.programs import RANKER
from recsys_contracts.v1 import common_pb2, ranking_pb2
from recsys_serving.runtime import REQUEST_ID_KEY, UNADMITTED_HEADROOM, rpc_limit
from tests.ranking.harness import config, free_port, health_status, run, sample, serve

SERVING = 1
NOT_SERVING = 2


def test_rank_scores_distinct_items_best_first_and_flags_unknown_ones(published, loaded):
    root, _ = published
    tables = loaded.tables
    ids = [int(tables.item_ids[i]) for i in (4, 2, 9)]

    async def main():
        async with serve(config(root), state=loaded) as (stub, _, _):
            return await stub.Rank(ranking_pb2.RankRequest(
                user_id="1", item_ids=[ids[0], ids[1], 10**12, ids[0], ids[2]],
                context=common_pb2.Context(timestamp_s=1_000_000)), timeout=5)

    reply = run(main())
    assert reply.ranking_version == 1
    assert list(reply.unknown_item_ids) == [10**12]
    assert list(reply.degraded) == [common_pb2.DEGRADED_PATH_UNKNOWN_ITEMS]
    assert sorted(item.item_id for item in reply.items) == sorted(ids + [10**12])     # duplicates scored once
    scores = [item.score for item in reply.items]
    assert scores == sorted(scores, reverse=True)
    # The served numbers are the program's on the artifact's features (no Redis configured).
    user = loaded.user_index["1"]
    idx = np.array([4, 2, 0, 9])
    # Rank computes the retrieval score itself from the version's user tower and item embeddings.
    user_view = dict(user_idx=user, user_cat=tables.user_cat[user], user_num=tables.user_num[user],
                     history=tables.history[user], timestamp=1_000_000)
    scores = retrieval_scores(loaded, item_idx=idx, **user_view)
    assert scores[2] == 0.0 and np.count_nonzero(scores) == 3       # the unknown item has no embedding
    ctr, rating = run_ranker(loaded.ranker, ranker_inputs(loaded, item_idx=idx, retrieval_score=scores, **user_view))
    served = {item.item_id: item for item in reply.items}
    for item_id, c, r, rs in zip(ids[:2] + [10**12] + ids[2:], ctr, rating, scores):
        assert served[item_id].ctr == pytest.approx(float(c), abs=1e-6)
        assert served[item_id].predicted_rating == pytest.approx(float(r), abs=1e-5)
        assert served[item_id].score == served[item_id].ctr
        assert served[item_id].retrieval_score == pytest.approx(float(rs), abs=1e-5)


@pytest.mark.parametrize("method, request_, named", [
    ("Rank", ranking_pb2.RankRequest(user_id="1", item_ids=list(range(1001))), "item_ids must hold 1..1000 ids, got 1001"),
    ("Recommend", ranking_pb2.RecommendRequest(user_id="1", k=0), "k must be in [1, 100], got 0"),
    ("RecordInteractions", ranking_pb2.RecordInteractionsRequest(), "interactions must hold 1..1000 entries, got 0"),
])
def test_invalid_argument_names_the_field_and_value(published, loaded, method, request_, named):
    root, _ = published

    async def main():
        async with serve(config(root), state=loaded) as (stub, _, _):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await getattr(stub, method)(request_, timeout=5)
            return error.value

    error = run(main())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == named


def test_unavailable_and_not_serving_until_a_version_exists(tmp_path):
    async def main():
        async with serve(config(tmp_path)) as (stub, channel, _):
            assert await health_status(channel) == NOT_SERVING
            assert await health_status(channel, "recsys.v1.RankingService") == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.Rank(ranking_pb2.RankRequest(user_id="1", item_ids=[1]), timeout=5)
            return error.value

    error = run(main())
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "no model version loaded" in error.details()


def test_deadline_too_short_on_arrival_fails_before_any_retrieval_or_redis_call(published, loaded):
    root, _ = published
    cfg = config(root, min_deadline_ms=1000, redis_url=f"redis://127.0.0.1:{free_port()}/0")

    async def main():
        async with serve(cfg, state=loaded) as (stub, channel, _):
            fetches = sample("ranking_stage_seconds_count", stage="feature_fetch")
            failures = sum(sample("ranking_retrieval_failures_total", code=c) for c in ("UNAVAILABLE", "DEADLINE_EXCEEDED"))
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.Recommend(ranking_pb2.RecommendRequest(user_id="1", k=3), timeout=0.5)
            assert sample("ranking_stage_seconds_count", stage="feature_fetch") == fetches
            assert sum(sample("ranking_retrieval_failures_total", code=c)
                       for c in ("UNAVAILABLE", "DEADLINE_EXCEEDED")) == failures
            assert await health_status(channel) == SERVING
            return error.value

    error = run(main())
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline must leave at least 1000 ms" in error.details()


@contextlib.contextmanager
def silent_retrieval_config(root, **settings):
    """A config with ``settings`` whose retrieval accepts connections and never answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        yield config(root, retrieval_target=f"127.0.0.1:{silent.getsockname()[1]}", **settings)


async def hold_the_slot(stub, app) -> asyncio.Future:
    """A Recommend that waits on the silent retrieval, once admission counts it in flight."""
    held = asyncio.ensure_future(stub.Recommend(ranking_pb2.RecommendRequest(user_id="1", k=3), timeout=1))
    while app.admission.in_flight < 1:
        await asyncio.sleep(0.01)
    return held


def test_overload_gets_resource_exhausted_at_once(published, loaded):
    root, _ = published
    # The first Recommend holds the only slot.
    with silent_retrieval_config(root, max_in_flight=1, max_concurrency=1) as cfg:

        async def main():
            async with serve(cfg, state=loaded) as (stub, _, app):
                first = await hold_the_slot(stub, app)
                before = sample("ranking_requests_total", method="Rank", code="RESOURCE_EXHAUSTED")
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await stub.Rank(ranking_pb2.RankRequest(user_id="1", item_ids=[1]), timeout=3)
                assert sample("ranking_requests_total", method="Rank", code="RESOURCE_EXHAUSTED") == before + 1
                # The held request still answers within its deadline, from the popular fallback.
                reply = await first
                assert common_pb2.DEGRADED_PATH_POPULAR_FALLBACK in reply.degraded
                return error.value

        error = run(main())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "too many requests in flight" in error.details()


def test_grpc_refuses_calls_beyond_admission_plus_headroom_before_the_servicer(published, loaded):
    # gRPC's own limit (runtime.rpc_limit) is admission's max_in_flight plus room for unadmitted
    # RPCs. Fill it: health watches (never admitted) take the headroom, a Recommend waiting on a
    # silent retrieval holds admission's only place. The next call is refused by gRPC itself
    # (its message, no servicer, nothing counted); once a watch ends, admission answers again
    # and counts its refusal.
    root, _ = published
    with silent_retrieval_config(root, max_in_flight=1, max_concurrency=1) as cfg:
        assert rpc_limit(cfg.max_in_flight) == 1 + UNADMITTED_HEADROOM

        async def main():
            async with serve(cfg, state=loaded) as (stub, channel, app):
                health = health_pb2_grpc.HealthStub(channel)
                watches = [health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
                           for _ in range(UNADMITTED_HEADROOM)]
                for watch in watches:
                    await watch.read()                     # each watch is active on the server
                held = await hold_the_slot(stub, app)
                seen = sample("ranking_requests_total", method="Rank", code="RESOURCE_EXHAUSTED")
                full = sample("ranking_refused_total", reason="full")
                with pytest.raises(grpc.aio.AioRpcError) as by_grpc:
                    await stub.Rank(ranking_pb2.RankRequest(user_id="1", item_ids=[1]), timeout=3)
                unseen = (sample("ranking_requests_total", method="Rank", code="RESOURCE_EXHAUSTED") == seen
                          and sample("ranking_refused_total", reason="full") == full)
                watches[0].cancel()
                while True:                                # until gRPC has counted the watch out
                    try:
                        await stub.Rank(ranking_pb2.RankRequest(user_id="1", item_ids=[1]), timeout=3)
                    except grpc.aio.AioRpcError as error:
                        if "Concurrent RPC limit" in (error.details() or ""):
                            await asyncio.sleep(0.01)
                            continue
                        by_admission = error
                        break
                counted = sample("ranking_refused_total", reason="full") - full
                for watch in watches[1:]:
                    watch.cancel()
                await held
                return by_grpc.value, unseen, by_admission, counted

        by_grpc, unseen, by_admission, counted = run(main())
    assert by_grpc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert by_grpc.details() == "Concurrent RPC limit exceeded!" and unseen
    assert by_admission.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many requests in flight" in by_admission.details() and counted == 1


def test_admission_drops_expired_queued_work_and_refuses_what_cannot_finish_in_time(published, loaded):
    root, _ = published
    # A retrieval that never answers: each Recommend holds the only slot until its popular fallback.
    # No queue limit: the deadline alone decides here (the limit has its own test in test_admission.py).
    with silent_retrieval_config(root, max_concurrency=1, max_in_flight=64, default_deadline_ms=300,
                                 max_queue_ms=0) as cfg:

        async def holding(stub, app, timeout_s: float) -> asyncio.Future:
            held = asyncio.ensure_future(
                stub.Recommend(ranking_pb2.RecommendRequest(user_id="1", k=3), timeout=timeout_s))
            while app.admission.running < 1:
                await asyncio.sleep(0.01)
            return held

        async def main():
            async with serve(cfg, state=loaded) as (stub, _, app):
                rank = ranking_pb2.RankRequest(user_id="1", item_ids=[1])
                expired = sample("ranking_expired_total")
                # No completion yet (the estimate is 0): a Rank with the server's 300 ms default deadline
                # is admitted, queues behind the held Recommend and is dropped unstarted when time runs out.
                held = await holding(stub, app, 1.5)
                with pytest.raises(grpc.aio.AioRpcError) as dropped:
                    await stub.Rank(rank)
                assert sample("ranking_expired_total") == expired + 1
                await held                     # ~1.5 s in the slot: the service-time estimate now
                refused = (sample("ranking_refused_total", reason="deadline"),
                           sample("ranking_requests_total", method="Rank", code="RESOURCE_EXHAUSTED"))
                held = await holding(stub, app, 1.5)
                # 0.5 s left < the ~1.5 s queue wait + ~1.5 s of service: refused at once, not queued.
                call = stub.Rank(rank, timeout=0.5)
                with pytest.raises(grpc.aio.AioRpcError) as refusal:
                    await call
                refused_before_the_slot_freed = not held.done()
                trailers = dict(await call.trailing_metadata())
                assert (sample("ranking_refused_total", reason="deadline"),
                        sample("ranking_requests_total", method="Rank", code="RESOURCE_EXHAUSTED")) == (
                    refused[0] + 1, refused[1] + 1)
                # A Rank with time enough queues for the slot and is answered.
                answered = await stub.Rank(rank, timeout=10)
                await held
                return dropped.value, refusal.value, refused_before_the_slot_freed, trailers, answered

        dropped, refusal, at_once, trailers, answered = run(main())
    assert dropped.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "waited for a slot" in dropped.details()
    assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "cannot finish within the deadline" in refusal.details() and at_once
    assert trailers["grpc-retry-pushback-ms"] == "-1"
    assert [item.item_id for item in answered.items] == [1]


def test_a_request_expected_to_queue_longer_than_the_limit_is_refused_though_its_deadline_is_far(published, loaded):
    """RANKING_MAX_QUEUE_MS: with a ~1 s service time and the only slot taken, a Rank with 10 s left
    (which the deadline alone would queue and answer) is refused at once, reason ``queue``, with the
    expected wait as its retry pushback."""
    root, _ = published
    with silent_retrieval_config(root, max_concurrency=1, max_in_flight=64, max_queue_ms=50) as cfg:

        async def main():
            async with serve(cfg, state=loaded) as (stub, _, app):
                await (await hold_the_slot(stub, app))     # ~1 s in the slot: the service-time estimate
                before = sample("ranking_refused_total", reason="queue")
                held = await hold_the_slot(stub, app)
                call = stub.Rank(ranking_pb2.RankRequest(user_id="1", item_ids=[1]), timeout=10)
                with pytest.raises(grpc.aio.AioRpcError) as refusal:
                    await call
                at_once = not held.done()
                trailers = dict(await call.trailing_metadata())
                await held
                return refusal.value, at_once, trailers, sample("ranking_refused_total", reason="queue") - before

        refusal, at_once, trailers, counted = run(main())
    assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and at_once and counted == 1
    assert "the queue is too long" in refusal.details() and "limit 50 ms" in refusal.details()
    assert 500 <= int(trailers["grpc-retry-pushback-ms"]) <= 2000     # ~ the 1 s wait for the slot


def test_retrieval_down_with_fallback_disabled_is_unavailable(published, loaded):
    root, _ = published

    async def main():
        async with serve(config(root, fallback="unavailable"), state=loaded) as (stub, _, _):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.Recommend(ranking_pb2.RecommendRequest(user_id="1", k=3), timeout=5)
            return error.value

    error = run(main())
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "fallback is disabled" in error.details()


def test_redis_refusing_recorded_interactions_is_unavailable(published, loaded):
    root, _ = published
    cfg = config(root, redis_url=f"redis://127.0.0.1:{free_port()}/0")

    async def main():
        async with serve(cfg, state=loaded) as (stub, _, _):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.RecordInteractions(ranking_pb2.RecordInteractionsRequest(
                    interactions=[common_pb2.Interaction(user_id="1", item_id=3)]), timeout=5)
            return error.value

    error = run(main())
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "did not take the interactions" in error.details()


class _BrokenRanker:
    signature = RANKER

    def __call__(self, item_idx, **_):
        raise RuntimeError("a bug deep inside the model")


def test_unexpected_errors_are_internal_without_a_traceback(published, loaded, caplog):
    root, _ = published
    broken = dataclasses.replace(loaded, ranker=_BrokenRanker())

    async def main():
        async with serve(config(root), state=broken) as (stub, _, _):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.Rank(ranking_pb2.RankRequest(user_id="1", item_ids=[1]), timeout=5,
                                metadata=((REQUEST_ID_KEY, "req-42"),))
            return error.value

    error = run(main())
    assert error.code() == grpc.StatusCode.INTERNAL and error.details() == "internal error"
    logged = [r for r in caplog.records if r.levelname == "ERROR" and getattr(r, "request_id", "") == "req-42"]
    assert logged and "a bug deep inside the model" in logged[0].exc_text
