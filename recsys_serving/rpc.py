"""The RPC wrapper both services' servicers put around every call: deadline, admission, status, metrics.

``Rpc.serve(method, context, handle)`` runs ``await handle(call)`` and owns what happens around it:

- the deadline: the caller's, else the service's default deadline setting
  (``RETRIEVAL_DEFAULT_DEADLINE_MS`` / ``RANKING_DEFAULT_DEADLINE_MS``); a call with less than
  ``min_deadline_s`` left on arrival fails DEADLINE_EXCEEDED at once, before any work;
- admission: ``call.admitted()`` takes a slot of the service's ``recsys_serving.admission``
  (RESOURCE_EXHAUSTED at once with a ``grpc-retry-pushback-ms`` trailer, or DEADLINE_EXCEEDED
  unstarted) and bounds the work by the deadline; the handler decides what runs before it
  (validation that needs no slot) and inside it. A call marked background
  (``recsys_serving.runtime.PRIORITY_KEY``) waits for a quiet moment instead (``Admission.background``);
- the status: ``RpcError(code, details)`` is sent as is; the service's ``errors`` map its own
  exception types to codes (the exception's message is the details); a ``TimeoutError`` is
  DEADLINE_EXCEEDED; anything else is INTERNAL (logged with its traceback, "internal error" on the
  wire). A cancellation (or a failed write after the caller left) within ``DEADLINE_SLACK_S`` of the
  deadline counts as DEADLINE_EXCEEDED (gRPC's timer and our estimate of the same instant differ by
  scheduling noise, not by intent), else as CANCELLED;
- metrics and logs: ``count(method, code, seconds)`` once per call; a failed call is logged at INFO
  with its code and the request id (the caller's ``x-request-id``, else a fresh one), a successful
  one and a refusal (RESOURCE_EXHAUSTED: counted, but a line each would cost CPU under overload) at DEBUG.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import grpc

from recsys_serving.admission import Admission, Expired, Refused
from recsys_serving.runtime import is_background, request_id as request_id_of

T = TypeVar("T")
# A cancellation this close to the deadline is the deadline.
DEADLINE_SLACK_S = 0.02
# Logged at DEBUG only (the request metrics count them): successes, and refusals, which come by the
# thousand per second under overload, when a log line each is CPU spent on the requests being refused.
_COUNTED_NOT_LOGGED = (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)


class RpcError(Exception):
    """Ends the call with ``code`` and ``details`` (a message naming what was wrong)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


@dataclass
class Call:
    """One call being served: its deadline (``loop.time()`` seconds), request id and admission."""

    deadline: float
    request_id: str
    admission: Admission
    background: bool = False

    @contextlib.asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """Holds an admission slot (a background call: the background turn) and bounds the body by the deadline."""
        gate = self.admission.background if self.background else self.admission.slot
        async with gate(self.deadline):
            async with asyncio.timeout_at(self.deadline):
                yield

    async def pause_for_live(self) -> None:
        """A background call waits here, between steps, while live requests run; a live call goes on."""
        if self.background:
            await self.admission.pause_for_live(self.deadline)

    def left_s(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()


class Rpc:
    """The wrapper of one service (see the module docstring)."""

    def __init__(self, *, admission: Admission, default_deadline_s: float, log: logging.Logger,
                 count: Callable[[str, str, float], None],
                 errors: Mapping[type[BaseException], grpc.StatusCode] = {},
                 min_deadline_s: float = 0.0) -> None:
        self.admission, self.default_deadline_s, self.min_deadline_s = admission, default_deadline_s, min_deadline_s
        self.log, self.count, self.errors = log, count, dict(errors)

    def _status(self, error: Exception) -> tuple[grpc.StatusCode, str] | None:
        for kind, code in self.errors.items():
            if isinstance(error, kind):
                return code, str(error)
        return None

    async def serve(self, method: str, context: grpc.aio.ServicerContext,
                    handle: Callable[[Call], Awaitable[T]]) -> T | None:
        loop = asyncio.get_running_loop()
        started, code, details = time.perf_counter(), grpc.StatusCode.OK, ""
        trailers: tuple[tuple[str, str], ...] = ()
        rid = request_id_of(context) or uuid.uuid4().hex
        remaining = context.time_remaining()
        remaining = self.default_deadline_s if remaining is None else remaining
        deadline = loop.time() + remaining      # the loop's clock is time.monotonic, as admission's
        try:
            if remaining < self.min_deadline_s:
                raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"deadline must leave at least {self.min_deadline_s * 1000:.0f} ms, "
                               f"got {remaining * 1000:.1f} ms")
            return await handle(Call(deadline, rid, self.admission, is_background(context)))
        except RpcError as failure:
            code, details = failure.code, failure.details
        except Refused as refusal:
            code, details, trailers = grpc.StatusCode.RESOURCE_EXHAUSTED, str(refusal), refusal.trailing_metadata
        except Expired as expired:
            code, details = grpc.StatusCode.DEADLINE_EXCEEDED, str(expired)
        except asyncio.CancelledError:   # the caller went away, or gRPC's own deadline timer fired
            code = self._ended(loop, deadline)
            raise
        except Exception as error:
            mapped = self._status(error)
            if mapped is not None:
                code, details = mapped
            elif isinstance(error, TimeoutError):
                code, details = grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline of {remaining * 1000:.0f} ms exceeded"
            elif context.cancelled() or loop.time() >= deadline:
                # The caller went away (cancelled, or its deadline passed) while we were writing:
                # gRPC fails the write; that is the caller's decision, not a server error.
                code, details = self._ended(loop, deadline), "the caller ended the call before the answer was sent"
            else:
                self.log.exception("%s failed", method, extra={"request_id": rid})
                code, details = grpc.StatusCode.INTERNAL, "internal error"
        finally:
            self.count(method, code.name, time.perf_counter() - started)
            quiet = code in _COUNTED_NOT_LOGGED
            if code != grpc.StatusCode.INTERNAL and (not quiet or self.log.isEnabledFor(logging.DEBUG)):
                self.log.log(logging.DEBUG if quiet else logging.INFO, "%s -> %s: %s",
                             method, code.name, details, extra={"request_id": rid, "code": code.name})
        if context.cancelled() or context.done():   # the call already ended: nothing left to send
            return None
        # The status is set and the handler returns no message (gRPC sends none with a non-OK code).
        # Not ``context.abort``: it raises through gRPC's handler machinery, which under overload cost
        # ~15 % of the ranking process's event-loop time on refusals alone (py-spy, 3x capacity).
        context.set_code(code)
        context.set_details(details)
        if trailers:
            context.set_trailing_metadata(trailers)
        return None

    @staticmethod
    def _ended(loop: asyncio.AbstractEventLoop, deadline: float) -> grpc.StatusCode:
        expired = loop.time() >= deadline - DEADLINE_SLACK_S
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
