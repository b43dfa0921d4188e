"""The clients' retry policy against a real gRPC server that refuses: pushback honoured, no amplification.

Both clients (ranking's channel to retrieval, and the load generator with ``--retry``) use
``recsys_serving.admission.client_service_config``; the server here is a real ``RetrievalService``
on 127.0.0.1:0 that answers RESOURCE_EXHAUSTED with a ``grpc-retry-pushback-ms`` trailer.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from loadtest.client import channel_options as loadtest_options
from ranking_service.retrieval_client import channel_options as ranking_options
from recsys_contracts.v1 import retrieval_pb2, retrieval_pb2_grpc
from recsys_serving.admission import PUSHBACK_KEY

CLIENTS = {"ranking": lambda: ranking_options(4 * 1024 * 1024), "loadtest": lambda: loadtest_options(True)}


class Refusing(retrieval_pb2_grpc.RetrievalServiceServicer):
    """Refuses the first ``refusals`` attempts (all when None) with ``pushback_ms``; records attempt times."""

    def __init__(self, pushback_ms: str, refusals: int | None) -> None:
        self.pushback_ms, self.refusals, self.attempts = pushback_ms, refusals, []

    async def Retrieve(self, request, context):
        self.attempts.append(time.monotonic())
        if self.refusals is None or len(self.attempts) <= self.refusals:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy",
                                trailing_metadata=((PUSHBACK_KEY, self.pushback_ms),))
        yield retrieval_pb2.RetrieveResponse(item_ids=[7], scores=[1.0], model_version=1)


async def _calls(servicer: Refusing, options, count: int) -> list[str]:
    server = grpc.aio.server()
    retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    codes = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            for _ in range(count):
                try:
                    [reply async for reply in stub.Retrieve(retrieval_pb2.RetrieveRequest(user_id="1"), timeout=5)]
                    codes.append("OK")
                except grpc.aio.AioRpcError as error:
                    codes.append(error.code().name)
    finally:
        await server.stop(0)
    return codes


@pytest.mark.parametrize("client", CLIENTS)
def test_a_refusal_is_retried_after_the_servers_pushback(client):
    servicer = Refusing("300", refusals=1)
    codes = asyncio.run(_calls(servicer, CLIENTS[client](), 1))
    assert codes == ["OK"] and len(servicer.attempts) == 2
    # The client's own backoff is 10..100 ms; the retry waited for the server's 300 ms instead.
    assert servicer.attempts[1] - servicer.attempts[0] >= 0.3


@pytest.mark.parametrize("client", CLIENTS)
def test_a_negative_pushback_means_no_retry(client):
    servicer = Refusing("-1", refusals=1)
    codes = asyncio.run(_calls(servicer, CLIENTS[client](), 1))
    assert codes == ["RESOURCE_EXHAUSTED"] and len(servicer.attempts) == 1


@pytest.mark.parametrize("client", CLIENTS)
def test_retries_stop_when_the_budget_is_spent(client):
    # 20 calls to a server that refuses everything, pushback 1 ms, 3 attempts allowed:
    # unthrottled that is 60 attempts; the budget (10 tokens, -1 per failure, retries only above 5)
    # allows the first three retries, then none: 20 calls + 3 retries.
    servicer = Refusing("1", refusals=None)
    codes = asyncio.run(_calls(servicer, CLIENTS[client](), 20))
    assert codes == ["RESOURCE_EXHAUSTED"] * 20
    assert 21 <= len(servicer.attempts) <= 25


def test_without_retry_the_load_generator_counts_every_refusal():
    servicer = Refusing("1", refusals=1)
    codes = asyncio.run(_calls(servicer, loadtest_options(False), 2))
    assert codes == ["RESOURCE_EXHAUSTED", "OK"] and len(servicer.attempts) == 2


class Counting(grpc.aio.ServerInterceptor):
    """Counts every attempt that reaches the server: interceptors run before gRPC's concurrent-RPC
    limit is applied, so attempts the limit refuses are counted too."""

    def __init__(self) -> None:
        self.attempts = 0

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.endswith("/Retrieve"):
            self.attempts += 1
        return await continuation(handler_call_details)


class Holding(retrieval_pb2_grpc.RetrievalServiceServicer):
    """Holds every call until ``release`` is set."""

    def __init__(self) -> None:
        self.release, self.started = asyncio.Event(), asyncio.Event()

    async def Retrieve(self, request, context):
        self.started.set()
        await self.release.wait()
        yield retrieval_pb2.RetrieveResponse(item_ids=[7], scores=[1.0], model_version=1)


@pytest.mark.parametrize("client", CLIENTS)
def test_refusals_by_grpcs_own_limit_carry_no_pushback_and_retries_stay_within_the_budget(client):
    # The servers' gRPC limit (recsys_serving.runtime.rpc_limit) refuses before any servicer code,
    # so without a pushback trailer: the client backs off on its own, and its retry budget still
    # caps the retries (20 refused calls, at most 3 retries as in the test above).
    async def main():
        counting, holding = Counting(), Holding()
        server = grpc.aio.server(interceptors=[counting], maximum_concurrent_rpcs=1)
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(holding, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        codes, details, trailers = [], set(), set()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CLIENTS[client]()) as channel:
                stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
                held = stub.Retrieve(retrieval_pb2.RetrieveRequest(user_id="1"), timeout=30)
                await holding.started.wait()
                before = counting.attempts
                for _ in range(20):
                    call = stub.Retrieve(retrieval_pb2.RetrieveRequest(user_id="1"), timeout=5)
                    try:
                        [reply async for reply in call]
                        codes.append("OK")
                    except grpc.aio.AioRpcError as error:
                        codes.append(error.code().name)
                        details.add(error.details())
                        trailers.add(tuple(key for key, _ in (error.trailing_metadata() or ())))
                attempts = counting.attempts - before
                holding.release.set()
                [reply async for reply in held]
        finally:
            await server.stop(0)
        return codes, details, trailers, attempts

    codes, details, trailers, attempts = asyncio.run(main())
    assert codes == ["RESOURCE_EXHAUSTED"] * 20 and details == {"Concurrent RPC limit exceeded!"}
    assert all(PUSHBACK_KEY not in keys for keys in trailers)
    assert 20 <= attempts <= 25
