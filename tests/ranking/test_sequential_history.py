"""The sequential user tower through both services: an interaction recorded with
``RecordInteractions`` becomes the last item of the sequence the tower reads, so the very next
``Recommend`` is retrieved with the new user vector (real Redis, both real servers in process, a
real exported sequential tower). The same recorded item becomes the latest item the ranker's transition
channels read, so the ranker's scores move with it too."""

from __future__ import annotations

import numpy as np
import pytest
import redis
import torch

from ranking_service.state import load_state, ranker_inputs, retrieval_scores, run_ranker
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


def record_the_top_item(fixture, redis_url: str, redis_namespace: str):
    """Through both real services: Recommend for user 1, RecordInteractions of its top item, Recommend again.
    Returns (before, the recorded item, the RecordInteractions answer, after, user 1's stored history, that
    history grown by the recorded item as the service assembles it)."""
    root, version, trained, loaded, retrieval_loaded = fixture
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
    history = loaded.tables.history[loaded.user_index["1"]]
    grown = np.concatenate([history[history > 0], loaded.items.indices(np.array([top]))])[-history.size:]
    padded = np.zeros_like(history)
    padded[history.size - grown.size:] = grown
    return before, top, recorded, after, history, padded


def test_a_recorded_interaction_changes_the_next_recommendation(sequential, redis_url, redis_namespace):
    _, _, _, loaded, _ = sequential
    before, top, _, after, _, padded = record_the_top_item(sequential, redis_url, redis_namespace)
    assert top not in {item.item_id for item in after.items}
    # The recorded item is now the newest in the sequence: retrieval's scores are the tower's for
    # the grown history, and not the ones before it.
    user = loaded.user_index["1"]
    ids = np.array([item.item_id for item in after.items])
    expected = retrieval_scores(loaded, user_idx=user, user_cat=loaded.tables.user_cat[user],
                                user_num=loaded.tables.user_num[user], history=padded, timestamp=TS,
                                item_idx=loaded.items.indices(ids))
    assert [item.retrieval_score for item in after.items] == pytest.approx(expected.tolist(), abs=1e-5)
    old = {item.item_id: item.retrieval_score for item in before.items}
    common = [item for item in after.items if item.item_id in old]
    assert common and any(abs(item.retrieval_score - old[item.item_id]) > 1e-4 for item in common)


@pytest.fixture(scope="module")
def with_transitions(tmp_path_factory):
    """(root, version, run, ranking state, retrieval state) of a tiny version whose ranker reads transition
    channels (``ranking.transition_mode=on``) beside the sequential tower."""
    root = tmp_path_factory.mktemp("transition-artifacts")
    trained = tiny_run(0, overrides=("retrieval.user_tower=sequential", "ranking.transition_mode=on"))
    version = publish_tiny_version(root, 0, run=trained)
    directory = root / "versions" / str(version)
    return root, version, trained, load_state(directory, version), load_retrieval_state(directory, version, "cpu")


def _transitions(ranker, history: np.ndarray, items: np.ndarray) -> np.ndarray:
    """(N, L) raw transition channels of ``items`` after ``history`` (oldest first), from the ranker's lists."""
    latest = ranker.latest(torch.as_tensor(history[None])).expand(items.size, -1)
    return ranker.raw_transitions(latest, torch.as_tensor(items)).numpy()


def test_a_recorded_interaction_moves_the_rankers_transition_channels(with_transitions, redis_url,
                                                                      redis_namespace):
    """The ranker's transition channels read the history the ranking service assembles per request: after
    ``RecordInteractions`` the served CTRs are the ranker program's on the grown history (whose latest item
    is the recorded one), and the channels of the returned items moved with it."""
    _, _, trained, loaded, _ = with_transitions
    _, pick, _, after, history, padded = record_the_top_item(with_transitions, redis_url, redis_namespace)
    user = loaded.user_index["1"]
    ids = np.array([item.item_id for item in after.items])
    item_idx = loaded.items.indices(ids)
    scores = np.array([item.retrieval_score for item in after.items], np.float32)
    common = dict(user_idx=user, user_cat=loaded.tables.user_cat[user], user_num=loaded.tables.user_num[user],
                  timestamp=TS, item_idx=item_idx, retrieval_score=scores)
    served = [item.ctr for item in after.items]
    ctr_grown, _ = run_ranker(loaded.ranker, ranker_inputs(loaded, history=padded, **common))
    ctr_old, _ = run_ranker(loaded.ranker, ranker_inputs(loaded, history=history, **common))
    assert served == pytest.approx(ctr_grown.tolist(), abs=1e-5)
    assert not np.allclose(ctr_old, ctr_grown, atol=1e-5)
    moved = _transitions(trained.ranker, padded, item_idx) != _transitions(trained.ranker, history, item_idx)
    assert moved.any()
    # The recorded item is the latest now: channel 0 is each candidate's weight in its successor list.
    pick_idx = int(loaded.items.indices(np.array([pick]))[0])
    successors = dict(zip(trained.ranker.successor_ids[pick_idx].tolist(),
                          trained.ranker.successor_weights[pick_idx].tolist()))
    assert _transitions(trained.ranker, padded, item_idx)[:, 0].tolist() == pytest.approx(
        [successors.get(int(i), 0.0) for i in item_idx])
