"""The load drivers over ``grpc.aio``: open loop, closed loop and ramp, and ``run_load`` tying them up.

- Open loop: requests leave on the ``schedule`` clock, each as its own task, never waiting for
  earlier replies; latency is charged from the intended send time (no coordinated omission).
- Closed loop: ``concurrency`` workers, each sending its next request when the last one returns;
  latency from the actual send (the definition of a closed loop, and why it flatters a slow server).
- Ramp: open-loop steps of ``step_duration_s`` at rate, rate + step, ... until a step's p99 exceeds
  the target or too many requests fail; the result is the highest rate held.

Every run is bounded by ``duration_s`` and ``max_requests`` (plus an unrecorded ``warmup_s``);
each request carries the deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence

import grpc
import numpy as np

from loadtest.collector import measured_window
from loadtest.config import LoadConfig, validate
from loadtest.results import THROTTLED, Outcome, elapsed_s, summarize
from loadtest.schedule import constant_arrivals, ramp_rates
from loadtest.users import Population, UserSampler, load_population
from recsys_contracts.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from recsys_serving.admission import client_service_config
from recsys_serving.channels import ChannelPool
from recsys_serving.aio import within
from recsys_serving.throttle import AdaptiveThrottle

# A restarted server should get traffic within ~1 s, not after gRPC's default backoff of up to 2 min.
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
_SERVICES = tuple(module.DESCRIPTOR.services_by_name[name].full_name
                  for module, name in ((ranking_pb2, "RankingService"), (retrieval_pb2, "RetrievalService")))


def channel_options(retry: bool) -> list[tuple[str, object]]:
    """The load generator's channel; ``retry`` (``--retry``) makes it behave like a well-mannered backend:
    UNAVAILABLE and RESOURCE_EXHAUSTED retried after the server's pushback, under a retry budget
    (``recsys_serving.admission.client_service_config``). Off by default: a run then measures what
    the server answered, each refusal counted as such."""
    if not retry:
        return list(CHANNEL_OPTIONS)
    return [*CHANNEL_OPTIONS, ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(client_service_config(*_SERVICES)))]


def throttle_for(config: LoadConfig) -> AdaptiveThrottle | None:
    """The client's adaptive throttle (``--throttle K``), shared by the warm-up and the measured run so
    the run starts from a client that has been sending; None when off."""
    return AdaptiveThrottle(config.throttle_k) if config.throttle_k else None


def _flags(degraded: Sequence[int]) -> tuple[str, ...]:
    return tuple(common_pb2.DegradedPath.Name(flag) for flag in degraded)


class Caller:
    """Sends one request of the configured RPC for a user id; returns (code, degraded flags, versions).

    With a ``throttle``, a request it rejects is not sent and comes back as the code ``THROTTLED``.
    """

    def __init__(self, channel: grpc.aio.Channel, config: LoadConfig, population: Population,
                 throttle: AdaptiveThrottle | None = None) -> None:
        self.config = config
        self.throttle = throttle
        self.timeout_s = config.deadline_ms / 1000
        self.items = population.item_ids
        self.rng = np.random.default_rng(config.seed + 1)   # item draws apart from the user stream
        self.ranking = ranking_pb2_grpc.RankingServiceStub(channel)
        self.retrieval = retrieval_pb2_grpc.RetrievalServiceStub(channel)

    async def __call__(self, user_id: str) -> tuple[str, tuple[str, ...], tuple[tuple[str, int], ...]]:
        if self.throttle is None:
            return await self._send(user_id)
        if not self.throttle.admit():
            return THROTTLED, (), ()
        answer = await self._send(user_id)
        self.throttle.record(grpc.StatusCode[answer[0]])
        return answer

    async def _send(self, user_id: str) -> tuple[str, tuple[str, ...], tuple[tuple[str, int], ...]]:
        try:
            if self.config.rpc == "recommend":
                reply = await self.ranking.Recommend(
                    ranking_pb2.RecommendRequest(user_id=user_id, k=self.config.k), timeout=self.timeout_s)
                return "OK", _flags(reply.degraded), (("retrieval", reply.retrieval_version),
                                                      ("ranking", reply.ranking_version))
            if self.config.rpc == "rank":
                size = min(self.config.rank_items, len(self.items))
                item_ids = self.rng.choice(self.items, size=size, replace=False).tolist()
                reply = await self.ranking.Rank(ranking_pb2.RankRequest(user_id=user_id, item_ids=item_ids),
                                                timeout=self.timeout_s)
                return "OK", _flags(reply.degraded), (("ranking", reply.ranking_version),)
            return await self._retrieve(user_id)
        except grpc.aio.AioRpcError as error:
            return error.code().name, (), ()

    async def _retrieve(self, user_id: str) -> tuple[str, tuple[str, ...], tuple[tuple[str, int], ...]]:
        request = retrieval_pb2.RetrieveRequest(user_id=user_id, num_candidates=self.config.num_candidates)
        flags: tuple[str, ...] = ()
        version = 0
        async for chunk in self.retrieval.Retrieve(request, timeout=self.timeout_s):
            flags, version = _flags(chunk.degraded), chunk.model_version   # the same on every chunk
        return "OK", flags, (("retrieval", version),)


async def _timed(caller: Caller, user_id: str, intended: float, origin: float) -> Outcome:
    code, degraded, versions = await caller(user_id)
    return Outcome(intended - origin, asyncio.get_running_loop().time() - intended, code, degraded, versions)


async def open_loop(caller: Caller, users: Sequence[str], arrivals: np.ndarray, origin: float) -> list[Outcome]:
    """Sends users[i] at loop time origin + arrivals[i] (s), each as its own task; returns when all replied."""
    loop = asyncio.get_running_loop()
    tasks = []
    for user_id, offset in zip(users, arrivals.tolist()):
        due = origin + offset
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        # A late wake-up (a busy client) still charges the request from `due`.
        tasks.append(loop.create_task(_timed(caller, user_id, due, origin)))
    return list(await asyncio.gather(*tasks))


async def closed_loop(caller: Caller, sampler: UserSampler, concurrency: int, duration_s: float,
                      max_requests: int, origin: float) -> list[Outcome]:
    """``concurrency`` workers send back to back until ``duration_s`` passed or ``max_requests`` were sent."""
    loop = asyncio.get_running_loop()
    end = origin + duration_s
    outcomes: list[Outcome] = []
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while sent < max_requests and loop.time() < end:
            sent += 1
            outcomes.append(await _timed(caller, sampler.sample(1)[0], loop.time(), origin))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def step_held(summary: dict, p99_target_ms: float, max_error_share: float) -> bool:
    """A ramp step holds when its p99 (all requests) is within the target and few enough requests failed."""
    p99 = summary["latency_ms"]["p99"]
    return (summary["requests"] > 0 and not math.isnan(p99) and p99 <= p99_target_ms
            and summary["failed"] <= max_error_share * summary["requests"])


async def ramp(caller: Caller, sampler: UserSampler, config: LoadConfig,
               origin: float) -> tuple[list[Outcome], list[dict]]:
    """Open-loop steps of rising rate until one is not held; returns (all outcomes, one dict per step)."""
    loop = asyncio.get_running_loop()
    outcomes: list[Outcome] = []
    steps: list[dict] = []
    max_steps = max(1, int(config.duration_s // config.step_duration_s))
    for rate in ramp_rates(config.rate, config.ramp_step, max_steps):
        budget = config.max_requests - len(outcomes)
        if budget < 1:
            break
        start = loop.time() - origin
        arrivals = start + constant_arrivals(rate, config.step_duration_s, budget)
        step = await open_loop(caller, sampler.sample(len(arrivals)), arrivals, origin)
        outcomes += step
        summary = summarize(step, config.step_duration_s)
        held = step_held(summary, config.p99_target_ms, config.max_error_share)
        steps.append({"rate": rate, "start_s": start, "held": held, "requests": summary["requests"],
                      "failed": summary["failed"], "throughput_rps": summary["throughput_rps"],
                      "latency_ms": summary["latency_ms"]})
        if not held:
            break
    return outcomes, steps


async def wait_connected(channel: grpc.aio.Channel, target: str, timeout_s: float) -> None:
    try:
        await within(channel.channel_ready(), timeout_s)
    except TimeoutError:
        raise ConnectionError(f"target {target!r} did not accept a connection within {timeout_s:g} s") from None


async def warm_up(channel: grpc.aio.Channel, config: LoadConfig, population: Population,
                  throttle: AdaptiveThrottle | None = None) -> int:
    """Open-loop load at ``config.rate`` for ``config.warmup_s`` (first calls, connections); returns requests sent."""
    if config.warmup_s == 0:
        return 0
    caller = Caller(channel, config, population, throttle)
    sampler = UserSampler(population.user_ids, config.skew, config.unknown_share, config.seed + 2)
    arrivals = constant_arrivals(config.rate, config.warmup_s, config.max_requests)
    await open_loop(caller, sampler.sample(len(arrivals)), arrivals, asyncio.get_running_loop().time())
    return len(arrivals)


async def drive(channel: grpc.aio.Channel, config: LoadConfig, population: Population,
                origin: float, throttle: AdaptiveThrottle | None = None) -> tuple[list[Outcome], dict]:
    """Runs the configured mode over an open channel; returns (outcomes, extra result fields)."""
    caller = Caller(channel, config, population, throttle)
    sampler = UserSampler(population.user_ids, config.skew, config.unknown_share, config.seed)
    if config.mode == "open":
        arrivals = constant_arrivals(config.rate, config.duration_s, config.max_requests)
        return await open_loop(caller, sampler.sample(len(arrivals)), arrivals, origin), {}
    if config.mode == "closed":
        return await closed_loop(caller, sampler, config.concurrency, config.duration_s, config.max_requests,
                                 origin), {}
    outcomes, steps = await ramp(caller, sampler, config, origin)
    held = [step["rate"] for step in steps if step["held"]]
    return outcomes, {"ramp": {"p99_target_ms": config.p99_target_ms, "highest_rate_held": max(held, default=None),
                               "steps": steps}}


async def run_load(config: LoadConfig, population: Population | None = None) -> tuple[dict, list[Outcome]]:
    """Validates, connects, drives the load; returns (results document without outcomes, outcomes)."""
    validate(config)
    loadavg_before = list(os.getloadavg())   # other work on the machine skews every figure
    cpu_before = time.process_time()
    population = population if population is not None else load_population(config.users_from)
    async with ChannelPool.insecure(config.target, channel_options(config.retry), config.channels) as channel:
        await wait_connected(channel, config.target, config.connect_timeout_s)
        throttle = throttle_for(config)
        await warm_up(channel, config, population, throttle)
        with measured_window() as collector:
            origin = asyncio.get_running_loop().time()
            outcomes, extra = await drive(channel, config, population, origin, throttle)
    # Throughput is over the schedule's span (open loop) or until the last reply, whichever is longer.
    span_s = min(config.duration_s, config.max_requests / config.rate) if config.mode == "open" else 1e-9
    duration_s = elapsed_s(outcomes, span_s)
    # The harness's own CPU seconds: shows whether the client, not the server, was the limit.
    return {"config": dataclasses.asdict(config), "loadavg_before": loadavg_before,
            "client_cpu_s": time.process_time() - cpu_before, "client_gc": collector.as_dict(),
            "summary": summarize(outcomes, duration_s),
            **extra}, outcomes
