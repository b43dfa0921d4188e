"""Inputs that must not poison an answer, over gRPC against real ranking + retrieval servers.

Each case has the status it must get: huge but finite numeric features are clipped to the training
range (OK, k finite scores); values past float32 or NaN are INVALID_ARGUMENT; oversized user ids are
INVALID_ARGUMENT with a short message (not RESOURCE_EXHAUSTED from an echoed id over the metadata
limit) and the channel keeps working; bytes that do not decode are INVALID_ARGUMENT, counted, and
logged at a bounded rate.
"""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest

from recsys_contracts.v1 import common_pb2, ranking_pb2
from recsys_serving import runtime
from tests.ranking.harness import config, run, sample, serve, serve_retrieval
from tests.ranking.test_recommend import both, recommend

pytestmark = pytest.mark.slow


def _with_age(value: float) -> ranking_pb2.RecommendRequest:
    return recommend(k=10, user_features=common_pb2.UserFeatures(numeric={"age": value}))


@pytest.mark.parametrize("value", [1e10, 1e30, -1e30, 3.0e38])
def test_huge_finite_features_give_k_finite_scores(published, loaded, retrieval_loaded, value):
    root, _ = published

    async def main():
        async with both(root, loaded, retrieval_loaded) as (stub, _):
            return await stub.Recommend(_with_age(value), timeout=10), await stub.Recommend(_with_age(0.0), timeout=10)

    reply, _ = run(main())
    scores = np.array([item.score for item in reply.items])
    assert len(reply.items) == 10 and np.isfinite(scores).all() and np.isfinite([i.ctr for i in reply.items]).all()
    assert common_pb2.DEGRADED_PATH_MODEL_FALLBACK not in reply.degraded


@pytest.mark.parametrize("value, message", [(1e308, "must be a finite float32"), (float("nan"), "must be a finite"),
                                            (float("inf"), "must be a finite")])
def test_features_past_float32_or_not_finite_are_invalid(published, loaded, retrieval_loaded, value, message):
    root, _ = published

    async def main():
        async with both(root, loaded, retrieval_loaded) as (stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.Recommend(_with_age(value), timeout=10)
            return error.value

    error = run(main())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details()
    assert "user_features.numeric['age']" in error.details()


@pytest.mark.parametrize("size", [16 * 1024, 200 * 1024, 1024 * 1024])
def test_oversized_user_ids_are_invalid_with_a_short_message_and_the_channel_survives(
        published, loaded, retrieval_loaded, size, caplog):
    root, _ = published

    async def main():
        async with both(root, loaded, retrieval_loaded) as (stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.Recommend(recommend(user_id="u" * size), timeout=10)
            after = await stub.Recommend(recommend(), timeout=10)      # the same channel, next call
            return error.value, after

    with caplog.at_level(logging.INFO):
        error, after = run(main())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("user_id must be 1..128 bytes") and f"({size} chars)" in error.details()
    assert len(error.details()) < 300
    assert len(after.items) == 5
    assert max(len(record.getMessage()) for record in caplog.records) < 2000   # no log line quotes the id


@pytest.mark.parametrize("payload", [b"\x0a\x04\xff\xfe\xfd\xfc",          # user_id: invalid UTF-8
                                     b"\x0a\xff\xff\xff\xff\x0f",           # a length past the end
                                     b"\xff\xff\xff"],                      # not protobuf at all
                         ids=["non-utf8-string", "truncated", "garbage"])
def test_malformed_bytes_are_invalid_argument_counted_and_logged_at_a_bounded_rate(
        published, loaded, retrieval_loaded, payload, caplog):
    root, _ = published
    before = {m: sample("recsys_malformed_requests_total", method=m) for m in ("Recommend", "Retrieve")}
    before_requests = sample("ranking_requests_total", method="Recommend", code="INVALID_ARGUMENT")
    runtime._malformed_log.last = -runtime.MALFORMED_LOG_INTERVAL_S      # a fresh rate window

    async def main():
        async with serve_retrieval(root, retrieval_loaded) as (target, _), \
                serve(config(root, retrieval_target=target), state=loaded) as (_, channel, _):
            codes = []
            call = channel.unary_unary("/recsys.v1.RankingService/Recommend")   # raw bytes in, raw out
            for _ in range(5):
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await call(payload, timeout=5)
                codes.append(error.value.code())
            async with grpc.aio.insecure_channel(target) as channel:
                stream = channel.unary_stream("/recsys.v1.RetrievalService/Retrieve")
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    async for _ in stream(payload, timeout=5):
                        pass
                codes.append(error.value.code())
            return codes

    with caplog.at_level(logging.WARNING, logger="recsys_serving.runtime"):
        codes = run(main())
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 6
    assert sample("recsys_malformed_requests_total", method="Recommend") == before["Recommend"] + 5
    assert sample("recsys_malformed_requests_total", method="Retrieve") == before["Retrieve"] + 1
    assert sample("ranking_requests_total", method="Recommend", code="INVALID_ARGUMENT") == before_requests + 5
    warnings = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == 1 and not any(r.exc_info for r in caplog.records)   # bounded, no traceback
