"""The ranking service's configuration: one frozen dataclass, read once from the environment.

``from_env()`` parses and validates every variable in ``ENV_VARS`` and fails fast with a
``ValueError`` naming the variable, its value and what was expected. An unknown ``RANKING_*``
name (a typo such as ``RANKING_PROT``) or an unknown ``RECSYS_*`` name fails too, so a misspelt
setting never falls back to its default silently. ``RETRIEVAL_*`` names are the retrieval
service's and are ignored here, so both services can share one env file.

The shared ``RECSYS_*`` names mean the same in ``retrieval_service/config.py`` (the services may
not import each other, so the small parsers are repeated there); an empty value counts as unset.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


from recsys_serving.env import (DEFAULT_TRUSTED_KEYS, LOG_LEVELS, TRUST_SPECS, ClientTls, client_tls, Parser, TlsConfig, choice, directory,
                               float_in, host, int_in, namespace, parse_specs, pem_file, redis_url_value,
                               reject_unknown)

PREFIX = "RANKING_"
SHARED_PREFIX = "RECSYS_"
# RECSYS_* names read by other programs of the project (trainer, test suite): not typos here.
FOREIGN_SHARED_VARS = ("RECSYS_DATA_DIR", "RECSYS_TEST_REDIS_URL", "RECSYS_SIGNING_KEY")

FALLBACKS = ("popular", "unavailable")
SCORE_MODES = ("ctr", "ctr_x_rating")


RetrievalClientTls = ClientTls      # TLS towards the retrieval service (recsys_serving.env.ClientTls)


@dataclass(frozen=True)
class RankingConfig:
    artifact_root: Path                      # the artifact volume (CURRENT, versions/)
    # None = no Redis: features come from the artifact in process. Kept out of repr: may hold a password.
    redis_url: str | None = field(default=None, repr=False)
    redis_namespace: str = "recsys"
    log_level: str = "INFO"
    pinned_version: int | None = None        # serve this version instead of CURRENT
    host: str = "127.0.0.1"                  # gRPC listen address (images and manifests set 0.0.0.0)
    port: int = 50052                        # gRPC; 0 = pick a free port (tests)
    metrics_host: str = "127.0.0.1"          # Prometheus HTTP listen address
    metrics_port: int = 9102                 # Prometheus HTTP; 0 = disabled
    retrieval_target: str = "localhost:50051"  # gRPC target of the retrieval service
    max_k: int = 100                         # largest k a Recommend may ask for
    default_candidates: int = 500            # candidates retrieved when the request says 0
    max_rank_items: int = 1000               # most item ids in one Rank; most candidates in one Recommend
    fallback: str = "popular"                # retrieval down: popular items, or UNAVAILABLE
    max_in_flight: int = 128                 # RPCs admitted (running + queued) before RESOURCE_EXHAUSTED
    # RPCs running at once; the rest queue (recsys_serving.admission). Each running RPC shares the CPU
    # with the others, so N slots make each take ~N times its CPU time: with 32 on the shared 2-core
    # machine that reached the 200 ms deadline (requests timed out instead of being refused).
    max_concurrency: int = 8
    min_deadline_ms: int = 5                 # a request with less time left fails DEADLINE_EXCEEDED at once
    default_deadline_ms: int = 200           # applied when the caller set no deadline
    diversity: float = 0.0                   # default MMR strength in [0, 1]
    score_mode: str = "ctr"                  # ctr, or ctr times the predicted rating
    poll_interval_s: float = 2.0             # how often CURRENT is checked for a new version
    redis_timeout_ms: int = 50               # per Redis round trip before degrading to artifact features
    redis_breaker_failures: int = 3          # consecutive Redis failures that open its circuit breaker
    redis_breaker_cooldown_ms: int = 1000    # Redis is skipped this long before one probe request tries it
    retrieval_breaker_failures: int = 5      # consecutive Retrieve failures/timeouts that open its breaker
    retrieval_breaker_cooldown_ms: int = 1000  # retrieval is skipped (popular fallback) this long, then probed
    grace_s: float = 10.0                    # drain time for in-flight RPCs after SIGTERM
    max_message_bytes: int = 4 * 1024 * 1024  # gRPC send/receive limit
    microbatch_max_size: int = 16            # DCN scoring requests batched into one forward pass
    microbatch_max_wait_ms: float = 0.0      # extra wait for a batch to fill (0: run at once; jobs
                                             # arriving while a pass runs form the next one)
    tls: TlsConfig | None = None             # None = plaintext
    trusted_keys: Path = DEFAULT_TRUSTED_KEYS  # public key(s) whose signatures make a version servable
    allow_unsigned: bool = False             # serve unsigned versions (local experiments only; loud)
    retrieval_tls: RetrievalClientTls | None = None  # None = plaintext channel to retrieval


def _target(name: str, raw: str) -> str:
    # gRPC targets: "host:port", "dns:///host:port", "unix:/path", "ipv4:1.2.3.4:5"; all lack whitespace.
    if any(ch.isspace() for ch in raw):
        raise ValueError(f"{name} must be a gRPC target such as 'host:port' or 'dns:///host:port', got {raw!r}")
    return raw


# Environment name -> (RankingConfig field, parser). A missing or empty variable keeps the default.
_SPECS: dict[str, tuple[str, Parser]] = {
    "RECSYS_ARTIFACT_ROOT": ("artifact_root", directory),
    "RECSYS_REDIS_URL": ("redis_url", redis_url_value),
    "RECSYS_REDIS_NAMESPACE": ("redis_namespace", namespace),
    "RECSYS_LOG_LEVEL": ("log_level", choice(LOG_LEVELS, upper=True)),
    "RECSYS_PINNED_VERSION": ("pinned_version", int_in(1)),
    **TRUST_SPECS,
    "RANKING_HOST": ("host", host),
    "RANKING_PORT": ("port", int_in(0, 65535)),
    "RANKING_METRICS_HOST": ("metrics_host", host),
    "RANKING_METRICS_PORT": ("metrics_port", int_in(0, 65535)),
    "RANKING_RETRIEVAL_TARGET": ("retrieval_target", _target),
    "RANKING_MAX_K": ("max_k", int_in(1, 10_000)),
    "RANKING_DEFAULT_CANDIDATES": ("default_candidates", int_in(1, 100_000)),
    "RANKING_MAX_RANK_ITEMS": ("max_rank_items", int_in(1, 100_000)),
    "RANKING_FALLBACK": ("fallback", choice(FALLBACKS)),
    "RANKING_MAX_IN_FLIGHT": ("max_in_flight", int_in(1, 100_000)),
    "RANKING_MAX_CONCURRENCY": ("max_concurrency", int_in(1, 100_000)),
    "RANKING_MIN_DEADLINE_MS": ("min_deadline_ms", int_in(0, 60_000)),
    "RANKING_DEFAULT_DEADLINE_MS": ("default_deadline_ms", int_in(1, 600_000)),
    "RANKING_DIVERSITY": ("diversity", float_in(0.0, 1.0)),
    "RANKING_SCORE_MODE": ("score_mode", choice(SCORE_MODES)),
    "RANKING_POLL_INTERVAL_S": ("poll_interval_s", float_in(0.0, 3600.0, lo_open=True)),
    "RANKING_REDIS_TIMEOUT_MS": ("redis_timeout_ms", int_in(1, 60_000)),
    "RANKING_REDIS_BREAKER_FAILURES": ("redis_breaker_failures", int_in(1, 1000)),
    "RANKING_REDIS_BREAKER_COOLDOWN_MS": ("redis_breaker_cooldown_ms", int_in(1, 3_600_000)),
    "RANKING_RETRIEVAL_BREAKER_FAILURES": ("retrieval_breaker_failures", int_in(1, 1000)),
    "RANKING_RETRIEVAL_BREAKER_COOLDOWN_MS": ("retrieval_breaker_cooldown_ms", int_in(1, 3_600_000)),
    "RANKING_GRACE_S": ("grace_s", float_in(0.0, 300.0)),
    "RANKING_MAX_MESSAGE_BYTES": ("max_message_bytes", int_in(1024, 2**31 - 1)),
    "RANKING_MICROBATCH_MAX_SIZE": ("microbatch_max_size", int_in(1, 4096)),
    "RANKING_MICROBATCH_MAX_WAIT_MS": ("microbatch_max_wait_ms", float_in(0.0, 1000.0)),
}
_TLS_VARS = ("RANKING_TLS_CERT_FILE", "RANKING_TLS_KEY_FILE", "RANKING_TLS_CLIENT_CA_FILE")
_RETRIEVAL_TLS_VARS = ("RANKING_RETRIEVAL_TLS_CA_FILE", "RANKING_RETRIEVAL_TLS_CERT_FILE",
                       "RANKING_RETRIEVAL_TLS_KEY_FILE")

ENV_VARS: tuple[str, ...] = (*_SPECS, *_TLS_VARS, *_RETRIEVAL_TLS_VARS)


def _cert_and_key(environ: Mapping[str, str], cert_name: str, key_name: str) -> tuple[Path | None, Path | None]:
    cert, key = pem_file(environ, cert_name), pem_file(environ, key_name)
    if (cert is None) != (key is None):
        raise ValueError(f"{cert_name} and {key_name} must be set together, "
                         f"got cert={environ.get(cert_name, '')!r}, key={environ.get(key_name, '')!r}")
    return cert, key


def _tls(environ: Mapping[str, str]) -> TlsConfig | None:
    cert, key = _cert_and_key(environ, _TLS_VARS[0], _TLS_VARS[1])
    client_ca = pem_file(environ, _TLS_VARS[2])
    if cert is None or key is None:
        if client_ca is not None:
            raise ValueError(f"RANKING_TLS_CLIENT_CA_FILE requires RANKING_TLS_CERT_FILE and "
                             f"RANKING_TLS_KEY_FILE (mTLS needs server TLS), got {str(client_ca)!r}")
        return None
    return TlsConfig(cert_file=cert, key_file=key, client_ca_file=client_ca)


def _check_relations(config: RankingConfig) -> None:
    if config.metrics_port and config.metrics_port == config.port:
        raise ValueError(f"RANKING_METRICS_PORT must differ from RANKING_PORT, got {config.metrics_port!r}")
    if config.max_k > config.default_candidates:
        raise ValueError(f"RANKING_MAX_K must be <= RANKING_DEFAULT_CANDIDATES ({config.default_candidates}) "
                         f"so a default Recommend can fill k, got {config.max_k!r}")
    if config.default_candidates > config.max_rank_items:
        raise ValueError(f"RANKING_DEFAULT_CANDIDATES must be <= RANKING_MAX_RANK_ITEMS "
                         f"({config.max_rank_items}), got {config.default_candidates!r}")
    if config.max_in_flight < config.max_concurrency:
        raise ValueError(f"RANKING_MAX_IN_FLIGHT must be >= RANKING_MAX_CONCURRENCY ({config.max_concurrency}), "
                         f"got {config.max_in_flight!r}")
    if config.default_deadline_ms <= config.min_deadline_ms:
        raise ValueError(f"RANKING_DEFAULT_DEADLINE_MS must be > RANKING_MIN_DEADLINE_MS "
                         f"({config.min_deadline_ms}), got {config.default_deadline_ms!r}")


def from_env(environ: Mapping[str, str] = os.environ) -> RankingConfig:
    """Builds the config from ``environ``; raises ValueError naming the first bad variable."""
    reject_unknown(environ, set(ENV_VARS) | set(FOREIGN_SHARED_VARS), (PREFIX, SHARED_PREFIX),
                   "ranking_service.config.ENV_VARS")
    values = parse_specs(environ, _SPECS, RankingConfig)
    values["tls"] = _tls(environ)
    values["retrieval_tls"] = client_tls(environ, *_RETRIEVAL_TLS_VARS)
    config = RankingConfig(**values)  # type: ignore[arg-type]
    _check_relations(config)
    return config
