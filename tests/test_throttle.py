"""The client-side adaptive throttle: its arithmetic on hand-computed cases, and a real gRPC server.

The arithmetic runs on a hand-driven clock and a seeded random source. The server is a real
``RankingService`` on 127.0.0.1:0 that refuses every call while told to (as an overloaded or
not-yet-ready ranking does), driven through the load generator's ``Caller`` with ``--throttle``.
"""

from __future__ import annotations

import asyncio
import math
import random

import grpc
import numpy as np
import pytest

from loadtest.client import Caller, throttle_for
from loadtest.config import LoadConfig, validate
from loadtest.results import THROTTLED, Outcome, summarize
from loadtest.users import Population
from recsys_contracts.v1 import ranking_pb2, ranking_pb2_grpc
from recsys_serving.throttle import AdaptiveThrottle, Throttled

OK, REFUSED = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _throttle(clock: Clock, k: float = 2.0, window_s: float = 10.0, buckets: int = 10, min_requests: int = 0,
              max_probability: float = 1.0) -> AdaptiveThrottle:
    """The bare formula unless the guards are asked for (the defaults: 50 requests, p <= 0.9)."""
    return AdaptiveThrottle(k, window_s, buckets, min_requests=min_requests, max_probability=max_probability,
                            rng=random.Random(0), clock=clock)


def _count(throttle: AdaptiveThrottle, code: grpc.StatusCode, n: int = 1) -> None:
    """n calls the application asked for and sent, each answered with ``code``."""
    for _ in range(n):
        throttle._requests[throttle._advance()] += 1
        throttle.record(code)


def test_a_server_that_takes_everything_is_never_throttled():
    throttle = _throttle(Clock())
    for _ in range(1000):
        assert throttle.admit()
        throttle.record(OK)
    assert throttle.probability() == 0.0 and throttle.rejected == 0


def test_the_reject_probability_is_the_sre_formula():
    clock = Clock()
    throttle = _throttle(clock)
    _count(throttle, OK, 3)        # 10 requests; the first 3 accepted, the rest refused
    _count(throttle, REFUSED, 7)
    # (requests - K * accepts) / (requests + 1) = (10 - 2 * 3) / 11
    assert throttle.probability() == pytest.approx(4 / 11)
    throttle.record(OK)            # 4 accepts: 10 - 8 = 2 -> 2 / 11
    assert throttle.probability() == pytest.approx(2 / 11)
    throttle.record(OK)            # 5 accepts: 10 - 10 = 0 -> no throttling
    assert throttle.probability() == 0.0


@pytest.mark.parametrize("code", ["RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED"])
def test_overload_unavailability_and_missed_deadlines_are_not_accepts(code):
    throttle = _throttle(Clock())
    _count(throttle, grpc.StatusCode[code], 9)
    assert throttle.probability() == pytest.approx(9 / 10)


@pytest.mark.parametrize("code", ["INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"])
def test_a_call_the_server_answered_with_an_error_is_an_accept(code):
    throttle = _throttle(Clock())
    _count(throttle, grpc.StatusCode[code], 9)
    assert throttle.probability() == 0.0


def test_old_slots_leave_the_window_one_by_one():
    clock = Clock()
    throttle = _throttle(clock, window_s=10.0, buckets=10)     # 1 s slots
    _count(throttle, REFUSED, 20)                              # slot 0: 20 refused requests
    clock.now += 5
    _count(throttle, OK, 10)                                   # slot 5: 10 accepted requests
    # 30 requests, 10 accepts: (30 - 20) / 31
    assert throttle.probability() == pytest.approx(10 / 31)
    clock.now += 5                                             # slot 0 left the window, slot 5 is still in it
    assert throttle.probability() == 0.0
    assert sum(throttle._requests) == 10 and sum(throttle._accepts) == 10
    clock.now += 100                                           # everything left
    throttle.probability()
    assert sum(throttle._requests) == 0 and sum(throttle._accepts) == 0


def test_against_a_server_that_takes_c_per_second_the_client_sends_about_k_times_c():
    """R = 900 calls/s offered, the server accepts the first C = 100 it sees each second (refuses the rest):
    in the steady state the client sends ~K * C and rejects the rest itself."""
    clock = Clock()
    throttle = _throttle(clock, k=2.0)
    sent_last_10_s = 0
    for second in range(30):
        accepted = 0
        for i in range(900):
            clock.now = 1000.0 + second + i / 900
            if not throttle.admit():
                continue
            if second >= 20:
                sent_last_10_s += 1
            if accepted < 100:
                accepted += 1
                throttle.record(OK)
            else:
                throttle.record(REFUSED)
    assert 2.0 * 100 * 10 * 0.9 <= sent_last_10_s <= 2.0 * 100 * 10 * 1.1


def test_below_the_floor_nothing_is_throttled():
    throttle = _throttle(Clock(), min_requests=50)
    _count(throttle, grpc.StatusCode.DEADLINE_EXCEEDED, 49)     # 49 calls, none accepted
    assert throttle.probability() == 0.0
    _count(throttle, grpc.StatusCode.DEADLINE_EXCEEDED)         # the 50th: (50 - 0) / 51
    assert throttle.probability() == pytest.approx(50 / 51)


def test_the_probability_is_capped_so_some_calls_still_probe_the_server():
    throttle = _throttle(Clock(), max_probability=0.9)
    _count(throttle, REFUSED, 1000)                             # (1000 - 0) / 1001 > 0.9
    assert throttle.probability() == 0.9
    assert sum(throttle.admit() for _ in range(2000)) == pytest.approx(200, abs=40)


def test_the_defaults_are_the_documented_ones():
    throttle = AdaptiveThrottle()
    assert (throttle.k, throttle.window_s, throttle.min_requests, throttle.max_probability) == (2.0, 10.0, 50, 0.9)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"k": 1.0}, "k"), ({"k": math.nan}, "k"), ({"k": 0.5}, "k"),
    ({"window_s": 0.0}, "window_s"), ({"window_s": math.inf}, "window_s"), ({"buckets": 0}, "buckets"),
    ({"min_requests": -1}, "min_requests"), ({"min_requests": 1.5}, "min_requests"),
    ({"max_probability": 0.0}, "max_probability"), ({"max_probability": 1.5}, "max_probability"),
    ({"max_probability": math.nan}, "max_probability"),
])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        AdaptiveThrottle(**kwargs)


def test_check_raises_a_grpc_resource_exhausted_that_says_why():
    throttle = _throttle(Clock())
    _count(throttle, REFUSED, 50)
    with pytest.raises(Throttled) as raised:
        for _ in range(100):
            throttle.check()
    error = raised.value
    assert isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "adaptive throttle" in error.details() and "RESOURCE_EXHAUSTED" in error.details()


def test_a_server_that_is_not_there_gives_unavailable_not_resource_exhausted():
    """The gateway maps the code to HTTP: a ranking that is down stays 503, an overloaded one 429."""
    throttle = _throttle(Clock())
    _count(throttle, grpc.StatusCode.UNAVAILABLE, 50)
    with pytest.raises(Throttled) as raised:
        for _ in range(100):
            throttle.check()
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(("value", "ok"), [(0.0, True), (2.0, True), (1.0, False), (0.5, False), (math.nan, False)])
def test_the_load_generators_throttle_setting_is_checked(value, ok):
    config = LoadConfig(throttle_k=value)
    if ok:
        assert validate(config) is config
        assert (throttle_for(config) is None) == (value == 0)
    else:
        with pytest.raises(ValueError, match="^throttle_k must be 0 \\(off\\) or > 1"):
            validate(config)


def test_a_summary_keeps_throttled_requests_apart_from_the_servers_refusals():
    outcomes = [Outcome(0.0, 0.004, "OK"), Outcome(0.1, 0.030, "RESOURCE_EXHAUSTED"),
                Outcome(0.2, 0.0001, THROTTLED), Outcome(0.3, 0.0002, THROTTLED)]
    summary = summarize(outcomes, 1.0)
    assert summary["codes"] == {"OK": 1, "RESOURCE_EXHAUSTED": 1, THROTTLED: 2} and summary["failed"] == 3
    assert summary["refused_latency_ms"]["max"] == pytest.approx(30.0)         # the server's alone
    assert summary["rejected_latency_ms"]["p50"] == pytest.approx(0.2)         # nearest rank 2 of 3
    assert summary["rejected_latency_ms"]["max"] == pytest.approx(30.0)


class Switchable(ranking_pb2_grpc.RankingServiceServicer):
    """Refuses every Recommend with RESOURCE_EXHAUSTED while ``refusing``; counts the calls it received."""

    def __init__(self) -> None:
        self.refusing, self.calls = True, 0

    async def Recommend(self, request, context):
        self.calls += 1
        if self.refusing:
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details("overloaded")
            return ranking_pb2.RecommendResponse()
        return ranking_pb2.RecommendResponse(ranking_version=1, retrieval_version=1)


def test_a_refusing_server_sees_few_calls_and_a_recovered_one_gets_them_all_again():
    async def main():
        servicer = Switchable()
        server = grpc.aio.server()
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        throttle = AdaptiveThrottle(2.0, window_s=0.5, buckets=5, rng=random.Random(1))
        population = Population(user_ids=("1",), item_ids=np.array([1, 2], dtype=np.int64))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                caller = Caller(channel, LoadConfig(deadline_ms=5000), population, throttle)
                refused = [(await caller("1"))[0] for _ in range(300)]
                calls_while_refusing = servicer.calls
                servicer.refusing = False
                await asyncio.sleep(0.6)               # the window forgets the refusals
                recovered = [(await caller("1"))[0] for _ in range(50)]
        finally:
            await server.stop(0)
        return refused, calls_while_refusing, recovered, servicer.calls

    refused, calls_while_refusing, recovered, calls = asyncio.run(main())
    # The first 50 go (the floor), then 1 in 10 (the cap at p = 0.9): ~50 + 25 of 300 reach the server.
    assert 50 <= calls_while_refusing <= 110
    assert refused.count(THROTTLED) == 300 - calls_while_refusing
    assert refused.count("RESOURCE_EXHAUSTED") == calls_while_refusing
    assert recovered == ["OK"] * 50 and calls == calls_while_refusing + 50
