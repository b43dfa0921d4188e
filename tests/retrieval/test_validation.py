"""Request validation: every bound from the protos, each refusal naming its field and value."""

from __future__ import annotations

import time

import pytest

from recsys_contracts.v1 import common_pb2, retrieval_pb2
from retrieval_service.validation import InvalidRequest, validate


def request(**fields) -> retrieval_pb2.RetrieveRequest:
    return retrieval_pb2.RetrieveRequest(**{"user_id": "u1", "num_candidates": 10, **fields})


def features(**fields) -> common_pb2.UserFeatures:
    return common_pb2.UserFeatures(**fields)


def test_valid_request_becomes_a_query():
    query = validate(request(user_features=features(categorical={"gender": "F"}, numeric={"age": 31.0},
                                                    recent_item_ids=[3, 9]),
                             context=common_pb2.Context(timestamp_s=1_700_000_000), include_seen=True), 100)
    assert (query.user_id, query.k, query.categorical, query.numeric, query.recent_item_ids, query.timestamp,
            query.include_seen) == ("u1", 10, {"gender": "F"}, {"age": 31.0}, (3, 9), 1_700_000_000, True)
    assert query.has_request_features


def test_timestamp_zero_means_now():
    before = int(time.time())
    query = validate(request(), 100)
    assert before <= query.timestamp <= int(time.time()) and not query.has_request_features


@pytest.mark.parametrize("fields, message", [
    ({"user_id": ""}, "user_id must be 1..128 bytes of UTF-8, got 0 bytes: ''"),
    ({"user_id": "é" * 65}, "user_id must be 1..128 bytes of UTF-8, got 130 bytes"),
    ({"user_id": "a{b}"}, "user_id must not contain '{', '}' or whitespace, got 'a{b}'"),
    ({"user_id": "bell\x07"}, "user_id must hold printable characters only, got 'bell\\\\x07'"),
    ({"num_candidates": 0}, "num_candidates must be in \\[1, 100\\], got 0"),
    ({"num_candidates": 101}, "num_candidates must be in \\[1, 100\\], got 101"),
    ({"user_features": features(categorical={str(i): "x" for i in range(33)})},
     "user_features.categorical must hold at most 32 entries, got 33"),
    ({"user_features": features(numeric={str(i): 1.0 for i in range(33)})},
     "user_features.numeric must hold at most 32 entries, got 33"),
    ({"user_features": features(categorical={"k" * 129: "x"})}, "user_features.categorical keys must be 1..128 bytes"),
    ({"user_features": features(numeric={"": 1.0})}, "user_features.numeric keys must be 1..128 bytes, got 0 bytes"),
    ({"user_features": features(categorical={"gender": ""})},
     "user_features.categorical\\['gender'\\] must be 1..128 bytes, got 0 bytes"),
    ({"user_features": features(numeric={"age": float("nan")})}, "user_features.numeric\\['age'\\] must be a finite float32 \\(\\|x\\| <= 3.403e\\+38\\), got nan"),
    ({"user_features": features(recent_item_ids=list(range(201)))},
     "user_features.recent_item_ids must hold at most 200 ids, got 201"),
    ({"user_features": features(recent_item_ids=[4, -2])}, "user_features.recent_item_ids must be >= 0, got -2"),
    ({"context": common_pb2.Context(timestamp_s=2**40)}, "context.timestamp_s must be in \\[0, 2\\*\\*40\\) seconds, got 1099511627776"),
])
def test_refusals_name_the_field_and_value(fields, message):
    with pytest.raises(InvalidRequest, match=message):
        validate(request(**fields), 100)
