"""Degradation with real processes: Redis killed / frozen / flushed during traffic, retrieval frozen / killed.

Every request carries a client deadline, so "never hangs past the deadline" shows up as an answer
instead of DEADLINE_EXCEEDED; waits for background work (the refill) poll with a generous bound.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from recsys_contracts.feature_store import KeyFormat
from recsys_contracts.v1 import common_pb2, ranking_pb2, retrieval_pb2, retrieval_pb2_grpc
from tests.ranking.harness import RetrievalProcess, config, health_status, run, sample, serve, serve_retrieval

FROM_ARTIFACT = common_pb2.DEGRADED_PATH_FEATURES_FROM_ARTIFACT
POPULAR = common_pb2.DEGRADED_PATH_POPULAR_FALLBACK
SERVING = 1
NAMESPACE = "degrade"


async def until(predicate, timeout_s: float = 20.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"{what} never held")
        await asyncio.sleep(0.05)


class Traffic:
    """Recommend in a loop (1 s client deadline each); keeps every outcome: a set of flags or an error code."""

    def __init__(self, stub) -> None:
        self.stub, self.outcomes = stub, []
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            try:
                reply = await self.stub.Recommend(ranking_pb2.RecommendRequest(user_id="1", k=5), timeout=1.0)
                self.outcomes.append(frozenset(reply.degraded))
            except grpc.aio.AioRpcError as error:
                self.outcomes.append(error.code())
            await asyncio.sleep(0.005)

    def last(self):
        return self.outcomes[-1] if self.outcomes else None

    def after(self, mark: int) -> list:
        return self.outcomes[mark:]

    async def stop(self) -> list:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        return self.outcomes


def marker_present(redis_server, version: int) -> bool:
    client = redis_server.client()
    try:
        return client.get(KeyFormat(NAMESPACE).complete(version)) == b"1"
    except Exception:  # noqa: BLE001 - down or frozen counts as "not present"
        return False
    finally:
        client.close()


@contextlib.asynccontextmanager
async def ranking_with_redis(published, loaded, retrieval_loaded, redis_server):
    root, version = published
    async with serve_retrieval(root, retrieval_loaded) as (target, _):
        cfg = config(root, retrieval_target=target, redis_url=redis_server.url, redis_namespace=NAMESPACE)
        async with serve(cfg, state=loaded) as (stub, channel, app):
            # The fresh Redis lacks the version: the service fills it from the artifact on its own.
            await until(lambda: marker_present(redis_server, version), what="initial refill")
            traffic = Traffic(stub)
            await until(lambda: traffic.last() == frozenset(), what="a normal answer")
            yield traffic, channel


def _check(outcomes: list) -> None:
    errors = [o for o in outcomes if not isinstance(o, frozenset)]
    assert not errors, f"requests failed during the outage: {errors[:5]}"


def test_redis_killed_then_restarted_empty_is_refilled(published, loaded, retrieval_loaded, private_redis):
    version = published[1]

    async def main():
        async with ranking_with_redis(published, loaded, retrieval_loaded, private_redis) as (traffic, channel):
            degraded = sample("ranking_degraded_total", path="DEGRADED_PATH_FEATURES_FROM_ARTIFACT")
            refills = sample("ranking_redis_refills_total")
            private_redis.kill()
            mark = len(traffic.outcomes)
            await until(lambda: FROM_ARTIFACT in (traffic.last() or ()), what="artifact answers")
            assert await health_status(channel) == SERVING
            assert sample("ranking_degraded_total", path="DEGRADED_PATH_FEATURES_FROM_ARTIFACT") > degraded
            assert sample("ranking_redis_errors_total", operation="read") >= 1
            private_redis.start()                                     # back, and empty
            await until(lambda: marker_present(private_redis, version), what="refill")
            await until(lambda: traffic.last() == frozenset(), what="normal answers again")
            assert sample("ranking_redis_refills_total") >= refills + 1
            return traffic.after(mark), await traffic.stop()

    during, everything = run(main())
    _check(everything)
    assert any(FROM_ARTIFACT in o for o in during)


def test_redis_frozen_answers_within_the_deadline_from_the_artifact(published, loaded, retrieval_loaded,
                                                                    private_redis):
    async def main():
        async with ranking_with_redis(published, loaded, retrieval_loaded, private_redis) as (traffic, channel):
            private_redis.freeze()
            mark = len(traffic.outcomes)
            await until(lambda: len(traffic.outcomes) > mark + 20, what="20 answers while frozen")
            assert await health_status(channel) == SERVING
            frozen = traffic.after(mark)
            private_redis.resume()
            await until(lambda: traffic.last() == frozenset(), what="normal answers after SIGCONT")
            return frozen, await traffic.stop()

    frozen, everything = run(main())
    _check(everything)
    assert all(FROM_ARTIFACT in o for o in frozen[1:])


def test_redis_flushed_is_refilled_and_answers_meanwhile(published, loaded, retrieval_loaded, private_redis):
    version = published[1]

    async def main():
        async with ranking_with_redis(published, loaded, retrieval_loaded, private_redis) as (traffic, _):
            client = private_redis.client()
            client.flushall()
            client.close()
            mark = len(traffic.outcomes)
            await until(lambda: marker_present(private_redis, version), what="refill after FLUSHALL")
            await until(lambda: traffic.last() == frozenset(), what="normal answers again")
            return traffic.after(mark), await traffic.stop()

    after_flush, everything = run(main())
    _check(everything)
    assert all(o <= {FROM_ARTIFACT} for o in after_flush)


def test_frozen_redis_opens_the_breaker_and_it_closes_after_resume(published, loaded, retrieval_loaded,
                                                                   private_redis):
    # While Redis is frozen only the reads the breaker lets through (the 2 that open it, then one probe
    # per 300 ms cool-down) wait out the 500 ms Redis timeout; the others, and writes, skip Redis.
    root, version = published
    transitions = "ranking_redis_breaker_transitions_total"

    def counters() -> dict[str, float]:
        return {"errors": sample("ranking_redis_errors_total", operation="read"),
                "record_errors": sample("ranking_redis_errors_total", operation="record"),
                "skipped": sample("ranking_redis_skipped_total"),
                **{to: sample(transitions, to=to) for to in ("open", "half_open", "closed")}}

    async def main():
        async with serve_retrieval(root, retrieval_loaded) as (target, _):
            cfg = config(root, retrieval_target=target, redis_url=private_redis.url, redis_namespace=NAMESPACE,
                         redis_timeout_ms=500, redis_breaker_failures=2, redis_breaker_cooldown_ms=300)
            async with serve(cfg, state=loaded) as (stub, _, _):
                await until(lambda: marker_present(private_redis, version), what="initial refill")
                assert not (await _recommend(stub, timeout=10)).degraded
                before = counters()
                private_redis.freeze()
                try:
                    frozen = [await _recommend(stub, timeout=5) for _ in range(30)]
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await stub.RecordInteractions(ranking_pb2.RecordInteractionsRequest(
                            interactions=[common_pb2.Interaction(user_id="1", item_id=1)]), timeout=5)
                    state_while_frozen = sample("ranking_redis_breaker_state")
                    during = counters()
                finally:
                    private_redis.resume()
                for _ in range(200):      # the next probe after the cool-down finds Redis back
                    last = await _recommend(stub, timeout=5)
                    if not last.degraded:
                        break
                    await asyncio.sleep(0.05)
                return frozen, refused.value, state_while_frozen, before, during, counters(), last

    frozen, refused, state_while_frozen, before, during, after, last = run(main())
    delta = {key: during[key] - before[key] for key in before}
    assert all(FROM_ARTIFACT in reply.degraded for reply in frozen)
    assert delta["open"] >= 1 and state_while_frozen in (1, 2)
    assert delta["errors"] + delta["skipped"] == 30          # every frozen read failed or skipped Redis
    assert delta["errors"] == 2 + delta["half_open"]         # only the opening reads and the probes waited
    assert delta["skipped"] > delta["errors"]
    assert refused.code() == grpc.StatusCode.UNAVAILABLE and "circuit breaker open" in refused.details()
    assert delta["record_errors"] == 0                       # refused without touching Redis
    assert not last.degraded
    assert after["closed"] - during["closed"] >= 1 and sample("ranking_redis_breaker_state") == 0


@pytest.fixture(scope="module")
def retrieval_process(published):
    process = RetrievalProcess(published[0])
    try:
        process.wait_serving()
        yield process
    finally:
        process.kill()


async def _recommend(stub, timeout: float = 1.0):
    return await stub.Recommend(ranking_pb2.RecommendRequest(user_id="1", k=5), timeout=timeout)


@contextlib.asynccontextmanager
async def two_rankings(root, loaded, target):
    """One ranking server falling back to popular items, one configured to fail UNAVAILABLE."""
    async with serve(config(root, retrieval_target=target), state=loaded) as (popular, channel, _):
        async with serve(config(root, retrieval_target=target, fallback="unavailable"),
                         state=loaded) as (strict, _, _):
            yield popular, strict, channel


async def _degraded_answers(popular, strict, channel):
    reply = await _recommend(popular)
    assert POPULAR in reply.degraded and len(reply.items) == 5 and reply.retrieval_version == 0
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _recommend(strict)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await health_status(channel) == SERVING


def test_retrieval_frozen_falls_back_within_the_deadline(published, loaded, retrieval_process):
    root, version = published

    async def main():
        async with two_rankings(root, loaded, retrieval_process.target) as (popular, strict, channel):
            assert (await _recommend(popular, timeout=10)).retrieval_version == version   # connected, warm
            assert (await _recommend(strict, timeout=10)).retrieval_version == version
            timeouts = sample("ranking_retrieval_failures_total", code="DEADLINE_EXCEEDED")
            retrieval_process.freeze()
            try:
                await _degraded_answers(popular, strict, channel)
            finally:
                retrieval_process.resume()
            assert sample("ranking_retrieval_failures_total", code="DEADLINE_EXCEEDED") == timeouts + 2
            reply = await _recommend(popular, timeout=10)
            assert reply.retrieval_version == version and POPULAR not in reply.degraded

    run(main())


def test_retrieval_frozen_opens_the_retrieval_breaker_and_it_closes_after_resume(published, loaded,
                                                                                 retrieval_process):
    # After 2 timeouts in a row Recommends skip retrieval (popular fallback at once) until a probe,
    # one per 300 ms cool-down, finds it answering again.
    root, version = published
    failures, transitions = "ranking_retrieval_failures_total", "ranking_retrieval_breaker_transitions_total"

    def counters() -> dict[str, float]:
        return {"timeouts": sample(failures, code="DEADLINE_EXCEEDED"),
                "skipped": sample(failures, code="CIRCUIT_OPEN"),
                **{to: sample(transitions, to=to) for to in ("open", "half_open", "closed")}}

    async def main():
        cfg = config(root, retrieval_target=retrieval_process.target, retrieval_breaker_failures=2,
                     retrieval_breaker_cooldown_ms=300, retrieval_timeout_multiplier=0.0)   # the whole budget
        async with serve(cfg, state=loaded) as (stub, _, _):
            assert (await _recommend(stub, timeout=10)).retrieval_version == version   # connected, warm
            before = counters()
            retrieval_process.freeze()
            try:
                frozen = [await _recommend(stub, timeout=1.0) for _ in range(20)]
                state_while_frozen = sample("ranking_retrieval_breaker_state")
                during = counters()
            finally:
                retrieval_process.resume()
            for _ in range(200):
                last = await _recommend(stub, timeout=10)
                if POPULAR not in last.degraded:
                    break
                await asyncio.sleep(0.05)
            return frozen, state_while_frozen, before, during, last

    frozen, state_while_frozen, before, during, last = run(main())
    delta = {key: during[key] - before[key] for key in before}
    assert all(POPULAR in reply.degraded and len(reply.items) == 5 for reply in frozen)
    assert delta["open"] >= 1 and state_while_frozen in (1, 2)
    assert delta["timeouts"] + delta["skipped"] == 20
    assert delta["timeouts"] == 2 + delta["half_open"] and delta["skipped"] > delta["timeouts"]
    assert last.retrieval_version == version and POPULAR not in last.degraded
    assert sample("ranking_retrieval_breaker_state") == 0


def test_calls_stuck_past_the_adaptive_cut_open_the_breaker_and_stop_waiting_a_lone_slow_one_is_answered(
        published, loaded, retrieval_process):
    # Primed by 60 answered calls, a Retrieve still waiting after max(50 ms, 2 x their p99) is a suspect:
    # one failure towards the breaker (2 in a row open it here), and it keeps waiting. A lone slow call
    # (retrieval frozen, then resumed before the request's 3 s budget ends) is answered by retrieval as
    # usual; four calls stuck at once open the breaker and all stop waiting at once: popular items,
    # SLOW, long before their budgets (~2.95 s) end.
    root, version = published
    failures, opened = "ranking_retrieval_failures_total", "ranking_retrieval_breaker_transitions_total"

    async def main():
        cfg = config(root, retrieval_target=retrieval_process.target, retrieval_breaker_failures=2,
                     retrieval_breaker_cooldown_ms=60_000, retrieval_timeout_multiplier=2.0,
                     retrieval_timeout_floor_ms=50)
        async with serve(cfg, state=loaded) as (stub, _, app):
            for _ in range(60):
                assert (await _recommend(stub, timeout=10)).retrieval_version == version
            cut_s = app.pipeline.retrieval_timeout.timeout_s()
            loop = asyncio.get_running_loop()
            counts = lambda: (sample(failures, code="SLOW"), sample(opened, to="open"))   # noqa: E731
            start = counts()
            retrieval_process.freeze()
            try:
                lone = asyncio.ensure_future(_recommend(stub, timeout=3.0))
                await asyncio.sleep(cut_s + 0.3)              # past its cut: a suspect, still waiting
            finally:
                retrieval_process.resume()
            lone_reply = await lone
            after_lone = counts()
            retrieval_process.freeze()
            try:
                began = loop.time()
                stuck = await asyncio.gather(*(_recommend(stub, timeout=3.0) for _ in range(4)))
                waited = loop.time() - began
                after_stuck = counts()
            finally:
                retrieval_process.resume()
            return cut_s, start, lone_reply, after_lone, stuck, waited, after_stuck

    cut_s, start, lone_reply, after_lone, stuck, waited, after_stuck = run(main())
    assert 0.05 <= cut_s < 1.0                      # the floor or 2 x a loopback call's p99, far below 3 s
    assert lone_reply.retrieval_version == version and POPULAR not in lone_reply.degraded
    assert after_lone == start                      # no SLOW answer, the breaker stayed closed
    assert all(POPULAR in reply.degraded and len(reply.items) == 5 for reply in stuck)
    assert after_stuck[0] - start[0] == 4 and after_stuck[1] - start[1] == 1
    assert waited < 1.5                             # cut near cut_s; the budgets would have held ~2.95 s


class _SlowForSome(retrieval_pb2_grpc.RetrievalServiceServicer):
    """A real gRPC retrieval stand-in: answers every RetrieveAll with the same candidates of version 1,
    after ``slow_s`` for the users in ``slow_users`` and at once for the others (alive, only slower for
    some calls, as while a version loads)."""

    def __init__(self, ids: list[int], slow_users: set[str], slow_s: float) -> None:
        self.ids, self.slow_users, self.slow_s = ids, slow_users, slow_s

    async def RetrieveAll(self, request, context):
        if request.user_id in self.slow_users:
            await asyncio.sleep(self.slow_s)
        return retrieval_pb2.RetrieveResponse(item_ids=self.ids, scores=[1.0 - i / 100 for i in range(len(self.ids))],
                                              model_version=1)


def test_calls_past_the_adaptive_cut_while_retrieval_answers_others_are_not_counted_and_get_their_answer(
        published, loaded):
    # Slow calls (0.6 s, far past the ~50 ms cut) while other calls keep being answered: retrieval is
    # alive, so they count nothing towards the breaker (2 in a row would open it), and each gets its
    # own answer from retrieval, not popular items.
    root, _ = published
    ids = [int(i) for i in loaded.tables.item_ids[1:31]]
    failures, opened = "ranking_retrieval_failures_total", "ranking_retrieval_breaker_transitions_total"

    async def main():
        server = grpc.aio.server()
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(_SlowForSome(ids, {"2"}, 0.6), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            cfg = config(root, retrieval_target=f"127.0.0.1:{port}", retrieval_breaker_failures=2,
                         retrieval_breaker_cooldown_ms=60_000, retrieval_timeout_multiplier=2.0,
                         retrieval_timeout_floor_ms=50)
            async with serve(cfg, state=loaded) as (stub, _, app):
                for _ in range(60):
                    assert POPULAR not in (await _recommend(stub, timeout=10)).degraded
                cut_s = app.pipeline.retrieval_timeout.timeout_s()
                before = sample(failures, code="SLOW"), sample(opened, to="open")
                slow = [asyncio.ensure_future(stub.Recommend(ranking_pb2.RecommendRequest(user_id="2", k=5),
                                                             timeout=3.0)) for _ in range(3)]
                fast = []
                while not all(call.done() for call in slow):
                    fast.append(await _recommend(stub, timeout=3.0))
                    await asyncio.sleep(0.02)
                after = sample(failures, code="SLOW"), sample(opened, to="open")
                return cut_s, before, after, [call.result() for call in slow], fast
        finally:
            await server.stop(0)

    cut_s, before, after, slow, fast = run(main())
    assert cut_s < 0.6                              # the slow calls ran past their cut
    assert after == before                          # nothing counted, the breaker stayed closed
    assert len(fast) >= 5 and all(POPULAR not in reply.degraded for reply in fast)
    assert all(POPULAR not in reply.degraded and reply.retrieval_version == 1 for reply in slow)


def test_retrieval_killed_falls_back_or_is_unavailable(published, loaded, retrieval_process):
    root, version = published

    async def main():
        async with two_rankings(root, loaded, retrieval_process.target) as (popular, strict, channel):
            assert (await _recommend(popular, timeout=10)).retrieval_version == version
            refused = sample("ranking_retrieval_failures_total", code="UNAVAILABLE")
            retrieval_process.kill()
            await _degraded_answers(popular, strict, channel)
            assert sample("ranking_retrieval_failures_total", code="UNAVAILABLE") >= refused + 2

    run(main())


class _MisalignedRetrieval(retrieval_pb2_grpc.RetrievalServiceServicer):
    """A broken peer (a real gRPC server): one good chunk, then one with more item ids than scores."""

    def __init__(self, good_ids: list[int]) -> None:
        self.good_ids = good_ids

    async def Retrieve(self, request, context):
        yield retrieval_pb2.RetrieveResponse(item_ids=self.good_ids, scores=[1.0] * len(self.good_ids),
                                             model_version=1)
        yield retrieval_pb2.RetrieveResponse(item_ids=[1, 2, 3], scores=[0.5], model_version=1)


def test_misaligned_chunk_from_retrieval_is_a_retrieval_failure_answered_from_popular_items(published, loaded):
    root, _ = published
    good = [int(i) for i in loaded.tables.item_ids[1:4]]

    async def main():
        server = grpc.aio.server()
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(_MisalignedRetrieval(good), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            cfg = config(root, retrieval_target=f"127.0.0.1:{port}")
            async with serve(cfg, state=loaded) as (stub, _, _):
                failures = sample("ranking_retrieval_failures_total", code="DATA_LOSS")
                reply = await _recommend(stub, timeout=5)
                assert sample("ranking_retrieval_failures_total", code="DATA_LOSS") == failures + 1
                return reply
        finally:
            await server.stop(0)

    reply = run(main())
    assert POPULAR in reply.degraded
    assert reply.retrieval_version == 1                     # the version the peer's first (good) chunk named
    ids = [item.item_id for item in reply.items]
    assert len(ids) == len(set(ids)) == 5


def test_an_overloaded_retrieval_is_throttled_popular_items_answer_and_its_breaker_stays_closed(published, loaded):
    """Retrieval refuses every call (RESOURCE_EXHAUSTED, pushback -1): every Recommend is answered from
    popular items, most without a call to retrieval (THROTTLED), and none counts against the breaker."""
    from tests.ranking.test_retrieval_client import Methods, Refusing

    root, _ = published
    failures = "ranking_retrieval_failures_total"

    async def main():
        methods = Methods()
        retrieval = grpc.aio.server(interceptors=(methods,))
        retrieval.add_generic_rpc_handlers((Refusing().handlers(),))
        port = retrieval.add_insecure_port("127.0.0.1:0")
        await retrieval.start()
        try:
            cfg = config(root, retrieval_target=f"127.0.0.1:{port}", retrieval_breaker_failures=2)
            async with serve(cfg, state=loaded) as (stub, _, _):
                before = {code: sample(failures, code=code) for code in ("RESOURCE_EXHAUSTED", "THROTTLED")}
                replies = [await _recommend(stub, timeout=5) for _ in range(200)]
                after = {code: sample(failures, code=code) for code in before}
                return replies, len(methods.seen), {code: after[code] - before[code] for code in before}, \
                    sample("ranking_retrieval_breaker_state")
        finally:
            await retrieval.stop(0)

    replies, reached, counted, breaker = run(main())
    assert all(POPULAR in reply.degraded and len(reply.items) == 5 for reply in replies)
    assert 50 <= reached <= 100, reached
    assert counted == {"RESOURCE_EXHAUSTED": reached, "THROTTLED": 200 - reached}
    assert breaker == 0
