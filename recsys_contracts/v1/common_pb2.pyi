from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class DegradedPath(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEGRADED_PATH_UNSPECIFIED: _ClassVar[DegradedPath]
    DEGRADED_PATH_COLD_START_USER: _ClassVar[DegradedPath]
    DEGRADED_PATH_FEATURES_FROM_ARTIFACT: _ClassVar[DegradedPath]
    DEGRADED_PATH_DEFAULT_FEATURES: _ClassVar[DegradedPath]
    DEGRADED_PATH_POPULAR_FALLBACK: _ClassVar[DegradedPath]
    DEGRADED_PATH_UNKNOWN_ITEMS: _ClassVar[DegradedPath]
    DEGRADED_PATH_MODEL_FALLBACK: _ClassVar[DegradedPath]
DEGRADED_PATH_UNSPECIFIED: DegradedPath
DEGRADED_PATH_COLD_START_USER: DegradedPath
DEGRADED_PATH_FEATURES_FROM_ARTIFACT: DegradedPath
DEGRADED_PATH_DEFAULT_FEATURES: DegradedPath
DEGRADED_PATH_POPULAR_FALLBACK: DegradedPath
DEGRADED_PATH_UNKNOWN_ITEMS: DegradedPath
DEGRADED_PATH_MODEL_FALLBACK: DegradedPath

class Context(_message.Message):
    __slots__ = ("timestamp_s",)
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    timestamp_s: int
    def __init__(self, timestamp_s: _Optional[int] = ...) -> None: ...

class UserFeatures(_message.Message):
    __slots__ = ("categorical", "numeric", "recent_item_ids")
    class CategoricalEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class NumericEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CATEGORICAL_FIELD_NUMBER: _ClassVar[int]
    NUMERIC_FIELD_NUMBER: _ClassVar[int]
    RECENT_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    categorical: _containers.ScalarMap[str, str]
    numeric: _containers.ScalarMap[str, float]
    recent_item_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, categorical: _Optional[_Mapping[str, str]] = ..., numeric: _Optional[_Mapping[str, float]] = ..., recent_item_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Interaction(_message.Message):
    __slots__ = ("user_id", "item_id", "rating", "timestamp_s")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_id: int
    rating: float
    timestamp_s: int
    def __init__(self, user_id: _Optional[str] = ..., item_id: _Optional[int] = ..., rating: _Optional[float] = ..., timestamp_s: _Optional[int] = ...) -> None: ...
