"""The gRPC server kit both services use: logging, metrics, health, reflection, TLS, shutdown."""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Histogram, start_http_server

from recsys_serving.aio import within

REQUEST_ID_KEY = "x-request-id"   # gRPC metadata key carrying the request id across services
# gRPC metadata marking a call as background work (the shadow's): it runs only in quiet moments
# (``recsys_serving.admission.Admission.background``).
PRIORITY_KEY, BACKGROUND = "x-recsys-priority", "background"

MALFORMED_REQUESTS = Counter("recsys_malformed_requests", "Requests whose bytes did not decode as the method's "
                             "message (corrupt wire data, non-UTF-8 strings), answered INVALID_ARGUMENT",
                             ["method"])
# A flood of malformed requests logs at most one WARNING per this many seconds (the counter counts all).
MALFORMED_LOG_INTERVAL_S = 10.0
log = logging.getLogger(__name__)

GC_PAUSE_SECONDS = Histogram("recsys_gc_pause_seconds", "Cyclic garbage collector pauses", ["generation"],
                             buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id when set, and the worker's
    index when the process is one of N workers behind one port (``recsys_serving.workers``)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) +
                 f".{int(record.msecs):03d}Z", "level": record.levelname, "logger": record.name,
                 "msg": record.getMessage()}
        if self.worker is not None:
            entry["worker"] = self.worker
        for key in ("request_id", "version", "code"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, worker: int | None = None) -> None:
    """JSON lines on stderr at ``level``; ``worker``: this process's index among N workers (logged)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(worker))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def tame_garbage_collector() -> None:
    """Keeps the cyclic garbage collector's pauses out of the latency tail; call it once, after the
    imports and BEFORE any model version is loaded.

    numpy, pandas, pyarrow, onnx and gRPC leave hundreds of thousands of long-lived objects behind
    after their imports (with torch, before serving moved to onnxruntime, ~350k); a full collection walks all of
    them, ~90 ms on the 2-core development machine, a pause that every request in flight pays, and
    under load such collections come every few seconds. ``gc.freeze`` moves every object alive now to
    a permanent generation the collector never scans (a full pass then takes ~7 ms). Versions are
    loaded later, so their objects stay collectable when a reload drops them. Pauses are observed in
    ``recsys_gc_pause_seconds``.
    """
    gc.collect()
    gc.freeze()
    if _observe_gc not in gc.callbacks:
        gc.callbacks.append(_observe_gc)
    if os.environ.get(MULTIPROC_ENV) and _deferred_pauses is None:
        _defer_gc_pauses()


def set_gil_switch_interval(milliseconds: float) -> None:
    """How long a thread may hold the GIL before the interpreter hands it to another that waits
    (``sys.setswitchinterval``; ``<PREFIX>GIL_SWITCH_MS``). The event loop needs the GIL for every
    callback; while the model's thread runs Python between its native calls, the loop (and so
    admission and every refusal) waits up to this long. Call it once at start; a version load
    shortens it further for its duration (``recsys_serving.reload``) and then restores this value."""
    sys.setswitchinterval(milliseconds / 1000)
    log.info("GIL switch interval %g ms", milliseconds)


_gc_started = [0.0]
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
GC_FLUSH_INTERVAL_S = 1.0
# Pauses waiting for the flusher thread, behind N worker processes (None: observed at once).
_deferred_pauses: collections.deque | None = None


def _observe_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
        return
    pause = (str(info["generation"]), time.perf_counter() - _gc_started[0])
    if _deferred_pauses is not None:
        _deferred_pauses.append(pause)
    else:
        GC_PAUSE_SECONDS.labels(pause[0]).observe(pause[1])


def _defer_gc_pauses() -> None:
    """In prometheus_client's multiprocess mode (N workers, ``recsys_serving.workers``) every metric
    of a process shares ONE non-reentrant lock, and a collection can start inside any metric update
    (the update allocates): observing the pause from the collector's callback would then wait on the
    lock its own thread holds, forever. So the callback only queues the pause and a thread observes
    the queue once a second."""
    global _deferred_pauses
    _deferred_pauses = pending = collections.deque(maxlen=10_000)

    def flush() -> None:
        while True:
            time.sleep(GC_FLUSH_INTERVAL_S)
            while pending:
                generation, seconds = pending.popleft()
                GC_PAUSE_SECONDS.labels(generation).observe(seconds)

    threading.Thread(target=flush, name="gc-pause-metrics", daemon=True).start()


def run_main(name: str, from_env: Callable[[], Any], serve: Callable[[Any], Awaitable[None]]) -> int:
    """A service's ``python -m`` entry: config from the environment (exit 2 naming the variable when
    it is invalid), JSON logs, the metrics endpoint, then ``serve(config)`` until it returns (0).

    With ``config.workers`` > 1 this process supervises that many worker processes instead, each
    running ``<name>.__main__.serve`` on the same port (``recsys_serving.workers``; ``serve`` must be
    that module's function, so a worker can import it)."""
    try:
        config = from_env()
    except ValueError as error:
        print(f"{name}: invalid configuration: {error}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    if config.workers > 1:
        from recsys_serving.workers import Supervisor

        return Supervisor(name, config).run()
    start_metrics(config.metrics_host, config.metrics_port)
    asyncio.run(serve(config))
    return 0


def start_metrics(host: str, port: int) -> None:
    """Serves Prometheus metrics over HTTP on ``host:port``; port 0 disables the endpoint."""
    if port:
        start_http_server(port, addr=host)


def request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            return str(value)[:128]
    return ""


def is_background(context: grpc.aio.ServicerContext) -> bool:
    """Whether the caller marked the call as background work (``PRIORITY_KEY`` = ``BACKGROUND``)."""
    return any(key == PRIORITY_KEY and value == BACKGROUND for key, value in context.invocation_metadata() or ())


class Malformed:
    """What the lenient deserializer gives for bytes that do not decode (never raises, so gRPC does
    not answer UNKNOWN with a traceback per request)."""

    __slots__ = ("size", "error")

    def __init__(self, size: int, error: str) -> None:
        self.size, self.error = size, error


class _MalformedLog:
    def __init__(self) -> None:
        self.last, self.suppressed = -MALFORMED_LOG_INTERVAL_S, 0

    def warn(self, method: str, request: Malformed) -> None:
        now = time.monotonic()
        if now - self.last < MALFORMED_LOG_INTERVAL_S:
            self.suppressed += 1
            return
        log.warning("malformed %s request (%d bytes): %s; %d more since the last such line",
                    method, request.size, request.error, self.suppressed, extra={"code": "INVALID_ARGUMENT"})
        self.last, self.suppressed = now, 0


_malformed_log = _MalformedLog()


def _lenient(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except (DecodeError, ValueError) as error:
            return Malformed(len(data), f"{type(error).__name__}: {str(error)[:120]}")
    return parse


def add_servicer(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor,
                 on_malformed: Callable[[str], None] | None = None) -> None:
    """Registers ``servicer``'s methods for ``service`` (what the generated ``add_*_to_server`` does)
    with request bytes that fail to decode answered INVALID_ARGUMENT, counted in
    ``recsys_malformed_requests{method}`` (and by ``on_malformed(method)``), logged at WARNING at most
    once per MALFORMED_LOG_INTERVAL_S."""
    handlers = {}
    for method in service.methods:
        behavior = getattr(servicer, method.name)
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        factory = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = factory(_refusing_malformed(method.name, behavior, on_malformed),
                                        request_deserializer=_lenient(request_class),
                                        response_serializer=response_class.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _refusing_malformed(name: str, behavior, on_malformed):
    async def handle(request, context):
        if isinstance(request, Malformed):
            MALFORMED_REQUESTS.labels(name).inc()
            if on_malformed is not None:
                on_malformed(name)
            _malformed_log.warn(name, request)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request bytes do not decode as the {name} request message ({request.error[:80]})")
        return await behavior(request, context)
    return handle


def add_health_and_reflection(server: grpc.aio.Server, service_names: list[str]) -> health.aio.HealthServicer:
    """Registers grpc.health.v1 (starting NOT_SERVING) and server reflection; returns the health servicer."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection(service_names + [reflection.SERVICE_NAME, health.SERVICE_NAME], server)
    return servicer


async def set_serving(servicer: health.aio.HealthServicer, service_names: list[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await servicer.set(name, status)


def server_credentials(tls) -> grpc.ServerCredentials | None:
    """TLS (and mTLS when a client CA is configured) credentials, or None for plaintext."""
    if tls is None:
        return None
    key, cert = Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes()
    client_ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def channel_credentials(tls) -> grpc.ChannelCredentials:
    """Client credentials for an ``env.ClientTls``: the peer's CA, plus our certificate for mTLS."""
    return grpc.ssl_channel_credentials(
        root_certificates=Path(tls.ca_file).read_bytes(),
        private_key=Path(tls.key_file).read_bytes() if tls.key_file else None,
        certificate_chain=Path(tls.cert_file).read_bytes() if tls.cert_file else None)


def bind(server: grpc.aio.Server, address: str, tls) -> int:
    credentials = server_credentials(tls)
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def message_size_options(max_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]


# RPCs besides the admitted ones a server may have running at once: health checks (probes,
# clients' health watches) and reflection, which admission never counts.
UNADMITTED_HEADROOM = 16


def rpc_limit(max_in_flight: int) -> int:
    """The server's ``maximum_concurrent_rpcs``: admission's ``max_in_flight`` plus the headroom.

    gRPC (``grpc.aio.server(maximum_concurrent_rpcs=...)``) refuses a call beyond this many active
    ones with RESOURCE_EXHAUSTED ("Concurrent RPC limit exceeded!") as soon as its server task takes
    the call from the core: before the request message is read and before any servicer code, so a
    server far behind sheds calls at the least cost it can. That still happens on the event loop
    (grpc.aio has no earlier hook), so it is no faster than the loop; what it saves is the work of
    reading, admitting and answering each call. Sized so that it trips only about where admission
    would refuse "full" anyway: of the calls gRPC counts, at most ``max_in_flight`` hold admission,
    health checks and reflection take at most the headroom, and the rest are calls not yet handled
    (which admission would take only while it has room) or refusals still being sent. These
    refusals carry no pushback trailer and are not in the services' metrics (the clients' retry
    budget still caps their retries: tests/test_retry_policy.py).
    """
    return max_in_flight + UNADMITTED_HEADROOM


def new_server(config) -> grpc.aio.Server:
    """A service's ``grpc.aio`` server: message size limits and ``rpc_limit`` from its config; with
    ``config.workers`` > 1, ``grpc.so_reuseport`` so every worker process binds the same port."""
    options = message_size_options(config.max_message_bytes)
    if config.workers > 1:
        options.append(("grpc.so_reuseport", 1))
    return grpc.aio.server(options=options, maximum_concurrent_rpcs=rpc_limit(config.max_in_flight))


class StoppedBeforeReady(Exception):
    """A stop signal arrived while a worker waited for its first version (``first_version_before_bind``)."""


async def first_version_before_bind(ready: Callable[[], bool], poll_s: float = 0.05) -> None:
    """Waits until ``ready()`` (the worker holds a version), polling every ``poll_s``; raises
    ``StoppedBeforeReady`` when SIGTERM/SIGINT arrives first.

    For N > 1 worker processes on one port (``recsys_serving.workers``): the kernel hands each new
    connection to any process listening on the port, and a readiness probe reaches one of them, so a
    worker that listened before loading would take connections (and answer probes) it cannot serve
    while its siblings report SERVING. Such a worker binds only after this returns: every process
    listening on the port holds a version. A single process binds first instead and reports
    NOT_SERVING until its first load (the probe then sees the truth)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not ready():
            try:
                await within(stop.wait(), poll_s)
            except TimeoutError:
                continue
            raise StoppedBeforeReady("stopped before the first version loaded")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def serve_until_signalled(server: grpc.aio.Server, servicer: health.aio.HealthServicer,
                                service_names: list[str], grace_s: float) -> None:
    """Waits for SIGTERM/SIGINT, then reports NOT_SERVING and drains in-flight RPCs for ``grace_s``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger(__name__).info("shutting down: NOT_SERVING, draining for up to %.1f s", grace_s)
    await set_serving(servicer, service_names, False)
    await server.stop(grace_s)
