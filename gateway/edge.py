"""The ASGI layer in front of every route: request ids, the body size limit, metrics and access logs.

- ``X-Request-Id``: taken from the request when it is 1..128 characters of ``[A-Za-z0-9._:-]`` (else
  400), a new uuid4 hex otherwise; echoed on every response, sent to ranking as the gRPC
  ``x-request-id`` metadata and written on the gateway's log line, so one id joins all three logs.
- Bodies over ``max_body_bytes`` are refused 413 before anything parses them (Content-Length is
  checked first; a chunked body is counted as it arrives, so it is never held in full).
- ``gateway_requests`` / ``gateway_request_seconds`` by route template and status.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from prometheus_client import Counter, Histogram
from starlette.exceptions import HTTPException

from gateway.problems import problem

log = logging.getLogger("gateway.access")
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)

REQUESTS = Counter("gateway_requests", "HTTP requests answered, by route template and status", ["route", "status"])
REQUEST_SECONDS = Histogram("gateway_request_seconds", "HTTP request latency by route template", ["route"],
                            buckets=_BUCKETS_S)


class BodyTooLarge(HTTPException):
    """Raised while a route reads a body that grows past the limit; an HTTPException, so FastAPI's body
    parsing lets it through and the app's handler answers 413 problem+json."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the body must be at most {limit} bytes")


class Edge:
    def __init__(self, app, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get(REQUEST_ID_HEADER)
        request_id = given if given is not None and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = [500]

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if given is not None and request_id != given:
                await problem(400, f"X-Request-Id must be 1..128 characters of letters, digits, '.', '_', ':', "
                                   f"'-', got {given[:64]!r}", request_id, field="X-Request-Id")(scope, receive,
                                                                                                 send_with_id)
                return
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                await problem(413, f"the body must be at most {self.max_body_bytes} bytes", request_id,
                              field="body")(scope, receive, send_with_id)
                return
            await self.app(scope, self._limited(receive), send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            elapsed = time.perf_counter() - started
            REQUESTS.labels(template, str(status[0])).inc()
            REQUEST_SECONDS.labels(template).observe(elapsed)
            log.info("%s %s -> %d in %.1f ms", scope["method"], template, status[0], elapsed * 1000,
                     extra={"request_id": request_id, "code": status[0]})

    def _limited(self, receive):
        seen = [0]

        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        return counted
