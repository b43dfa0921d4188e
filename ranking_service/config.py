"""The ranking service's configuration: one frozen dataclass, read once from the environment.

``from_env()`` parses and validates every variable in ``ENV_VARS`` and fails fast with a
``ValueError`` naming the variable, its value and what was expected. An unknown ``RANKING_*``
name (a typo such as ``RANKING_PROT``) or an unknown ``RECSYS_*`` name fails too, so a misspelt
setting never falls back to its default silently. ``RETRIEVAL_*`` names are the retrieval
service's and are ignored here, so both services can share one env file.

The settings both services have (``recsys_serving.env.ServiceConfig``: the shared ``RECSYS_*``
names, listen addresses, admission, default deadline, Redis, TLS, trust) are parsed by the same
code in both; an empty value counts as unset.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from recsys_serving.env import (FOREIGN_SHARED_VARS, ClientTls, Parser, ServiceConfig, TlsConfig, check_service,
                                choice, client_tls, float_in, int_in, parse_specs, reject_unknown, server_tls,
                                server_tls_vars, service_specs, throttle_k)

__all__ = ["ENV_VARS", "RankingConfig", "RetrievalClientTls", "TlsConfig", "from_env"]
PREFIX = "RANKING_"
SHARED_PREFIX = "RECSYS_"

FALLBACKS = ("popular", "unavailable")
SCORE_MODES = ("ctr", "ctr_x_rating")


RetrievalClientTls = ClientTls      # TLS towards the retrieval service (recsys_serving.env.ClientTls)


@dataclass(frozen=True)
class RankingConfig(ServiceConfig):
    port: int = 50052                        # gRPC; 0 = pick a free port (tests)
    metrics_port: int = 9102                 # Prometheus HTTP; 0 = disabled
    microbatch_max_size: int = 16            # DCN scoring requests batched into one forward pass
    max_in_flight: int = 128                 # RPCs admitted (running + queued) before RESOURCE_EXHAUSTED
    # RPCs running at once; the rest queue (recsys_serving.admission). Each running RPC shares the CPU
    # with the others, so N slots make each take ~N times its CPU time: with 32 on the shared 2-core
    # machine that reached the 200 ms deadline (requests timed out instead of being refused).
    max_concurrency: int = 8
    default_deadline_ms: int = 200           # applied when the caller set no deadline
    retrieval_target: str = "localhost:50051"  # gRPC target of the retrieval service
    max_k: int = 100                         # largest k a Recommend may ask for
    default_candidates: int = 500            # candidates retrieved when the request says 0
    max_rank_items: int = 1000               # most item ids in one Rank; most candidates in one Recommend
    fallback: str = "popular"                # retrieval down: popular items, or UNAVAILABLE
    min_deadline_ms: int = 5                 # a request with less time left fails DEADLINE_EXCEEDED at once
    diversity: float = 0.0                   # default MMR strength in [0, 1]
    score_mode: str = "ctr"                  # ctr, or ctr times the predicted rating
    retrieval_breaker_failures: int = 5      # consecutive Retrieve failures/timeouts that open its breaker
    retrieval_breaker_cooldown_ms: int = 1000  # retrieval is skipped (popular fallback) this long, then probed
    retrieval_tls: RetrievalClientTls | None = None  # None = plaintext channel to retrieval
    retrieval_channels: int = 1              # connections to retrieval, used in turn (RETRIEVAL_WORKERS > 1)
    # Adaptive throttle on the calls to retrieval (recsys_serving.throttle): while retrieval refuses,
    # send at most ~K x what it accepts and answer the rest from popular items at once; 0 = off.
    retrieval_throttle_k: float = 2.0
    # A Retrieve still waiting after max(floor, multiplier x p99 of the recent calls) counts towards the
    # breaker at once when retrieval answered no call since it began (recsys_serving.latency,
    # ranking_service.pipeline); when the breaker opens every call past its cut is answered from
    # popular items; a frozen retrieval then
    # opens it in tens of milliseconds instead of after whole budgets. 2, the default since the sixth
    # session of 2026-12-06 (0 = off): at 200 req/s with retrieval frozen 5 s, 0 / 0 failed during the
    # freeze and p99 12 / 9 ms, against 10 / 10 failed and 126 / 121 ms off; 10 hot reloads, 0 / 0
    # failed and no answer from popular items, against 20 / 1 failed off. Before the "answered no call"
    # condition (380ba13) a version load that stalled retrieval past the cut tripped it (208 of 5,000
    # answers from popular items in one hot-reload run); with it, five hot-reload runs in two sessions
    # answered none so (docs/RESULTS.md, "The adaptive Retrieve cut on by default").
    retrieval_timeout_multiplier: float = 2.0
    retrieval_timeout_floor_ms: int = 20


def _target(name: str, raw: str) -> str:
    # gRPC targets: "host:port", "dns:///host:port", "unix:/path", "ipv4:1.2.3.4:5"; all lack whitespace.
    if any(ch.isspace() for ch in raw):
        raise ValueError(f"{name} must be a gRPC target such as 'host:port' or 'dns:///host:port', got {raw!r}")
    return raw


def _timeout_multiplier(name: str, raw: str) -> float:
    """0 (off) or a multiplier >= 1 of retrieval's p99 (below 1 it would cut a healthy call in a hundred)."""
    value = float_in(0.0, 1000.0)(name, raw)
    if 0 < value < 1:
        raise ValueError(f"{name} must be 0 (off) or a number in [1, 1000], got {raw!r}")
    return value


# Environment name -> (RankingConfig field, parser). A missing or empty variable keeps the default.
_SPECS: dict[str, tuple[str, Parser]] = {
    **service_specs(PREFIX),
    "RANKING_RETRIEVAL_TARGET": ("retrieval_target", _target),
    "RANKING_MAX_K": ("max_k", int_in(1, 10_000)),
    "RANKING_DEFAULT_CANDIDATES": ("default_candidates", int_in(1, 100_000)),
    "RANKING_MAX_RANK_ITEMS": ("max_rank_items", int_in(1, 100_000)),
    "RANKING_FALLBACK": ("fallback", choice(FALLBACKS)),
    "RANKING_MIN_DEADLINE_MS": ("min_deadline_ms", int_in(0, 60_000)),
    "RANKING_DIVERSITY": ("diversity", float_in(0.0, 1.0)),
    "RANKING_SCORE_MODE": ("score_mode", choice(SCORE_MODES)),
    "RANKING_RETRIEVAL_BREAKER_FAILURES": ("retrieval_breaker_failures", int_in(1, 1000)),
    "RANKING_RETRIEVAL_BREAKER_COOLDOWN_MS": ("retrieval_breaker_cooldown_ms", int_in(1, 3_600_000)),
    "RANKING_RETRIEVAL_CHANNELS": ("retrieval_channels", int_in(1, 64)),
    "RANKING_RETRIEVAL_THROTTLE_K": ("retrieval_throttle_k", throttle_k),
    "RANKING_RETRIEVAL_TIMEOUT_MULTIPLIER": ("retrieval_timeout_multiplier", _timeout_multiplier),
    "RANKING_RETRIEVAL_TIMEOUT_FLOOR_MS": ("retrieval_timeout_floor_ms", int_in(1, 60_000)),
}
_RETRIEVAL_TLS_VARS = ("RANKING_RETRIEVAL_TLS_CA_FILE", "RANKING_RETRIEVAL_TLS_CERT_FILE",
                       "RANKING_RETRIEVAL_TLS_KEY_FILE")

ENV_VARS: tuple[str, ...] = (*_SPECS, *server_tls_vars(PREFIX), *_RETRIEVAL_TLS_VARS)


def _check_relations(config: RankingConfig) -> None:
    check_service(config, PREFIX)
    if config.max_k > config.default_candidates:
        raise ValueError(f"RANKING_MAX_K must be <= RANKING_DEFAULT_CANDIDATES ({config.default_candidates}) "
                         f"so a default Recommend can fill k, got {config.max_k!r}")
    if config.default_candidates > config.max_rank_items:
        raise ValueError(f"RANKING_DEFAULT_CANDIDATES must be <= RANKING_MAX_RANK_ITEMS "
                         f"({config.max_rank_items}), got {config.default_candidates!r}")
    if config.default_deadline_ms <= config.min_deadline_ms:
        raise ValueError(f"RANKING_DEFAULT_DEADLINE_MS must be > RANKING_MIN_DEADLINE_MS "
                         f"({config.min_deadline_ms}), got {config.default_deadline_ms!r}")


def from_env(environ: Mapping[str, str] = os.environ) -> RankingConfig:
    """Builds the config from ``environ``; raises ValueError naming the first bad variable."""
    reject_unknown(environ, set(ENV_VARS) | set(FOREIGN_SHARED_VARS), (PREFIX, SHARED_PREFIX),
                   "ranking_service.config.ENV_VARS")
    values = parse_specs(environ, _SPECS, RankingConfig)
    values["tls"] = server_tls(environ, PREFIX)
    values["retrieval_tls"] = client_tls(environ, *_RETRIEVAL_TLS_VARS)
    config = RankingConfig(**values)  # type: ignore[arg-type]
    _check_relations(config)
    return config
