"""The RPC wrapper both services use (``recsys_serving.rpc``), over a real gRPC server on port 0."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
import pytest

from recsys_contracts.v1 import ranking_pb2, ranking_pb2_grpc
from recsys_serving.admission import Admission
from recsys_serving.rpc import Call, Rpc


class _Slow(ranking_pb2_grpc.RankingServiceServicer):
    """Rank holds its admission slot for ``work_s`` seconds."""

    def __init__(self, rpc: Rpc, work_s: float) -> None:
        self.rpc, self.work_s = rpc, work_s

    async def Rank(self, request, context):
        async def handle(call: Call) -> ranking_pb2.RankResponse:
            async with call.admitted():
                await asyncio.sleep(self.work_s)
                return ranking_pb2.RankResponse(ranking_version=1)

        return await self.rpc.serve("Rank", context, handle)


@contextlib.asynccontextmanager
async def _served(rpc: Rpc, work_s: float):
    """A real gRPC server on port 0 whose Rank goes through ``rpc``; yields a stub."""
    server = grpc.aio.server()
    ranking_pb2_grpc.add_RankingServiceServicer_to_server(_Slow(rpc, work_s), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield ranking_pb2_grpc.RankingServiceStub(channel)
    finally:
        await server.stop(0)


async def _counted_soon(counted: list, n: int = 1) -> None:
    for _ in range(100):                  # the server side finishes after the client saw the end
        if len(counted) >= n:
            return
        await asyncio.sleep(0.01)


def _call(default_deadline_s: float, work_s: float, timeout_s: float | None) -> tuple[grpc.StatusCode, str, list]:
    counted: list[tuple[str, str]] = []

    async def main():
        rpc = Rpc(admission=Admission(2, 4), default_deadline_s=default_deadline_s, log=logging.getLogger("test.rpc"),
                  count=lambda method, code, seconds: counted.append((method, code)))
        async with _served(rpc, work_s) as stub:
            try:
                await stub.Rank(ranking_pb2.RankRequest(user_id="1", item_ids=[1]), timeout=timeout_s)
                code, details = grpc.StatusCode.OK, ""
            except grpc.aio.AioRpcError as error:
                code, details = error.code(), error.details() or ""
            await _counted_soon(counted)
        return code, details, counted

    return asyncio.run(main())


def test_the_default_deadline_applies_when_the_caller_sets_none():
    # retrieval's default deadline is a setting now (RETRIEVAL_DEFAULT_DEADLINE_MS), as ranking's was
    code, details, counted = _call(default_deadline_s=0.2, work_s=2.0, timeout_s=None)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and details == "deadline of 200 ms exceeded"
    assert counted == [("Rank", "DEADLINE_EXCEEDED")]


def test_a_call_ended_by_the_callers_deadline_counts_as_deadline_exceeded_not_cancelled():
    # gRPC cancels the handler when the caller's deadline passes; near the deadline that is the deadline
    # (retrieval's rule, now ranking's too: ranking counted such calls CANCELLED)
    code, _, counted = _call(default_deadline_s=30.0, work_s=2.0, timeout_s=0.3)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert counted == [("Rank", "DEADLINE_EXCEEDED")]


def test_a_call_within_its_deadline_is_counted_ok():
    assert _call(default_deadline_s=1.0, work_s=0.0, timeout_s=5.0) == (grpc.StatusCode.OK, "", [("Rank", "OK")])


def test_a_refusal_is_counted_but_not_logged_at_info(caplog):
    """Under overload a log line per refusal would be CPU spent on the requests being refused."""
    counted: list[tuple[str, str]] = []

    async def main():
        rpc = Rpc(admission=Admission(1, 1), default_deadline_s=5.0, log=logging.getLogger("test.rpc.refusals"),
                  count=lambda method, code, seconds: counted.append((method, code)))
        async with _served(rpc, work_s=0.3) as stub:
            request = ranking_pb2.RankRequest(user_id="1", item_ids=[1])
            first = asyncio.ensure_future(stub.Rank(request, timeout=5))
            while rpc.admission.in_flight < 1:           # the first call holds the only slot
                await asyncio.sleep(0.005)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Rank(request, timeout=5, wait_for_ready=True)
            await first
            await _counted_soon(counted, 2)
        return refused.value.code()

    with caplog.at_level(logging.INFO, logger="test.rpc.refusals"):
        code = asyncio.run(main())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sorted(counted) == [("Rank", "OK"), ("Rank", "RESOURCE_EXHAUSTED")]
    assert [r for r in caplog.records if r.name == "test.rpc.refusals" and r.levelno >= logging.INFO] == []
