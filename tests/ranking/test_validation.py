"""Every rejected request field, with the message naming the field and the value (INVALID_ARGUMENT)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ranking_service import validation
from ranking_service.config import RankingConfig
from recsys_contracts.v1 import common_pb2, ranking_pb2

CONFIG = RankingConfig(artifact_root="unused", max_k=20, default_candidates=50, max_rank_items=60)


def recommend(**fields) -> ranking_pb2.RecommendRequest:
    return ranking_pb2.RecommendRequest(**{"user_id": "1", "k": 5, **fields})


def features(**fields) -> common_pb2.UserFeatures:
    return common_pb2.UserFeatures(**fields)


@pytest.mark.parametrize("request_, message", [
    (recommend(user_id=""), "user_id must be 1..128 bytes"),
    (recommend(user_id="x" * 129), "user_id must be 1..128 bytes"),
    (recommend(user_id="a{b}"), "user_id must not contain"),
    (recommend(k=0), r"k must be in \[1, 20\], got 0"),
    (recommend(k=21), r"k must be in \[1, 20\], got 21"),
    (recommend(options=ranking_pb2.RecommendOptions(num_candidates=3)), r"options.num_candidates must be .*got 3"),
    (recommend(options=ranking_pb2.RecommendOptions(num_candidates=61)), r"options.num_candidates .*got 61"),
    (recommend(options=ranking_pb2.RecommendOptions(diversity=1.5)), r"options.diversity must be in \[0, 1\], got 1.5"),
    (recommend(options=ranking_pb2.RecommendOptions(diversity=float("nan"))), "options.diversity must be in"),
    (recommend(context=common_pb2.Context(timestamp_s=-1)), r"context.timestamp_s must be in \[0, 2\*\*40\).*got -1"),
    (recommend(context=common_pb2.Context(timestamp_s=2**40)), "context.timestamp_s must be in"),
    (recommend(user_features=features(categorical={f"f{i}": "v" for i in range(33)})),
     "user_features.categorical must hold at most 32 entries, got 33"),
    (recommend(user_features=features(numeric={f"f{i}": 1.0 for i in range(33)})),
     "user_features.numeric must hold at most 32 entries, got 33"),
    (recommend(user_features=features(categorical={"g" * 129: "F"})), "user_features.categorical keys must be 1..128"),
    (recommend(user_features=features(categorical={"gender": ""})),
     r"user_features.categorical\['gender'\] must be 1..128 bytes, got 0 bytes: ''"),
    (recommend(user_features=features(numeric={"a" * 129: 1.0})), "user_features.numeric keys must be 1..128"),
    (recommend(user_features=features(numeric={"age": float("inf")})),
     r"user_features.numeric\['age'\] must be a finite float32 \(\|x\| <= 3.403e\+38\), got inf"),
    (recommend(user_features=features(recent_item_ids=list(range(201)))),
     "user_features.recent_item_ids must hold at most 200 ids, got 201"),
    (recommend(user_features=features(recent_item_ids=[3, -4])), "user_features.recent_item_ids must be >= 0, got -4"),
    (recommend(user_features=features(categorical={"shoe_size": "44"})),
     r"user_features: categorical user feature names must be in .*shoe_size"),
    (recommend(user_features=features(numeric={"age": 1e308})),
     r"user_features.numeric\['age'\] must be a finite float32 .*, got 1e\+308"),
])
def test_recommend_rejects(loaded, request_, message):
    with pytest.raises(ValueError, match=message):
        validation.recommend_query(request_, loaded.spec, CONFIG)


@pytest.mark.parametrize("name, value", [("log_count", -3.0), ("log_count", 1e10), ("log_count", 1e30)])
def test_numeric_features_outside_the_training_range_are_clipped_to_it(loaded, name, value):
    """A value past the bounds recorded at training encodes as the bound itself: finite, never a
    NaN or a saturated input (log1p's domain below -1 is clipped away too)."""
    column = next(c for c in loaded.spec.user_numeric if c.name == name)
    bound = column.low if value < column.low else column.high
    query = validation.recommend_query(recommend(user_features=features(numeric={name: value})), loaded.spec, CONFIG)
    at_bound = validation.recommend_query(recommend(user_features=features(numeric={name: bound})), loaded.spec, CONFIG)
    assert query.overrides.num_values.size == 1 and np.isfinite(query.overrides.num_values).all()
    np.testing.assert_array_equal(query.overrides.num_values, at_bound.overrides.num_values)


def test_recommend_query_fills_defaults_and_encodes_features(loaded):
    query = validation.recommend_query(recommend(user_features=features(categorical={"gender": "F"},
                                                                       recent_item_ids=[7, 9])),
                                       loaded.spec, CONFIG)
    assert (query.num_candidates, query.diversity, query.include_seen) == (50, CONFIG.diversity, False)
    assert abs(query.timestamp - time.time()) < 60                      # 0 on the wire = now
    assert query.overrides.cat_positions.tolist() == [0] and query.overrides.cat_values.tolist() == [1]
    assert query.overrides.recent_item_ids.tolist() == [7, 9]
    assert query.retrieve.num_candidates == 50 and query.retrieve.context.timestamp_s == query.timestamp
    explicit = validation.recommend_query(
        recommend(options=ranking_pb2.RecommendOptions(num_candidates=5, diversity=0.0, include_seen=True),
                  context=common_pb2.Context(timestamp_s=123)), loaded.spec, CONFIG)
    assert (explicit.num_candidates, explicit.diversity, explicit.include_seen, explicit.timestamp) == (5, 0.0, True, 123)


@pytest.mark.parametrize("ids, message", [
    ([], r"item_ids must hold 1..60 ids, got 0"), (list(range(61)), r"item_ids must hold 1..60 ids, got 61"),
    ([1, -2], "item_ids must be >= 0, got -2")])
def test_rank_rejects(loaded, ids, message):
    with pytest.raises(ValueError, match=message):
        validation.rank_query(ranking_pb2.RankRequest(user_id="1", item_ids=ids), loaded.spec, CONFIG)


def test_rank_query_removes_duplicates_keeping_first_occurrence_order(loaded):
    query = validation.rank_query(ranking_pb2.RankRequest(user_id="1", item_ids=[9, 3, 9, 1, 3]), loaded.spec, CONFIG)
    assert query.item_ids.tolist() == [9, 3, 1]
    assert query.item_ids.dtype == np.int64


def interaction(**fields) -> common_pb2.Interaction:
    return common_pb2.Interaction(**{"user_id": "u1", "item_id": 4, **fields})


@pytest.mark.parametrize("items, message", [
    ([], r"interactions must hold 1..1000 entries, got 0"),
    ([interaction()] * 1001, r"interactions must hold 1..1000 entries, got 1001"),
    ([interaction(), interaction(user_id="")], r"interactions\[1\].user_id must be 1..128 bytes"),
    ([interaction(item_id=-1)], r"interactions\[0\].item_id must be >= 0, got -1"),
    ([interaction(rating=float("nan"))], r"interactions\[0\].rating must be finite, got nan"),
    ([interaction(timestamp_s=-5)], r"interactions\[0\].timestamp_s must be in \[0, 2\*\*40\) seconds, got -5"),
])
def test_record_interactions_rejects(items, message):
    with pytest.raises(ValueError, match=message):
        validation.interactions(ranking_pb2.RecordInteractionsRequest(interactions=items))


def test_record_interactions_keeps_ratings_and_fills_the_time():
    pairs = validation.interactions(ranking_pb2.RecordInteractionsRequest(
        interactions=[interaction(rating=4.5, timestamp_s=10), interaction(item_id=5)]))
    assert pairs[0] == ("u1", pairs[0][1]) and (pairs[0][1].rating, pairs[0][1].timestamp) == (4.5, 10)
    assert pairs[1][1].rating is None and abs(pairs[1][1].timestamp - time.time()) < 60


@pytest.mark.parametrize("fields", [
    {"user_id": "bell\x07"}, {"user_id": "é" * 65}, {"user_id": "a b"},
    {"user_features": features(categorical={"gender": ""})},
    {"user_features": features(numeric={"k" * 129: 1.0})},
    {"user_features": features(numeric={"age": float("inf")})},
    {"user_features": features(recent_item_ids=list(range(201)))},
    {"user_features": features(recent_item_ids=[1, -7])},
    {"context": common_pb2.Context(timestamp_s=2**40)},
])
def test_shared_fields_get_one_rule_at_both_doors(loaded, fields):
    """Ranking refuses a shared field exactly as retrieval would (one rule: ``recsys_serving.wire``), so
    nothing it accepts comes back from retrieval as INVALID_ARGUMENT for these fields."""
    from recsys_contracts.v1 import retrieval_pb2
    from retrieval_service.validation import validate

    with pytest.raises(ValueError) as at_ranking:
        validation.recommend_query(recommend(**fields), loaded.spec, CONFIG)
    with pytest.raises(ValueError) as at_retrieval:
        validate(retrieval_pb2.RetrieveRequest(**{"user_id": "1", "num_candidates": 5, **fields}), 100)
    assert str(at_ranking.value) == str(at_retrieval.value)
