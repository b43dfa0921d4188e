"""The server end to end over real gRPC: streaming, chunks, exclusions, status codes, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from recsys_contracts.feature_store import KeyFormat
from recsys_contracts.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from retrieval_service.backends import TorchExactIndex
from retrieval_service.batching import MicroBatcher
from retrieval_service.config import TlsConfig
from retrieval_service.features import FeatureStore
from retrieval_service.generator import CandidateGenerator, DeadlineExceeded
from retrieval_service.server import SERVICE_NAME, create_server
from retrieval_service.state import embed, table_row
from retrieval_service.validation import Query
from recsys_serving.runtime import BACKGROUND, PRIORITY_KEY
from tests.retrieval.harness import cached_holder, config, health_status, items, retrieve, sample, serve

COLD = common_pb2.DEGRADED_PATH_COLD_START_USER
WHEN = 1_700_000_000   # a fixed request time (seconds): the tower reads hour and weekday from it


def known_user(state, index: int = 1) -> str:
    return str(state.tables.user_ids[index])


def test_happy_path_streams_external_ids_best_first(published, loaded):
    root, version = published

    async def body():
        async with serve(config(root, chunk_size=7), holder=cached_holder(root, loaded)) as (stub, _, _):
            return await retrieve(stub, user_id=known_user(loaded), num_candidates=30)

    chunks = asyncio.run(body())
    assert [len(c.item_ids) for c in chunks] == [7, 7, 7, 7, 2]
    assert [len(c.scores) for c in chunks] == [7, 7, 7, 7, 2]
    assert {c.model_version for c in chunks} == {version}
    assert all(list(c.degraded) == [] for c in chunks)
    ids, scores = items(chunks), [s for chunk in chunks for s in chunk.scores]
    catalog = set(loaded.tables.item_ids[1:].tolist())
    assert len(set(ids)) == 30 and set(ids) <= catalog
    assert scores == sorted(scores, reverse=True)
    # Scores are dot products of unit vectors over the temperature.
    assert max(abs(s) for s in scores) <= 1.0 / loaded.temperature + 1e-4


def test_retrieve_all_answers_the_whole_stream_in_one_message(published, loaded):
    """RetrieveAll (what ranking calls) = the Retrieve stream's chunks joined, whatever the chunk size."""
    root, version = published

    async def body():
        async with serve(config(root, chunk_size=7), holder=cached_holder(root, loaded)) as (stub, _, _):
            fields = {"user_id": known_user(loaded, 2), "num_candidates": 30, "context": common_pb2.Context(timestamp_s=WHEN)}
            chunks = await retrieve(stub, **fields)
            whole = await stub.RetrieveAll(retrieval_pb2.RetrieveRequest(**fields), timeout=5)
            return chunks, whole

    chunks, whole = asyncio.run(body())
    assert len(chunks) == 5 and len(whole.item_ids) == 30
    assert list(whole.item_ids) == items(chunks)
    assert list(whole.scores) == pytest.approx([s for chunk in chunks for s in chunk.scores])
    assert whole.model_version == version and list(whole.degraded) == list(chunks[0].degraded)


def test_retrieve_all_refuses_what_retrieve_refuses(published, loaded):
    root, _ = published

    async def body():
        async with serve(config(root, max_candidates=50), holder=cached_holder(root, loaded)) as (stub, _, _):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.RetrieveAll(retrieval_pb2.RetrieveRequest(user_id="u1", num_candidates=51), timeout=5)
            return error.value

    error = asyncio.run(body())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "num_candidates" in error.details() and "51" in error.details()


def test_answers_equal_exact_search_minus_seen(published, loaded):
    root, _ = published
    user = known_user(loaded, 3)
    idx = loaded.user_index[user]
    seen_ids = set(loaded.tables.item_ids[loaded.tables.seen(idx)].tolist())

    async def body():
        async with serve(config(root), holder=cached_holder(root, loaded)) as (stub, _, _):
            context = common_pb2.Context(timestamp_s=WHEN)
            return (await retrieve(stub, user_id=user, num_candidates=20, context=context),
                    await retrieve(stub, user_id=user, num_candidates=20, include_seen=True, context=context))

    excluded, included = asyncio.run(body())
    query = embed(loaded, [table_row(loaded.tables, idx, WHEN)])
    # Exact ranking over the whole catalog (flat index = exact), best first, as external ids.
    scores = query @ np.load(root / "versions" / "1" / "item_embeddings.npy")[1:].T     # (1, m)
    order = loaded.tables.item_ids[1:][np.argsort(-scores[0], kind="stable")].tolist()
    assert items(excluded) == [i for i in order if i not in seen_ids][:20]
    assert seen_ids.isdisjoint(items(excluded))
    assert items(included) == order[:20]


@pytest.mark.parametrize("fields, named", [
    ({"user_id": "", "num_candidates": 5}, "user_id"),
    ({"user_id": "x" * 129, "num_candidates": 5}, "user_id"),
    ({"user_id": "a b", "num_candidates": 5}, "user_id"),
    ({"user_id": "u1", "num_candidates": 0}, "num_candidates"),
    ({"user_id": "u1", "num_candidates": 51}, "num_candidates"),
    ({"user_id": "u1", "num_candidates": 5,
      "user_features": common_pb2.UserFeatures(recent_item_ids=list(range(201)))}, "recent_item_ids"),
    ({"user_id": "u1", "num_candidates": 5,
      "user_features": common_pb2.UserFeatures(categorical={"no_such_feature": "x"})}, "no_such_feature"),
    ({"user_id": "u1", "num_candidates": 5, "context": common_pb2.Context(timestamp_s=-1)}, "timestamp_s"),
])
def test_invalid_argument_names_the_field(published, loaded, fields, named):
    root, _ = published

    async def body():
        async with serve(config(root, max_candidates=50), holder=cached_holder(root, loaded)) as (stub, _, _):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await retrieve(stub, **fields)
            return error.value

    error = asyncio.run(body())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in error.details() and "Traceback" not in error.details()


def test_unavailable_and_not_serving_before_the_first_version(tmp_path):
    async def body():
        before = sample("retrieval_requests_total", code="UNAVAILABLE")
        async with serve(config(tmp_path), wait_serving=False) as (stub, channel, _):
            statuses = [await health_status(channel, name) for name in ("", SERVICE_NAME)]
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await retrieve(stub, user_id="u1", num_candidates=5)
        return statuses, error.value, sample("retrieval_requests_total", code="UNAVAILABLE") - before

    statuses, error, counted = asyncio.run(body())
    assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING] * 2
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "no model version" in error.details()
    assert counted == 1


def test_cold_start_user(published, loaded):
    root, version = published
    popular = loaded.tables.item_ids[loaded.tables.popular_items[:10]].tolist()

    async def body():
        async with serve(config(root), holder=cached_holder(root, loaded)) as (stub, _, _):
            bare = await retrieve(stub, user_id="never-seen", num_candidates=10)
            featured = await retrieve(stub, user_id="never-seen", num_candidates=10,
                                      user_features=common_pb2.UserFeatures(
                                          categorical={"gender": "F"}, recent_item_ids=[popular[0], 10**12]))
            return bare, featured

    bare, featured = asyncio.run(body())
    assert items(bare) == popular
    counts = loaded.tables.item_counts[loaded.tables.popular_items[:10]]
    assert np.allclose(list(bare[0].scores), np.log(np.maximum(counts, 1)), atol=1e-5)
    assert all(list(c.degraded) == [COLD] for c in bare + featured)
    assert popular[0] not in items(featured)   # a recent item counts as seen
    assert items(featured) != popular and len(items(featured)) == 10


def test_deadline_stops_the_work(published, loaded):
    # A 2 s batching window outlives the 0.3 s deadline: the request ends DEADLINE_EXCEEDED on the
    # server and its tower forward never runs.
    root, _ = published

    async def body():
        cfg = config(root, microbatch_max_wait_ms=2000.0, microbatch_max_size=64)
        async with serve(cfg, holder=cached_holder(root, loaded)) as (stub, _, _):
            before = (sample("retrieval_requests_total", code="DEADLINE_EXCEEDED"),
                      sample("retrieval_batch_size_count"))
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await retrieve(stub, timeout=0.3, user_id=known_user(loaded), num_candidates=5)
            await asyncio.sleep(2.5)   # past the batching window: a batch would have run by now
            after = (sample("retrieval_requests_total", code="DEADLINE_EXCEEDED"),
                     sample("retrieval_batch_size_count"))
            return error.value, before, after

    error, before, after = asyncio.run(body())
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert after[0] - before[0] == 1, "the server itself ended the call at the deadline"
    assert after[1] == before[1], "no tower forward / search ran for the expired request"


def test_cancelled_stream_stops_the_work(published, loaded):
    root, _ = published

    async def body():
        cfg = config(root, microbatch_max_wait_ms=2000.0, microbatch_max_size=64)
        async with serve(cfg, holder=cached_holder(root, loaded)) as (stub, _, _):
            before = (sample("retrieval_requests_total", code="CANCELLED"), sample("retrieval_batch_size_count"))
            call = stub.Retrieve(retrieval_pb2.RetrieveRequest(user_id=known_user(loaded), num_candidates=5),
                                 timeout=10)
            await asyncio.sleep(0.3)
            call.cancel()
            loop = asyncio.get_running_loop()
            end = loop.time() + 1.5    # well inside the 2 s window
            while sample("retrieval_requests_total", code="CANCELLED") == before[0] and loop.time() < end:
                await asyncio.sleep(0.02)
            cancelled = sample("retrieval_requests_total", code="CANCELLED") - before[0]
            await asyncio.sleep(2.0)
            return cancelled, sample("retrieval_batch_size_count") - before[1]

    cancelled, batches = asyncio.run(body())
    assert cancelled == 1
    assert batches == 0


def test_no_time_left_is_refused_before_any_work(published, loaded):
    generator = CandidateGenerator(FeatureStore(None, KeyFormat(), 0.05), MicroBatcher(4, 0.0))
    query = Query("u1", 5, {}, {}, (), 1, False)
    with pytest.raises(DeadlineExceeded, match="no time left"):
        asyncio.run(generator.generate(loaded, query, time.monotonic() - 0.001))


def test_tls_port_serves_tls_clients_only(published, loaded, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    root, version = published

    async def body():
        cfg = config(root, tls=TlsConfig(cert_file=cert, key_file=key))
        _, port, app = await create_server(cfg, holder=cached_holder(root, loaded))
        try:
            while not app.holder.ready:
                await asyncio.sleep(0.02)
            credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
            async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
                chunks = await retrieve(retrieval_pb2_grpc.RetrievalServiceStub(channel), user_id="1", num_candidates=3)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await retrieve(retrieval_pb2_grpc.RetrievalServiceStub(channel), timeout=2, user_id="1",
                                   num_candidates=3)
            return chunks, error.value
        finally:
            await app.close(grace_s=0)

    chunks, error = asyncio.run(body())
    assert {c.model_version for c in chunks} == {version} and len(items(chunks)) == 3
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_a_bug_is_internal_without_a_traceback_and_logged_with_the_request_id(published, loaded, caplog):
    # A state whose index has the wrong dimension (load_state would refuse it) makes the search raise.
    root, _ = published
    broken = dataclasses.replace(loaded, index=TorchExactIndex(np.eye(5, dtype=np.float32), np.arange(1, 6)))

    async def body():
        async with serve(config(root), holder=cached_holder(root, broken)) as (stub, _, _):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                call = stub.Retrieve(retrieval_pb2.RetrieveRequest(user_id=known_user(loaded), num_candidates=5),
                                     timeout=5, metadata=(("x-request-id", "req-42"),))
                _ = [chunk async for chunk in call]
            return error.value

    error = asyncio.run(body())
    assert error.code() == grpc.StatusCode.INTERNAL and error.details() == "internal error"
    logged = [r for r in caplog.records if r.getMessage() == "Retrieve failed"]
    assert logged and logged[0].request_id == "req-42" and "queries must have shape" in logged[0].exc_text


def test_a_background_retrieve_waits_for_a_quiet_moment_and_expires_unstarted(published, loaded):
    """A Retrieve marked background (the shadow worker's) runs only when no live Retrieve runs or waits."""
    root, version = published
    background = ((PRIORITY_KEY, BACKGROUND),)

    async def body():
        # No caller deadline on the expiring call: the server's default (200 ms) ends it, not a racing cancel.
        async with serve(config(root, default_deadline_ms=200), holder=cached_holder(root, loaded)) as (stub, _, app):
            admission = app.admission
            request = retrieval_pb2.RetrieveRequest(user_id=known_user(loaded), num_candidates=5)
            before = {r: sample("retrieval_background_total", result=r) for r in ("ran", "expired")}
            async with admission.slot(time.monotonic() + 30):           # a live Retrieve in progress
                with pytest.raises(grpc.aio.AioRpcError) as expired:
                    await _collect(stub.Retrieve(request, metadata=background))
                waiting = asyncio.ensure_future(_collect(stub.Retrieve(request, timeout=10, metadata=background)))
                await asyncio.sleep(0.2)
                done_while_live = waiting.done()
                live = await _collect(stub.Retrieve(request, timeout=5))   # live work is never held back
            chunks = await waiting                                         # the slot is free: it runs
            after = {r: sample("retrieval_background_total", result=r) - before[r] for r in before}
            return expired.value.code(), done_while_live, live, chunks, after

    code, done_while_live, live, chunks, after = asyncio.run(body())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not done_while_live
    assert items(chunks) == items(live) and {c.model_version for c in chunks} == {version}
    assert after == {"ran": 1, "expired": 1}


async def _collect(call) -> list:
    return [chunk async for chunk in call]
