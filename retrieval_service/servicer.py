"""The ``recsys.v1.RetrievalService`` servicer: validate, call the generator, stream the reply.

Status codes: INVALID_ARGUMENT (a field out of range, named with its value), UNAVAILABLE (no
version loaded yet), RESOURCE_EXHAUSTED (refused at once by ``recsys_serving.admission``: it could
not finish within its deadline given the queue, or too many are in flight; with a
``grpc-retry-pushback-ms`` trailer), DEADLINE_EXCEEDED (no time left, the deadline passed while it
was queued, or the work outran the caller's deadline),
CANCELLED (the caller went away: the work stops at the next await), INTERNAL (a bug: logged with
its traceback here, a plain message on the wire).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from recsys_contracts.v1 import retrieval_pb2, retrieval_pb2_grpc
from recsys_serving.admission import Admission, Expired, Refused
from recsys_serving.reload import VersionHolder
from recsys_serving.runtime import request_id
from retrieval_service import metrics
from retrieval_service.generator import CandidateGenerator, Candidates, DeadlineExceeded
from retrieval_service.state import ServingState
from retrieval_service.validation import InvalidRequest, validate

log = logging.getLogger(__name__)

# Deadline used when the caller set none (seconds): no request may hold the server forever.
DEFAULT_DEADLINE_S = 30.0
# A cancellation this close to the deadline is the deadline: gRPC's timer and our estimate of the
# same instant (now + time_remaining() at the start) differ by scheduling noise, not by intent.
DEADLINE_SLACK_S = 0.02


class NotReady(Exception):
    """No version is loaded yet."""


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
                 max_candidates: int, chunk_size: int, admission: Admission) -> None:
        self.holder, self.generator, self.admission = holder, generator, admission
        self.max_candidates, self.chunk_size = max_candidates, chunk_size

    async def Retrieve(self, request: retrieval_pb2.RetrieveRequest, context: grpc.aio.ServicerContext):
        started = time.perf_counter()
        code, message = grpc.StatusCode.OK, ""
        trailers: tuple[tuple[str, str], ...] = ()
        remaining = context.time_remaining()
        deadline = time.monotonic() + (DEFAULT_DEADLINE_S if remaining is None else remaining)
        try:
            query = validate(request, self.max_candidates)
            # Read once: this stream stays on this version. The first asked version held (the
            # caller ranks with it), else the current one; model_version tells the caller which.
            state = choose_state(self.holder, query.versions)
            if state is None:
                raise NotReady("no model version loaded yet")
            async with self.admission.slot(deadline):
                async with asyncio.timeout(deadline - time.monotonic()):
                    result = await self.generator.generate(state, query, deadline)
                for response in chunks(result, self.chunk_size):
                    await context.write(response)
        except InvalidRequest as error:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(error)
        except Refused as refusal:
            code, message, trailers = grpc.StatusCode.RESOURCE_EXHAUSTED, str(refusal), refusal.trailing_metadata
        except Expired as error:
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, str(error)
        except NotReady as error:
            code, message = grpc.StatusCode.UNAVAILABLE, str(error)
        except (DeadlineExceeded, TimeoutError):
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the candidates were ready"
        except asyncio.CancelledError:
            # gRPC cancels the handler itself when the deadline passes (by its own timer, which can fire
            # a little before our estimate of the same instant); count that as what it is.
            expired = time.monotonic() >= deadline - DEADLINE_SLACK_S
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except Exception:
            if context.cancelled() or time.monotonic() >= deadline:
                # The caller went away (cancelled, or its deadline passed) while we were writing:
                # gRPC fails the write; that is the caller's decision, not a server error.
                expired = time.monotonic() >= deadline - DEADLINE_SLACK_S
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                message = "the caller ended the call before the candidates were sent"
            else:
                code, message = grpc.StatusCode.INTERNAL, "internal error"
                log.exception("Retrieve failed", extra={"request_id": request_id(context)})
        finally:
            metrics.REQUESTS.labels(code.name).inc()
            metrics.REQUEST_SECONDS.observe(time.perf_counter() - started)
            if code not in (grpc.StatusCode.OK, grpc.StatusCode.INTERNAL) or log.isEnabledFor(logging.DEBUG):
                log.log(logging.DEBUG if code == grpc.StatusCode.OK else logging.INFO, "Retrieve %s %s",
                        code.name, message, extra={"request_id": request_id(context), "code": code.name})
        if code != grpc.StatusCode.OK and not context.cancelled():
            await context.abort(code, message, trailing_metadata=trailers)
