"""Wire validation of the messages both services receive: user id, user features, context.

One set of limits (the proto comments' in ``recsys/v1/common.proto``) and one user-id rule
(``recsys_contracts.feature_store.check_user_id``: 1..128 bytes of printable UTF-8, no braces or
whitespace), applied at each service's door, so a request ranking accepts is never refused by
retrieval for these fields. Every refusal is an ``InvalidRequest`` (a ``ValueError``) whose message
names the field and quotes the value (at most ``recsys_contracts.ids.QUOTE_CHARS`` characters).
Checks that need the served version (feature names, encoding) belong to the services' user view.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from recsys_contracts import feature_store
from recsys_contracts.ids import excerpt
from recsys_contracts.v1 import common_pb2

MAX_FEATURES = 32             # entries per UserFeatures map
MAX_FEATURE_BYTES = 128       # bytes per key or categorical value
MAX_RECENT_ITEMS = 200        # UserFeatures.recent_item_ids
MAX_TIMESTAMP_S = 2**40       # exclusive
FLOAT32_MAX = 3.4028234663852886e38   # numeric features become float32 model inputs


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
