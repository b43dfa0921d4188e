"""Ranking's retrieval client against real gRPC servers: RetrieveAll, and a retrieval build that predates it.

The server here registers only what an older retrieval build served (the ``Retrieve`` stream), so a
``RetrieveAll`` call gets gRPC's own UNIMPLEMENTED, as in a rolling upgrade where ranking is new first.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from ranking_service import retrieval_client
from ranking_service.retrieval_client import RetrievalClient, RetrievalFailed, RetrievalRefused
from recsys_contracts.v1 import retrieval_pb2
from tests.ranking.harness import config

SERVICE = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name


class Retrieval:
    """Answers user "7" with candidates 7, 8, 9 (in two chunks when streamed); refuses user "bad"."""

    async def retrieve(self, request, context):
        if request.user_id == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id must be known, got 'bad'")
        yield retrieval_pb2.RetrieveResponse(item_ids=[7, 8], scores=[0.9, 0.8], model_version=3)
        yield retrieval_pb2.RetrieveResponse(item_ids=[9], scores=[0.7], model_version=3)

    async def retrieve_all(self, request, context):
        if request.user_id == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id must be known, got 'bad'")
        return retrieval_pb2.RetrieveResponse(item_ids=[7, 8, 9], scores=[0.9, 0.8, 0.7], model_version=3)

    def handlers(self, with_all: bool) -> grpc.GenericRpcHandler:
        kinds = dict(request_deserializer=retrieval_pb2.RetrieveRequest.FromString,
                     response_serializer=retrieval_pb2.RetrieveResponse.SerializeToString)
        methods = {"Retrieve": grpc.unary_stream_rpc_method_handler(self.retrieve, **kinds)}
        if with_all:
            methods["RetrieveAll"] = grpc.unary_unary_rpc_method_handler(self.retrieve_all, **kinds)
        return grpc.method_handlers_generic_handler(SERVICE, methods)


async def _collect(client: RetrievalClient, user_id: str = "7") -> list[retrieval_pb2.RetrieveResponse]:
    return [r async for r in client.stream(retrieval_pb2.RetrieveRequest(user_id=user_id), 5.0, "rid")]


class Methods(grpc.aio.ServerInterceptor):
    """Records every call's method name, also the ones no handler serves."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def intercept_service(self, continuation, handler_call_details):
        self.seen.append(handler_call_details.method.rsplit("/", 1)[1])
        return await continuation(handler_call_details)


async def _with_server(tmp_path, with_all: bool, body):
    servicer, methods = Retrieval(), Methods()
    server = grpc.aio.server(interceptors=(methods,))
    server.add_generic_rpc_handlers((servicer.handlers(with_all),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = RetrievalClient(config(tmp_path, retrieval_target=f"127.0.0.1:{port}"))
    try:
        return await body(client), methods.seen, client
    finally:
        await client.close()
        await server.stop(0)


def test_candidates_come_in_one_retrieve_all_call(tmp_path):
    async def body(client):
        return [await _collect(client) for _ in range(3)]

    answers, calls, client = asyncio.run(_with_server(tmp_path, True, body))
    assert calls == ["RetrieveAll"] * 3 and client.unary
    assert all([list(r.item_ids) for r in answer] == [[7, 8, 9]] for answer in answers)


def test_a_retrieval_without_retrieve_all_is_streamed_and_asked_again_later(tmp_path, monkeypatch):
    async def body(client):
        first = await _collect(client)        # UNIMPLEMENTED, then the stream, within the same call
        second = await _collect(client)       # remembered: straight to the stream
        monkeypatch.setattr(retrieval_client, "UNARY_RETRY_S", 0.0)
        client._unary_again_at = 0.0          # the retry period is over: RetrieveAll is asked again
        third = await _collect(client)
        return first, second, third

    (first, second, third), calls, client = asyncio.run(_with_server(tmp_path, False, body))
    for answer in (first, second, third):
        assert [list(r.item_ids) for r in answer] == [[7, 8], [9]]
    assert calls == ["RetrieveAll", "Retrieve", "Retrieve", "RetrieveAll", "Retrieve"]
    assert client.unary is False


@pytest.mark.parametrize("with_all", [True, False])
def test_invalid_argument_is_the_callers_error_on_either_method(tmp_path, with_all):
    async def body(client):
        with pytest.raises(RetrievalRefused, match="user_id"):
            await _collect(client, "bad")
        return None

    asyncio.run(_with_server(tmp_path, with_all, body))


def test_an_unreachable_retrieval_is_a_failure_not_a_fallback_to_the_stream(tmp_path):
    async def body():
        client = RetrievalClient(config(tmp_path))           # its target refuses connections
        try:
            with pytest.raises(RetrievalFailed) as failure:
                [r async for r in client.stream(retrieval_pb2.RetrieveRequest(user_id="7"), 0.5, "rid")]
            return failure.value, client.unary
        finally:
            await client.close()

    failure, unary = asyncio.run(body())
    assert failure.code in {"UNAVAILABLE", "DEADLINE_EXCEEDED"} and unary is True


class Refusing:
    """Refuses every call RESOURCE_EXHAUSTED with pushback -1 (no retry), as an overloaded retrieval does."""

    async def retrieve_all(self, request, context):
        context.set_trailing_metadata((("grpc-retry-pushback-ms", "-1"),))
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded on purpose")

    def handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {"RetrieveAll": grpc.unary_unary_rpc_method_handler(
            self.retrieve_all, request_deserializer=retrieval_pb2.RetrieveRequest.FromString,
            response_serializer=retrieval_pb2.RetrieveResponse.SerializeToString)})


async def _against_refusing(tmp_path, calls: int, **client_options) -> tuple[list[str], int]:
    """The failure code of each of ``calls`` calls, and how many reached the server."""
    methods = Methods()
    server = grpc.aio.server(interceptors=(methods,))
    server.add_generic_rpc_handlers((Refusing().handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    background = client_options.pop("background", False)
    client = RetrievalClient(config(tmp_path, retrieval_target=f"127.0.0.1:{port}", **client_options),
                             background=background)
    codes = []
    try:
        for _ in range(calls):
            with pytest.raises(RetrievalFailed) as info:
                await _collect(client)
            codes.append(info.value.code)
    finally:
        await client.close()
        await server.stop(0)
    return codes, len(methods.seen)


def test_while_retrieval_refuses_most_calls_are_throttled_here_and_never_sent(tmp_path):
    # K = 2 (the default) against a server that accepts nothing: the first 50 calls go (the floor),
    # then each goes with probability 1 - 0.9 (the cap): ~75 of 300 reach the server.
    codes, reached = asyncio.run(_against_refusing(tmp_path, 300))
    assert 50 <= reached <= 110, reached
    assert codes.count("RESOURCE_EXHAUSTED") == reached
    assert codes.count(retrieval_client.THROTTLED) == 300 - reached


@pytest.mark.parametrize("options", [{"retrieval_throttle_k": 0.0}, {"background": True}], ids=["off", "background"])
def test_with_the_throttle_off_or_for_background_calls_every_call_is_sent(tmp_path, options):
    codes, reached = asyncio.run(_against_refusing(tmp_path, 150, **options))
    assert reached == 150 and set(codes) == {"RESOURCE_EXHAUSTED"}


def test_the_throttle_counts_answers_refusals_and_abandoned_streams(tmp_path):
    async def body(client):
        await _collect(client)                                   # answered: accepted
        with pytest.raises(RetrievalRefused):
            await _collect(client, "bad")                        # the caller's error: accepted
        stream = client.stream(retrieval_pb2.RetrieveRequest(user_id="7"), 5.0, "rid")
        await stream.__anext__()
        await stream.aclose()                                    # the caller stopped early: accepted
        return sum(client.throttle._requests), sum(client.throttle._accepts)

    (requests, accepts), _, _ = asyncio.run(_with_server(tmp_path, True, body))
    assert (requests, accepts) == (3, 3)
