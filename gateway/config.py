"""The gateway's configuration: one frozen dataclass, read once from the environment.

``from_env()`` parses every variable in ``ENV_VARS`` and fails fast with a ``ValueError`` naming the
variable, its value and what was expected; an unknown ``GATEWAY_*`` name (a typo) fails too. The
gateway shares ``RECSYS_LOG_LEVEL`` with the services; other ``RECSYS_*``, ``RANKING_*`` and
``RETRIEVAL_*`` names belong to them and are ignored, so one env file can serve all three.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from recsys_serving.env import (LOG_LEVELS, ClientTls, Parser, choice, client_tls, float_in, int_in, parse_specs,
                               reject_unknown, throttle_k)

PREFIX = "GATEWAY_"


RankingTls = ClientTls      # TLS towards the ranking service (recsys_serving.env.ClientTls)


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "0.0.0.0"                      # HTTP listen address
    port: int = 8080                           # HTTP port; 0 = pick a free port (tests)
    ranking_target: str = "localhost:50052"    # gRPC target of the ranking service
    log_level: str = "INFO"
    default_timeout_ms: int = 1000             # deadline given to gRPC when the request sets none
    max_timeout_ms: int = 30_000               # the largest deadline a request may ask for
    max_body_bytes: int = 1024 * 1024          # larger request bodies are refused 413 before parsing
    max_k: int = 100                           # largest k accepted (keep <= the ranking's RANKING_MAX_K)
    max_candidates: int = 1000                 # largest num_candidates / Rank item count (RANKING_MAX_RANK_ITEMS)
    retry_after_s: int = 1                     # Retry-After sent with 429 (ranking RESOURCE_EXHAUSTED)
    grace_s: float = 10.0                      # after SIGTERM: in-flight requests get this long to finish
    throttle_k: float = 2.0                    # adaptive throttle towards ranking (recsys_serving.throttle):
                                               # sends at most ~K x what ranking accepts; 0 = off
    ranking_tls: RankingTls | None = None      # None = plaintext channel to ranking


def _target(name: str, raw: str) -> str:
    if any(ch.isspace() for ch in raw):
        raise ValueError(f"{name} must be a gRPC target such as 'host:port' or 'dns:///host:port', got {raw!r}")
    return raw


def _host(name: str, raw: str) -> str:
    if any(ch.isspace() for ch in raw) or len(raw) > 253:
        raise ValueError(f"{name} must be a host name or IP address to listen on, got {raw[:64]!r}")
    return raw


_SPECS: dict[str, tuple[str, Parser]] = {
    "RECSYS_LOG_LEVEL": ("log_level", choice(LOG_LEVELS, upper=True)),
    "GATEWAY_HOST": ("host", _host),
    "GATEWAY_PORT": ("port", int_in(0, 65535)),
    "GATEWAY_RANKING_TARGET": ("ranking_target", _target),
    "GATEWAY_DEFAULT_TIMEOUT_MS": ("default_timeout_ms", int_in(1, 600_000)),
    "GATEWAY_MAX_TIMEOUT_MS": ("max_timeout_ms", int_in(1, 600_000)),
    "GATEWAY_MAX_BODY_BYTES": ("max_body_bytes", int_in(1024, 64 * 1024 * 1024)),
    "GATEWAY_MAX_K": ("max_k", int_in(1, 10_000)),
    "GATEWAY_MAX_CANDIDATES": ("max_candidates", int_in(1, 100_000)),
    "GATEWAY_RETRY_AFTER_S": ("retry_after_s", int_in(0, 3600)),
    "GATEWAY_GRACE_S": ("grace_s", float_in(0.0, 300.0)),
    "GATEWAY_THROTTLE_K": ("throttle_k", throttle_k),
}
_TLS_VARS = ("GATEWAY_RANKING_TLS_CA_FILE", "GATEWAY_RANKING_TLS_CERT_FILE", "GATEWAY_RANKING_TLS_KEY_FILE")

ENV_VARS: tuple[str, ...] = (*_SPECS, *_TLS_VARS)


def from_env(environ: Mapping[str, str] = os.environ) -> GatewayConfig:
    """Builds the config from ``environ``; raises ValueError naming the first bad variable."""
    reject_unknown(environ, set(ENV_VARS), (PREFIX,), "gateway.config.ENV_VARS")
    values = parse_specs(environ, _SPECS, GatewayConfig)
    values["ranking_tls"] = client_tls(environ, *_TLS_VARS)
    config = GatewayConfig(**values)  # type: ignore[arg-type]
    if config.default_timeout_ms > config.max_timeout_ms:
        raise ValueError(f"GATEWAY_DEFAULT_TIMEOUT_MS must be <= GATEWAY_MAX_TIMEOUT_MS "
                         f"({config.max_timeout_ms}), got {config.default_timeout_ms!r}")
    if config.max_k > config.max_candidates:
        raise ValueError(f"GATEWAY_MAX_K must be <= GATEWAY_MAX_CANDIDATES ({config.max_candidates}), "
                         f"got {config.max_k!r}")
    return config
