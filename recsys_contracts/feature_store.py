"""The Redis feature store: key format, value codec, pipelined read/write helpers, client factory.

Redis is a cache of one artifact version plus the fresh interactions recorded online. This
docstring is the one documentation of the format; ``tests/contracts/test_feature_store.py``
pins it with golden keys and golden bytes.

Keys (``ns`` = namespace, default ``recsys``, ``[A-Za-z0-9_.-]{1,64}``; ``V`` = version, int >= 1)::

    {ns}:v{V}:{u:<user_id>}:feat   bytes   the user's encoded feature row (row codec)
    {ns}:v{V}:{u:<user_id>}:hist   bytes   the user's recent item ids from the artifact
                                           (id codec, oldest first)
    {ns}:v{V}:{u:<user_id>}:seen   bytes   every item id the user has in training data
                                           (id codec, sorted ascending, unique)
    {ns}:fresh:{u:<user_id>}       LIST    fresh interactions recorded online (fresh codec),
                                           oldest first; unversioned so they survive version
                                           changes; RPUSH, LTRIM to the last ``max_fresh``
                                           (default 200), EXPIRE (default 30 days) on each write
    {ns}:v{V}:{i:<item_id>}:feat   bytes   the item's encoded feature row (row codec)
    {ns}:v{V}:complete             "1"     set once every key of version V is written

``{u:...}`` and ``{i:...}`` are Redis Cluster hash tags: every key of one user hashes to one slot,
so the 4-command pipelined user read works on Cluster. Item keys spread over slots; a cluster
pipeline splits an item read by node. User ids are 1..128 bytes of UTF-8 without ``{``, ``}``
or whitespace (they would break the hash tag or the key grammar); item ids are ints in
[0, 2**63). Values are raw bytes: clients must not decode responses (``redis_client`` doesn't).

Codecs (all little-endian):

- row: header ``b"R"``, uint8 format version 1, uint16 C, uint16 N; then C int32 categorical
  indices, then N float32 numeric values. 6 + 4C + 4N bytes. Categorical indices are int64 in
  memory (the model-input contract) and must fit int32 on the wire.
- ids: n int64, 8n bytes.
- fresh: int64 item id, int64 timestamp (seconds since the Unix epoch, UTC), float32 rating
  (NaN when the interaction has no rating). 20 bytes.

Sync (``redis.Redis``, the trainer) and async (``redis.asyncio.Redis``, the services) callers
share one implementation: ``queue_*`` functions add commands to a pipeline, the caller executes
it (``pipe.execute()`` or ``await pipe.execute()``), ``parse_*`` functions read the results::

    pipe = client.pipeline(transaction=False)
    queue_user_read(pipe, keys, version, user_id)
    record = parse_user_read(pipe.execute())

The services read a user with one command instead (``USER_READ_SCRIPT``, through
``recsys_serving.features.UserReader``); its replies parse the same way.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import redis
import redis.asyncio

from recsys_contracts.ids import excerpt
import redis.asyncio.retry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MAX_USER_ID_BYTES = 128
_INT64_MAX = 2**63 - 1
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)

_ROW_MAGIC = b"R"
_ROW_FORMAT_VERSION = 1
# magic (1 byte), format version (uint8), C (uint16), N (uint16)
_ROW_HEADER = struct.Struct("<cBHH")
# item id (int64), timestamp (int64), rating (float32; NaN = none)
_FRESH = struct.Struct("<qqf")

DEFAULT_MAX_FRESH = 200
DEFAULT_FRESH_TTL_S = 30 * 86400
_EXPIRE_BATCH = 1000  # EXPIRE commands per pipeline round trip


class Pipeline(Protocol):
    """The commands this module queues; ``redis.client.Pipeline`` and its asyncio twin both fit."""

    def get(self, name: str) -> Any: ...
    def set(self, name: str, value: bytes, ex: int | None = None) -> Any: ...
    def lrange(self, name: str, start: int, end: int) -> Any: ...
    def rpush(self, name: str, *values: bytes) -> Any: ...
    def ltrim(self, name: str, start: int, end: int) -> Any: ...
    def expire(self, name: str, time: int) -> Any: ...


def _check_int(field: str, value: object, low: int, high: int) -> int:
    """``value`` as an int in [low, high]; bools and non-integers are rejected."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{field} must be an int in [{low}, {high}], got {value!r}")
    if not low <= int(value) <= high:
        raise ValueError(f"{field} must be in [{low}, {high}], got {value!r}")
    return int(value)


def check_version(version: object) -> int:
    """A version number: an int >= 1."""
    return _check_int("version", version, 1, _INT64_MAX)


def check_user_id(user_id: object) -> str:
    """An external user id: 1..128 bytes of printable UTF-8 without ``{``, ``}`` or whitespace.

    The length is checked before anything quotes the value, and messages quote at most
    ``ids.QUOTE_CHARS`` characters of it (a huge id must not become a huge log line or status)."""
    if not isinstance(user_id, str):
        raise ValueError(f"user_id must be a str, got {excerpt(user_id)} ({type(user_id).__name__})")
    if len(user_id) > _MAX_USER_ID_BYTES:      # > 128 characters is > 128 bytes: refuse unread
        raise ValueError(f"user_id must be 1..{_MAX_USER_ID_BYTES} bytes of UTF-8, got {len(user_id)} characters: "
                         f"{excerpt(user_id)}")
    try:
        size = len(user_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"user_id must be valid UTF-8, got {excerpt(user_id)}") from None
    if not 1 <= size <= _MAX_USER_ID_BYTES:
        raise ValueError(
            f"user_id must be 1..{_MAX_USER_ID_BYTES} bytes of UTF-8, got {size} bytes: {excerpt(user_id)}"
        )
    if any(ch in "{}" or ch.isspace() for ch in user_id):
        raise ValueError(f"user_id must not contain '{{', '}}' or whitespace, got {excerpt(user_id)}")
    if not user_id.isprintable():
        raise ValueError(f"user_id must hold printable characters only, got {excerpt(user_id)}")
    return user_id


def check_item_id(item_id: object) -> int:
    """An external item id: an int in [0, 2**63)."""
    return _check_int("item_id", item_id, 0, _INT64_MAX)


@dataclass(frozen=True)
class KeyFormat:
    """Builds every key of the store under one namespace (see the module docstring)."""

    namespace: str = "recsys"

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, str) or not _NAMESPACE_RE.fullmatch(self.namespace):
            raise ValueError(
                f"namespace must match [A-Za-z0-9_.-]{{1,64}}, got {self.namespace!r}"
            )

    def _user(self, version: int, user_id: str, suffix: str) -> str:
        return f"{self.namespace}:v{check_version(version)}:{{u:{check_user_id(user_id)}}}:{suffix}"

    def user_features(self, version: int, user_id: str) -> str:
        return self._user(version, user_id, "feat")

    def user_history(self, version: int, user_id: str) -> str:
        return self._user(version, user_id, "hist")

    def user_seen(self, version: int, user_id: str) -> str:
        return self._user(version, user_id, "seen")

    def user_fresh(self, user_id: str) -> str:
        return f"{self.namespace}:fresh:{{u:{check_user_id(user_id)}}}"

    def item_features(self, version: int, item_id: int) -> str:
        return f"{self.namespace}:v{check_version(version)}:{{i:{check_item_id(item_id)}}}:feat"

    def complete(self, version: int) -> str:
        return f"{self.namespace}:v{check_version(version)}:complete"

    def version_pattern(self, version: int) -> str:
        """SCAN MATCH pattern of every key of one version (the namespace holds no glob chars)."""
        return f"{self.namespace}:v{check_version(version)}:*"


# ---------------------------------------------------------------- codecs


def encode_row(cat: np.ndarray, num: np.ndarray) -> bytes:
    """Encode one feature row: ``cat`` integer (C,), ``num`` real (N,); C, N <= 65535."""
    cat = np.asarray(cat)
    num = np.asarray(num)
    if cat.ndim != 1 or cat.dtype.kind not in "iu" or cat.size > 0xFFFF:
        raise ValueError(
            f"cat must be a 1-D integer array of at most 65535 values, "
            f"got dtype {cat.dtype} shape {cat.shape}"
        )
    if num.ndim != 1 or num.dtype.kind not in "iuf" or num.size > 0xFFFF:
        raise ValueError(
            f"num must be a 1-D real array of at most 65535 values, "
            f"got dtype {num.dtype} shape {num.shape}"
        )
    if cat.size and (int(cat.min()) < _INT32_MIN or int(cat.max()) > _INT32_MAX):
        raise ValueError(
            f"cat values must fit int32, got range [{int(cat.min())}, {int(cat.max())}]"
        )
    header = _ROW_HEADER.pack(_ROW_MAGIC, _ROW_FORMAT_VERSION, cat.size, num.size)
    return header + cat.astype("<i4").tobytes() + num.astype("<f4").tobytes()


def decode_row(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``encode_row``'s bytes into (cat int64 (C,), num float32 (N,))."""
    if len(data) < _ROW_HEADER.size:
        raise ValueError(
            f"row must be at least {_ROW_HEADER.size} bytes, got {len(data)} bytes: {data[:16]!r}"
        )
    magic, fmt, n_cat, n_num = _ROW_HEADER.unpack_from(data)
    if magic != _ROW_MAGIC:
        raise ValueError(f"row magic must be {_ROW_MAGIC!r}, got {magic!r}")
    if fmt != _ROW_FORMAT_VERSION:
        raise ValueError(f"row format version must be {_ROW_FORMAT_VERSION}, got {fmt}")
    expected = _ROW_HEADER.size + 4 * (n_cat + n_num)
    if len(data) != expected:
        raise ValueError(
            f"row length must be {expected} bytes for C={n_cat} N={n_num}, got {len(data)}"
        )
    body = np.frombuffer(data, dtype=np.uint8, offset=_ROW_HEADER.size)
    cat = body[: 4 * n_cat].view("<i4").astype(np.int64)  # (C,)
    num = body[4 * n_cat :].view("<f4").astype(np.float32)  # (N,) native order, owned copy
    return cat, num


def encode_ids(ids: np.ndarray | Sequence[int]) -> bytes:
    """Encode a 1-D list of ids >= 0 as int64 little-endian."""
    arr = np.asarray(ids)
    # An empty list arrives as float64; emptiness is the only case where the dtype doesn't matter.
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(
            f"ids must be a 1-D integer array, got dtype {arr.dtype} shape {arr.shape}"
        )
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _INT64_MAX):
        raise ValueError(
            f"ids must be in [0, 2**63), got range [{int(arr.min())}, {int(arr.max())}]"
        )
    return arr.astype("<i8").tobytes()


def decode_ids(data: bytes) -> np.ndarray:
    """Decode ``encode_ids``'s bytes into an int64 (n,) array."""
    if len(data) % 8:
        raise ValueError(f"ids length must be a multiple of 8 bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i8").astype(np.int64)


@dataclass(frozen=True)
class FreshInteraction:
    """One interaction recorded online; ``rating`` None when the interaction carries none."""

    item_id: int
    timestamp: int  # seconds since the Unix epoch, UTC
    rating: float | None = None

    def __post_init__(self) -> None:
        check_item_id(self.item_id)
        _check_int("timestamp", self.timestamp, 0, _INT64_MAX)
        if self.rating is not None and not (
            isinstance(self.rating, (int, float, np.floating))
            and not isinstance(self.rating, bool)
            and abs(self.rating) <= _FLOAT32_MAX
        ):
            raise ValueError(f"rating must be a finite float32 or None, got {self.rating!r}")


def encode_fresh(interaction: FreshInteraction) -> bytes:
    rating = math.nan if interaction.rating is None else interaction.rating
    return _FRESH.pack(interaction.item_id, interaction.timestamp, rating)


def decode_fresh(data: bytes) -> FreshInteraction:
    if len(data) != _FRESH.size:
        raise ValueError(f"fresh interaction must be {_FRESH.size} bytes, got {len(data)}")
    item_id, timestamp, rating = _FRESH.unpack(data)
    return FreshInteraction(item_id, timestamp, None if math.isnan(rating) else rating)


# ---------------------------------------------------------------- reads


@dataclass(frozen=True)
class UserRecord:
    """What the store holds for one user in one version (empty arrays when absent)."""

    row: tuple[np.ndarray, np.ndarray] | None  # (cat int64 (Cu,), num float32 (Nu,))
    history: np.ndarray  # int64 (h,), oldest first
    seen: np.ndarray  # int64 (s,), sorted
    fresh: list[FreshInteraction]  # oldest first


_USER_READ_COMMANDS = 4


def user_read_keys(keys: KeyFormat, version: int, user_id: str) -> list[str]:
    """The keys of a user read, in ``parse_user_read``'s order: features, history, seen, fresh."""
    return [keys.user_features(version, user_id), keys.user_history(version, user_id),
            keys.user_seen(version, user_id), keys.user_fresh(user_id)]


def queue_user_read(pipe: Pipeline, keys: KeyFormat, version: int, user_id: str) -> None:
    """Queue the 4 commands of a user read (one slot thanks to the hash tag, one round trip)."""
    feat, hist, seen, fresh = user_read_keys(keys, version, user_id)
    pipe.get(feat)
    pipe.get(hist)
    pipe.get(seen)
    pipe.lrange(fresh, 0, -1)


# The same read as ONE command (EVALSHA of this script, KEYS = ``user_read_keys``): the four replies
# of ``queue_user_read``, in its order, for ``parse_user_read``. The services' per-request read: redis-py's
# asyncio client spends about a third less CPU on one command than on a 4-command pipeline (~150 against
# ~230 us a read, measured). Read-only, and its keys share the user's hash tag (one Cluster slot).
USER_READ_SCRIPT = ("return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2]), "
                    "redis.call('GET', KEYS[3]), redis.call('LRANGE', KEYS[4], 0, -1)}")


def parse_user_read(results: Sequence[Any]) -> UserRecord:
    """Parse the results of ``queue_user_read``'s 4 commands."""
    if len(results) != _USER_READ_COMMANDS:
        raise ValueError(f"results must hold {_USER_READ_COMMANDS} replies, got {len(results)}")
    feat, hist, seen, fresh = results
    empty = np.zeros(0, dtype=np.int64)
    return UserRecord(
        row=None if feat is None else decode_row(feat),
        history=empty if hist is None else decode_ids(hist),
        seen=empty if seen is None else decode_ids(seen),
        fresh=[decode_fresh(item) for item in fresh or ()],
    )


def queue_item_read(pipe: Pipeline, keys: KeyFormat, version: int, item_ids: Sequence[int]) -> None:
    """Queue one GET per item (not MGET: item keys live in different Cluster slots)."""
    for item_id in item_ids:
        pipe.get(keys.item_features(version, item_id))


def parse_item_read(
    results: Sequence[Any], item_ids: Sequence[int]
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Rows by item id; items the store lacks are absent from the dict."""
    if len(results) != len(item_ids):
        raise ValueError(
            f"results must hold one reply per item id ({len(item_ids)}), got {len(results)}"
        )
    return {int(i): decode_row(r) for i, r in zip(item_ids, results) if r is not None}


def queue_is_complete(pipe: Pipeline, keys: KeyFormat, version: int) -> None:
    pipe.get(keys.complete(version))


def parse_is_complete(result: Any) -> bool:
    """True when the version's complete marker holds "1"."""
    return result == b"1"


# ---------------------------------------------------------------- writes


def queue_record_interactions(
    pipe: Pipeline,
    keys: KeyFormat,
    interactions: Iterable[tuple[str, FreshInteraction]],
    *,
    max_fresh: int = DEFAULT_MAX_FRESH,
    ttl_s: int = DEFAULT_FRESH_TTL_S,
) -> int:
    """Queue RPUSH + LTRIM + EXPIRE per user for (user_id, interaction) pairs, in order.

    Returns how many interactions were queued. The list keeps the last ``max_fresh`` entries and
    expires ``ttl_s`` seconds after the user's latest write.
    """
    _check_int("max_fresh", max_fresh, 1, 1_000_000)
    _check_int("ttl_s", ttl_s, 1, _INT64_MAX)
    by_user: dict[str, list[bytes]] = {}
    for user_id, interaction in interactions:
        by_user.setdefault(keys.user_fresh(user_id), []).append(encode_fresh(interaction))
    for key, values in by_user.items():
        pipe.rpush(key, *values)
        pipe.ltrim(key, -max_fresh, -1)
        pipe.expire(key, ttl_s)
    return sum(len(values) for values in by_user.values())


def _set_batches(
    client: redis.Redis, pairs: Iterable[tuple[str, bytes]], batch_size: int, ttl_s: int | None
) -> int:
    written = 0
    pipe = client.pipeline(transaction=False)
    for key, value in pairs:
        pipe.set(key, value, ex=ttl_s)
        if len(pipe) >= batch_size:
            written += len(pipe.execute())
    written += len(pipe.execute())
    return written


def write_version(
    client: redis.Redis,
    keys: KeyFormat,
    version: int,
    *,
    users: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    items: Iterable[tuple[int, np.ndarray, np.ndarray]],
    batch_size: int = 1000,
    ttl_s: int | None = None,
) -> int:
    """Write a version's user and item keys with a sync client; returns how many keys were set.

    ``users`` yields (user_id, cat, num, history, seen), ``items`` yields (item_id, cat, num).
    Batches of ``batch_size`` SETs go in non-transactional pipelines (one round trip each);
    ``seen`` is stored sorted and unique. Call ``mark_complete`` afterwards.
    """
    _check_int("batch_size", batch_size, 1, 1_000_000)
    if ttl_s is not None:
        _check_int("ttl_s", ttl_s, 1, _INT64_MAX)
    check_version(version)

    def pairs() -> Iterable[tuple[str, bytes]]:
        for user_id, cat, num, history, seen in users:
            yield keys.user_features(version, user_id), encode_row(cat, num)
            yield keys.user_history(version, user_id), encode_ids(history)
            yield keys.user_seen(version, user_id), encode_ids(np.unique(np.asarray(seen)))
        for item_id, cat, num in items:
            yield keys.item_features(version, item_id), encode_row(cat, num)

    return _set_batches(client, pairs(), batch_size, ttl_s)


def mark_complete(client: redis.Redis, keys: KeyFormat, version: int) -> None:
    client.set(keys.complete(version), b"1")


def expire_version(client: redis.Redis, keys: KeyFormat, version: int, ttl_s: int) -> int:
    """Set a TTL of ``ttl_s`` seconds on every key of a version; returns how many keys got one.

    SCAN walks one node: on Redis Cluster pass ``redis.cluster.RedisCluster``, whose
    ``scan_iter`` visits every primary (or run this once per node).
    """
    _check_int("ttl_s", ttl_s, 1, _INT64_MAX)
    expired = 0
    pipe = client.pipeline(transaction=False)
    for key in client.scan_iter(match=keys.version_pattern(version), count=_EXPIRE_BATCH):
        pipe.expire(key, ttl_s)
        if len(pipe) >= _EXPIRE_BATCH:
            expired += sum(map(bool, pipe.execute()))
    expired += sum(map(bool, pipe.execute()))
    return expired


# ---------------------------------------------------------------- client


def redis_client(
    url: str,
    *,
    socket_timeout_s: float = 0.2,
    connect_timeout_s: float = 0.2,
    retries: int = 1,
    asyncio: bool = False,
) -> redis.Redis | redis.asyncio.Redis:
    """A client for ``url`` (auth and ``rediss://`` TLS come from the URL) that fails fast.

    The library defaults (5 s socket timeouts, 10 retries with backoff up to 1 s) can block a
    request for tens of seconds on a frozen or partitioned Redis; a service with a 50 ms feature
    budget must instead fail within about ``(retries + 1) * socket_timeout_s`` and fall back to
    the artifact. Backoff between tries is 10..50 ms. Health checks are off: a failing command
    already reconnects, and a periodic PING only adds latency to the hot path. Responses stay
    bytes (the codecs need them).
    """
    timeouts = {"socket_timeout_s": socket_timeout_s, "connect_timeout_s": connect_timeout_s}
    for field, value in timeouts.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 60:
            raise ValueError(f"{field} must be a number of seconds in (0, 60], got {value!r}")
    _check_int("retries", retries, 0, 10)
    backoff = ExponentialBackoff(cap=0.05, base=0.01)  # seconds
    options = dict(
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        health_check_interval=0,
        decode_responses=False,
    )
    if asyncio:
        return redis.asyncio.Redis.from_url(
            url, retry=redis.asyncio.retry.Retry(backoff, retries), **options
        )
    return redis.Redis.from_url(url, retry=Retry(backoff, retries), **options)


def write_tables(client: redis.Redis, keys: KeyFormat, version: int, tables: Any, *,
                 user_ids: np.ndarray, item_ids: np.ndarray, batch_size: int = 1000,
                 ttl_s: int | None = None) -> int:
    """Materialises a version's tables into Redis and marks the version complete; returns keys set.

    ``tables`` holds the index-aligned arrays ``user_cat``, ``user_num``, ``history``,
    ``seen_indptr``, ``seen_items``, ``item_cat``, ``item_num`` (``recsys_contracts.bundle.
    VersionTables`` or the trainer's ``FeatureTables``); ``user_ids`` (n+1,) and ``item_ids`` (m+1,)
    map indices to external ids. The trainer calls this after publishing; the services call it
    to refill a Redis that came back empty.
    """

    def users() -> Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        for u in range(1, len(user_ids)):
            history = tables.history[u]
            seen = tables.seen_items[tables.seen_indptr[u]:tables.seen_indptr[u + 1]]
            yield (str(user_ids[u]), tables.user_cat[u], tables.user_num[u],
                   item_ids[history[history > 0]], item_ids[seen])

    def items() -> Iterable[tuple[int, np.ndarray, np.ndarray]]:
        for i in range(1, len(item_ids)):
            yield int(item_ids[i]), tables.item_cat[i], tables.item_num[i]

    written = write_version(client, keys, version, users=users(), items=items(),
                            batch_size=batch_size, ttl_s=ttl_s)
    mark_complete(client, keys, version)
    return written
