"""The retrieval service's configuration: one frozen dataclass, read once from the environment.

``from_env()`` parses and validates every variable in ``ENV_VARS`` and fails fast with a
``ValueError`` naming the variable, its value and what was expected. An unknown ``RETRIEVAL_*``
name (a typo such as ``RETRIEVAL_PROT``) or an unknown ``RECSYS_*`` name fails too, so a misspelt
setting never falls back to its default silently. ``RANKING_*`` names are the ranking service's
and are ignored here, so both services can share one env file.

The settings both services have (``recsys_serving.env.ServiceConfig``: the shared ``RECSYS_*``
names, listen addresses, admission, default deadline, Redis, TLS, trust) are parsed by the same
code in both; an empty value counts as unset. Model hyper-parameters are not configured here:
they travel in the artifact.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from recsys_serving.env import (FOREIGN_SHARED_VARS, Parser, ServiceConfig, TlsConfig, check_service, choice,
                                int_in, parse_specs, reject_unknown, server_tls, server_tls_vars, service_specs)

__all__ = ["ENV_VARS", "RetrievalConfig", "TlsConfig", "from_env"]
PREFIX = "RETRIEVAL_"
SHARED_PREFIX = "RECSYS_"

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RetrievalConfig(ServiceConfig):
    port: int = 50051                        # gRPC; 0 = pick a free port (tests)
    metrics_port: int = 9101                 # Prometheus HTTP; 0 = disabled
    microbatch_max_size: int = 32            # user-tower requests batched into one forward pass
    default_deadline_ms: int = 30_000        # applied when the caller set no deadline
    max_candidates: int = 1000               # largest num_candidates a Retrieve may ask for
    chunk_size: int = 500                    # candidates per streamed message (one DCN call each downstream)
    device: str = "auto"                     # auto = cuda when available, else cpu


# Environment name -> (RetrievalConfig field, parser). A missing or empty variable keeps the default.
_SPECS: dict[str, tuple[str, Parser]] = {
    **service_specs(PREFIX),
    "RETRIEVAL_MAX_CANDIDATES": ("max_candidates", int_in(1, 100_000)),
    "RETRIEVAL_CHUNK_SIZE": ("chunk_size", int_in(1, 100_000)),
    "RETRIEVAL_DEVICE": ("device", choice(DEVICES)),
}

ENV_VARS: tuple[str, ...] = (*_SPECS, *server_tls_vars(PREFIX))


def from_env(environ: Mapping[str, str] = os.environ) -> RetrievalConfig:
    """Builds the config from ``environ``; raises ValueError naming the first bad variable."""
    reject_unknown(environ, set(ENV_VARS) | set(FOREIGN_SHARED_VARS), (PREFIX, SHARED_PREFIX),
                   "retrieval_service.config.ENV_VARS")
    values = parse_specs(environ, _SPECS, RetrievalConfig)
    values["tls"] = server_tls(environ, PREFIX)
    config = RetrievalConfig(**values)  # type: ignore[arg-type]
    check_service(config, PREFIX)
    if config.chunk_size > config.max_candidates:
        raise ValueError(f"RETRIEVAL_CHUNK_SIZE must be <= RETRIEVAL_MAX_CANDIDATES "
                         f"({config.max_candidates}), got {config.chunk_size!r}")
    return config
