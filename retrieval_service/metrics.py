"""Prometheus metrics of the retrieval service (default registry, ``retrieval_`` prefix).

Module-level because the default registry refuses duplicate names; several servers in one process
(tests) share them, so tests read deltas.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from recsys_serving.admission import AdmissionMetrics

# Seconds; fine buckets at the low end because the stages take well under 10 ms.
_STAGE_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

REQUESTS = Counter("retrieval_requests", "Retrieve calls by final gRPC status code", ["code"])
REQUEST_SECONDS = Histogram("retrieval_request_seconds", "Retrieve latency, whole call", buckets=_STAGE_BUCKETS)
STAGE_SECONDS = Histogram("retrieval_stage_seconds",
                          "Latency per stage: features (per request), tower and search (per batch)",
                          ["stage"], buckets=_STAGE_BUCKETS)
BATCH_SIZE = Histogram("retrieval_batch_size", "Requests per user-tower forward / index search",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
VERSION = Gauge("retrieval_model_version", "Artifact version currently served (0 = none)")
RELOADS = Counter("retrieval_reloads", "Versions loaded and swapped in")
REFUSALS = Counter("retrieval_refusals", "Versions refused (corrupt or failed their checks)")
DEGRADED = Counter("retrieval_degraded", "Requests answered on a degraded path", ["path"])
FEATURE_STORE_ERRORS = Counter("retrieval_feature_store_errors",
                               "Redis reads that failed or timed out (answered from the artifact)")
FEATURE_STORE_SKIPPED = Counter("retrieval_feature_store_skipped",
                                "Redis reads skipped because its circuit breaker is open (answered from the artifact)")
REDIS_BREAKER_STATE = Gauge("retrieval_redis_breaker_state",
                            "Redis circuit breaker: 0 closed, 1 open (Redis skipped), 2 half-open (probing)")
REDIS_BREAKER_TRANSITIONS = Counter("retrieval_redis_breaker_transitions",
                                    "Redis circuit breaker state changes, by the state entered", ["to"])
ADMISSION = AdmissionMetrics(
    in_flight=Gauge("retrieval_in_flight", "Retrieves admitted now: running + queued for a slot"),
    queued=Gauge("retrieval_queued", "Retrieves admitted and waiting for a slot"),
    refused=Counter("retrieval_refused", "Retrieves refused at once with RESOURCE_EXHAUSTED, by reason "
                    "(deadline: could not finish in time given the queue; full: max in flight)", ["reason"]),
    expired=Counter("retrieval_expired", "Queued Retrieves dropped unstarted: their deadline passed"),
    service_seconds=Gauge("retrieval_service_seconds_estimate",
                          "Moving average of the seconds a Retrieve holds a slot"),
    queue_wait=Histogram("retrieval_queue_wait_seconds", "Seconds admitted Retrieves waited for a slot",
                         buckets=_STAGE_BUCKETS))


def count_request(method: str, code: str, seconds: float) -> None:
    """One answered Retrieve (``recsys_serving.rpc``; the only method, so not a label)."""
    REQUESTS.labels(code).inc()
    REQUEST_SECONDS.observe(seconds)
