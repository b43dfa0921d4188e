"""Builds the retrieval gRPC server: servicer, health, reflection, hot reload, feature store, batcher.

``create_server(config)`` binds ``config.host:config.port`` (port 0 = a free port, for tests; the
host defaults to loopback, and the images, compose and Kubernetes set 0.0.0.0 to be reachable on the
pod's address), starts serving with health NOT_SERVING, and starts watching the artifact volume; health turns
SERVING once the first version is loaded and warm. One of N worker processes on a shared port
(``RETRIEVAL_WORKERS``) loads its first version before it binds instead
(``runtime.first_version_before_bind``). ``App.close`` is the graceful stop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health as grpc_health

from recsys_contracts import feature_store
from recsys_contracts.v1 import retrieval_pb2
from recsys_serving import env, features, runtime
from recsys_serving.admission import Admission
from recsys_serving.reload import VersionHolder
from retrieval_service import metrics
from retrieval_service.backends import open_backend, resolve_device
from retrieval_service.batching import MicroBatcher
from retrieval_service.config import RetrievalConfig
from retrieval_service.features import FeatureStore, redis_breaker
from retrieval_service.generator import CandidateGenerator
from retrieval_service.servicer import RetrievalServicer
from retrieval_service.state import ServingState, load_state

SERVICE_NAME = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name
log = logging.getLogger(__name__)


@dataclass
class App:
    """What ``create_server`` assembled, for ``main`` and tests. Builds its version holder with its
    callbacks (metrics, SERVING after a swap), or adopts a preloaded one (tests) with them."""

    config: RetrievalConfig
    server: grpc.aio.Server
    generator: CandidateGenerator
    health: grpc_health.aio.HealthServicer
    admission: Admission
    holder: VersionHolder[ServingState] | None = None
    _tasks: set[asyncio.Task] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if self.holder is None:
            self.holder = default_holder(self.config, on_swap=self._swapped, on_refuse=self._refused)
        else:
            self.holder.follow(self._swapped, self._refused)

    def _swapped(self, state: ServingState, version: int) -> None:
        metrics.VERSION.set(version)
        metrics.RELOADS.inc()
        log.info("serving version %d (backend %s, device %s, index %s, build-time recall@100 %s)", version,
                 state.backend, state.device, state.index_params.kind, state.build_recall, extra={"version": version})
        task = asyncio.get_running_loop().create_task(self.set_serving(True))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refused(self, version: int, error: Exception) -> None:
        metrics.REFUSALS.inc()

    async def set_serving(self, serving: bool) -> None:
        await runtime.set_serving(self.health, [SERVICE_NAME], serving)

    async def close(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, drain in-flight calls for ``grace_s`` (default: config), then release everything."""
        await self.set_serving(False)
        await self.holder.stop()
        await self.server.stop(self.config.grace_s if grace_s is None else grace_s)
        await self.generator.batcher.close()
        await self.generator.features.close()
        await self.admission.close()


def _feature_store(config: RetrievalConfig) -> FeatureStore:
    timeout_s = config.redis_timeout_ms / 1000
    client = features.redis_client(config.redis_url, timeout_s)
    breaker = redis_breaker(config.redis_breaker_failures, config.redis_breaker_cooldown_ms / 1000)
    return FeatureStore(client, feature_store.KeyFormat(config.redis_namespace), timeout_s, breaker)


def default_holder(config: RetrievalConfig, *, on_swap: Callable[[ServingState, int], None],
                   on_refuse: Callable[[int, Exception], None]) -> VersionHolder[ServingState]:
    """Watches ``config.artifact_root`` (or the pinned version) and loads states for the configured device."""
    device = resolve_device(config.device)
    load = functools.partial(load_state, device=device, open_backend=open_backend)
    return VersionHolder(config.artifact_root, load, trust=env.trust(config), pinned=config.pinned_version,
                         poll_interval_s=config.poll_interval_s, on_swap=on_swap, on_refuse=on_refuse)


async def create_server(config: RetrievalConfig, *, holder: VersionHolder[ServingState] | None = None,
                        batching: bool = True) -> tuple[grpc.aio.Server, int, App]:
    """Builds and starts the server; returns (server, bound port, app). ``batching`` False = no micro-batching."""
    batcher = MicroBatcher(config.microbatch_max_size, config.microbatch_max_wait_ms / 1000, enabled=batching,
                           thread_nice=config.compute_nice)
    generator = CandidateGenerator(_feature_store(config), batcher)
    server = runtime.new_server(config)
    health_servicer = runtime.add_health_and_reflection(server, [SERVICE_NAME])
    admission = Admission.for_service(config, metrics.ADMISSION)
    app = App(config, server, generator, health_servicer, admission, holder)
    holder = app.holder
    servicer = RetrievalServicer(holder, generator, config.max_candidates, config.chunk_size, admission,
                                 config.default_deadline_ms / 1000)
    runtime.add_servicer(server, servicer, retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"],
                         on_malformed=lambda method: metrics.REQUESTS.labels("INVALID_ARGUMENT").inc())
    await app.set_serving(False)
    shared_port = config.workers > 1     # one of N on a shared port: listen only once it holds a version
    if shared_port:
        admission.start()
        holder.start()
        try:
            await runtime.first_version_before_bind(lambda: holder.ready)
        except BaseException:
            await app.close(0)
            raise
    port = runtime.bind(server, env.host_port(config.host, config.port), config.tls)
    await server.start()
    if shared_port:
        return server, port, app     # serving already: the first load's swap reported SERVING
    admission.start()
    if holder.ready:
        metrics.VERSION.set(holder.version or 0)
        await app.set_serving(True)
    holder.start()
    return server, port, app
