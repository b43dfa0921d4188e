"""One Redis read of the user per Recommend: ranking reads the record and passes it to retrieval
(``RetrieveRequest.stored_user``), and retrieval answers from it exactly as from its own read.

Both services run for real (in process, on port 0) against a redis-server of the test's own, whose
``INFO commandstats`` counts the reads: a user read is one pipeline of 3 GETs and 1 LRANGE (the
fresh interactions), so LRANGE calls count user reads.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from recsys_contracts.feature_store import FreshInteraction, UserRecord
from recsys_contracts.v1 import common_pb2, ranking_pb2, retrieval_pb2, retrieval_pb2_grpc
from recsys_serving import wire
from tests.ranking.harness import config, run, sample, serve, serve_retrieval
from tests.processes import free_port
from tests.ranking.test_degradation import NAMESPACE, marker_present, until

FROM_ARTIFACT = common_pb2.DEGRADED_PATH_FEATURES_FROM_ARTIFACT


def lrange_calls(redis_server) -> int:
    client = redis_server.client()
    try:
        return int(client.info("commandstats").get("cmdstat_lrange", {}).get("calls", 0))
    finally:
        client.close()


async def retrieve(stub, request: retrieval_pb2.RetrieveRequest) -> tuple[list[int], list[float], list[int]]:
    chunks = [chunk async for chunk in stub.Retrieve(request, timeout=5)]
    return ([i for c in chunks for i in c.item_ids], [s for c in chunks for s in c.scores],
            list(chunks[0].degraded))


def test_a_recommend_reads_the_user_once_and_retrieval_answers_as_from_its_own_read(
        published, loaded, retrieval_loaded, private_redis):
    root, version = published
    users = [str(u) for u in loaded.tables.user_ids[1:4]] + ["never-seen"]

    async def main():
        async with serve_retrieval(root, retrieval_loaded, redis_url=private_redis.url,
                                   redis_namespace=NAMESPACE) as (target, _):
            cfg = config(root, retrieval_target=target, redis_url=private_redis.url, redis_namespace=NAMESPACE)
            async with serve(cfg, state=loaded) as (stub, _, app):
                await until(lambda: marker_present(private_redis, version), what="initial refill")
                fresh_item = int(loaded.tables.item_ids[7])
                await stub.RecordInteractions(ranking_pb2.RecordInteractionsRequest(interactions=[
                    common_pb2.Interaction(user_id=users[0], item_id=fresh_item, timestamp_s=1_000)]), timeout=5)
                for user in users:                     # warm: connections, batchers
                    await stub.Recommend(ranking_pb2.RecommendRequest(user_id=user, k=5), timeout=5)

                reads, passed, own = (lrange_calls(private_redis), sample("retrieval_user_records_total", source="caller"),
                                      sample("retrieval_user_records_total", source="own"))
                replies = [await stub.Recommend(ranking_pb2.RecommendRequest(user_id=user, k=5), timeout=5)
                           for user in users]
                counts = (lrange_calls(private_redis) - reads,
                          sample("retrieval_user_records_total", source="caller") - passed,
                          sample("retrieval_user_records_total", source="own") - own)

                # Retrieval on its own read and on ranking's read of the same user: the same answer.
                retrieval = retrieval_pb2_grpc.RetrievalServiceStub(grpc.aio.insecure_channel(target))
                pairs = []
                for user in users:
                    request = retrieval_pb2.RetrieveRequest(user_id=user, num_candidates=50)
                    read = await app.features.read_user(version, user)
                    with_read = retrieval_pb2.RetrieveRequest()
                    with_read.CopyFrom(request)
                    with_read.stored_user.CopyFrom(wire.stored_user_message(version, read.record))
                    pairs.append((await retrieve(retrieval, request), await retrieve(retrieval, with_read)))
                return replies, counts, pairs, fresh_item

    replies, counts, pairs, fresh_item = run(main())
    assert counts == (len(users), len(users), 0)          # one read per Recommend, retrieval took it
    assert all(reply.retrieval_version == reply.ranking_version for reply in replies)
    assert fresh_item not in [item.item_id for item in replies[0].items]        # the fresh one is excluded
    assert common_pb2.DEGRADED_PATH_COLD_START_USER in replies[-1].degraded
    for own_read, callers_read in pairs:
        assert own_read == callers_read and len(own_read[0]) == 50
    assert fresh_item not in pairs[0][1][0]


def test_a_failed_read_passed_on_flags_retrieval_as_its_own_failed_read_would(published, retrieval_loaded):
    # Retrieval with a Redis that refuses connections (its own read fails) and retrieval told
    # that ranking's read failed: the same candidates, both flagged FEATURES_FROM_ARTIFACT.
    root, version = published
    user = str(retrieval_loaded.tables.user_ids[2])

    async def main():
        async with serve_retrieval(root, retrieval_loaded, redis_url=f"redis://127.0.0.1:{free_port()}/0",
                                   redis_breaker_failures=1000) as (target, _):
            stub = retrieval_pb2_grpc.RetrievalServiceStub(grpc.aio.insecure_channel(target))
            request = retrieval_pb2.RetrieveRequest(user_id=user, num_candidates=20)
            told = retrieval_pb2.RetrieveRequest(user_id=user, num_candidates=20,
                                                 stored_user=wire.stored_user_message(version, None))
            return await retrieve(stub, request), await retrieve(stub, told)

    own_read, callers_read = run(main())
    assert own_read == callers_read and own_read[2] == [FROM_ARTIFACT]


def _message(**fields) -> retrieval_pb2.StoredUser:
    return retrieval_pb2.StoredUser(version=3, **fields)


def test_stored_user_round_trips_through_the_wire():
    record = UserRecord(row=(np.array([1, 0, 7], np.int64), np.array([0.5, -1.25], np.float32)),
                        history=np.array([5, 9, 2], np.int64), seen=np.array([2, 5, 9], np.int64),
                        fresh=[FreshInteraction(11, 100, 4.5), FreshInteraction(12, 101)])
    back = wire.stored_user(wire.stored_user_message(3, record))
    assert back.version == 3
    np.testing.assert_array_equal(back.record.row[0], record.row[0])
    np.testing.assert_array_equal(back.record.row[1], record.row[1])
    assert back.record.row[1].dtype == np.float32
    np.testing.assert_array_equal(back.record.history, record.history)
    np.testing.assert_array_equal(back.record.seen, record.seen)
    assert back.record.fresh == record.fresh
    assert wire.stored_user(wire.stored_user_message(3, None)).record is None
    no_row = wire.stored_user(_message(history_item_ids=[1]))
    assert no_row.record.row is None and no_row.record.fresh == []


@pytest.mark.parametrize("message, error", [
    (retrieval_pb2.StoredUser(version=0), "stored_user.version must be >= 1, got 0"),
    (_message(store_failed=True, seen_item_ids=[1]),
     "stored_user.seen_item_ids must be empty when stored_user.store_failed is true"),
    (_message(store_failed=True, row=retrieval_pb2.FeatureRow()),
     "stored_user.row must be empty when stored_user.store_failed is true"),
    (_message(row=retrieval_pb2.FeatureRow(categorical=[1, 2**31])),
     "stored_user.row.categorical must be int32 vocabulary indices, got 2147483648"),
    (_message(row=retrieval_pb2.FeatureRow(categorical=[0] * 65536)),
     "stored_user.row.categorical must hold at most 65535 values, got 65536"),
    (_message(row=retrieval_pb2.FeatureRow(numeric=[1.0, float("nan")])), "stored_user.row.numeric must be finite, got nan"),
    (_message(history_item_ids=[3, -4]), "stored_user.history_item_ids must be item ids >= 0, got -4"),
    (_message(seen_item_ids=[0] * 100_001), "stored_user.seen_item_ids must hold at most 100000 ids, got 100001"),
    (_message(fresh=[retrieval_pb2.FreshItem(item_id=-1)]), "stored_user.fresh[0].item_id must be >= 0, got -1"),
    (_message(fresh=[retrieval_pb2.FreshItem(item_id=1, timestamp_s=-5)]),
     "stored_user.fresh[0].timestamp_s must be >= 0, got -5"),
    (_message(fresh=[retrieval_pb2.FreshItem(item_id=1, rating=float("inf"))]),
     "stored_user.fresh[0].rating must be finite, got inf"),
    (_message(fresh=[retrieval_pb2.FreshItem(item_id=1)] * 1001), "stored_user.fresh must hold at most 1000 entries, got 1001"),
])
def test_a_bad_stored_user_is_refused_naming_the_field_and_value(message, error):
    with pytest.raises(wire.InvalidRequest) as refused:
        wire.stored_user(message)
    assert str(refused.value) == error
