"""The gRPC front door: ``RankingServicer`` (translate, don't decide) and ``create_server``.

Every RPC goes through ``_serve``, which owns the status codes:

- DEADLINE_EXCEEDED at once when less than ``RANKING_MIN_DEADLINE_MS`` is left on arrival (no
  retrieval or Redis call), and when the deadline (the caller's, else ``RANKING_DEFAULT_DEADLINE_MS``)
  passes while serving;
- RESOURCE_EXHAUSTED at once when the RPC cannot finish within its deadline given the queue, or
  ``RANKING_MAX_IN_FLIGHT`` RPCs are already admitted (``recsys_serving.admission``; the refusal
  carries a ``grpc-retry-pushback-ms`` trailer); DEADLINE_EXCEEDED, unstarted, when its deadline
  passes while it waits for one of the ``RANKING_MAX_CONCURRENCY`` slots;
- UNAVAILABLE while no version is loaded, when retrieval fails with fallback disabled, or when
  Redis does not take recorded interactions;
- INVALID_ARGUMENT with the ValueError's message naming the field and value;
- FAILED_PRECONDITION when a Recommend pins a version a service does not hold (the held ones named);
- INTERNAL for anything unexpected (logged with its traceback; never sent on the wire).

``RankingApp`` is the composition: version holder, feature store, refiller, DCN batcher, retrieval
channel and pipeline; ``create_server`` binds, starts, loads the first version, then reports SERVING.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc

from ranking_service import arms, display, metrics, validation
from ranking_service.batching import MicroBatcher
from ranking_service.config import RankingConfig
from ranking_service.features import FeatureStore, StoreUnavailable, redis_breaker
from ranking_service.pipeline import Answer, Pipeline, RetrievalUnavailable, VersionNotHeld
from ranking_service.refill import run_refiller
from ranking_service.retrieval_client import CandidateSource, RetrievalClient
from ranking_service.shadow import Shadow
from ranking_service.state import ServingState, load_state
from recsys_contracts.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc
from recsys_serving import env, runtime
from recsys_serving.admission import Admission, Expired, Refused
from recsys_serving.breaker import CircuitBreaker
from recsys_serving.reload import VersionHolder

log = logging.getLogger(__name__)
SERVICE_NAME = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name
_RECORD_TIMEOUT_CAP_S = 1.0   # RecordInteractions waits at most this long for Redis


class _Failure(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def default_holder(config: RankingConfig) -> VersionHolder[ServingState]:
    """Watches ``config.artifact_root`` (or the pinned version) and builds states with ``load_state``."""
    return VersionHolder(config.artifact_root, functools.partial(load_state, default_score_mode=config.score_mode),
                         trust=env.trust(config), pinned=config.pinned_version,
                         poll_interval_s=config.poll_interval_s)


class RankingApp:
    """Everything the servicer needs, built once per process; ``close()`` releases it."""

    def __init__(self, config: RankingConfig, candidates: CandidateSource | None = None,
                 holder: VersionHolder[ServingState] | None = None) -> None:
        self.config = config
        self.health = None
        self.holder = holder if holder is not None else default_holder(config)
        self.holder.on_swap, self.holder.on_refuse = self._on_swap, self._on_refuse
        self.features = FeatureStore(config.redis_url, config.redis_namespace, config.redis_timeout_ms,
                                     breaker=redis_breaker(config.redis_breaker_failures,
                                                           config.redis_breaker_cooldown_ms / 1000))
        self.batcher = MicroBatcher(config.microbatch_max_size, config.microbatch_max_wait_ms / 1000)
        self.candidates = candidates if candidates is not None else RetrievalClient(config)
        self.pipeline = Pipeline(features=self.features, batcher=self.batcher, candidates=self.candidates,
                                 fallback=config.fallback, breaker=CircuitBreaker(
                                     "ranking-retrieval", config.retrieval_breaker_failures,
                                     config.retrieval_breaker_cooldown_ms / 1000,
                                     state_gauge=metrics.RETRIEVAL_BREAKER_STATE,
                                     transitions=metrics.RETRIEVAL_BREAKER_TRANSITIONS),
                                 held=self.holder.held,
                                 held_versions=self._fallback_versions, used=self.holder.used)
        self.admission = Admission(config.max_concurrency, config.max_in_flight, metrics.ADMISSION)
        # The shadow runs on its own DCN batcher (its batches never join or queue before a live
        # one) and its own retrieval breaker (a failing candidate must not open the live one).
        self.shadow_batcher = MicroBatcher(config.microbatch_max_size, config.microbatch_max_wait_ms / 1000)
        self.shadow = Shadow(Pipeline(features=self.features, batcher=self.shadow_batcher,
                                      candidates=self.candidates, fallback="unavailable",
                                      breaker=CircuitBreaker("ranking-shadow-retrieval",
                                                             config.retrieval_breaker_failures,
                                                             config.retrieval_breaker_cooldown_ms / 1000),
                                      held=self.holder.held),
                             config, self.holder, self._spawn)
        self._tasks: set[asyncio.Task] = set()

    def _fallback_versions(self) -> list[int]:
        """The held versions retrieval may answer from instead of the asked one: all but the arms'
        candidate (only a canary request ranks with it, and asks for it)."""
        return [v for v in self.holder.held_versions if v != self.holder.candidate_version]

    def _on_swap(self, state: ServingState, version: int) -> None:
        metrics.MODEL_VERSION.set(version)
        metrics.RELOADS.labels("loaded").inc()
        self.features.refill_wanted.set()          # a new version may not be in Redis yet
        if self.health is not None:
            self._spawn(runtime.set_serving(self.health, [SERVICE_NAME], True))

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_refuse(self, version: int, error: Exception) -> None:
        metrics.RELOADS.labels("refused").inc()

    async def start(self, health) -> None:
        self.health = health
        await self.holder.refresh()
        if self.holder.ready:
            await runtime.set_serving(health, [SERVICE_NAME], True)
        self.holder.start()
        if self.features.redis is not None:
            self._spawn(run_refiller(self.features, lambda: self.holder.current, self.config.poll_interval_s))

    async def close(self) -> None:
        await self.holder.stop()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.batcher.close()
        await self.shadow_batcher.close()
        await self.candidates.close()
        await self.features.close()


def _scored_items(answer: Answer) -> list[ranking_pb2.ScoredItem]:
    items = answer.items
    if items is None:
        return []
    return [ranking_pb2.ScoredItem(item_id=int(i), score=float(s), ctr=float(c), predicted_rating=float(r),
                                   retrieval_score=float(rs))
            for i, s, c, r, rs in zip(items.item_ids.tolist(), items.score.tolist(), items.ctr.tolist(),
                                      items.rating.tolist(), items.retrieval_score.tolist())]


def _count_degraded(answer: Answer) -> list[int]:
    flags = sorted(answer.degraded)
    for flag in flags:
        metrics.DEGRADED.labels(common_pb2.DegradedPath.Name(flag)).inc()
    return flags


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    def __init__(self, app: RankingApp) -> None:
        self.app = app

    async def _serve(self, method: str, context: grpc.aio.ServicerContext,
                     handle: Callable[[ServingState | None, float, str], Awaitable]):
        config, loop = self.app.config, asyncio.get_running_loop()
        started, code, details = time.perf_counter(), grpc.StatusCode.OK, ""
        request_id = runtime.request_id(context) or uuid.uuid4().hex
        remaining = context.time_remaining()
        remaining = config.default_deadline_ms / 1000 if remaining is None else remaining
        trailers: tuple[tuple[str, str], ...] = ()
        try:
            if remaining * 1000 < config.min_deadline_ms:
                raise _Failure(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"deadline must leave at least {config.min_deadline_ms} ms, got {remaining * 1000:.1f} ms")
            deadline = loop.time() + remaining      # the loop's clock is time.monotonic, as admission's
            async with self.app.admission.slot(deadline):
                state = self.app.holder.current
                if state is None:
                    raise _Failure(grpc.StatusCode.UNAVAILABLE, "no model version loaded yet")
                async with asyncio.timeout_at(deadline):
                    return await handle(state, deadline, request_id)
        except _Failure as failure:
            code, details = failure.code, failure.details
        except Refused as refusal:
            code, details, trailers = grpc.StatusCode.RESOURCE_EXHAUSTED, str(refusal), refusal.trailing_metadata
        except Expired as expired:
            code, details = grpc.StatusCode.DEADLINE_EXCEEDED, str(expired)
        except ValueError as error:
            code, details = grpc.StatusCode.INVALID_ARGUMENT, str(error)
        except (RetrievalUnavailable, StoreUnavailable) as error:
            code, details = grpc.StatusCode.UNAVAILABLE, str(error)
        except VersionNotHeld as error:
            code, details = grpc.StatusCode.FAILED_PRECONDITION, str(error)
        except TimeoutError:
            code, details = grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline of {remaining * 1000:.0f} ms exceeded"
        except asyncio.CancelledError:   # the caller went away: count it, let gRPC finish the call
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:  # never a traceback on the wire
            log.exception("%s failed", method, extra={"request_id": request_id})
            code, details = grpc.StatusCode.INTERNAL, "internal error"
        finally:
            metrics.REQUESTS.labels(method, code.name).inc()
            metrics.REQUEST_SECONDS.labels(method).observe(time.perf_counter() - started)
        log.info("%s -> %s: %s", method, code.name, details, extra={"request_id": request_id, "code": code.name})
        if context.done():   # the caller's deadline already ended the call: nothing left to send
            return None
        await context.abort(code, details, trailing_metadata=trailers)

    async def Recommend(self, request: ranking_pb2.RecommendRequest, context) -> ranking_pb2.RecommendResponse:
        async def handle(state: ServingState, deadline: float, request_id: str) -> ranking_pb2.RecommendResponse:
            state, arm = (self._pinned(request.version), ranking_pb2.ARM_PINNED) if request.version > 0 \
                else arms.route(self.app.holder, request.user_id, state)
            query = validation.recommend_query(request, state.spec, self.app.config)
            history_size = display.history_size(request.options)
            answer = await self.app.pipeline.recommend(state, query, deadline, request_id)
            if arm == ranking_pb2.ARM_CANARY and answer.ranking_version != state.version:
                arm = ranking_pb2.ARM_LIVE       # retrieval did not hold the candidate: the live version answered
            metrics.ARM_ANSWERS.labels(ranking_pb2.Arm.Name(arm)).inc()
            if arm == ranking_pb2.ARM_LIVE:
                self.app.shadow.maybe_start(request, answer, request_id)
            reply = ranking_pb2.RecommendResponse(items=_scored_items(answer), retrieval_version=answer.retrieval_version,
                                                  ranking_version=answer.ranking_version,
                                                  degraded=_count_degraded(answer), arm=arm)
            # titles from the version that answered (the previous one, while the two stages swap)
            answered = state if answer.ranking_version == state.version else self.app.holder.held(answer.ranking_version)
            if request.options.include_item_metadata and answered is not None:
                display.describe(answered, reply.items)
            if history_size and answered is not None:
                reply.history.extend(await display.history(self.app.features, answered, query.user_id, history_size))
            return reply

        return await self._serve("Recommend", context, handle)

    def _pinned(self, version: int) -> ServingState:
        """The held state of a pinned version, else FAILED_PRECONDITION naming the held versions."""
        state = self.app.holder.held(version)
        if state is None:
            raise VersionNotHeld(f"version {version} is not held by the ranking service; held versions: "
                                 f"{self.app.holder.held_versions}")
        return state

    async def Rank(self, request: ranking_pb2.RankRequest, context) -> ranking_pb2.RankResponse:
        async def handle(state: ServingState, deadline: float, request_id: str) -> ranking_pb2.RankResponse:
            query = validation.rank_query(request, state.spec, self.app.config)
            answer = await self.app.pipeline.rank(state, query)
            reply = ranking_pb2.RankResponse(items=_scored_items(answer), ranking_version=answer.ranking_version,
                                             degraded=_count_degraded(answer),
                                             unknown_item_ids=answer.unknown_item_ids.tolist())
            if request.include_item_metadata:
                display.describe(state, reply.items)
            return reply

        return await self._serve("Rank", context, handle)

    async def RecordInteractions(self, request: ranking_pb2.RecordInteractionsRequest,
                                 context) -> ranking_pb2.RecordInteractionsResponse:
        async def handle(state: ServingState, deadline: float, request_id: str):
            pairs = validation.interactions(request)
            timeout_s = min(deadline - asyncio.get_running_loop().time(), _RECORD_TIMEOUT_CAP_S)
            recorded = await self.app.pipeline.record(pairs, timeout_s)
            return ranking_pb2.RecordInteractionsResponse(recorded=recorded)

        return await self._serve("RecordInteractions", context, handle)


async def create_server(config: RankingConfig, *, candidates: CandidateSource | None = None,
                        holder: VersionHolder[ServingState] | None = None,
                        ) -> tuple[grpc.aio.Server, int, RankingApp]:
    """Builds, binds and starts the server, loads the first version, returns (server, port, app).

    Port 0 picks a free port. ``candidates`` replaces the gRPC retrieval client (the in-process
    benchmark); ``holder`` replaces the default version holder (tests reuse a loaded state).
    """
    app = RankingApp(config, candidates, holder)
    server = grpc.aio.server(options=runtime.message_size_options(config.max_message_bytes))
    runtime.add_servicer(server, RankingServicer(app), ranking_pb2.DESCRIPTOR.services_by_name["RankingService"],
                         on_malformed=lambda method: metrics.REQUESTS.labels(method, "INVALID_ARGUMENT").inc())
    health = runtime.add_health_and_reflection(server, [SERVICE_NAME])
    await runtime.set_serving(health, [SERVICE_NAME], False)   # readiness is earned by the first load
    port = runtime.bind(server, env.host_port(config.host, config.port), config.tls)
    await server.start()
    await app.start(health)
    return server, port, app
