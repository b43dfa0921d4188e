"""Request validation: protobuf requests -> typed queries, or ValueError naming the field and the value.

The servicer turns a ValueError into INVALID_ARGUMENT with its message. Limits are the proto's
(user ids 1..128 bytes, <= 32 request features, <= 200 recent items, timestamps in [0, 2**40),
1..1000 interactions) and the server's (``RANKING_MAX_K``, ``RANKING_MAX_RANK_ITEMS``).
Request-time feature names must be in the served version's feature spec.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ranking_service.config import RankingConfig
from ranking_service.features import UserOverrides, encode_overrides
from recsys_contracts import feature_store
from recsys_contracts.feature_spec import FeatureSpec
from recsys_contracts.feature_store import FreshInteraction
from recsys_contracts.ids import excerpt
from recsys_contracts.v1 import common_pb2, ranking_pb2, retrieval_pb2

MAX_TIMESTAMP_S = 2**40
MAX_FEATURES = 32
MAX_FEATURE_BYTES = 128
MAX_RECENT_ITEMS = 200
MAX_INTERACTIONS = 1000
FLOAT32_MAX = 3.4028234663852886e38   # numeric features become float32 model inputs


@dataclass(frozen=True, eq=False)
class RecommendQuery:
    user_id: str
    k: int
    num_candidates: int
    diversity: float
    include_seen: bool
    timestamp: int                          # seconds since the Unix epoch, UTC (0 on the wire = now)
    overrides: UserOverrides
    retrieve: retrieval_pb2.RetrieveRequest  # what is sent to retrieval
    pinned_version: int = 0                 # the version the request pinned (0 = none): no other may answer


@dataclass(frozen=True, eq=False)
class RankQuery:
    user_id: str
    item_ids: np.ndarray                    # (N,) int64 distinct ids, first occurrence order
    timestamp: int
    overrides: UserOverrides


def _user_id(user_id: str, field: str = "user_id") -> str:
    try:
        return feature_store.check_user_id(user_id)
    except ValueError as error:
        raise ValueError(f"{field}{str(error).removeprefix('user_id')}") from None


def _timestamp(value: int, field: str) -> int:
    if not 0 <= value < MAX_TIMESTAMP_S:
        raise ValueError(f"{field} must be in [0, 2**40) seconds, got {value}")
    return value if value else int(time.time())


def _name_and_value(field: str, name: str, value: str | None = None) -> None:
    if not 1 <= len(name.encode()) <= MAX_FEATURE_BYTES:
        raise ValueError(f"{field} keys must be 1..{MAX_FEATURE_BYTES} bytes, got {excerpt(name)}")
    if value is not None and not 1 <= len(value.encode()) <= MAX_FEATURE_BYTES:
        raise ValueError(f"{field}[{name!r}] must be 1..{MAX_FEATURE_BYTES} bytes, got {excerpt(value)}")


def overrides(spec: FeatureSpec, features: common_pb2.UserFeatures) -> UserOverrides:
    """Checks the proto's limits, then encodes with the version's spec (unknown names are refused)."""
    for field, entries in (("user_features.categorical", features.categorical),
                           ("user_features.numeric", features.numeric)):
        if len(entries) > MAX_FEATURES:
            raise ValueError(f"{field} must hold at most {MAX_FEATURES} entries, got {len(entries)}")
    for name, value in features.categorical.items():
        _name_and_value("user_features.categorical", name, value)
    for name, value in features.numeric.items():
        _name_and_value("user_features.numeric", name)
        if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise ValueError(f"user_features.numeric[{name!r}] must be a finite float32 "
                             f"(|x| <= {FLOAT32_MAX:.4g}), got {value!r}")
    recent = list(features.recent_item_ids)
    if len(recent) > MAX_RECENT_ITEMS:
        raise ValueError(f"user_features.recent_item_ids must hold at most {MAX_RECENT_ITEMS} ids, got {len(recent)}")
    negative = [i for i in recent if i < 0]
    if negative:
        raise ValueError(f"user_features.recent_item_ids must be >= 0, got {negative[0]}")
    try:
        return encode_overrides(spec, dict(features.categorical), dict(features.numeric), recent)
    except ValueError as error:
        raise ValueError(f"user_features: {error}") from None


def recommend_query(request: ranking_pb2.RecommendRequest, spec: FeatureSpec, config: RankingConfig) -> RecommendQuery:
    user_id = _user_id(request.user_id)
    if not 1 <= request.k <= config.max_k:
        raise ValueError(f"k must be in [1, {config.max_k}], got {request.k}")
    options = request.options
    num_candidates = options.num_candidates or config.default_candidates
    if options.num_candidates and not request.k <= options.num_candidates <= config.max_rank_items:
        raise ValueError(f"options.num_candidates must be 0 or in [k={request.k}, {config.max_rank_items}], "
                         f"got {options.num_candidates}")
    diversity = options.diversity if options.HasField("diversity") else config.diversity
    if not (math.isfinite(diversity) and 0.0 <= diversity <= 1.0):
        raise ValueError(f"options.diversity must be in [0, 1], got {diversity!r}")
    timestamp = _timestamp(request.context.timestamp_s, "context.timestamp_s")
    if request.version < 0:
        raise ValueError(f"version must be >= 0 (0 = the current version), got {request.version}")
    encoded = overrides(spec, request.user_features)
    retrieve = retrieval_pb2.RetrieveRequest(
        user_id=user_id, num_candidates=num_candidates, user_features=request.user_features,
        context=common_pb2.Context(timestamp_s=timestamp), include_seen=options.include_seen)
    return RecommendQuery(user_id=user_id, k=request.k, num_candidates=num_candidates, diversity=float(diversity),
                          include_seen=options.include_seen, timestamp=timestamp, overrides=encoded,
                          retrieve=retrieve, pinned_version=request.version)


def rank_query(request: ranking_pb2.RankRequest, spec: FeatureSpec, config: RankingConfig) -> RankQuery:
    user_id = _user_id(request.user_id)
    ids = np.asarray(request.item_ids, dtype=np.int64)
    if not 1 <= ids.size <= config.max_rank_items:
        raise ValueError(f"item_ids must hold 1..{config.max_rank_items} ids, got {ids.size}")
    if (ids < 0).any():
        raise ValueError(f"item_ids must be >= 0, got {int(ids[ids < 0][0])}")
    _, first = np.unique(ids, return_index=True)
    distinct = ids[np.sort(first)]            # duplicates scored once, in first-occurrence order
    return RankQuery(user_id=user_id, item_ids=distinct,
                     timestamp=_timestamp(request.context.timestamp_s, "context.timestamp_s"),
                     overrides=overrides(spec, request.user_features))


def interactions(request: ranking_pb2.RecordInteractionsRequest) -> list[tuple[str, FreshInteraction]]:
    count = len(request.interactions)
    if not 1 <= count <= MAX_INTERACTIONS:
        raise ValueError(f"interactions must hold 1..{MAX_INTERACTIONS} entries, got {count}")
    pairs = []
    for i, item in enumerate(request.interactions):
        field = f"interactions[{i}]"
        user_id = _user_id(item.user_id, f"{field}.user_id")
        if item.item_id < 0:
            raise ValueError(f"{field}.item_id must be >= 0, got {item.item_id}")
        rating = item.rating if item.HasField("rating") else None
        if rating is not None and not math.isfinite(rating):
            raise ValueError(f"{field}.rating must be finite, got {rating!r}")
        timestamp = _timestamp(item.timestamp_s, f"{field}.timestamp_s")
        pairs.append((user_id, FreshInteraction(item_id=item.item_id, timestamp=timestamp, rating=rating)))
    return pairs
