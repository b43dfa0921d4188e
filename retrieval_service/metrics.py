"""Prometheus metrics of the retrieval service (default registry, ``retrieval_`` prefix).

Module-level because the default registry refuses duplicate names; several servers in one process
(tests) share them, so tests read deltas.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from recsys_serving.admission import admission_metrics
from recsys_serving.breaker import breaker_metrics

# Seconds; fine buckets at the low end because the stages take well under 10 ms.
_STAGE_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

REQUESTS = Counter("retrieval_requests", "Retrieve calls by final gRPC status code", ["code"])
REQUEST_SECONDS = Histogram("retrieval_request_seconds", "Retrieve latency, whole call", buckets=_STAGE_BUCKETS)
STAGE_SECONDS = Histogram("retrieval_stage_seconds",
                          "Latency per stage: features (per request), tower and search (per batch)",
                          ["stage"], buckets=_STAGE_BUCKETS)
BATCH_SIZE = Histogram("retrieval_batch_size", "Requests per user-tower forward / index search",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
VERSION = Gauge("retrieval_model_version", "Artifact version currently served (0 = none)",
                multiprocess_mode="liveall")
RELOADS = Counter("retrieval_reloads", "Versions loaded and swapped in")
REFUSALS = Counter("retrieval_refusals", "Versions refused (corrupt or failed their checks)")
DEGRADED = Counter("retrieval_degraded", "Requests answered on a degraded path", ["path"])
FEATURE_STORE_ERRORS = Counter("retrieval_feature_store_errors",
                               "Redis reads that failed or timed out (answered from the artifact)")
FEATURE_STORE_SKIPPED = Counter("retrieval_feature_store_skipped",
                                "Redis reads skipped because its circuit breaker is open (answered from the artifact)")
FEATURE_READS = Counter("retrieval_user_records", "Where each Retrieve's user record came from: caller (the "
                        "caller's read, RetrieveRequest.stored_user) or own (this service read the store, or has none)",
                        ["source"])
REDIS_BREAKER_STATE, REDIS_BREAKER_TRANSITIONS = breaker_metrics("retrieval_redis", "Redis", "Redis skipped")
ADMISSION = admission_metrics("retrieval", "Retrieves", _STAGE_BUCKETS)


def count_request(method: str, code: str, seconds: float) -> None:
    """One answered Retrieve or RetrieveAll (``recsys_serving.rpc``): the same work in one or several
    messages, so one count, not a method label."""
    REQUESTS.labels(code).inc()
    REQUEST_SECONDS.observe(seconds)
