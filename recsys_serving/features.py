"""The user view both services build: stored record + artifact + request -> model inputs, exclusions, flags.

``user_view`` merges, for one request and one version (contract types only: the version's
``VersionTables``, its ``ItemLookup``, the store's ``UserRecord``):

- the user row: the store's (when present and shaped like the version's spec), else the artifact's
  (a known user), else the spec's default row; request-time features (``encode_overrides``)
  overwrite their columns;
- the history: stored (or artifact) history + fresh interactions + the request's
  ``recent_item_ids``, oldest first, the last H items the version knows, left-padded with 0;
- the exclusions: the artifact's and the store's seen items, fresh and recent ones (external ids);
- the flags: FEATURES_FROM_ARTIFACT when the store was asked and failed, or answered without a
  known user's row; COLD_START_USER for a user outside the version; DEFAULT_FEATURES when such a
  user also brings no request-time features (the model runs on the default row).

``redis_client(url, timeout_s)`` is the async client both services' feature stores read with: no
retries (one slow try already spends the per-request budget; the artifact answers instead), socket
and connect timeouts of the budget (at least ``MIN_SOCKET_TIMEOUT_S``, so a connect can succeed).
Key format, codec and the batch read/write are ``recsys_contracts.feature_store``'s; how a service
reads (budgets, breaker, metrics) and what it does with the view is its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import redis.asyncio

from recsys_contracts import feature_store
from recsys_contracts.bundle import VersionTables
from recsys_contracts.feature_spec import FeatureSpec
from recsys_contracts.feature_store import UserRecord
from recsys_contracts.ids import ItemLookup, sorted_unique
from recsys_contracts.v1 import common_pb2

_EMPTY_IDS = np.zeros(0, dtype=np.int64)

MIN_SOCKET_TIMEOUT_S = 0.05


def redis_client(url: str | None, timeout_s: float) -> redis.asyncio.Redis | None:
    """The async client for ``url`` (None = no Redis configured: None)."""
    if not url:
        return None
    socket_timeout_s = max(timeout_s, MIN_SOCKET_TIMEOUT_S)
    return feature_store.redis_client(url, socket_timeout_s=socket_timeout_s, connect_timeout_s=socket_timeout_s,
                                      retries=0, asyncio=True)


class UserReader:
    """``await reader(version, user_id)``: the replies of one user read (``feature_store.parse_user_read``
    parses them) in ONE Redis command, ``feature_store.USER_READ_SCRIPT`` by EVALSHA. redis-py's
    registered script loads it again when Redis answers NOSCRIPT (a restarted or flushed script cache)."""

    def __init__(self, client: redis.asyncio.Redis, keys: feature_store.KeyFormat) -> None:
        self.script = client.register_script(feature_store.USER_READ_SCRIPT)
        self.keys = keys

    async def __call__(self, version: int, user_id: str) -> list:
        return await self.script(keys=feature_store.user_read_keys(self.keys, version, user_id))


@dataclass(frozen=True, eq=False)
class UserOverrides:
    """Request-time user features, encoded: positions of the row to overwrite and their values."""

    cat_positions: np.ndarray      # (c,) int64 positions in the (Cu,) categorical row
    cat_values: np.ndarray         # (c,) int64 vocabulary indices
    num_positions: np.ndarray      # (n,) int64 positions in the (Nu,) numeric row
    num_values: np.ndarray         # (n,) float32 standardised values
    recent_item_ids: np.ndarray    # (r,) int64 external item ids, oldest first

    @property
    def has_features(self) -> bool:
        return bool(self.cat_positions.size or self.num_positions.size)


NO_OVERRIDES = UserOverrides(_EMPTY_IDS, _EMPTY_IDS, _EMPTY_IDS, np.zeros(0, np.float32), _EMPTY_IDS)


def encode_overrides(spec: FeatureSpec, categorical: Mapping[str, str], numeric: Mapping[str, float],
                     recent_item_ids: Sequence[int]) -> UserOverrides:
    """Encodes request-time features with the version's spec; ValueError names an unknown or bad feature."""
    if not (categorical or numeric or len(recent_item_ids)):
        return NO_OVERRIDES                          # the common request: nothing to encode
    cat, num = spec.encode_user(categorical, numeric)
    cat_pos = [i for i, column in enumerate(spec.user_categorical) if column.name in categorical]
    num_pos = [i for i, column in enumerate(spec.user_numeric) if column.name in numeric]
    return UserOverrides(np.asarray(cat_pos, np.int64), cat[cat_pos], np.asarray(num_pos, np.int64),
                         num[num_pos], np.asarray(recent_item_ids, dtype=np.int64))


@dataclass(frozen=True, eq=False)
class UserView:
    """A model's user inputs for one request and the items the user already interacted with."""

    user_idx: int                  # 0 = not in the version's vocabulary
    cat: np.ndarray                # (Cu,) int64
    num: np.ndarray                # (Nu,) float32
    history: np.ndarray            # (H,) int64 item indices, oldest first, left-padded with 0
    exclude_ids: np.ndarray        # (e,) int64 sorted unique external item ids: seen + fresh + recent
    fresh_ids: np.ndarray          # (f,) int64 external ids of the fresh interactions, oldest first
    degraded: frozenset[int]       # common_pb2.DegradedPath values


def _stored_row(spec: FeatureSpec, record: UserRecord | None) -> tuple[np.ndarray, np.ndarray] | None:
    if record is None or record.row is None:
        return None
    cat, num = record.row
    if cat.shape != (spec.user_cat_dim,) or num.shape != (spec.user_num_dim,):
        return None  # a row of another feature layout: not this version's, use the artifact's
    return cat.copy(), num.copy()


def user_view(tables: VersionTables, user_index: Mapping[str, int], items: ItemLookup, user_id: str,
              record: UserRecord | None, from_store: bool, overrides: UserOverrides) -> UserView:
    """Merges the store's record, the artifact and the request (see the module docstring).

    ``from_store``: the store was asked (``record`` None = it failed or was skipped); False = no
    store configured (``record``, when given, holds only what the process keeps, e.g. fresh items).
    """
    spec = tables.spec
    user_idx = user_index.get(user_id, 0)
    flags: set[int] = set()
    row = _stored_row(spec, record)
    artifact_seen = tables.item_ids[tables.seen(user_idx)] if user_idx > 0 else _EMPTY_IDS
    if row is not None:
        (cat, num), history_ids, stored_seen = row, record.history, record.seen
    elif user_idx > 0:
        cat, num = tables.user_cat[user_idx].copy(), tables.user_num[user_idx].copy()
        history = tables.history[user_idx]
        history_ids, stored_seen = tables.item_ids[history[history > 0]], _EMPTY_IDS
    else:
        (cat, num), history_ids, stored_seen = spec.default_user_row(), _EMPTY_IDS, _EMPTY_IDS
    if from_store and (record is None or (row is None and user_idx > 0)):
        flags.add(common_pb2.DEGRADED_PATH_FEATURES_FROM_ARTIFACT)
    if user_idx == 0:
        flags.add(common_pb2.DEGRADED_PATH_COLD_START_USER)
        if not overrides.has_features:
            flags.add(common_pb2.DEGRADED_PATH_DEFAULT_FEATURES)
    cat[overrides.cat_positions] = overrides.cat_values
    num[overrides.num_positions] = overrides.num_values
    fresh_ids = np.asarray([f.item_id for f in record.fresh] if record is not None else [], np.int64)
    interacted = np.concatenate([history_ids, fresh_ids, overrides.recent_item_ids]).astype(np.int64)  # oldest first
    known = items.indices(interacted)
    known = known[known > 0][-spec.history_length:]
    padded = np.zeros(spec.history_length, dtype=np.int64)
    padded[spec.history_length - known.size:] = known
    exclude = sorted_unique(np.concatenate([stored_seen, artifact_seen, fresh_ids,
                                            overrides.recent_item_ids]).astype(np.int64))
    return UserView(user_idx=user_idx, cat=cat, num=num, history=padded, exclude_ids=exclude,
                    fresh_ids=fresh_ids, degraded=frozenset(flags))
