"""Request validation: a ``RetrieveRequest`` becomes a typed ``Query`` or an ``InvalidRequest``.

The shared fields (user id, user features, context) are checked by ``recsys_serving.wire`` with the
limits ranking applies too; the Retrieve-only ones here: ``num_candidates`` (``max_candidates``,
``RETRIEVAL_MAX_CANDIDATES``), ``version``, ``fallback_versions`` and ``stored_user`` (the caller's
read of the user's record, checked by ``recsys_serving.wire.stored_user``). Checks that need the served
version (feature names) happen in the user view, which raises ``InvalidRequest`` too. Every message
names the field and the bad value.
"""

from __future__ import annotations

from dataclasses import dataclass

from recsys_contracts.v1 import retrieval_pb2
from recsys_serving import wire
from recsys_serving.wire import InvalidRequest, StoredUser

__all__ = ["InvalidRequest", "MAX_FALLBACK_VERSIONS", "Query", "validate"]
MAX_FALLBACK_VERSIONS = 8     # RetrieveRequest.fallback_versions entries


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
    stored: StoredUser | None = None          # the caller's read of the user's record (None: read it here)

    @property
    def versions(self) -> tuple[int, ...]:
        """The versions the caller can rank with, in its order of preference (empty: the current one)."""
        return ((self.version,) if self.version else ()) + self.fallback_versions

    @property
    def has_request_features(self) -> bool:
        return bool(self.categorical or self.numeric or self.recent_item_ids)


def validate(request: retrieval_pb2.RetrieveRequest, max_candidates: int) -> Query:
    """The request as a ``Query``; raises ``InvalidRequest`` naming the first bad field."""
    user_id = wire.user_id(request.user_id)
    if not 1 <= request.num_candidates <= max_candidates:
        raise InvalidRequest(f"num_candidates must be in [1, {max_candidates}], got {request.num_candidates!r}")
    features = wire.user_features(request.user_features)
    timestamp = wire.timestamp(request.context.timestamp_s)
    if request.version < 0:
        raise InvalidRequest(f"version must be >= 0 (0 = the current version), got {request.version!r}")
    fallbacks = tuple(request.fallback_versions)
    if len(fallbacks) > MAX_FALLBACK_VERSIONS:
        raise InvalidRequest(f"fallback_versions must have at most {MAX_FALLBACK_VERSIONS} entries, "
                             f"got {len(fallbacks)}")
    if any(v < 1 for v in fallbacks):
        raise InvalidRequest(f"fallback_versions must be versions >= 1, got {min(fallbacks)!r}")
    stored = wire.stored_user(request.stored_user) if request.HasField("stored_user") else None
    return Query(user_id=user_id, k=request.num_candidates, categorical=features.categorical,
                 numeric=features.numeric, recent_item_ids=features.recent_item_ids, timestamp=timestamp,
                 include_seen=request.include_seen, version=request.version, fallback_versions=fallbacks,
                 stored=stored)
