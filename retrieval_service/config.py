"""The retrieval service's configuration: one frozen dataclass, read once from the environment.

``from_env()`` parses and validates every variable in ``ENV_VARS`` and fails fast with a
``ValueError`` naming the variable, its value and what was expected. An unknown ``RETRIEVAL_*``
name (a typo such as ``RETRIEVAL_PROT``) or an unknown ``RECSYS_*`` name fails too, so a misspelt
setting never falls back to its default silently. ``RANKING_*`` names are the ranking service's
and are ignored here, so both services can share one env file.

The shared ``RECSYS_*`` names mean the same in ``ranking_service/config.py``; an empty value counts
as unset everywhere. Model hyper-parameters are not configured here: they travel in the artifact.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


from recsys_serving.env import (DEFAULT_TRUSTED_KEYS, LOG_LEVELS, TRUST_SPECS, Parser, TlsConfig, choice, directory,
                               float_in, host, int_in, namespace, parse_specs, pem_file, redis_url_value,
                               reject_unknown)

PREFIX = "RETRIEVAL_"
SHARED_PREFIX = "RECSYS_"
# RECSYS_* names read by other programs of the project (trainer, test suite): not typos here.
FOREIGN_SHARED_VARS = ("RECSYS_DATA_DIR", "RECSYS_TEST_REDIS_URL", "RECSYS_SIGNING_KEY")

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RetrievalConfig:
    artifact_root: Path                      # the artifact volume (CURRENT, versions/)
    # None = no Redis: features come from the artifact in process. Kept out of repr: may hold a password.
    redis_url: str | None = field(default=None, repr=False)
    redis_namespace: str = "recsys"
    log_level: str = "INFO"
    pinned_version: int | None = None        # serve this version instead of CURRENT
    host: str = "127.0.0.1"                  # gRPC listen address (images and manifests set 0.0.0.0)
    port: int = 50051                        # gRPC; 0 = pick a free port (tests)
    metrics_host: str = "127.0.0.1"          # Prometheus HTTP listen address
    metrics_port: int = 9101                 # Prometheus HTTP; 0 = disabled
    max_candidates: int = 1000               # largest num_candidates a Retrieve may ask for
    chunk_size: int = 500                    # candidates per streamed message (one DCN call each downstream)
    poll_interval_s: float = 2.0             # how often CURRENT is checked for a new version
    device: str = "auto"                     # auto = cuda when available, else cpu
    microbatch_max_size: int = 32            # user-tower requests batched into one forward pass
    microbatch_max_wait_ms: float = 0.0      # extra wait for a batch to fill (0: run at once; requests
                                             # arriving while a batch runs form the next one)
    max_in_flight: int = 64                  # Retrieves admitted (running + queued) before RESOURCE_EXHAUSTED
    max_concurrency: int = 8                 # Retrieves running at once; the rest queue (recsys_serving.admission)
    default_deadline_ms: int = 30_000        # applied when the caller set no deadline
    redis_timeout_ms: int = 50               # per Redis round trip before degrading to artifact features
    redis_breaker_failures: int = 3          # consecutive Redis failures that open its circuit breaker
    redis_breaker_cooldown_ms: int = 1000    # Redis is skipped this long before one probe request tries it
    grace_s: float = 10.0                    # drain time for in-flight RPCs after SIGTERM
    max_message_bytes: int = 4 * 1024 * 1024  # gRPC send/receive limit
    tls: TlsConfig | None = None             # None = plaintext
    trusted_keys: Path = DEFAULT_TRUSTED_KEYS  # public key(s) whose signatures make a version servable
    allow_unsigned: bool = False             # serve unsigned versions (local experiments only; loud)


# Environment name -> (RetrievalConfig field, parser). A missing or empty variable keeps the default.
_SPECS: dict[str, tuple[str, Parser]] = {
    "RECSYS_ARTIFACT_ROOT": ("artifact_root", directory),
    "RECSYS_REDIS_URL": ("redis_url", redis_url_value),
    "RECSYS_REDIS_NAMESPACE": ("redis_namespace", namespace),
    "RECSYS_LOG_LEVEL": ("log_level", choice(LOG_LEVELS, upper=True)),
    "RECSYS_PINNED_VERSION": ("pinned_version", int_in(1)),
    **TRUST_SPECS,
    "RETRIEVAL_HOST": ("host", host),
    "RETRIEVAL_PORT": ("port", int_in(0, 65535)),
    "RETRIEVAL_METRICS_HOST": ("metrics_host", host),
    "RETRIEVAL_METRICS_PORT": ("metrics_port", int_in(0, 65535)),
    "RETRIEVAL_MAX_CANDIDATES": ("max_candidates", int_in(1, 100_000)),
    "RETRIEVAL_CHUNK_SIZE": ("chunk_size", int_in(1, 100_000)),
    "RETRIEVAL_POLL_INTERVAL_S": ("poll_interval_s", float_in(0.0, 3600.0, lo_open=True)),
    "RETRIEVAL_DEVICE": ("device", choice(DEVICES)),
    "RETRIEVAL_MICROBATCH_MAX_SIZE": ("microbatch_max_size", int_in(1, 4096)),
    "RETRIEVAL_MICROBATCH_MAX_WAIT_MS": ("microbatch_max_wait_ms", float_in(0.0, 1000.0)),
    "RETRIEVAL_MAX_IN_FLIGHT": ("max_in_flight", int_in(1, 100_000)),
    "RETRIEVAL_MAX_CONCURRENCY": ("max_concurrency", int_in(1, 100_000)),
    "RETRIEVAL_DEFAULT_DEADLINE_MS": ("default_deadline_ms", int_in(1, 600_000)),
    "RETRIEVAL_REDIS_TIMEOUT_MS": ("redis_timeout_ms", int_in(1, 60_000)),
    "RETRIEVAL_REDIS_BREAKER_FAILURES": ("redis_breaker_failures", int_in(1, 1000)),
    "RETRIEVAL_REDIS_BREAKER_COOLDOWN_MS": ("redis_breaker_cooldown_ms", int_in(1, 3_600_000)),
    "RETRIEVAL_GRACE_S": ("grace_s", float_in(0.0, 300.0)),
    "RETRIEVAL_MAX_MESSAGE_BYTES": ("max_message_bytes", int_in(1024, 2**31 - 1)),
}
_TLS_VARS = ("RETRIEVAL_TLS_CERT_FILE", "RETRIEVAL_TLS_KEY_FILE", "RETRIEVAL_TLS_CLIENT_CA_FILE")

ENV_VARS: tuple[str, ...] = (*_SPECS, *_TLS_VARS)


def _tls(environ: Mapping[str, str]) -> TlsConfig | None:
    cert, key, client_ca = (pem_file(environ, name) for name in _TLS_VARS)
    if (cert is None) != (key is None):
        raise ValueError(f"RETRIEVAL_TLS_CERT_FILE and RETRIEVAL_TLS_KEY_FILE must be set together, "
                         f"got cert={environ.get(_TLS_VARS[0], '')!r}, key={environ.get(_TLS_VARS[1], '')!r}")
    if cert is None or key is None:
        if client_ca is not None:
            raise ValueError(f"RETRIEVAL_TLS_CLIENT_CA_FILE requires RETRIEVAL_TLS_CERT_FILE and "
                             f"RETRIEVAL_TLS_KEY_FILE (mTLS needs server TLS), got {str(client_ca)!r}")
        return None
    return TlsConfig(cert_file=cert, key_file=key, client_ca_file=client_ca)


def from_env(environ: Mapping[str, str] = os.environ) -> RetrievalConfig:
    """Builds the config from ``environ``; raises ValueError naming the first bad variable."""
    reject_unknown(environ, set(ENV_VARS) | set(FOREIGN_SHARED_VARS), (PREFIX, SHARED_PREFIX),
                   "retrieval_service.config.ENV_VARS")
    values = parse_specs(environ, _SPECS, RetrievalConfig)
    values["tls"] = _tls(environ)
    config = RetrievalConfig(**values)  # type: ignore[arg-type]
    if config.metrics_port and config.metrics_port == config.port:
        raise ValueError(f"RETRIEVAL_METRICS_PORT must differ from RETRIEVAL_PORT, got {config.metrics_port!r}")
    if config.chunk_size > config.max_candidates:
        raise ValueError(f"RETRIEVAL_CHUNK_SIZE must be <= RETRIEVAL_MAX_CANDIDATES "
                         f"({config.max_candidates}), got {config.chunk_size!r}")
    if config.max_in_flight < config.max_concurrency:
        raise ValueError(f"RETRIEVAL_MAX_IN_FLIGHT must be >= RETRIEVAL_MAX_CONCURRENCY ({config.max_concurrency}), "
                         f"got {config.max_in_flight!r}")
    return config
