"""Request validation: a ``RetrieveRequest`` becomes a typed ``Query`` or an ``InvalidRequest``.

Bounds come from the proto comments (recsys/v1/common.proto, retrieval.proto) and the config
(``max_candidates``). Checks that need the served version (feature names) happen in the
generator, which raises ``InvalidRequest`` too. Every message names the field and the bad value.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from recsys_contracts import feature_store
from recsys_contracts.ids import excerpt
from recsys_contracts.v1 import retrieval_pb2

MAX_FEATURES = 32             # entries per UserFeatures map
MAX_FEATURE_BYTES = 128       # bytes per key or categorical value
MAX_RECENT_ITEMS = 200
MAX_TIMESTAMP_S = 2**40       # exclusive
FLOAT32_MAX = 3.4028234663852886e38   # numeric features become float32 model inputs
MAX_FALLBACK_VERSIONS = 8     # RetrieveRequest.fallback_versions entries


class InvalidRequest(ValueError):
    """A request field is out of range; the message names the field and the value."""


@dataclass(frozen=True)
class Query:
    """A validated request. ``timestamp`` is in seconds since the Unix epoch (0 was replaced by now)."""

    user_id: str
    k: int
    categorical: dict[str, str]
    numeric: dict[str, float]
    recent_item_ids: tuple[int, ...]
    timestamp: int
    include_seen: bool
    version: int = 0               # the artifact version asked for (0 = current), answered when held
    fallback_versions: tuple[int, ...] = ()   # else the first of these held (RetrieveRequest.fallback_versions)

    @property
    def versions(self) -> tuple[int, ...]:
        """The versions the caller can rank with, in its order of preference (empty: the current one)."""
        return ((self.version,) if self.version else ()) + self.fallback_versions

    @property
    def has_request_features(self) -> bool:
        return bool(self.categorical or self.numeric or self.recent_item_ids)


def _check_bytes(field: str, value: str) -> None:
    size = len(value.encode("utf-8"))
    if not 1 <= size <= MAX_FEATURE_BYTES:
        raise InvalidRequest(f"{field} must be 1..{MAX_FEATURE_BYTES} bytes, got {size} bytes: {excerpt(value)}")


def _features(request: retrieval_pb2.RetrieveRequest) -> tuple[dict[str, str], dict[str, float], tuple[int, ...]]:
    features = request.user_features
    categorical, numeric = dict(features.categorical), dict(features.numeric)
    for name, mapping in (("categorical", categorical), ("numeric", numeric)):
        if len(mapping) > MAX_FEATURES:
            raise InvalidRequest(f"user_features.{name} must have at most {MAX_FEATURES} entries, got {len(mapping)}")
        for key in mapping:
            _check_bytes(f"user_features.{name} key", key)
    for key, value in categorical.items():
        _check_bytes(f"user_features.categorical[{excerpt(key)}]", value)
    for key, value in numeric.items():
        if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise InvalidRequest(f"user_features.numeric[{excerpt(key)}] must be a finite float32 "
                                 f"(|x| <= {FLOAT32_MAX:.4g}), got {value!r}")
    recent = tuple(features.recent_item_ids)
    if len(recent) > MAX_RECENT_ITEMS:
        raise InvalidRequest(f"user_features.recent_item_ids must have at most {MAX_RECENT_ITEMS} entries, "
                             f"got {len(recent)}")
    negative = [item for item in recent if item < 0]
    if negative:
        raise InvalidRequest(f"user_features.recent_item_ids must be item ids >= 0, got {negative[0]!r}")
    return categorical, numeric, recent


def validate(request: retrieval_pb2.RetrieveRequest, max_candidates: int) -> Query:
    """The request as a ``Query``; raises ``InvalidRequest`` naming the first bad field."""
    try:
        user_id = feature_store.check_user_id(request.user_id)
    except ValueError as error:
        raise InvalidRequest(str(error)) from None
    if not 1 <= request.num_candidates <= max_candidates:
        raise InvalidRequest(f"num_candidates must be in [1, {max_candidates}], got {request.num_candidates!r}")
    categorical, numeric, recent = _features(request)
    timestamp = request.context.timestamp_s
    if not 0 <= timestamp < MAX_TIMESTAMP_S:
        raise InvalidRequest(f"context.timestamp_s must be in [0, 2^40), got {timestamp!r}")
    if request.version < 0:
        raise InvalidRequest(f"version must be >= 0 (0 = the current version), got {request.version!r}")
    fallbacks = tuple(request.fallback_versions)
    if len(fallbacks) > MAX_FALLBACK_VERSIONS:
        raise InvalidRequest(f"fallback_versions must have at most {MAX_FALLBACK_VERSIONS} entries, "
                             f"got {len(fallbacks)}")
    if any(v < 1 for v in fallbacks):
        raise InvalidRequest(f"fallback_versions must be versions >= 1, got {min(fallbacks)!r}")
    return Query(user_id=user_id, k=request.num_candidates, categorical=categorical, numeric=numeric,
                 recent_item_ids=recent, timestamp=timestamp or int(time.time()),
                 include_seen=request.include_seen, version=request.version, fallback_versions=fallbacks)
