"""The ranking service's Prometheus metrics (process-wide, served by ``recsys_serving.runtime.start_metrics``).

Names start with ``ranking_`` so the retrieval service's metrics can share a registry (the
in-process benchmark runs both). Stages: ``retrieval_stream`` (Retrieve opened -> last chunk),
``feature_fetch`` (the user's Redis round trip or artifact lookup), ``dcn`` (one forward pass).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from recsys_serving.admission import admission_metrics
from recsys_serving.breaker import breaker_metrics

_LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)

REQUESTS = Counter("ranking_requests", "RPCs answered, by method and gRPC status code", ["method", "code"])
REQUEST_SECONDS = Histogram("ranking_request_seconds", "RPC latency by method", ["method"],
                            buckets=_LATENCY_BUCKETS_S)
STAGE_SECONDS = Histogram("ranking_stage_seconds", "Latency of one pipeline stage", ["stage"],
                          buckets=_LATENCY_BUCKETS_S)
DEGRADED = Counter("ranking_degraded", "Answers that took a degraded path, by path", ["path"])
ADMISSION = admission_metrics("ranking", "RPCs", _LATENCY_BUCKETS_S)
MODEL_VERSION = Gauge("ranking_model_version", "Artifact version being served (0 = none yet)",
                      multiprocess_mode="liveall")
RELOADS = Counter("ranking_reloads", "Version loads, by result (loaded, refused)", ["result"])
REDIS_ERRORS = Counter("ranking_redis_errors", "Feature-store calls that failed or timed out, by operation",
                       ["operation"])
REDIS_SKIPPED = Counter("ranking_redis_skipped",
                        "User reads that skipped Redis because its circuit breaker is open (artifact features)")
REDIS_BREAKER_STATE, REDIS_BREAKER_TRANSITIONS = breaker_metrics("ranking_redis", "Redis", "Redis skipped")
REDIS_REFILLS = Counter("ranking_redis_refills", "Times the service refilled an empty Redis from the artifact")
RETRIEVAL_FAILURES = Counter("ranking_retrieval_failures", "Retrieve calls that failed, by gRPC status code "
                             "(CIRCUIT_OPEN: skipped, the retrieval breaker is open; THROTTLED: not sent, the "
                             "adaptive throttle rejected it while retrieval refuses; SLOW: still waiting past the "
                             "adaptive cut, ranking_retrieval_timeout_seconds, when the breaker opened)", ["code"])
RETRIEVAL_TIMEOUT = Gauge("ranking_retrieval_timeout_seconds", "The adaptive cut past which a waiting Retrieve "
                          "call counts towards the breaker (max(floor, multiplier x retrieval's recent p99); "
                          "0 = none yet or off)",
                          multiprocess_mode="liveall")
RETRIEVAL_BREAKER_STATE, RETRIEVAL_BREAKER_TRANSITIONS = breaker_metrics("ranking_retrieval", "Retrieval",
                                                                         "popular fallback")
DCN_BATCH_JOBS = Histogram("ranking_dcn_batch_jobs", "Scoring jobs merged into one DCN forward pass",
                           buckets=(1, 2, 4, 8, 16, 32, 64))
ARM_ANSWERS = Counter("ranking_arm_answers", "Recommend answers by the arm that answered "
                      "(ARM_LIVE, ARM_CANARY, ARM_PINNED)", ["arm"])
SHADOW_RUNS = Counter("ranking_shadow_runs", "Shadow runs of the candidate version, by result (scored, "
                      "skipped: the worker's queue was full, it was down or still loading the candidate, "
                      "not_candidate: retrieval did not hold it, failed)", ["result"])
SHADOW_WORKER_PRIORITY = Gauge("ranking_shadow_worker_priority", "1 for the CPU priority the shadow worker "
                               "process took (idle: SCHED_IDLE, nice19: nice 19 where SCHED_IDLE is refused)",
                               ["policy"], multiprocess_mode="liveall")
SHADOW_WORKER_EXITS = Counter("ranking_shadow_worker_exits", "Times the shadow worker process died or could "
                              "not be started (each is restarted after a backoff)")
SHADOW_OVERLAP = Histogram("ranking_shadow_overlap_at_k", "Share of the served top k also in the candidate's top k",
                           buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.999, 1.0))
SHADOW_RANK_CORRELATION = Histogram("ranking_shadow_rank_correlation",
                                    "Kendall's tau of the items the served and the candidate's lists share",
                                    buckets=(-0.5, 0.0, 0.25, 0.5, 0.75, 0.9, 0.999, 1.0))
VERSION_MATCH = Counter("ranking_version_match",
                        "Recommend answers by how the ranking version met retrieval's: same (retrieval "
                        "answered from the version asked for), held (ranked with the other version this "
                        "service holds, to match), mixed (retrieval answered from a version this service "
                        "does not hold)", ["result"])
MODEL_FALLBACK_ROWS = Counter("ranking_model_fallback_rows",
                              "Candidates whose model output was not finite (ranked last by retrieval score)")


def count_request(method: str, code: str, seconds: float) -> None:
    """One answered RPC (``recsys_serving.rpc``)."""
    REQUESTS.labels(method, code).inc()
    REQUEST_SECONDS.labels(method).observe(seconds)
