"""Offline/online parity: the served top-k and scores equal the trainer's eager models on the same inputs.

The guard against training/serving skew. Offline: the trainer's eager two-tower scores every item
for the user (dot product / temperature), drops the user's training items, and the eager DCN scores
those candidates with their retrieval scores. Online: Recommend through both services with the
version's features in Redis. Asking for every candidate keeps ANN boundary ties out of the comparison.
"""

from __future__ import annotations

import numpy as np
import redis
import torch

from recsys_contracts import feature_store
from recsys_contracts.v1 import common_pb2, ranking_pb2
from tests.ranking.harness import run
from tests.ranking.test_recommend import both
from trainer.inputs import item_inputs, user_inputs
from trainer.publish import all_item_embeddings, materialize_features

TS = 1_234_567_890
K = 10


@torch.no_grad()
def offline_top_k(tiny, user_idx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item ids (K,), scores (K,), retrieval scores (K,)) by the eager modules."""
    tables = tiny.tables
    user = tiny.two_tower.user_tower(**user_inputs(tables, np.array([user_idx]), np.array([TS])))   # (1, D)
    items = torch.as_tensor(all_item_embeddings(tiny.two_tower, tables))                             # (m+1, D)
    retrieval = (user @ items.T / tiny.two_tower.temperature)[0].numpy()                             # (m+1,)
    seen = tables.seen_items[tables.seen_indptr[user_idx]:tables.seen_indptr[user_idx + 1]]
    candidates = np.setdiff1d(np.arange(1, tables.vocab.n_items + 1), seen)                        # (N,)
    n = candidates.size
    inputs = {**user_inputs(tables, np.full(n, user_idx), np.full(n, TS)), **item_inputs(tables, candidates),
              "retrieval_score": torch.as_tensor(retrieval[candidates])}
    logit, _ = tiny.ranker(**inputs)
    ctr = torch.sigmoid(logit).numpy()                                                              # (N,)
    top = np.argsort(-ctr, kind="stable")[:K]
    return tables.vocab.item_ids[candidates[top]], ctr[top], retrieval[candidates[top]]


def test_served_top_k_equals_the_offline_pipeline(published, loaded, retrieval_loaded, tiny, redis_url,
                                                  redis_namespace):
    root, version = published
    client = redis.Redis.from_url(redis_url)
    materialize_features(client, feature_store.KeyFormat(redis_namespace), version, tiny.tables)
    client.close()
    users = [str(u) for u in tiny.tables.vocab.user_ids[1:6]]
    request = dict(k=K, context=common_pb2.Context(timestamp_s=TS),
                   options=ranking_pb2.RecommendOptions(num_candidates=tiny.tables.vocab.n_items))

    async def main():
        async with both(root, loaded, retrieval_loaded, redis_url, redis_namespace) as (stub, _):
            return [await stub.Recommend(ranking_pb2.RecommendRequest(user_id=u, **request), timeout=5) for u in users]

    replies = run(main())
    for user_id, reply in zip(users, replies):
        assert list(reply.degraded) == [], user_id
        ids, scores, retrieval = offline_top_k(tiny, int(tiny.tables.vocab.users_to_idx([user_id])[0]))
        assert [item.item_id for item in reply.items] == ids.tolist(), user_id
        np.testing.assert_allclose([item.score for item in reply.items], scores, atol=1e-5)
        np.testing.assert_allclose([item.retrieval_score for item in reply.items], retrieval, atol=1e-4)
        assert all(item.ctr == item.score for item in reply.items)          # the version's score_mode is "ctr"
