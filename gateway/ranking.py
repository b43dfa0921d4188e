"""The gateway's one gRPC channel to the ranking service, and the calls made on it.

One channel per process (created in the running event loop, closed at shutdown): it balances over
every address the target resolves to (``round_robin``), retries Recommend and Rank (idempotent) when
they fail UNAVAILABLE before an answer, reconnects within ~1 s after ranking comes back, and uses TLS
or mTLS when ``GATEWAY_RANKING_TLS_*`` is set. Every call carries the HTTP request's deadline as its
gRPC timeout and its request id in the ``x-request-id`` metadata the services log.

Recommend and Rank pass through the client-side adaptive throttle (``GATEWAY_THROTTLE_K``,
``recsys_serving.throttle``): while ranking refuses (overload, not ready, down), the gateway answers
most of those calls itself in microseconds, 429 while ranking is overloaded and 503 while it is down,
instead of adding them to ranking's queue of refusals. RecordInteractions (cheap writes a caller should not lose) is not
throttled.
"""

from __future__ import annotations

import asyncio
import json

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import GatewayConfig
from recsys_contracts.v1 import ranking_pb2, ranking_pb2_grpc
from recsys_serving import runtime
from recsys_serving.runtime import REQUEST_ID_KEY
from recsys_serving.throttle import AdaptiveThrottle

RANKING_SERVICE = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": RANKING_SERVICE, "method": "Recommend"}, {"service": RANKING_SERVICE, "method": "Rank"}],
        "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.1s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
}
_OPTIONS = [("grpc.service_config", json.dumps(SERVICE_CONFIG)), ("grpc.enable_retries", 1),
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]


class RankingClient:
    """The ranking service's three RPCs and its health, over one channel; raises ``grpc.aio.AioRpcError``."""

    def __init__(self, config: GatewayConfig) -> None:
        if config.ranking_tls is None:
            self.channel = grpc.aio.insecure_channel(config.ranking_target, options=_OPTIONS)
        else:
            self.channel = grpc.aio.secure_channel(config.ranking_target, runtime.channel_credentials(config.ranking_tls),
                                                   options=_OPTIONS)
        self.stub = ranking_pb2_grpc.RankingServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.throttle = AdaptiveThrottle(config.throttle_k) if config.throttle_k else None

    async def _throttled(self, method, request, timeout_s: float, request_id: str):
        """``method(request)`` under the adaptive throttle; raises ``Throttled`` (an ``AioRpcError``) when it
        rejects the call before it leaves."""
        if self.throttle is None:
            return await method(request, timeout=timeout_s, metadata=((REQUEST_ID_KEY, request_id),))
        self.throttle.check()
        try:
            reply = await method(request, timeout=timeout_s, metadata=((REQUEST_ID_KEY, request_id),))
        except grpc.aio.AioRpcError as error:
            self.throttle.record(error.code())
            raise
        except asyncio.CancelledError:          # the HTTP caller left: not a refusal, so not counted as one
            self.throttle.record(grpc.StatusCode.CANCELLED)
            raise
        self.throttle.record(grpc.StatusCode.OK)
        return reply

    async def recommend(self, request: ranking_pb2.RecommendRequest, timeout_s: float,
                        request_id: str) -> ranking_pb2.RecommendResponse:
        return await self._throttled(self.stub.Recommend, request, timeout_s, request_id)

    async def rank(self, request: ranking_pb2.RankRequest, timeout_s: float, request_id: str) -> ranking_pb2.RankResponse:
        return await self._throttled(self.stub.Rank, request, timeout_s, request_id)

    async def record(self, request: ranking_pb2.RecordInteractionsRequest, timeout_s: float,
                     request_id: str) -> ranking_pb2.RecordInteractionsResponse:
        return await self.stub.RecordInteractions(request, timeout=timeout_s, metadata=((REQUEST_ID_KEY, request_id),))

    async def serving(self, timeout_s: float) -> bool:
        """True when the ranking service reports SERVING (a version loaded and warm)."""
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(service=RANKING_SERVICE), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self.channel.close()
