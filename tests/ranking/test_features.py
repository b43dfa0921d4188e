"""How a request's user inputs are assembled from Redis, the artifact, fresh interactions and request features."""

from __future__ import annotations

import numpy as np
import pytest

from ranking_service.features import FeatureStore, UserRead, build_user_view
from recsys_serving.features import NO_OVERRIDES, encode_overrides
from recsys_contracts.feature_store import FreshInteraction, UserRecord
from recsys_contracts.v1 import common_pb2

FROM_ARTIFACT = common_pb2.DEGRADED_PATH_FEATURES_FROM_ARTIFACT
COLD = common_pb2.DEGRADED_PATH_COLD_START_USER
DEFAULTS = common_pb2.DEGRADED_PATH_DEFAULT_FEATURES


def record(state, user_idx: int, fresh=(), row=True) -> UserRecord:
    tables = state.tables
    history = tables.history[user_idx]
    return UserRecord(row=(tables.user_cat[user_idx] + 0, tables.user_num[user_idx] * 0 + 0.5) if row else None,
                      history=tables.item_ids[history[history > 0]], seen=tables.item_ids[tables.seen(user_idx)],
                      fresh=list(fresh))


def test_redis_row_history_plus_fresh_plus_recent_oldest_first(loaded):
    state, tables = loaded, loaded.tables
    user_id, user_idx = "1", loaded.user_index["1"]
    fresh = [FreshInteraction(int(tables.item_ids[5]), 10), FreshInteraction(10**9, 11)]   # the second is unknown
    overrides = encode_overrides(state.spec, {}, {}, [int(tables.item_ids[7])])
    view = build_user_view(state, user_id, UserRead(record(state, user_idx, fresh), True), overrides)
    assert view.degraded == frozenset() and view.user_idx == user_idx
    np.testing.assert_array_equal(view.num, np.full(state.spec.user_num_dim, 0.5, np.float32))   # Redis's row
    stored = tables.history[user_idx][tables.history[user_idx] > 0].tolist()
    expected = (stored + [5, 7])[-state.spec.history_length:]
    assert view.history[-len(expected):].tolist() == expected
    assert set(view.exclude_ids.tolist()) == set(tables.item_ids[tables.seen(user_idx)].tolist()) | {
        int(tables.item_ids[5]), 10**9, int(tables.item_ids[7])}


@pytest.mark.parametrize("read", ["failed", "flushed"])
def test_known_user_without_redis_features_comes_from_the_artifact_flagged(loaded, read):
    user_idx = loaded.user_index["1"]
    store_read = UserRead(None, True) if read == "failed" else UserRead(record(loaded, user_idx, row=False), True)
    view = build_user_view(loaded, "1", store_read, NO_OVERRIDES)
    assert view.degraded == {FROM_ARTIFACT}
    np.testing.assert_array_equal(view.num, loaded.tables.user_num[user_idx])
    np.testing.assert_array_equal(view.history, loaded.tables.history[user_idx])


def test_no_redis_configured_uses_the_artifact_without_a_flag(loaded):
    user_idx = loaded.user_index["1"]
    read = UserRead(UserRecord(row=None, history=np.zeros(0, np.int64), seen=np.zeros(0, np.int64),
                               fresh=[FreshInteraction(int(loaded.tables.item_ids[3]), 1)]), False)
    view = build_user_view(loaded, "1", read, NO_OVERRIDES)
    assert view.degraded == frozenset()
    np.testing.assert_array_equal(view.cat, loaded.tables.user_cat[user_idx])      # the artifact's row
    assert view.history[-1] == 3 and int(loaded.tables.item_ids[3]) in view.exclude_ids


def test_a_row_of_another_layout_is_ignored(loaded):
    user_idx = loaded.user_index["1"]
    bad = UserRecord(row=(np.zeros(1, np.int64), np.zeros(1, np.float32)), history=np.zeros(0, np.int64),
                     seen=np.zeros(0, np.int64), fresh=[])
    view = build_user_view(loaded, "1", UserRead(bad, True), NO_OVERRIDES)
    np.testing.assert_array_equal(view.cat, loaded.tables.user_cat[user_idx])
    assert FROM_ARTIFACT in view.degraded


def test_cold_start_user_uses_request_features_or_defaults(loaded):
    empty = UserRead(UserRecord(row=None, history=np.zeros(0, np.int64), seen=np.zeros(0, np.int64), fresh=[]), True)
    plain = build_user_view(loaded, "nobody", empty, NO_OVERRIDES)
    assert plain.user_idx == 0 and plain.degraded == {COLD, DEFAULTS}
    assert not plain.history.any() and not plain.cat.any()
    overrides = encode_overrides(loaded.spec, {"gender": "M"}, {"age": 60.0}, [])
    featured = build_user_view(loaded, "nobody", empty, overrides)
    assert featured.degraded == {COLD}
    assert featured.cat[0] == 2                                            # "M" is vocabulary entry 2
    age = [c.name for c in loaded.spec.user_numeric].index("age")
    assert featured.num[age] == pytest.approx(loaded.spec.user_numeric[age].encode_array([60.0])[0])


def test_request_features_override_a_known_users_stored_row(loaded):
    user_idx = loaded.user_index["1"]
    overrides = encode_overrides(loaded.spec, {"occupation": "writer"}, {}, [])
    view = build_user_view(loaded, "1", UserRead(record(loaded, user_idx), True), overrides)
    occupation = loaded.spec.user_categorical[1]
    assert view.cat[1] == occupation.encode("writer")
    assert view.cat[0] == loaded.tables.user_cat[user_idx][0]


def test_recording_without_redis_goes_to_the_in_process_store():
    import asyncio

    async def main():
        store = FeatureStore(None, "ns", 50)
        assert await store.record([("u", FreshInteraction(3, 1))], 1.0) == 1
        return (await store.read_user(1, "u")).record.fresh

    assert [f.item_id for f in asyncio.run(main())] == [3]


def test_both_services_build_one_user_view_from_the_same_read(loaded, retrieval_loaded):
    """One merge rule (``recsys_serving.features.user_view``): the same stored record and request give
    ranking and retrieval the same row, history, exclusions and flags. Two former differences: a
    stored row is used for a user outside the version in both (retrieval took the artifact's), and a
    cold user whose tower runs on the default row is flagged DEFAULT_FEATURES by retrieval too."""
    from recsys_serving import wire
    from retrieval_service.features import resolve_user
    from retrieval_service.validation import Query

    tables = loaded.tables
    recent = [int(tables.item_ids[4])]
    fresh = [FreshInteraction(int(tables.item_ids[6]), 10)]
    cases = [("1", record(loaded, loaded.user_index["1"], fresh)),          # known user, Redis row
             ("1", None),                                                   # Redis failed
             ("never-seen", record(loaded, loaded.user_index["1"], fresh)),  # a stored row for an unknown user
             ("never-seen", UserRecord(row=None, history=np.zeros(0, np.int64), seen=np.zeros(0, np.int64),
                                       fresh=fresh))]                       # cold, fresh items only
    for user_id, stored in cases:
        view = build_user_view(loaded, user_id, UserRead(stored, True), encode_overrides(loaded.spec, {}, {}, recent))
        query = Query(user_id, 5, {}, {}, tuple(recent), wire.timestamp(0), False)
        resolved = resolve_user(retrieval_loaded, query, stored, store_failed=stored is None)
        assert set(resolved.degraded) == view.degraded, user_id
        assert resolved.row is not None
        np.testing.assert_array_equal(resolved.row.cat, view.cat)
        np.testing.assert_array_equal(resolved.row.num, view.num)
        np.testing.assert_array_equal(resolved.row.history, view.history)
        assert resolved.seen.tolist() == sorted(loaded.items.indices(view.exclude_ids).tolist())
    assert view.degraded == {COLD, DEFAULTS}
