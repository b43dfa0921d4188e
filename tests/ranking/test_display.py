"""What Recommend and Rank return for people when asked: titles and genres from the version's
metadata, and the user's history (training log + recorded interactions, newest first)."""

from __future__ import annotations

import re

import grpc
import pytest

from recsys_contracts.v1 import common_pb2, ranking_pb2
from tests.ranking.harness import config, run, serve, serve_retrieval


def _recommend(user_id: str, **options) -> ranking_pb2.RecommendRequest:
    return ranking_pb2.RecommendRequest(user_id=user_id, k=4, context=common_pb2.Context(timestamp_s=1_700_000_000),
                                        options=ranking_pb2.RecommendOptions(**options))


def test_titles_history_and_recorded_interactions(published, loaded, retrieval_loaded):
    root, _ = published

    async def main():
        async with serve_retrieval(root, retrieval_loaded) as (target, _):
            async with serve(config(root, retrieval_target=target), state=loaded) as (stub, _, _):
                plain = await stub.Recommend(_recommend("4"), timeout=10)
                described = await stub.Recommend(_recommend("4", include_item_metadata=True, history_size=3),
                                                 timeout=10)
                await stub.RecordInteractions(ranking_pb2.RecordInteractionsRequest(interactions=[
                    common_pb2.Interaction(user_id="4", item_id=described.items[0].item_id, timestamp_s=1_800_000_000)]),
                    timeout=10)
                after = await stub.Recommend(_recommend("4", history_size=3), timeout=10)
                ranked = await stub.Rank(ranking_pb2.RankRequest(user_id="4", item_ids=[5, 6],
                                                                 include_item_metadata=True), timeout=10)
                return plain, described, after, ranked

    plain, described, after, ranked = run(main())
    assert [i.item_id for i in plain.items] == [i.item_id for i in described.items], "display never changes ranking"
    assert all(i.title == "" and not i.genres for i in plain.items) and not plain.history
    assert all(i.title.startswith(f"Synthetic Movie {i.item_id}") and i.genres for i in described.items)
    times = [h.timestamp_s for h in described.history]
    assert len(times) == 3 and times == sorted(times, reverse=True)
    assert not any(h.fresh for h in described.history) and all(h.title for h in described.history)
    assert after.history[0].item_id == described.items[0].item_id and after.history[0].fresh
    assert after.history[0].timestamp_s == 1_800_000_000 and after.history[0].title == described.items[0].title
    assert [h.item_id for h in after.history[1:]] == [h.item_id for h in described.history[:2]]
    assert sorted(i.item_id for i in ranked.items) == [5, 6]
    assert all(re.fullmatch(rf"Synthetic Movie {i.item_id}( \(\d{{4}}\))?", i.title) for i in ranked.items)


@pytest.mark.parametrize("size", [-1, 51])
def test_history_size_out_of_range_is_invalid_argument(published, loaded, size):
    root, _ = published

    async def main():
        async with serve(config(root), state=loaded) as (stub, _, _):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.Recommend(_recommend("4", history_size=size), timeout=10)
            return error.value

    error = run(main())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == f"options.history_size must be in [0, 50], got {size}"
