"""The ranking service's composition: ``RankingApp`` and ``create_server``.

``RankingApp`` builds, once per process, what the servicer (``ranking_service.servicer``) needs:
version holder, feature store, refiller, DCN batcher, retrieval channel, pipeline, shadow sampling
(its worker process) and admission; ``create_server`` binds, starts, loads the first version, then reports SERVING
(one of N worker processes on a shared port loads first and binds after: ``runtime.first_version_before_bind``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

import grpc

from ranking_service import metrics
from ranking_service.batching import MicroBatcher
from ranking_service.config import RankingConfig
from ranking_service.features import FeatureStore
from ranking_service.pipeline import Pipeline
from ranking_service.refill import run_refiller
from ranking_service.retrieval_client import CandidateSource, RetrievalClient
from ranking_service.servicer import RankingServicer
from ranking_service.shadow import Shadow
from ranking_service.state import ServingState, load_state
from recsys_contracts.v1 import ranking_pb2
from recsys_serving import env, runtime
from recsys_serving.admission import Admission
from recsys_serving.breaker import CircuitBreaker
from recsys_serving.latency import AdaptiveTimeout
from recsys_serving.reload import VersionHolder

log = logging.getLogger(__name__)
SERVICE_NAME = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name


def default_holder(config: RankingConfig, *, on_swap: Callable[[ServingState, int], None],
                   on_refuse: Callable[[int, Exception], None]) -> VersionHolder[ServingState]:
    """Watches ``config.artifact_root`` (or the pinned version) and builds states with ``load_state``."""
    return VersionHolder(config.artifact_root, functools.partial(load_state, default_score_mode=config.score_mode),
                         trust=env.trust(config), pinned=config.pinned_version,
                         poll_interval_s=config.poll_interval_s, on_swap=on_swap, on_refuse=on_refuse)


class RankingApp:
    """Everything the servicer needs, built once per process; ``close()`` releases it."""

    def __init__(self, config: RankingConfig, candidates: CandidateSource | None = None,
                 holder: VersionHolder[ServingState] | None = None) -> None:
        self.config = config
        self.health = None
        if holder is None:
            holder = default_holder(config, on_swap=self._on_swap, on_refuse=self._on_refuse)
        else:
            holder.follow(self._on_swap, self._on_refuse)     # a preloaded holder (tests)
        self.holder = holder
        self.features = FeatureStore.from_config(config)
        self.batcher = MicroBatcher(config.microbatch_max_size, config.microbatch_max_wait_ms / 1000,
                                    thread_nice=config.compute_nice)
        self.candidates = candidates if candidates is not None else RetrievalClient(config)
        self.pipeline = Pipeline(features=self.features, batcher=self.batcher, candidates=self.candidates,
                                 fallback=config.fallback, breaker=CircuitBreaker(
                                     "ranking-retrieval", config.retrieval_breaker_failures,
                                     config.retrieval_breaker_cooldown_ms / 1000,
                                     state_gauge=metrics.RETRIEVAL_BREAKER_STATE,
                                     transitions=metrics.RETRIEVAL_BREAKER_TRANSITIONS),
                                 holder=self.holder,
                                 retrieval_timeout=AdaptiveTimeout(config.retrieval_timeout_multiplier,
                                                                   config.retrieval_timeout_floor_ms / 1000)
                                 if config.retrieval_timeout_multiplier else None)
        self.admission = Admission.for_service(config, metrics.ADMISSION)
        # The shadow runs in its own process at idle CPU priority (ranking_service.shadow_worker);
        # this process only samples and enqueues.
        self.shadow = Shadow(config, self.holder)
        self._tasks: set[asyncio.Task] = set()

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
        self.admission.start()
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
        await self.shadow.close()
        await self.batcher.close()
        await self.candidates.close()
        await self.features.close()
        await self.admission.close()


async def create_server(config: RankingConfig, *, candidates: CandidateSource | None = None,
                        holder: VersionHolder[ServingState] | None = None,
                        ) -> tuple[grpc.aio.Server, int, RankingApp]:
    """Builds, binds and starts the server, loads the first version, returns (server, port, app).

    Port 0 picks a free port. ``candidates`` replaces the gRPC retrieval client (the in-process
    benchmark); ``holder`` replaces the default version holder (tests reuse a loaded state).
    """
    app = RankingApp(config, candidates, holder)
    server = runtime.new_server(config)
    servicer = RankingServicer(config=config, holder=app.holder, pipeline=app.pipeline, features=app.features,
                               shadow=app.shadow, admission=app.admission)
    runtime.add_servicer(server, servicer, ranking_pb2.DESCRIPTOR.services_by_name["RankingService"],
                         on_malformed=lambda method: metrics.REQUESTS.labels(method, "INVALID_ARGUMENT").inc())
    health = runtime.add_health_and_reflection(server, [SERVICE_NAME])
    await runtime.set_serving(health, [SERVICE_NAME], False)   # readiness is earned by the first load
    shared_port = config.workers > 1     # one of N on a shared port: listen only once it holds a version
    if shared_port:
        try:
            await app.start(health)
            await runtime.first_version_before_bind(lambda: app.holder.ready)
        except BaseException:
            await app.close()
            raise
    port = runtime.bind(server, env.host_port(config.host, config.port), config.tls)
    await server.start()
    if not shared_port:
        await app.start(health)
    return server, port, app
