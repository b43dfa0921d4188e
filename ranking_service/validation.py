"""Request validation: protobuf requests -> typed queries, or ValueError naming the field and the value.

The servicer turns a ValueError into INVALID_ARGUMENT with its message. The shared fields (user
ids, user features, context) are checked by ``recsys_serving.wire``, with the limits and user-id
rule retrieval applies too; the rest here: 1..1000 interactions and the server's limits
(``RANKING_MAX_K``, ``RANKING_MAX_RANK_ITEMS``). Request-time feature names must be in the served
version's feature spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ranking_service.config import RankingConfig
from recsys_serving.features import UserOverrides, encode_overrides
from recsys_contracts.feature_spec import FeatureSpec
from recsys_contracts.feature_store import FreshInteraction
from recsys_contracts.v1 import common_pb2, ranking_pb2, retrieval_pb2
from recsys_serving import wire
from recsys_serving.wire import InvalidRequest

MAX_INTERACTIONS = 1000


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


def overrides(spec: FeatureSpec, features: common_pb2.UserFeatures) -> UserOverrides:
    """Checks the proto's limits, then encodes with the version's spec (unknown names are refused)."""
    checked = wire.user_features(features)
    try:
        return encode_overrides(spec, checked.categorical, checked.numeric, checked.recent_item_ids)
    except ValueError as error:
        raise InvalidRequest(f"user_features: {error}") from None


def recommend_query(request: ranking_pb2.RecommendRequest, spec: FeatureSpec, config: RankingConfig) -> RecommendQuery:
    user_id = wire.user_id(request.user_id)
    if not 1 <= request.k <= config.max_k:
        raise InvalidRequest(f"k must be in [1, {config.max_k}], got {request.k}")
    options = request.options
    num_candidates = options.num_candidates or config.default_candidates
    if options.num_candidates and not request.k <= options.num_candidates <= config.max_rank_items:
        raise InvalidRequest(f"options.num_candidates must be 0 or in [k={request.k}, {config.max_rank_items}], "
                         f"got {options.num_candidates}")
    diversity = options.diversity if options.HasField("diversity") else config.diversity
    if not (math.isfinite(diversity) and 0.0 <= diversity <= 1.0):
        raise InvalidRequest(f"options.diversity must be in [0, 1], got {diversity!r}")
    timestamp = wire.timestamp(request.context.timestamp_s)
    if request.version < 0:
        raise InvalidRequest(f"version must be >= 0 (0 = the current version), got {request.version}")
    encoded = overrides(spec, request.user_features)
    retrieve = retrieval_pb2.RetrieveRequest(
        user_id=user_id, num_candidates=num_candidates, user_features=request.user_features,
        context=common_pb2.Context(timestamp_s=timestamp), include_seen=options.include_seen)
    return RecommendQuery(user_id=user_id, k=request.k, num_candidates=num_candidates, diversity=float(diversity),
                          include_seen=options.include_seen, timestamp=timestamp, overrides=encoded,
                          retrieve=retrieve, pinned_version=request.version)


def rank_query(request: ranking_pb2.RankRequest, spec: FeatureSpec, config: RankingConfig) -> RankQuery:
    user_id = wire.user_id(request.user_id)
    ids = np.asarray(request.item_ids, dtype=np.int64)
    if not 1 <= ids.size <= config.max_rank_items:
        raise InvalidRequest(f"item_ids must hold 1..{config.max_rank_items} ids, got {ids.size}")
    if (ids < 0).any():
        raise InvalidRequest(f"item_ids must be >= 0, got {int(ids[ids < 0][0])}")
    _, first = np.unique(ids, return_index=True)
    distinct = ids[np.sort(first)]            # duplicates scored once, in first-occurrence order
    return RankQuery(user_id=user_id, item_ids=distinct,
                     timestamp=wire.timestamp(request.context.timestamp_s),
                     overrides=overrides(spec, request.user_features))


def interactions(request: ranking_pb2.RecordInteractionsRequest) -> list[tuple[str, FreshInteraction]]:
    count = len(request.interactions)
    if not 1 <= count <= MAX_INTERACTIONS:
        raise InvalidRequest(f"interactions must hold 1..{MAX_INTERACTIONS} entries, got {count}")
    pairs = []
    for i, item in enumerate(request.interactions):
        field = f"interactions[{i}]"
        user_id = wire.user_id(item.user_id, f"{field}.user_id")
        if item.item_id < 0:
            raise InvalidRequest(f"{field}.item_id must be >= 0, got {item.item_id}")
        rating = item.rating if item.HasField("rating") else None
        if rating is not None and not math.isfinite(rating):
            raise InvalidRequest(f"{field}.rating must be finite, got {rating!r}")
        timestamp = wire.timestamp(item.timestamp_s, f"{field}.timestamp_s")
        pairs.append((user_id, FreshInteraction(item_id=item.item_id, timestamp=timestamp, rating=rating)))
    return pairs
