"""The Redis feature-store contract: golden keys and bytes, codecs, pipelined reads/writes on a
real Redis (sync and asyncio clients), fresh-list trimming, version TTLs, and the fail-fast client
against a frozen Redis."""

from __future__ import annotations

import asyncio
import hashlib
import math
import time

import numpy as np
import pytest
import redis

from recsys_contracts.ids import excerpt
from recsys_contracts.feature_store import (
    FreshInteraction,
    KeyFormat,
    USER_READ_SCRIPT,
    UserRecord,
    decode_fresh,
    decode_ids,
    decode_row,
    encode_fresh,
    encode_ids,
    encode_row,
    expire_version,
    mark_complete,
    parse_is_complete,
    parse_item_read,
    parse_user_read,
    queue_is_complete,
    queue_item_read,
    queue_record_interactions,
    queue_user_read,
    redis_client,
    write_version,
)
from tests.redis_server import private_redis_server

CAT = np.array([3, 0, 7], dtype=np.int64)
NUM = np.array([0.5, -1.0], dtype=np.float32)


# ---------------------------------------------------------------- keys


def test_golden_keys():
    keys = KeyFormat()
    assert keys.user_features(3, "alice") == "recsys:v3:{u:alice}:feat"
    assert keys.user_history(3, "alice") == "recsys:v3:{u:alice}:hist"
    assert keys.user_seen(3, "alice") == "recsys:v3:{u:alice}:seen"
    assert keys.user_fresh("alice") == "recsys:fresh:{u:alice}"
    assert keys.item_features(3, 42) == "recsys:v3:{i:42}:feat"
    assert keys.complete(3) == "recsys:v3:complete"
    assert keys.version_pattern(3) == "recsys:v3:*"
    assert KeyFormat("prod-eu").user_fresh("ü7") == "prod-eu:fresh:{u:ü7}"
    assert KeyFormat().item_features(1, np.int64(0)) == "recsys:v1:{i:0}:feat"


def test_user_keys_share_one_cluster_slot():
    from redis.crc import key_slot

    keys = KeyFormat()
    slots = {
        key_slot(k.encode())
        for k in (
            keys.user_features(1, "alice"),
            keys.user_history(1, "alice"),
            keys.user_seen(1, "alice"),
            keys.user_fresh("alice"),
            keys.user_features(2, "alice"),
        )
    }
    assert len(slots) == 1


@pytest.mark.parametrize(
    "user_id, message",
    [
        ("", "1..128 bytes"),
        ("é" * 65, "1..128 bytes"),  # 130 bytes of UTF-8
        ("a{b", "whitespace"),
        ("a}b", "whitespace"),
        ("a b", "whitespace"),
        ("a\tb", "whitespace"),
        ("\ud800", "valid UTF-8"),
        (17, "must be a str"),
    ],
)
def test_bad_user_id_raises_with_value(user_id, message):
    with pytest.raises(ValueError, match=message) as err:
        KeyFormat().user_features(1, user_id)
    assert "user_id" in str(err.value) and excerpt(user_id) in str(err.value)


@pytest.mark.parametrize("size", [129, 16 * 1024, 200 * 1024, 1024 * 1024])
def test_a_huge_user_id_is_refused_with_a_short_message(size):
    """The length is checked first and only an excerpt is quoted: a 1 MB id must not become a 1 MB
    log line or a gRPC status over the metadata limit."""
    with pytest.raises(ValueError, match=rf"user_id must be 1..128 bytes of UTF-8, got {size} characters: 'xxxx") as err:
        KeyFormat().user_features(1, "x" * size)
    assert len(str(err.value)) < 200 and f"({size} chars)" in str(err.value)


def test_user_id_limit_is_in_bytes():
    assert KeyFormat().user_fresh("é" * 64)  # exactly 128 bytes


@pytest.mark.parametrize("item_id", [-1, 2**63, True, 1.0, "3"])
def test_bad_item_id_raises_with_value(item_id):
    with pytest.raises(ValueError, match="item_id") as err:
        KeyFormat().item_features(1, item_id)
    assert repr(item_id) in str(err.value)


@pytest.mark.parametrize("version", [0, -1, True, "1", 1.0])
def test_bad_version_raises_with_value(version):
    with pytest.raises(ValueError, match="version") as err:
        KeyFormat().complete(version)
    assert repr(version) in str(err.value)


@pytest.mark.parametrize("namespace", ["", "a:b", "a*", "{x}", "a b", "x" * 65, None])
def test_bad_namespace_raises_with_value(namespace):
    with pytest.raises(ValueError, match="namespace") as err:
        KeyFormat(namespace)
    assert repr(namespace) in str(err.value)


# ---------------------------------------------------------------- codecs


def test_golden_row_bytes():
    # b"R", version 1, C=3 (uint16 LE), N=2; int32 3, 0, 7;
    # float32 0.5 = 0x3f000000, -1.0 = 0xbf800000 (little-endian on the wire)
    expected = bytes.fromhex(
        "52 01 0300 0200" "03000000 00000000 07000000" "0000003f 000080bf".replace(" ", "")
    )
    assert encode_row(CAT, NUM) == expected
    cat, num = decode_row(expected)
    assert cat.dtype == np.int64 and num.dtype == np.float32
    np.testing.assert_array_equal(cat, CAT)
    np.testing.assert_array_equal(num, NUM)


def test_golden_ids_bytes():
    expected = bytes.fromhex("0100000000000000" "0201000000000000")  # 1, 258 = 0x0102
    assert encode_ids(np.array([1, 258])) == expected
    np.testing.assert_array_equal(decode_ids(expected), [1, 258])
    assert decode_ids(expected).dtype == np.int64


def test_golden_fresh_bytes():
    # item 42 = 0x2a, timestamp 881250949 = 0x3486d285, rating 4.5 = 0x40900000, NaN = 0x7fc00000
    rated = bytes.fromhex("2a00000000000000" "85d2863400000000" "00009040")
    unrated = bytes.fromhex("2a00000000000000" "85d2863400000000" "0000c07f")
    assert encode_fresh(FreshInteraction(42, 881250949, 4.5)) == rated
    assert encode_fresh(FreshInteraction(42, 881250949)) == unrated
    assert decode_fresh(rated) == FreshInteraction(42, 881250949, 4.5)
    assert decode_fresh(unrated) == FreshInteraction(42, 881250949, None)


def test_row_round_trip_and_empty_row():
    rng = np.random.default_rng(0)
    cat = rng.integers(0, 2**31 - 1, size=40)
    num = rng.standard_normal(19).astype(np.float32)
    got_cat, got_num = decode_row(encode_row(cat, num))
    np.testing.assert_array_equal(got_cat, cat)
    np.testing.assert_array_equal(got_num, num)
    empty_cat, empty_num = decode_row(encode_row(np.zeros(0, np.int64), np.zeros(0, np.float32)))
    assert empty_cat.shape == (0,) and empty_num.shape == (0,)
    assert encode_ids([]) == b"" and decode_ids(b"").shape == (0,)


@pytest.mark.parametrize(
    "cat, num, message",
    [
        (np.zeros((2, 2), np.int64), NUM, "cat must be a 1-D integer array"),
        (np.array([1.5]), NUM, "cat must be a 1-D integer array"),
        (np.array([2**31]), NUM, r"cat values must fit int32, got range \[2147483648"),
        (CAT, np.zeros((1, 2), np.float32), "num must be a 1-D real array"),
        (CAT, np.array(["a"]), "num must be a 1-D real array"),
    ],
)
def test_encode_row_rejects_bad_arrays(cat, num, message):
    with pytest.raises(ValueError, match=message):
        encode_row(cat, num)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"R\x01\x00", r"at least 6 bytes, got 3"),
        (b"X\x01\x00\x00\x00\x00", r"magic must be b'R', got b'X'"),
        (b"R\x02\x00\x00\x00\x00", "format version must be 1, got 2"),
        (b"R\x01\x01\x00\x00\x00", "length must be 10 bytes for C=1 N=0, got 6"),
    ],
)
def test_decode_row_rejects_malformed_bytes(data, message):
    with pytest.raises(ValueError, match=message):
        decode_row(data)


@pytest.mark.parametrize(
    "ids, message",
    [
        (np.zeros((2, 2), np.int64), "ids must be a 1-D integer array"),
        (np.array([1.0]), "ids must be a 1-D integer array"),
        (np.array([3, -1]), r"ids must be in \[0, 2\*\*63\), got range \[-1, 3\]"),
    ],
)
def test_encode_ids_rejects_bad_ids(ids, message):
    with pytest.raises(ValueError, match=message):
        encode_ids(ids)


def test_decode_ids_and_fresh_reject_bad_lengths():
    with pytest.raises(ValueError, match="multiple of 8 bytes, got 7"):
        decode_ids(b"\x00" * 7)
    with pytest.raises(ValueError, match="must be 20 bytes, got 19"):
        decode_fresh(b"\x00" * 19)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(item_id=-1, timestamp=0), "item_id"),
        (dict(item_id=1, timestamp=-5), "timestamp"),
        (dict(item_id=1, timestamp=1.5), "timestamp"),
        (dict(item_id=1, timestamp=0, rating=math.nan), "rating"),
        (dict(item_id=1, timestamp=0, rating=math.inf), "rating"),
        (dict(item_id=1, timestamp=0, rating=1e39), "rating"),
        (dict(item_id=1, timestamp=0, rating="4"), "rating"),
        (dict(item_id=1, timestamp=0, rating=True), "rating"),
    ],
)
def test_fresh_interaction_rejects_bad_fields(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        FreshInteraction(**kwargs)
    assert repr(kwargs[field]) in str(err.value)


# ---------------------------------------------------------------- Redis round trips


@pytest.fixture
def client(redis_url):
    c = redis_client(redis_url)
    yield c
    c.close()


def _users():
    return [
        ("alice", CAT, NUM, np.array([5, 9, 2]), np.array([9, 2, 5, 2])),
        ("bob", np.array([1, 1, 1]), np.zeros(2, np.float32), np.array([], np.int64), []),
    ]


def _items():
    return [(5, np.array([2]), np.array([1.0, 0.0, 0.25])), (9, np.array([0]), np.zeros(3))]


def test_write_version_then_user_read_is_one_round_trip(client, redis_namespace):
    keys = KeyFormat(redis_namespace)
    written = write_version(client, keys, 1, users=_users(), items=_items(), batch_size=2)
    assert written == 3 * 2 + 2

    pipe = client.pipeline(transaction=False)
    queue_user_read(pipe, keys, 1, "alice")
    assert len(pipe) == 4  # all of the user's data in one round trip
    record = parse_user_read(pipe.execute())
    np.testing.assert_array_equal(record.row[0], CAT)
    np.testing.assert_array_equal(record.row[1], NUM)
    np.testing.assert_array_equal(record.history, [5, 9, 2])
    np.testing.assert_array_equal(record.seen, [2, 5, 9])  # sorted, unique
    assert record.fresh == []

    pipe = client.pipeline(transaction=False)
    queue_user_read(pipe, keys, 1, "bob")
    bob = parse_user_read(pipe.execute())
    assert bob.history.shape == (0,) and bob.seen.shape == (0,) and bob.history.dtype == np.int64


def test_unknown_user_reads_as_empty_record(client, redis_namespace):
    pipe = client.pipeline(transaction=False)
    queue_user_read(pipe, KeyFormat(redis_namespace), 1, "nobody")
    record = parse_user_read(pipe.execute())
    assert record.row is None and record.fresh == []
    assert record.history.shape == (0,) and record.seen.shape == (0,)
    assert isinstance(record, UserRecord)


def test_parse_user_read_rejects_wrong_reply_count():
    with pytest.raises(ValueError, match="4 replies, got 3"):
        parse_user_read([None, None, None])


def test_item_read_skips_missing_items(client, redis_namespace):
    keys = KeyFormat(redis_namespace)
    write_version(client, keys, 2, users=[], items=_items())
    pipe = client.pipeline(transaction=False)
    item_ids = [9, 777, 5]
    queue_item_read(pipe, keys, 2, item_ids)
    rows = parse_item_read(pipe.execute(), item_ids)
    assert sorted(rows) == [5, 9]
    np.testing.assert_array_equal(rows[5][0], [2])
    np.testing.assert_array_equal(rows[5][1], np.array([1.0, 0.0, 0.25], np.float32))


def test_parse_item_read_rejects_length_mismatch():
    with pytest.raises(ValueError, match=r"one reply per item id \(2\), got 1"):
        parse_item_read([None], [1, 2])


def test_complete_marker(client, redis_namespace):
    keys = KeyFormat(redis_namespace)
    pipe = client.pipeline(transaction=False)
    queue_is_complete(pipe, keys, 4)
    assert parse_is_complete(pipe.execute()[0]) is False
    write_version(client, keys, 4, users=_users(), items=_items())
    mark_complete(client, keys, 4)
    pipe = client.pipeline(transaction=False)
    queue_is_complete(pipe, keys, 4)
    assert parse_is_complete(pipe.execute()[0]) is True


def test_write_version_ttl(client, redis_namespace):
    keys = KeyFormat(redis_namespace)
    write_version(client, keys, 1, users=_users()[:1], items=[], ttl_s=600)
    assert 0 < client.ttl(keys.user_seen(1, "alice")) <= 600


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(batch_size=0), "batch_size"), (dict(ttl_s=0), "ttl_s"), (dict(ttl_s=1.5), "ttl_s")],
)
def test_write_version_rejects_bad_options(client, redis_namespace, kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        write_version(client, KeyFormat(redis_namespace), 1, users=[], items=[], **kwargs)
    assert repr(kwargs[field]) in str(err.value)


def test_fresh_list_is_trimmed_and_expires(client, redis_namespace):
    keys = KeyFormat(redis_namespace)
    pipe = client.pipeline(transaction=False)
    events = [("carol", FreshInteraction(i, 1000 + i, float(i % 5) or None)) for i in range(5)]
    events.append(("dave", FreshInteraction(7, 2000)))
    assert queue_record_interactions(pipe, keys, events, max_fresh=3, ttl_s=3600) == 6
    pipe.execute()

    pipe = client.pipeline(transaction=False)
    queue_user_read(pipe, keys, 1, "carol")
    record = parse_user_read(pipe.execute())
    assert [f.item_id for f in record.fresh] == [2, 3, 4]  # the last 3, oldest first
    assert record.fresh[0] == FreshInteraction(2, 1002, 2.0)
    assert 0 < client.ttl(keys.user_fresh("carol")) <= 3600
    assert client.llen(keys.user_fresh("dave")) == 1


@pytest.mark.parametrize(
    "kwargs, field", [(dict(max_fresh=0), "max_fresh"), (dict(ttl_s=0), "ttl_s")]
)
def test_record_interactions_rejects_bad_options(client, kwargs, field):
    pipe = client.pipeline(transaction=False)
    with pytest.raises(ValueError, match=field) as err:
        queue_record_interactions(pipe, KeyFormat(), [], **kwargs)
    assert repr(kwargs[field]) in str(err.value)


def test_expire_version_sets_ttls_on_that_version_only(client, redis_namespace):
    keys = KeyFormat(redis_namespace)
    write_version(client, keys, 1, users=_users(), items=_items())
    mark_complete(client, keys, 1)
    write_version(client, keys, 11, users=_users()[:1], items=[])  # v11 must not match v1:*
    pipe = client.pipeline(transaction=False)
    queue_record_interactions(pipe, keys, [("alice", FreshInteraction(1, 1))], ttl_s=86400)
    pipe.execute()

    assert expire_version(client, keys, 1, ttl_s=120) == 3 * 2 + 2 + 1
    assert 0 < client.ttl(keys.complete(1)) <= 120
    assert 0 < client.ttl(keys.item_features(1, 9)) <= 120
    assert client.ttl(keys.user_features(11, "alice")) == -1  # no TTL
    assert client.ttl(keys.user_fresh("alice")) > 120
    with pytest.raises(ValueError, match="ttl_s must be in"):
        expire_version(client, keys, 1, ttl_s=0)


def test_async_client_uses_the_same_functions(client, redis_url, redis_namespace):
    keys = KeyFormat(redis_namespace)
    write_version(client, keys, 1, users=_users(), items=_items())

    async def read() -> tuple[UserRecord, dict]:
        aclient = redis_client(redis_url, asyncio=True)
        try:
            pipe = aclient.pipeline(transaction=False)
            queue_record_interactions(pipe, keys, [("alice", FreshInteraction(5, 99, 3.5))])
            await pipe.execute()
            pipe = aclient.pipeline(transaction=False)
            queue_user_read(pipe, keys, 1, "alice")
            queue_item_read(pipe, keys, 1, [5])
            results = await pipe.execute()
            return parse_user_read(results[:4]), parse_item_read(results[4:], [5])
        finally:
            await aclient.aclose()

    record, items = asyncio.run(read())
    assert isinstance(client, redis.Redis)
    np.testing.assert_array_equal(record.row[0], CAT)
    assert record.fresh == [FreshInteraction(5, 99, 3.5)]
    assert list(items) == [5]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(socket_timeout_s=0), "socket_timeout_s"),
        (dict(connect_timeout_s=-1.0), "connect_timeout_s"),
        (dict(socket_timeout_s=None), "socket_timeout_s"),
        (dict(retries=-1), "retries"),
    ],
)
def test_redis_client_rejects_bad_options(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        redis_client("redis://127.0.0.1:6379/0", **kwargs)
    assert repr(kwargs[field]) in str(err.value)


# ---------------------------------------------------------------- frozen Redis


@pytest.fixture
def frozen_redis():
    """A private redis-server, SIGSTOPped once it answers; yields its URL."""
    with private_redis_server() as server:
        server.freeze()
        yield server.url


@pytest.mark.slow
def test_configured_client_fails_fast_on_frozen_redis(frozen_redis):
    # The timeout contract: (retries + 1) * socket_timeout_s ~ 0.45 s, asserted loosely at 3 s.
    sync_client = redis_client(frozen_redis)
    start = time.monotonic()
    with pytest.raises((redis.TimeoutError, redis.ConnectionError)):
        pipe = sync_client.pipeline(transaction=False)
        queue_user_read(pipe, KeyFormat(), 1, "alice")
        pipe.execute()
    assert time.monotonic() - start < 3.0
    sync_client.close()

    async def read() -> None:
        aclient = redis_client(frozen_redis, asyncio=True)
        try:
            await aclient.get("x")
        finally:
            await aclient.aclose()

    start = time.monotonic()
    with pytest.raises((redis.TimeoutError, redis.ConnectionError)):
        asyncio.run(read())
    assert time.monotonic() - start < 3.0


def test_the_services_one_command_read_equals_the_pipeline_read_after_a_restart_too():
    """``UserReader`` (one EVALSHA) gives the pipeline's replies, for a user with and without data and
    one never written; a Redis that lost its script cache (restarted) is answered NOSCRIPT, and the
    reader loads the script again instead of failing. Its own redis-server: the test restarts it."""
    from recsys_serving.features import UserReader

    keys = KeyFormat("onecmd")

    def pipeline_read(client, user_id):
        pipe = client.pipeline(transaction=False)
        queue_user_read(pipe, keys, 1, user_id)
        return pipe.execute()

    async def one_command_reads(url, users):
        aclient = redis_client(url, asyncio=True)
        try:
            reader = UserReader(aclient, keys)
            return [await reader(1, user_id) for user_id in users]
        finally:
            await aclient.aclose()

    users = ["alice", "bob", "nobody"]
    with private_redis_server() as server:
        client = server.client()
        write_version(client, keys, 1, users=_users(), items=_items())
        pipe = client.pipeline(transaction=False)
        queue_record_interactions(pipe, keys, [("alice", FreshInteraction(5, 99, 3.5)), ("alice", FreshInteraction(9, 100))])
        pipe.execute()
        expected = [pipeline_read(client, user_id) for user_id in users]
        assert asyncio.run(one_command_reads(server.url, users)) == expected
        assert parse_user_read(expected[0]).fresh == [FreshInteraction(5, 99, 3.5), FreshInteraction(9, 100)]

        client.script_flush()              # what a restart does to the script cache
        sha = hashlib.sha1(USER_READ_SCRIPT.encode()).hexdigest()
        assert client.script_exists(sha) == [False]
        assert asyncio.run(one_command_reads(server.url, users)) == expected
        assert client.script_exists(sha) == [True]
