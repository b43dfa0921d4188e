"""The channel to the retrieval service and the candidate stream the Recommend pipeline consumes.

The channel balances over every address the target resolves to (``round_robin``), retries a
``Retrieve`` that fails with UNAVAILABLE (a restarting or dead replica) or RESOURCE_EXHAUSTED (a
refusal by retrieval's admission) before any response arrived: at most ``RETRY_MAX_ATTEMPTS``
attempts, 10..100 ms backoff or the server's ``grpc-retry-pushback-ms`` (-1: no retry), always
inside the call's deadline, under a retry budget so retries cannot amplify an overload
(``recsys_serving.admission.client_service_config``),
reconnects within ~1 s after retrieval comes back, and uses TLS / mTLS when configured. It opens
``RANKING_RETRIEVAL_CHANNELS`` connections and uses them in turn (``recsys_serving.channels``), so
retrieval's worker processes (``RETRIEVAL_WORKERS``), which the kernel gives connections, all get calls. gRPC Python
does not propagate deadlines: every call gets the caller's remaining time as its own timeout, and
the request id travels in the ``x-request-id`` metadata so both services' logs can be joined.

``CandidateSource`` is what the pipeline needs; ``RetrievalClient`` is the gRPC one, and the
benchmark plugs an in-process one in to measure the pipeline without the network hop. The client
keeps gRPC on this side: a failed call surfaces as ``RetrievalFailed`` (its status code's name),
or, when retrieval refused a field we passed through (INVALID_ARGUMENT: the caller's error, e.g. a
``num_candidates`` above ``RETRIEVAL_MAX_CANDIDATES``), as ``RetrievalRefused``, a ``ValueError``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Protocol

import grpc

from ranking_service.config import RankingConfig
from recsys_contracts.v1 import retrieval_pb2, retrieval_pb2_grpc
from recsys_serving.admission import client_service_config
from recsys_serving import runtime
from recsys_serving.channels import ChannelPool
from recsys_serving.runtime import BACKGROUND, PRIORITY_KEY, REQUEST_ID_KEY, message_size_options

RETRIEVAL_SERVICE = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name
RETRY_MAX_ATTEMPTS = 3

SERVICE_CONFIG = {"loadBalancingConfig": [{"round_robin": {}}],
                  **client_service_config(RETRIEVAL_SERVICE, max_attempts=RETRY_MAX_ATTEMPTS)}


class RetrievalFailed(Exception):
    """A Retrieve call failed; ``code`` is the gRPC status code's name (e.g. "UNAVAILABLE")."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


class RetrievalRefused(ValueError):
    """Retrieval refused the request as invalid: the caller's error (INVALID_ARGUMENT)."""


class CandidateSource(Protocol):
    def stream(self, request: retrieval_pb2.RetrieveRequest, timeout_s: float,
               request_id: str) -> AsyncIterator[retrieval_pb2.RetrieveResponse]: ...

    async def close(self) -> None: ...


def channel_options(max_message_bytes: int) -> list[tuple[str, object]]:
    return [*message_size_options(max_message_bytes), ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
            ("grpc.enable_retries", 1),
            # gRPC's default reconnect backoff grows to minutes; a restarted retrieval should be used within
            # ~1 s. (min_reconnect_backoff_ms stays at its default: it is also the connect timeout.)
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]


class RetrievalClient:
    """``stream(request, timeout_s, request_id)``: the Retrieve response chunks, as they arrive."""

    def __init__(self, config: RankingConfig, *, background: bool = False) -> None:
        """``background``: every call is marked background work (the shadow worker's): retrieval runs it
        only in moments without live requests (``recsys_serving.admission.Admission.background``)."""
        self.metadata: tuple[tuple[str, str], ...] = ((PRIORITY_KEY, BACKGROUND),) if background else ()
        if config.retrieval_tls is None:
            def make(options):
                return grpc.aio.insecure_channel(config.retrieval_target, options=options)
        else:
            credentials = runtime.channel_credentials(config.retrieval_tls)

            def make(options):
                return grpc.aio.secure_channel(config.retrieval_target, credentials, options=options)
        # RANKING_RETRIEVAL_CHANNELS connections, used in turn: retrieval's worker processes
        # (RETRIEVAL_WORKERS) share connections, not calls (recsys_serving.channels).
        self.channel = ChannelPool(make, channel_options(config.max_message_bytes), config.retrieval_channels)
        self.stub = retrieval_pb2_grpc.RetrievalServiceStub(self.channel)

    async def stream(self, request: retrieval_pb2.RetrieveRequest, timeout_s: float,
                     request_id: str) -> AsyncIterator[retrieval_pb2.RetrieveResponse]:
        call = self.stub.Retrieve(request, timeout=timeout_s, metadata=((REQUEST_ID_KEY, request_id), *self.metadata))
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise RetrievalRefused(f"retrieval refused the request: {error.details()}") from None
            raise RetrievalFailed(error.code().name, error.details() or "") from None
        finally:
            call.cancel()   # no-op once finished; frees the stream when the consumer stops early

    async def close(self) -> None:
        await self.channel.close()
