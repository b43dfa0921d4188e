"""The ``recsys.v1.RetrievalService`` servicer: validate, call the generator, answer.

``Retrieve`` streams the candidates in chunks of ``RETRIEVAL_CHUNK_SIZE``; ``RetrieveAll`` (what the
ranking service calls) answers the same candidates in one message. Both share admission, checks and
errors.

The call goes through ``recsys_serving.rpc`` (deadline: the caller's, else
``RETRIEVAL_DEFAULT_DEADLINE_MS``; admission; status mapping; metrics; request id). Status codes:
INVALID_ARGUMENT (a field out of range, named with its value), UNAVAILABLE (no version loaded yet),
RESOURCE_EXHAUSTED (refused at once by ``recsys_serving.admission``: it could not finish within its
deadline given the queue, or too many are in flight; with a ``grpc-retry-pushback-ms`` trailer; the
decision comes before validation, so under overload a bad request is refused, not examined; past
``recsys_serving.runtime.rpc_limit`` active calls gRPC itself refuses, before this servicer runs),
DEADLINE_EXCEEDED (no time left, the deadline passed while it was queued, or the work outran the
caller's deadline), CANCELLED (the caller went away: the work stops at the next await), INTERNAL
(a bug: logged with its traceback, a plain message on the wire).
"""

from __future__ import annotations

import logging

import grpc

from recsys_contracts.v1 import retrieval_pb2, retrieval_pb2_grpc
from recsys_serving.admission import Admission
from recsys_serving.reload import VersionHolder
from recsys_serving.rpc import Call, Rpc, RpcError
from retrieval_service import metrics
from retrieval_service.generator import CandidateGenerator, Candidates, DeadlineExceeded
from retrieval_service.state import ServingState
from retrieval_service.validation import InvalidRequest, validate

log = logging.getLogger(__name__)
ERRORS = {InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT, DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED}


def choose_state(holder: VersionHolder[ServingState], versions: tuple[int, ...]) -> ServingState | None:
    """The first of ``versions`` the holder holds (noted as used, so it stays loaded while the caller
    ranks with it), else the current state (None before the first load)."""
    for version in versions:
        state = holder.held(version)
        if state is not None:
            holder.used(version)
            return state
    return holder.current


def chunks(result: Candidates, chunk_size: int) -> list[retrieval_pb2.RetrieveResponse]:
    """The stream's messages: ``chunk_size`` candidates each, every one with the version and the flags.

    An empty answer (everything excluded) is one message without candidates: it still carries the version.
    """
    messages = []
    for start in range(0, max(len(result.item_ids), 1), chunk_size):
        part = slice(start, start + chunk_size)
        messages.append(retrieval_pb2.RetrieveResponse(
            item_ids=result.item_ids[part].tolist(), scores=result.scores[part].tolist(),
            model_version=result.version, degraded=result.degraded))
    return messages


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    def __init__(self, holder: VersionHolder[ServingState], generator: CandidateGenerator,
                 max_candidates: int, chunk_size: int, admission: Admission, default_deadline_s: float) -> None:
        self.holder, self.generator = holder, generator
        self.max_candidates, self.chunk_size = max_candidates, chunk_size
        self.rpc = Rpc(admission=admission, default_deadline_s=default_deadline_s, log=log,
                       count=metrics.count_request, errors=ERRORS)

    async def _candidates(self, request: retrieval_pb2.RetrieveRequest, call: Call) -> Candidates:
        """Validated, on one version, generated: what both methods answer with."""
        query = validate(request, self.max_candidates)
        # Read once: this call stays on this version. The first asked version held (the caller
        # ranks with it), else the current one; model_version tells the caller which.
        state = choose_state(self.holder, query.versions)
        if state is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "no model version loaded yet")
        # generate() takes a time.monotonic() instant: the loop's clock
        return await self.generator.generate(state, query, call.deadline,
                                             call.pause_for_live if call.background else None)

    async def Retrieve(self, request: retrieval_pb2.RetrieveRequest, context: grpc.aio.ServicerContext):
        async def handle(call: Call) -> None:
            # Admission first: under overload a refusal costs no parsing or validation.
            async with call.admitted():
                result = await self._candidates(request, call)
                for response in chunks(result, self.chunk_size):
                    await call.pause_for_live()         # background work steps aside for live requests
                    await context.write(response)

        await self.rpc.serve("Retrieve", context, handle)

    async def RetrieveAll(self, request: retrieval_pb2.RetrieveRequest,
                          context: grpc.aio.ServicerContext) -> retrieval_pb2.RetrieveResponse | None:
        async def handle(call: Call) -> retrieval_pb2.RetrieveResponse:
            async with call.admitted():
                result = await self._candidates(request, call)
                await call.pause_for_live()
            return chunks(result, max(len(result.item_ids), 1))[0]

        return await self.rpc.serve("RetrieveAll", context, handle)
