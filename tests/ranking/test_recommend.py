"""Recommend end to end against the real retrieval service (both in process, real gRPC, real Redis)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import grpc
import numpy as np
import pytest
import redis

from ranking_service.state import ScoreRule, ranker_inputs, retrieval_scores, run_ranker
from recsys_contracts import feature_store
from recsys_contracts.v1 import common_pb2, ranking_pb2
from recsys_serving.runtime import REQUEST_ID_KEY
from tests.ranking.harness import config, run, serve, serve_retrieval
from trainer.publish import materialize_features

TS = 1_000_000


def recommend(user_id: str = "1", k: int = 5, **fields) -> ranking_pb2.RecommendRequest:
    return ranking_pb2.RecommendRequest(user_id=user_id, k=k, context=common_pb2.Context(timestamp_s=TS), **fields)


@contextlib.asynccontextmanager
async def both(root, loaded, retrieval_loaded, redis_url=None, namespace="recsys", retrieval=None, **ranking):
    """Retrieval and ranking in this loop, sharing Redis (or none)."""
    async with serve_retrieval(root, retrieval_loaded, redis_url=redis_url, redis_namespace=namespace,
                               **(retrieval or {})) as (target, _):
        cfg = config(root, retrieval_target=target, redis_url=redis_url, redis_namespace=namespace, **ranking)
        async with serve(cfg, state=loaded) as (stub, channel, app):
            yield stub, app


@pytest.fixture
def materialized(redis_url, redis_namespace, published, tiny):
    client = redis.Redis.from_url(redis_url)
    materialize_features(client, feature_store.KeyFormat(redis_namespace), published[1], tiny.tables)
    client.close()
    return redis_url, redis_namespace


def test_recommend_returns_k_unseen_items_best_first_from_both_versions(published, loaded, retrieval_loaded,
                                                                         materialized):
    root, version = published
    url, namespace = materialized

    async def main():
        async with both(root, loaded, retrieval_loaded, url, namespace) as (stub, _):
            return await stub.Recommend(recommend(), timeout=5)

    reply = run(main())
    assert (reply.ranking_version, reply.retrieval_version) == (version, version)
    assert list(reply.degraded) == []
    assert len(reply.items) == 5
    scores = [item.score for item in reply.items]
    assert scores == sorted(scores, reverse=True)
    seen = set(loaded.tables.item_ids[loaded.tables.seen(loaded.user_index["1"])].tolist())
    assert not seen & {item.item_id for item in reply.items}
    assert all(item.retrieval_score != 0 and 0 < item.ctr < 1 for item in reply.items)


def _rank_one(stub, user_id, item_id):
    return stub.Rank(ranking_pb2.RankRequest(user_id=user_id, item_ids=[item_id],
                                             context=common_pb2.Context(timestamp_s=TS)), timeout=5)


def _expected_ctr(state, user_id: str, history: np.ndarray, item_idx: int) -> float:
    user = state.user_index[user_id]
    view = dict(user_idx=user, user_cat=state.tables.user_cat[user], user_num=state.tables.user_num[user],
                history=history, timestamp=TS)
    # Rank's retrieval score comes from the same (grown) history, through the user tower.
    score = retrieval_scores(state, item_idx=np.array([item_idx]), **view)
    ctr, _ = run_ranker(state.ranker, ranker_inputs(state, item_idx=np.array([item_idx]), retrieval_score=score,
                                                    **view))
    return float(ctr[0])


@pytest.mark.parametrize("with_redis", [True, False], ids=["redis", "in-process"])
def test_recorded_interaction_is_excluded_and_enters_the_history(published, loaded, retrieval_loaded, redis_url,
                                                                 redis_namespace, tiny, with_redis):
    root, version = published
    url = redis_url if with_redis else None
    if with_redis:
        client = redis.Redis.from_url(redis_url)
        materialize_features(client, feature_store.KeyFormat(redis_namespace), version, tiny.tables)
        client.close()
    user = loaded.user_index["1"]
    probe = int(loaded.tables.item_ids[loaded.tables.seen(user)[0]])    # an item scored with Rank before/after

    async def main():
        async with both(root, loaded, retrieval_loaded, url, redis_namespace) as (stub, _):
            before = await stub.Recommend(recommend(), timeout=5)
            top = before.items[0].item_id
            recorded = await stub.RecordInteractions(ranking_pb2.RecordInteractionsRequest(interactions=[
                common_pb2.Interaction(user_id="1", item_id=top, rating=4.0, timestamp_s=TS)]), timeout=5)
            after = await stub.Recommend(recommend(), timeout=5)
            ranked = await _rank_one(stub, "1", probe)
            return top, recorded, after, ranked

    top, recorded, after, ranked = run(main())
    assert recorded.recorded == 1
    assert top not in {item.item_id for item in after.items}
    assert list(after.degraded) == []
    history = loaded.tables.history[user]
    grown = np.concatenate([history[history > 0], loaded.items.indices(np.array([top]))])[-history.size:]
    padded = np.zeros_like(history)
    padded[history.size - grown.size:] = grown
    assert ranked.items[0].ctr == pytest.approx(_expected_ctr(loaded, "1", padded, int(loaded.items.indices(
        np.array([probe]))[0])), abs=1e-6)


def test_diversity_rerank_trades_similarity_for_novelty(published, loaded, retrieval_loaded):
    root, _ = published

    def similarity(reply) -> float:
        idx = loaded.items.indices(np.array([item.item_id for item in reply.items]))
        emb = loaded.item_embeddings[idx]                               # (k, D)
        sims = emb @ emb.T                                              # (k, k)
        return float(sims[~np.eye(len(idx), dtype=bool)].mean())

    async def main():
        async with both(root, loaded, retrieval_loaded, diversity=0.9) as (stub, _):
            plain = await stub.Recommend(recommend(k=8, options=ranking_pb2.RecommendOptions(diversity=0.0)),
                                         timeout=5)
            default = await stub.Recommend(recommend(k=8), timeout=5)   # the server default: 0.9
            return plain, default

    plain, diverse = run(main())
    assert plain.items[0].item_id == diverse.items[0].item_id          # MMR always starts with the best item
    assert [i.item_id for i in plain.items] != [i.item_id for i in diverse.items]
    assert similarity(diverse) < similarity(plain)


def test_request_id_travels_to_retrieval_and_its_refusal_is_invalid_argument(published, loaded, retrieval_loaded,
                                                                              caplog):
    root, _ = published
    caplog.set_level(logging.INFO, logger="retrieval_service")

    async def main():
        async with both(root, loaded, retrieval_loaded, retrieval={"max_candidates": 50}) as (stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.Recommend(recommend(options=ranking_pb2.RecommendOptions(num_candidates=100)), timeout=5,
                                     metadata=((REQUEST_ID_KEY, "trace-7f3a"),))
            return error.value

    error = run(main())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("retrieval refused the request:") and "100" in error.details()
    assert any(getattr(record, "request_id", "") == "trace-7f3a" for record in caplog.records
               if record.name.startswith("retrieval_service"))


def test_cold_start_user_with_request_features_is_answered_and_flagged(published, loaded, retrieval_loaded):
    root, _ = published
    features = common_pb2.UserFeatures(categorical={"gender": "F"}, numeric={"age": 30.0},
                                       recent_item_ids=[int(loaded.tables.item_ids[3])])

    async def main():
        async with both(root, loaded, retrieval_loaded) as (stub, _):
            return await stub.Recommend(recommend(user_id="brand-new", user_features=features), timeout=5)

    reply = run(main())
    assert len(reply.items) == 5 and common_pb2.DEGRADED_PATH_COLD_START_USER in reply.degraded
    assert common_pb2.DEGRADED_PATH_DEFAULT_FEATURES not in reply.degraded
    assert int(loaded.tables.item_ids[3]) not in {item.item_id for item in reply.items}   # recent = interacted


def test_ctr_x_rating_blends_the_heads(published, loaded, retrieval_loaded):
    root, _ = published
    blended = dataclasses.replace(loaded, score_rule=ScoreRule("ctr_x_rating", 2.0, 5.0))

    async def main():
        async with both(root, blended, retrieval_loaded) as (stub, _):
            return await stub.Recommend(recommend(k=10), timeout=5)

    reply = run(main())
    for item in reply.items:
        assert item.score == pytest.approx(item.ctr * (item.predicted_rating / 5.0) ** 2, rel=1e-5)
    scores = [item.score for item in reply.items]
    assert scores == sorted(scores, reverse=True)


def test_include_seen_keeps_training_and_fresh_items(published, loaded, retrieval_loaded):
    root, _ = published
    n_items = loaded.tables.n_items
    seen = set(loaded.tables.item_ids[loaded.tables.seen(loaded.user_index["1"])].tolist())
    everything = ranking_pb2.RecommendOptions(num_candidates=n_items, include_seen=True)

    async def main():
        async with both(root, loaded, retrieval_loaded, max_k=n_items, default_candidates=n_items) as (stub, _):
            fresh = (await stub.Recommend(recommend(), timeout=5)).items[0].item_id
            await stub.RecordInteractions(ranking_pb2.RecordInteractionsRequest(
                interactions=[common_pb2.Interaction(user_id="1", item_id=fresh)]), timeout=5)
            hidden = await stub.Recommend(recommend(k=n_items, options=ranking_pb2.RecommendOptions(
                num_candidates=n_items)), timeout=5)
            shown = await stub.Recommend(recommend(k=n_items, options=everything), timeout=5)
            return fresh, {i.item_id for i in hidden.items}, {i.item_id for i in shown.items}

    fresh, hidden, shown = run(main())
    assert fresh not in hidden and not hidden & seen
    assert fresh in shown and seen <= shown and len(shown) == n_items
