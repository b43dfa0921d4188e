from recsys_contracts.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Arm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARM_UNSPECIFIED: _ClassVar[Arm]
    ARM_LIVE: _ClassVar[Arm]
    ARM_CANARY: _ClassVar[Arm]
    ARM_PINNED: _ClassVar[Arm]
ARM_UNSPECIFIED: Arm
ARM_LIVE: Arm
ARM_CANARY: Arm
ARM_PINNED: Arm

class RecommendOptions(_message.Message):
    __slots__ = ("num_candidates", "diversity", "include_seen", "include_item_metadata", "history_size")
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ITEM_METADATA_FIELD_NUMBER: _ClassVar[int]
    HISTORY_SIZE_FIELD_NUMBER: _ClassVar[int]
    num_candidates: int
    diversity: float
    include_seen: bool
    include_item_metadata: bool
    history_size: int
    def __init__(self, num_candidates: _Optional[int] = ..., diversity: _Optional[float] = ..., include_seen: _Optional[bool] = ..., include_item_metadata: _Optional[bool] = ..., history_size: _Optional[int] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "k", "context", "options", "user_features", "version")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    USER_FEATURES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    k: int
    context: _common_pb2.Context
    options: RecommendOptions
    user_features: _common_pb2.UserFeatures
    version: int
    def __init__(self, user_id: _Optional[str] = ..., k: _Optional[int] = ..., context: _Optional[_Union[_common_pb2.Context, _Mapping]] = ..., options: _Optional[_Union[RecommendOptions, _Mapping]] = ..., user_features: _Optional[_Union[_common_pb2.UserFeatures, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "ctr", "predicted_rating", "retrieval_score", "title", "genres")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CTR_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_RATING_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_SCORE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    GENRES_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    score: float
    ctr: float
    predicted_rating: float
    retrieval_score: float
    title: str
    genres: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_id: _Optional[int] = ..., score: _Optional[float] = ..., ctr: _Optional[float] = ..., predicted_rating: _Optional[float] = ..., retrieval_score: _Optional[float] = ..., title: _Optional[str] = ..., genres: _Optional[_Iterable[str]] = ...) -> None: ...

class HistoryItem(_message.Message):
    __slots__ = ("item_id", "timestamp_s", "title", "genres", "fresh")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    GENRES_FIELD_NUMBER: _ClassVar[int]
    FRESH_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    timestamp_s: int
    title: str
    genres: _containers.RepeatedScalarFieldContainer[str]
    fresh: bool
    def __init__(self, item_id: _Optional[int] = ..., timestamp_s: _Optional[int] = ..., title: _Optional[str] = ..., genres: _Optional[_Iterable[str]] = ..., fresh: _Optional[bool] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "retrieval_version", "ranking_version", "degraded", "history", "arm")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RANKING_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    retrieval_version: int
    ranking_version: int
    degraded: _containers.RepeatedScalarFieldContainer[_common_pb2.DegradedPath]
    history: _containers.RepeatedCompositeFieldContainer[HistoryItem]
    arm: Arm
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., retrieval_version: _Optional[int] = ..., ranking_version: _Optional[int] = ..., degraded: _Optional[_Iterable[_Union[_common_pb2.DegradedPath, str]]] = ..., history: _Optional[_Iterable[_Union[HistoryItem, _Mapping]]] = ..., arm: _Optional[_Union[Arm, str]] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("user_id", "item_ids", "context", "user_features", "include_item_metadata")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    USER_FEATURES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ITEM_METADATA_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_ids: _containers.RepeatedScalarFieldContainer[int]
    context: _common_pb2.Context
    user_features: _common_pb2.UserFeatures
    include_item_metadata: bool
    def __init__(self, user_id: _Optional[str] = ..., item_ids: _Optional[_Iterable[int]] = ..., context: _Optional[_Union[_common_pb2.Context, _Mapping]] = ..., user_features: _Optional[_Union[_common_pb2.UserFeatures, _Mapping]] = ..., include_item_metadata: _Optional[bool] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("items", "ranking_version", "degraded", "unknown_item_ids")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RANKING_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    ranking_version: int
    degraded: _containers.RepeatedScalarFieldContainer[_common_pb2.DegradedPath]
    unknown_item_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., ranking_version: _Optional[int] = ..., degraded: _Optional[_Iterable[_Union[_common_pb2.DegradedPath, str]]] = ..., unknown_item_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RecordInteractionsRequest(_message.Message):
    __slots__ = ("interactions",)
    INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    interactions: _containers.RepeatedCompositeFieldContainer[_common_pb2.Interaction]
    def __init__(self, interactions: _Optional[_Iterable[_Union[_common_pb2.Interaction, _Mapping]]] = ...) -> None: ...

class RecordInteractionsResponse(_message.Message):
    __slots__ = ("recorded",)
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    recorded: int
    def __init__(self, recorded: _Optional[int] = ...) -> None: ...
