"""Wire validation of the messages both services receive: user id, user features, context, stored user.

One set of limits (the proto comments' in ``recsys/v1/common.proto``) and one user-id rule
(``recsys_contracts.feature_store.check_user_id``: 1..128 bytes of printable UTF-8, no braces or
whitespace), applied at each service's door, so a request ranking accepts is never refused by
retrieval for these fields. Every refusal is an ``InvalidRequest`` (a ``ValueError``) whose message
names the field and quotes the value (at most ``recsys_contracts.ids.QUOTE_CHARS`` characters).
Checks that need the served version (feature names, encoding) belong to the services' user view.

``stored_user_message`` / ``stored_user`` are the two ends of ``RetrieveRequest.stored_user``: the
user's feature-store record as ranking read it, passed on so retrieval does not read it again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from recsys_contracts import feature_store
from recsys_contracts.feature_store import FreshInteraction, UserRecord
from recsys_contracts.ids import excerpt
from recsys_contracts.v1 import common_pb2, retrieval_pb2

MAX_FEATURES = 32             # entries per UserFeatures map
MAX_FEATURE_BYTES = 128       # bytes per key or categorical value
MAX_RECENT_ITEMS = 200        # UserFeatures.recent_item_ids
MAX_TIMESTAMP_S = 2**40       # exclusive
FLOAT32_MAX = 3.4028234663852886e38   # numeric features become float32 model inputs
MAX_ROW_VALUES = 0xFFFF       # StoredUser.row: per part, the row codec's limit
MAX_STORED_ITEMS = 100_000    # StoredUser.history_item_ids and seen_item_ids, each
MAX_FRESH = 1000              # StoredUser.fresh
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


class InvalidRequest(ValueError):
    """A request field is out of range; the message names the field and the value."""


@dataclass(frozen=True)
class Features:
    """A request's ``UserFeatures``, checked: names -> values, recent item ids oldest first."""

    categorical: dict[str, str]
    numeric: dict[str, float]
    recent_item_ids: tuple[int, ...]

    @property
    def any(self) -> bool:
        return bool(self.categorical or self.numeric or self.recent_item_ids)


def user_id(value: object, field: str = "user_id") -> str:
    """The user id, or ``InvalidRequest`` naming ``field``."""
    try:
        return feature_store.check_user_id(value)
    except ValueError as error:
        raise InvalidRequest(f"{field}{str(error).removeprefix('user_id')}") from None


def timestamp(value: int, field: str = "context.timestamp_s") -> int:
    """Seconds since the Unix epoch, UTC; 0 on the wire means now."""
    if not 0 <= value < MAX_TIMESTAMP_S:
        raise InvalidRequest(f"{field} must be in [0, 2**40) seconds, got {value!r}")
    return value if value else int(time.time())


def _size(field: str, value: str) -> None:
    size = len(value.encode("utf-8"))
    if not 1 <= size <= MAX_FEATURE_BYTES:
        raise InvalidRequest(f"{field} must be 1..{MAX_FEATURE_BYTES} bytes, got {size} bytes: {excerpt(value)}")


def user_features(features: common_pb2.UserFeatures, field: str = "user_features") -> Features:
    """The request-time features within the proto's limits, or ``InvalidRequest`` naming the first bad one."""
    categorical, numeric = dict(features.categorical), dict(features.numeric)
    for name, mapping in (("categorical", categorical), ("numeric", numeric)):
        if len(mapping) > MAX_FEATURES:
            raise InvalidRequest(f"{field}.{name} must hold at most {MAX_FEATURES} entries, got {len(mapping)}")
        for key in mapping:
            _size(f"{field}.{name} keys", key)
    for key, value in categorical.items():
        _size(f"{field}.categorical[{excerpt(key)}]", value)
    for key, value in numeric.items():
        if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise InvalidRequest(f"{field}.numeric[{excerpt(key)}] must be a finite float32 "
                                 f"(|x| <= {FLOAT32_MAX:.4g}), got {value!r}")
    recent = tuple(features.recent_item_ids)
    if len(recent) > MAX_RECENT_ITEMS:
        raise InvalidRequest(f"{field}.recent_item_ids must hold at most {MAX_RECENT_ITEMS} ids, got {len(recent)}")
    negative = [item for item in recent if item < 0]
    if negative:
        raise InvalidRequest(f"{field}.recent_item_ids must be >= 0, got {negative[0]!r}")
    return Features(categorical, numeric, recent)


@dataclass(frozen=True, eq=False)
class StoredUser:
    """A checked ``StoredUser``: the record (None = the store failed) read under ``version``."""

    version: int
    record: UserRecord | None


def stored_user_message(version: int, record: UserRecord | None) -> retrieval_pb2.StoredUser:
    """The wire form of what a read under ``version`` gave (``record`` None: the store failed)."""
    message = retrieval_pb2.StoredUser(version=version, store_failed=record is None)
    if record is None:
        return message
    if record.row is not None:
        cat, num = record.row
        message.row.categorical.extend(cat.tolist())
        message.row.numeric.extend(num.tolist())
    message.history_item_ids.extend(record.history.tolist())
    message.seen_item_ids.extend(record.seen.tolist())
    message.fresh.extend(retrieval_pb2.FreshItem(item_id=f.item_id, timestamp_s=f.timestamp, rating=f.rating)
                         for f in record.fresh)
    return message


def _item_ids(field: str, values, limit: int) -> np.ndarray:
    ids = np.asarray(values, dtype=np.int64)
    if ids.size > limit:
        raise InvalidRequest(f"{field} must hold at most {limit} ids, got {ids.size}")
    if ids.size and int(ids.min()) < 0:
        raise InvalidRequest(f"{field} must be item ids >= 0, got {int(ids.min())}")
    return ids


def _row(message: retrieval_pb2.FeatureRow, field: str) -> tuple[np.ndarray, np.ndarray]:
    for name, values in (("categorical", message.categorical), ("numeric", message.numeric)):
        if len(values) > MAX_ROW_VALUES:
            raise InvalidRequest(f"{field}.{name} must hold at most {MAX_ROW_VALUES} values, got {len(values)}")
    cat = np.asarray(message.categorical, dtype=np.int64)                # (Cu,)
    if cat.size and not (INT32_MIN <= int(cat.min()) and int(cat.max()) <= INT32_MAX):
        bad = int(cat.min()) if int(cat.min()) < INT32_MIN else int(cat.max())
        raise InvalidRequest(f"{field}.categorical must be int32 vocabulary indices, got {bad}")
    num = np.asarray(message.numeric, dtype=np.float32)                  # (Nu,)
    if not np.isfinite(num).all():
        raise InvalidRequest(f"{field}.numeric must be finite, got {float(num[~np.isfinite(num)][0])!r}")
    return cat, num


def _fresh(items, field: str) -> list[FreshInteraction]:
    if len(items) > MAX_FRESH:
        raise InvalidRequest(f"{field} must hold at most {MAX_FRESH} entries, got {len(items)}")
    fresh = []
    for i, item in enumerate(items):
        rating = item.rating if item.HasField("rating") else None
        if item.item_id < 0:
            raise InvalidRequest(f"{field}[{i}].item_id must be >= 0, got {item.item_id}")
        if item.timestamp_s < 0:
            raise InvalidRequest(f"{field}[{i}].timestamp_s must be >= 0, got {item.timestamp_s}")
        if rating is not None and not math.isfinite(rating):
            raise InvalidRequest(f"{field}[{i}].rating must be finite, got {rating!r}")
        fresh.append(FreshInteraction(item_id=item.item_id, timestamp=item.timestamp_s, rating=rating))
    return fresh


def stored_user(message: retrieval_pb2.StoredUser, field: str = "stored_user") -> StoredUser:
    """The checked record, or ``InvalidRequest`` naming the first bad field and its value."""
    if message.version < 1:
        raise InvalidRequest(f"{field}.version must be >= 1, got {message.version}")
    if message.store_failed:
        filled = [name for name in ("row", "history_item_ids", "seen_item_ids", "fresh")
                  if (message.HasField(name) if name == "row" else len(getattr(message, name)))]
        if filled:
            raise InvalidRequest(f"{field}.{filled[0]} must be empty when {field}.store_failed is true")
        return StoredUser(message.version, None)
    row = _row(message.row, f"{field}.row") if message.HasField("row") else None
    history = _item_ids(f"{field}.history_item_ids", message.history_item_ids, MAX_STORED_ITEMS)
    seen = _item_ids(f"{field}.seen_item_ids", message.seen_item_ids, MAX_STORED_ITEMS)
    return StoredUser(message.version, UserRecord(row=row, history=history, seen=np.sort(seen),
                                                  fresh=_fresh(message.fresh, f"{field}.fresh")))
