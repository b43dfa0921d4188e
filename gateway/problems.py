"""Errors as RFC 9457 problem+json, and the ranking service's gRPC status codes as HTTP statuses.

| gRPC | HTTP |
|---|---|
| INVALID_ARGUMENT | 400, ``field`` named from the service's message |
| NOT_FOUND | 404 |
| RESOURCE_EXHAUSTED | 429 with ``Retry-After`` |
| UNAVAILABLE | 503 |
| DEADLINE_EXCEEDED | 504 |
| anything else | 502 (logged; the service's details are not forwarded) |

Requests the gateway refuses itself are 400 (a field out of range, a body that is not JSON), 404
(no such route), 405, 413 (a body over ``GATEWAY_MAX_BODY_BYTES``) and 415; each body names the
field and shows at most ``MAX_VALUE_CHARS`` characters of the bad value.
"""

from __future__ import annotations

import http
import re

import grpc
from fastapi.responses import JSONResponse

MEDIA_TYPE = "application/problem+json"
MAX_VALUE_CHARS = 64

STATUS_FOR_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
BAD_GATEWAY = 502
# The ranking service's messages start with the proto field; the HTTP names of the GET route differ.
_HTTP_FIELD = {"options.num_candidates": "num_candidates", "options.diversity": "diversity",
               "options.history_size": "history", "context.timestamp_s": "timestamp_s"}
_LEADING_FIELD = re.compile(r"[A-Za-z_][\w.\[\]]*")


def clip(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "..."


def problem(status: int, detail: str, request_id: str, field: str | None = None,
            headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"type": "about:blank", "title": http.HTTPStatus(status).phrase, "status": status,
            "detail": detail, "field": field, "request_id": request_id}
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def field_of(details: str) -> str | None:
    """The field a ranking INVALID_ARGUMENT message names first (``"k must be..."`` -> ``"k"``)."""
    match = _LEADING_FIELD.match(details)
    if match is None:
        return None
    name = match.group(0).rstrip(".")
    return _HTTP_FIELD.get(name, name)


def from_rpc_error(error: grpc.aio.AioRpcError, request_id: str, retry_after_s: int) -> JSONResponse:
    code, details = error.code(), error.details() or ""
    status = STATUS_FOR_CODE.get(code, BAD_GATEWAY)
    if status == BAD_GATEWAY:
        return problem(status, f"the ranking service failed ({code.name})", request_id)
    headers = {"Retry-After": str(retry_after_s)} if status == 429 else None
    field = field_of(details) if status == 400 else None
    return problem(status, f"ranking service: {details}" if details else f"ranking service: {code.name}",
                   request_id, field=field, headers=headers)


def from_validation_errors(errors: list[dict], request_id: str) -> JSONResponse:
    """FastAPI's request validation errors as one 400 naming the first bad field and its value."""
    first = errors[0]
    location = [str(part) for part in first.get("loc", ())]
    if location and location[0] in ("query", "path", "header", "body"):
        location = location[1:]
    field = ".".join(location) or "body"
    if first.get("type") == "json_invalid":
        return problem(400, "the body must be valid JSON: " + clip(first.get("ctx", {}).get("error", "")),
                       request_id, field="body")
    value = f", got {clip(first['input'])}" if "input" in first and first.get("type") != "missing" else ""
    return problem(400, f"{field}: {first.get('msg', 'invalid')}{value}", request_id, field=field)
