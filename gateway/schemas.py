"""The HTTP API's typed models: requests are checked against the proto's limits before any gRPC call,
and the OpenAPI document at ``/openapi.json`` is generated from these classes.

Limits mirror ``protos/recsys/v1`` and the ranking service's validation (user ids 1..128 bytes of
UTF-8 without ``{``, ``}`` or whitespace; item ids in [0, 2**63); timestamps in [0, 2**40); at most
32 request features with 1..128-byte names; at most 200 recent ids; 1..1000 interactions), so what
the gateway forwards is what the service accepts; feature names are checked by the service against
the served version and come back as 400 naming the field. Server-configured bounds (k, item counts)
are applied per route from ``GatewayConfig``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_USER_ID_BYTES = 128
MAX_FEATURES = 32
MAX_FEATURE_BYTES = 128
MAX_RECENT_ITEMS = 200
MAX_INTERACTIONS = 1000
MAX_HISTORY = 50              # RecommendOptions.history_size (recsys_contracts.item_metadata.RECENT_PER_USER)
MAX_TIMESTAMP_S = 2**40
INT64_MAX = 2**63 - 1
FLOAT32_MAX = 3.4028234e38
USER_ID_PATTERN = r"^[^\s{}]+$"


def utf8_at_most(limit: int, what: str):
    def check(value: str) -> str:
        size = len(value.encode("utf-8", errors="surrogatepass"))
        if size > limit:
            raise ValueError(f"{what} must be at most {limit} bytes of UTF-8, got {size} bytes")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{what} must be valid UTF-8 (no lone surrogates)") from None
        return value

    return AfterValidator(check)


UserId = Annotated[str, Field(min_length=1, max_length=MAX_USER_ID_BYTES, pattern=USER_ID_PATTERN,
                              description="External user id: 1..128 bytes of UTF-8 without '{', '}' or whitespace."),
                   utf8_at_most(MAX_USER_ID_BYTES, "user_id")]
ItemId = Annotated[int, Field(ge=0, le=INT64_MAX, description="External item id, >= 0.")]
Timestamp = Annotated[int, Field(ge=0, lt=MAX_TIMESTAMP_S,
                                 description="Seconds since the Unix epoch, UTC; 0 = now (the server's clock).")]
FeatureName = Annotated[str, Field(min_length=1, max_length=MAX_FEATURE_BYTES), utf8_at_most(MAX_FEATURE_BYTES, "name")]
FeatureText = Annotated[str, Field(min_length=1, max_length=MAX_FEATURE_BYTES), utf8_at_most(MAX_FEATURE_BYTES, "value")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UserFeatures(_Strict):
    """Request-time user features (cold start, overrides); names must be in the served version's spec."""

    categorical: dict[FeatureName, FeatureText] = Field(default_factory=dict, max_length=MAX_FEATURES)
    numeric: dict[FeatureName, Annotated[float, Field(allow_inf_nan=False)]] = Field(
        default_factory=dict, max_length=MAX_FEATURES)
    recent_item_ids: list[ItemId] = Field(default_factory=list, max_length=MAX_RECENT_ITEMS,
                                          description="Items the user interacted with recently, oldest first.")


class RankBody(_Strict):
    user_id: UserId
    item_ids: list[ItemId] = Field(min_length=1, description="Items to score; duplicates are scored once.")
    timestamp_s: Timestamp = 0
    user_features: UserFeatures | None = None
    include_metadata: bool = Field(True, description="Fill titles and genres from the served version.")


class Interaction(_Strict):
    user_id: UserId
    item_id: ItemId
    rating: Annotated[float, Field(allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)] | None = Field(
        None, description="Explicit rating in the dataset's scale, when there is one.")
    timestamp_s: Timestamp = 0


class InteractionsBody(_Strict):
    interactions: list[Interaction] = Field(min_length=1, max_length=MAX_INTERACTIONS)


class ScoredItem(BaseModel):
    item_id: int
    score: float = Field(description="What the list is sorted by (higher is better).")
    ctr: float = Field(description="Predicted probability of an interaction, in [0, 1].")
    predicted_rating: float = Field(description="Predicted explicit rating, in the dataset's scale.")
    retrieval_score: float = Field(description="The two-tower score the candidate arrived with.")
    title: str = Field(description="From the served version's item metadata; '' when unknown or not asked.")
    genres: list[str]


class HistoryItem(BaseModel):
    item_id: int
    timestamp_s: int = Field(description="When, seconds since the Unix epoch, UTC.")
    title: str
    genres: list[str]
    fresh: bool = Field(description="Recorded since the version was trained (else from its training log).")


class Recommendations(BaseModel):
    user_id: str
    items: list[ScoredItem] = Field(description="Best first, at most k.")
    retrieval_version: int = Field(description="0 when the popular-items fallback answered without retrieval.")
    ranking_version: int
    degraded: list[str] = Field(description="Degraded paths taken, e.g. 'cold_start_user', 'popular_fallback'.")
    history: list[HistoryItem] = Field(description="The user's most recent interactions, newest first.")
    latency_ms: float = Field(description="The ranking service's round trip as the gateway measured it.")
    request_id: str


class Ranked(BaseModel):
    user_id: str
    items: list[ScoredItem]
    ranking_version: int
    degraded: list[str]
    unknown_item_ids: list[int] = Field(description="Requested ids not in the catalog (scored with defaults).")
    latency_ms: float
    request_id: str


class Recorded(BaseModel):
    recorded: int = Field(description="How many interactions were stored.")
    request_id: str


class Health(BaseModel):
    status: str = Field(description="'ok' (live), 'serving' (ready) or 'not_serving'.")


class Problem(BaseModel):
    """An RFC 9457 problem detail (media type application/problem+json)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    field: str | None = Field(None, description="The request field at fault, when one is.")
    request_id: str
