"""The channel to the retrieval service and the candidate stream the Recommend pipeline consumes.

Candidates come from ``RetrieveAll``: the whole answer in one message (a one-message ``Retrieve``
stream cost about a third more of gRPC's CPU per call at both ends, and ranking scores each
retrieval chunk as one DCN pass anyway). A retrieval service that predates it answers UNIMPLEMENTED
(mid rolling upgrade): the client then streams ``Retrieve`` and asks again after ``UNARY_RETRY_S``.

The channel balances over every address the target resolves to (``round_robin``), retries a
call that fails with UNAVAILABLE (a restarting or dead replica) or RESOURCE_EXHAUSTED (a
refusal by retrieval's admission) before any response arrived: at most ``RETRY_MAX_ATTEMPTS``
attempts, 10..100 ms backoff or the server's ``grpc-retry-pushback-ms`` (-1: no retry), always
inside the call's deadline, under a retry budget so retries cannot amplify an overload
(``recsys_serving.admission.client_service_config``),
reconnects within ~1 s after retrieval comes back, and uses TLS / mTLS when configured. It opens
``RANKING_RETRIEVAL_CHANNELS`` connections and uses them in turn (``recsys_serving.channels``), so
retrieval's worker processes (``RETRIEVAL_WORKERS``), which the kernel gives connections, all get calls. gRPC Python
does not propagate deadlines: every call gets the caller's remaining time as its own timeout, and
the request id travels in the ``x-request-id`` metadata so both services' logs can be joined.

While retrieval refuses calls (RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED), the client-side
adaptive throttle (``RANKING_RETRIEVAL_THROTTLE_K``, default 2; ``recsys_serving.throttle``) sends at
most about K times what it accepts and fails the rest at once with ``THROTTLED``, before they cost
either side a call: retrieval's CPU then goes to the calls it can answer, and the pipeline answers the
throttled ones from popular items as it does a refusal (neither counts against the retrieval breaker).
The shadow worker's background calls are not throttled.

``CandidateSource`` is what the pipeline needs; ``RetrievalClient`` is the gRPC one, and the
benchmark plugs an in-process one in to measure the pipeline without the network hop. The client
keeps gRPC on this side: a failed call surfaces as ``RetrievalFailed`` (its status code's name),
or, when retrieval refused a field we passed through (INVALID_ARGUMENT: the caller's error, e.g. a
``num_candidates`` above ``RETRIEVAL_MAX_CANDIDATES``), as ``RetrievalRefused``, a ``ValueError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Protocol

import grpc

from ranking_service.config import RankingConfig
from recsys_contracts.v1 import retrieval_pb2, retrieval_pb2_grpc
from recsys_serving.admission import client_service_config
from recsys_serving import runtime
from recsys_serving.channels import ChannelPool
from recsys_serving.throttle import AdaptiveThrottle
from recsys_serving.runtime import BACKGROUND, PRIORITY_KEY, REQUEST_ID_KEY, message_size_options

RETRIEVAL_SERVICE = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name
THROTTLED = "THROTTLED"   # RetrievalFailed.code of a call the adaptive throttle did not send
RETRY_MAX_ATTEMPTS = 3
UNARY_RETRY_S = 60.0     # after an UNIMPLEMENTED RetrieveAll, stream Retrieve this long before asking again

log = logging.getLogger(__name__)

SERVICE_CONFIG = {"loadBalancingConfig": [{"round_robin": {}}],
                  **client_service_config(RETRIEVAL_SERVICE, max_attempts=RETRY_MAX_ATTEMPTS)}


class RetrievalFailed(Exception):
    """A Retrieve call failed; ``code`` is the gRPC status code's name (e.g. "UNAVAILABLE")."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


class RetrievalRefused(ValueError):
    """Retrieval refused the request as invalid: the caller's error (INVALID_ARGUMENT)."""


def _failure(error: grpc.aio.AioRpcError) -> Exception:
    """A failed call as the pipeline sees it: the caller's error (INVALID_ARGUMENT) or a failure."""
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return RetrievalRefused(f"retrieval refused the request: {error.details()}")
    return RetrievalFailed(error.code().name, error.details() or "")


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
        # True while retrieval answers RetrieveAll; False for UNARY_RETRY_S after it answered
        # UNIMPLEMENTED (a retrieval build from before it, e.g. mid rolling upgrade): Retrieve is streamed.
        self.unary = True
        self._unary_again_at = 0.0
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
        self.throttle = AdaptiveThrottle(config.retrieval_throttle_k) \
            if config.retrieval_throttle_k and not background else None

    async def stream(self, request: retrieval_pb2.RetrieveRequest, timeout_s: float,
                     request_id: str) -> AsyncIterator[retrieval_pb2.RetrieveResponse]:
        """The candidates (see ``_candidates``), under the adaptive throttle when it is on: raises
        ``RetrievalFailed(THROTTLED)`` for a call it rejects, and counts each sent call's outcome."""
        if self.throttle is None:
            async with contextlib.aclosing(self._candidates(request, timeout_s, request_id)) as candidates:
                async for response in candidates:
                    yield response
            return
        admitted, p = self.throttle.decide()
        if not admitted:
            raise RetrievalFailed(THROTTLED, "not sent: the adaptive throttle rejected it while retrieval "
                                             f"refuses (probability {p:.2f})")
        deadline = time.monotonic() + timeout_s
        outcome = grpc.StatusCode.CANCELLED       # the caller stopped early or went away: not a refusal
        try:
            async with contextlib.aclosing(self._candidates(request, timeout_s, request_id)) as candidates:
                async for response in candidates:
                    yield response
            outcome = grpc.StatusCode.OK
        except RetrievalFailed as error:
            outcome = getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNKNOWN)
            raise
        except RetrievalRefused:                  # retrieval answered: the request was bad
            outcome = grpc.StatusCode.INVALID_ARGUMENT
            raise
        except (asyncio.CancelledError, GeneratorExit):
            if time.monotonic() >= deadline:      # the caller's timeout at our deadline: retrieval was too slow
                outcome = grpc.StatusCode.DEADLINE_EXCEEDED
            raise
        finally:
            self.throttle.record(outcome)

    async def _candidates(self, request: retrieval_pb2.RetrieveRequest, timeout_s: float,
                          request_id: str) -> AsyncIterator[retrieval_pb2.RetrieveResponse]:
        """``RetrieveAll``'s one message, or the ``Retrieve`` stream's chunks from a retrieval service
        that predates ``RetrieveAll`` (see ``unary``)."""
        metadata = ((REQUEST_ID_KEY, request_id), *self.metadata)
        deadline = time.monotonic() + timeout_s
        if self.unary or time.monotonic() >= self._unary_again_at:
            try:
                response = await self.stub.RetrieveAll(request, timeout=timeout_s, metadata=metadata)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise _failure(error) from None
                if self.unary:
                    log.warning("retrieval does not serve RetrieveAll (an older build): streaming Retrieve "
                                "instead, asking again in %.0f s", UNARY_RETRY_S)
                self.unary, self._unary_again_at = False, time.monotonic() + UNARY_RETRY_S
            else:
                self.unary = True
                yield response
                return
        call = self.stub.Retrieve(request, timeout=max(deadline - time.monotonic(), 0.0), metadata=metadata)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as error:
            raise _failure(error) from None
        finally:
            call.cancel()   # no-op once finished; frees the stream when the consumer stops early

    async def close(self) -> None:
        await self.channel.close()
