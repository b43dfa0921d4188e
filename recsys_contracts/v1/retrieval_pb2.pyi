from recsys_contracts.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RetrieveRequest(_message.Message):
    __slots__ = ("user_id", "num_candidates", "user_features", "context", "include_seen", "version", "fallback_versions", "stored_user")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    USER_FEATURES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    STORED_USER_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    num_candidates: int
    user_features: _common_pb2.UserFeatures
    context: _common_pb2.Context
    include_seen: bool
    version: int
    fallback_versions: _containers.RepeatedScalarFieldContainer[int]
    stored_user: StoredUser
    def __init__(self, user_id: _Optional[str] = ..., num_candidates: _Optional[int] = ..., user_features: _Optional[_Union[_common_pb2.UserFeatures, _Mapping]] = ..., context: _Optional[_Union[_common_pb2.Context, _Mapping]] = ..., include_seen: _Optional[bool] = ..., version: _Optional[int] = ..., fallback_versions: _Optional[_Iterable[int]] = ..., stored_user: _Optional[_Union[StoredUser, _Mapping]] = ...) -> None: ...

class StoredUser(_message.Message):
    __slots__ = ("version", "store_failed", "row", "history_item_ids", "seen_item_ids", "fresh")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STORE_FAILED_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SEEN_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    FRESH_FIELD_NUMBER: _ClassVar[int]
    version: int
    store_failed: bool
    row: FeatureRow
    history_item_ids: _containers.RepeatedScalarFieldContainer[int]
    seen_item_ids: _containers.RepeatedScalarFieldContainer[int]
    fresh: _containers.RepeatedCompositeFieldContainer[FreshItem]
    def __init__(self, version: _Optional[int] = ..., store_failed: _Optional[bool] = ..., row: _Optional[_Union[FeatureRow, _Mapping]] = ..., history_item_ids: _Optional[_Iterable[int]] = ..., seen_item_ids: _Optional[_Iterable[int]] = ..., fresh: _Optional[_Iterable[_Union[FreshItem, _Mapping]]] = ...) -> None: ...

class FeatureRow(_message.Message):
    __slots__ = ("categorical", "numeric")
    CATEGORICAL_FIELD_NUMBER: _ClassVar[int]
    NUMERIC_FIELD_NUMBER: _ClassVar[int]
    categorical: _containers.RepeatedScalarFieldContainer[int]
    numeric: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, categorical: _Optional[_Iterable[int]] = ..., numeric: _Optional[_Iterable[float]] = ...) -> None: ...

class FreshItem(_message.Message):
    __slots__ = ("item_id", "timestamp_s", "rating")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    timestamp_s: int
    rating: float
    def __init__(self, item_id: _Optional[int] = ..., timestamp_s: _Optional[int] = ..., rating: _Optional[float] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("item_ids", "scores", "model_version", "degraded")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    model_version: int
    degraded: _containers.RepeatedScalarFieldContainer[_common_pb2.DegradedPath]
    def __init__(self, item_ids: _Optional[_Iterable[int]] = ..., scores: _Optional[_Iterable[float]] = ..., model_version: _Optional[int] = ..., degraded: _Optional[_Iterable[_Union[_common_pb2.DegradedPath, str]]] = ...) -> None: ...
