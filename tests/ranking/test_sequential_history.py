"""The sequential user tower through both services: an interaction recorded with
``RecordInteractions`` becomes the last item of the sequence the tower reads, so the very next
``Recommend`` is retrieved with the new user vector (real Redis, both real servers in process, a
real exported sequential tower)."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from ranking_service.state import load_state, retrieval_scores
from recsys_contracts import feature_store
from recsys_contracts.v1 import common_pb2, ranking_pb2
from retrieval_service.state import load_state as load_retrieval_state
from tests.factories import publish_tiny_version, tiny_run
from tests.ranking.harness import run
from tests.ranking.test_recommend import TS, both, recommend
from trainer.publish import materialize_features


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """(root, version, run, ranking state, retrieval state) of a tiny version with the sequential tower."""
    root = tmp_path_factory.mktemp("sequential-artifacts")
    trained = tiny_run(0, overrides=("retrieval.user_tower=sequential",))
    version = publish_tiny_version(root, 0, run=trained)
    directory = root / "versions" / str(version)
    return root, version, trained, load_state(directory, version), load_retrieval_state(directory, version, "cpu")


def test_a_recorded_interaction_changes_the_next_recommendation(sequential, redis_url, redis_namespace):
    root, version, trained, loaded, retrieval_loaded = sequential
    client = redis.Redis.from_url(redis_url)
    materialize_features(client, feature_store.KeyFormat(redis_namespace), version, trained.tables)
    client.close()

    async def main():
        async with both(root, loaded, retrieval_loaded, redis_url, redis_namespace) as (stub, _):
            before = await stub.Recommend(recommend(k=20), timeout=5)
            top = before.items[0].item_id
            recorded = await stub.RecordInteractions(ranking_pb2.RecordInteractionsRequest(interactions=[
                common_pb2.Interaction(user_id="1", item_id=top, rating=5.0, timestamp_s=TS)]), timeout=5)
            after = await stub.Recommend(recommend(k=20), timeout=5)
            return before, top, recorded, after

    before, top, recorded, after = run(main())
    assert recorded.recorded == 1 and list(after.degraded) == []
    assert (after.retrieval_version, after.ranking_version) == (version, version)
    assert top not in {item.item_id for item in after.items}
    # The recorded item is now the newest in the sequence: retrieval's scores are the tower's for
    # the grown history, and not the ones before it.
    user = loaded.user_index["1"]
    history = loaded.tables.history[user]
    grown = np.concatenate([history[history > 0], loaded.items.indices(np.array([top]))])[-history.size:]
    padded = np.zeros_like(history)
    padded[history.size - grown.size:] = grown
    ids = np.array([item.item_id for item in after.items])
    expected = retrieval_scores(loaded, user_idx=user, user_cat=loaded.tables.user_cat[user],
                                user_num=loaded.tables.user_num[user], history=padded, timestamp=TS,
                                item_idx=loaded.items.indices(ids))
    assert [item.retrieval_score for item in after.items] == pytest.approx(expected.tolist(), abs=1e-5)
    old = {item.item_id: item.retrieval_score for item in before.items}
    common = [item for item in after.items if item.item_id in old]
    assert common and any(abs(item.retrieval_score - old[item.item_id]) > 1e-4 for item in common)
