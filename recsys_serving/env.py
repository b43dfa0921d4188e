"""Parsers for the services' environment configuration: one copy, so both fail the same way.

Each parser takes the variable's name and raw text and returns the typed value or raises
``ValueError`` naming the variable, the value (URLs with their password masked) and what was
expected. ``retrieval_service/config.py`` and ``ranking_service/config.py`` build on them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:       # imported where a Trust is built: the gateway parses its env without cryptography
    from recsys_contracts.signing import Trust

@dataclass(frozen=True)
class TlsConfig:
    """Server-side TLS: PEM files. ``client_ca_file`` set = clients must present a cert it signed (mTLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


@dataclass(frozen=True)
class ClientTls:
    """TLS towards a peer (ranking -> retrieval, gateway -> ranking): its CA, plus our client cert and
    key when it requires mTLS."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Keys are "<namespace>:..." with Redis Cluster hash tags in braces, so braces and spaces are out.
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_REDIS_SCHEMES = ("redis", "rediss", "unix")

Parser = Callable[[str, str], object]


def int_in(lo: int, hi: int | None = None) -> Parser:
    expected = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"

    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{name} must be {expected}, got {raw!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise ValueError(f"{name} must be {expected}, got {raw!r}")
        return value

    return parse


def throttle_k(name: str, raw: str) -> float:
    """An adaptive throttle's K (``recsys_serving.throttle``): 0 = off, else a number > 1."""
    value = float_in(0.0)(name, raw)
    if 0 < value <= 1:
        raise ValueError(f"{name} must be 0 (off) or a number > 1, got {raw!r}")
    return value


def float_in(lo: float, hi: float | None = None, *, lo_open: bool = False) -> Parser:
    low = f"({lo}" if lo_open else f"[{lo}"
    expected = f"a number in {low}, {hi}]" if hi is not None else f"a number in {low}, inf)"

    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{name} must be {expected}, got {raw!r}") from None
        if (not math.isfinite(value) or value < lo or (lo_open and value == lo)
                or (hi is not None and value > hi)):
            raise ValueError(f"{name} must be {expected}, got {raw!r}")
        return value

    return parse


def choice(options: tuple[str, ...], *, upper: bool = False) -> Parser:
    def parse(name: str, raw: str) -> str:
        value = raw.upper() if upper else raw
        if value not in options:
            raise ValueError(f"{name} must be one of {', '.join(options)}, got {raw!r}")
        return value

    return parse


def directory(name: str, raw: str) -> Path:
    path = Path(raw)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} must be a directory (the artifact volume), got {raw!r}: not a directory")
    return path


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def redis_url_value(name: str, raw: str) -> str:
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError on a non-numeric or out-of-range port
    except ValueError:
        raise ValueError(f"{name} must be a redis://, rediss:// or unix:// URL, got {redact(raw)!r}") from None
    if parts.scheme not in _REDIS_SCHEMES or (parts.scheme != "unix" and not parts.hostname) or (
            parts.scheme == "unix" and not parts.path):
        raise ValueError(f"{name} must be a redis://, rediss:// or unix:// URL, got {redact(raw)!r}")
    return raw


def namespace(name: str, raw: str) -> str:
    if not _NAMESPACE.fullmatch(raw):
        raise ValueError(f"{name} must be 1..64 characters of letters, digits, '_', '.', ':', '-' "
                         f"starting with a letter or digit, got {raw!r}")
    return raw


def pem_file(environ: Mapping[str, str], name: str) -> Path | None:
    raw = environ.get(name, "")
    if not raw:
        return None
    if not Path(raw).is_file():
        raise ValueError(f"{name} must name an existing PEM file, got {raw!r}")
    return Path(raw)


def key_path(name: str, raw: str) -> Path:
    """A key file or folder; like the artifact root, it may be mounted after the config is read, so
    its keys are loaded (and a bad one refused, naming it) when the service builds its holder."""
    if any(ch in raw for ch in "\n\x00"):
        raise ValueError(f"{name} must be a path to a PEM file or a folder of them, got {raw[:64]!r}")
    return Path(raw)


def flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(f"{name} must be 1/true/yes or 0/false/no, got {raw[:64]!r}")
    return value in ("1", "true", "yes")


def host(name: str, raw: str) -> str:
    """An address to listen on: an IPv4/IPv6 literal or a host name (no port, no spaces)."""
    value = raw.strip("[]")
    if not value or any(ch.isspace() or ch in "/@" for ch in value) or len(value) > 253:
        raise ValueError(f"{name} must be an IP address or host name to listen on (e.g. 127.0.0.1, 0.0.0.0, "
                         f"::), got {raw[:64]!r}")
    return value


def host_port(host_name: str, port: int) -> str:
    """``host:port`` for gRPC's bind, with IPv6 literals in brackets."""
    return f"[{host_name}]:{port}" if ":" in host_name else f"{host_name}:{port}"


# Signature settings both services read (and mean the same by).
TRUST_SPECS: dict[str, tuple[str, Parser]] = {
    "RECSYS_TRUSTED_KEYS": ("trusted_keys", key_path),
    "RECSYS_ALLOW_UNSIGNED": ("allow_unsigned", flag),
}


# Where the images, compose and Kubernetes mount the trusted public keys (never on the artifact
# volume: whoever writes the volume could add a key there).
DEFAULT_TRUSTED_KEYS = Path("/etc/recsys/trusted-keys")


def trust(config) -> Trust:
    """The Trust a service config asks for (``trusted_keys`` / ``allow_unsigned`` fields); raises
    ValueError naming RECSYS_TRUSTED_KEYS when its keys cannot be read."""
    from recsys_contracts.signing import Trust

    if config.allow_unsigned:
        return Trust.unsigned()
    if not config.trusted_keys.exists():
        raise ValueError(f"RECSYS_TRUSTED_KEYS must name a PEM public key file or a folder of them (only "
                         f"versions they signed are served), got {str(config.trusted_keys)!r}: not found; "
                         f"RECSYS_ALLOW_UNSIGNED=1 serves unsigned versions (local experiments only)")
    try:
        return Trust.from_path(config.trusted_keys)
    except ValueError as error:
        raise ValueError(f"RECSYS_TRUSTED_KEYS: {error}") from None


def client_tls(environ: Mapping[str, str], ca_name: str, cert_name: str, key_name: str) -> ClientTls | None:
    """The client TLS the three variables ask for (None = plaintext); ValueError names an inconsistent one."""
    ca, cert, key = pem_file(environ, ca_name), pem_file(environ, cert_name), pem_file(environ, key_name)
    if (cert is None) != (key is None):
        raise ValueError(f"{cert_name} and {key_name} must be set together, "
                         f"got cert={environ.get(cert_name, '')!r}, key={environ.get(key_name, '')!r}")
    if ca is None:
        if cert is not None:
            raise ValueError(f"{cert_name} requires {ca_name} (a client cert only makes sense over TLS), "
                             f"got {str(cert)!r}")
        return None
    return ClientTls(ca_file=ca, cert_file=cert, key_file=key)


def reject_unknown(environ: Mapping[str, str], known: set[str], prefixes: tuple[str, ...], where: str) -> None:
    """Fails on any variable with one of ``prefixes`` that is not in ``known`` (a typo never falls
    back to a default silently); ``where`` names the ENV_VARS tuple to look in."""
    unknown = sorted(name for name in environ if name.startswith(prefixes) and name not in known)
    if unknown:
        raise ValueError(f"unknown environment variables {unknown}: expected names from {where} (typo?)")


def parse_specs(environ: Mapping[str, str], specs: Mapping[str, tuple[str, Parser]],
                config_cls: type) -> dict[str, object]:
    """{field: value} for every variable in ``specs`` that is set (an empty value counts as unset);
    a required field (no default in ``config_cls``) that is unset raises naming its variable."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    values: dict[str, object] = {}
    for name, (attr, parse) in specs.items():
        raw = environ.get(name, "")
        if raw:
            values[attr] = parse(name, raw)
        elif defaults[attr] is dataclasses.MISSING:
            raise ValueError(f"{name} must be set (required: {attr.replace('_', ' ')}), got {raw!r}")
    return values


# RECSYS_* names read by other programs of the project (trainer, test suite): not typos for a service.
FOREIGN_SHARED_VARS = ("RECSYS_DATA_DIR", "RECSYS_TEST_REDIS_URL", "RECSYS_SIGNING_KEY")


# 10: side by side on the shared 2-core machine (docs/RESULTS.md, "The event loop before the model"),
# goodput at ~3x capacity 137-230 req/s against 29-112 at 0 (deadline misses: 0-1,150 against
# thousands per run), refusals 2-7x faster; near capacity 3 % less goodput (median 272 against 281).
COMPUTE_NICE_DEFAULT = 10
# 1 ms (Python's default is 5): side by side at 300 req/s (~1x capacity, docs/RESULTS.md, "A shorter GIL
# switch interval"), p99 median 42 against 51 ms over eight pairs (<= 50 ms in 8 of 8 runs against 3 of
# 8), fewer refusals; no difference at 3x.
GIL_SWITCH_MS_DEFAULT = 1.0


@dataclass(frozen=True)
class ServiceConfig:
    """The settings both services have, each under its own prefix (``RETRIEVAL_`` / ``RANKING_``) or the
    shared ``RECSYS_*`` names; a service's config adds its own fields and sets its own defaults."""

    artifact_root: Path                      # the artifact volume (CURRENT, versions/)
    # None = no Redis: features come from the artifact in process. Kept out of repr: may hold a password.
    redis_url: str | None = dataclasses.field(default=None, repr=False)
    redis_namespace: str = "recsys"
    log_level: str = "INFO"
    pinned_version: int | None = None        # serve this version instead of CURRENT
    host: str = "127.0.0.1"                  # gRPC listen address (images and manifests set 0.0.0.0)
    port: int = 0                            # gRPC; 0 = pick a free port (tests)
    metrics_host: str = "127.0.0.1"          # Prometheus HTTP listen address
    metrics_port: int = 0                    # Prometheus HTTP; 0 = disabled
    poll_interval_s: float = 2.0             # how often CURRENT is checked for a new version
    microbatch_max_size: int = 16            # requests batched into one forward pass
    microbatch_max_wait_ms: float = 0.0      # extra wait for a batch to fill (0: run at once; requests
                                             # arriving while a batch runs form the next one)
    max_in_flight: int = 64                  # RPCs admitted (running + queued) before RESOURCE_EXHAUSTED
    max_concurrency: int = 8                 # RPCs running at once; the rest queue (recsys_serving.admission)
    max_loop_lag_ms: float = 0.0             # refuse new RPCs while the event loop stands this far behind; 0 = off
    max_queue_ms: float = 25.0               # refuse new RPCs expected to wait longer than this for a slot;
                                             # 0 = off (only the deadline limits the wait)
    default_deadline_ms: int = 200           # applied when the caller set no deadline
    redis_timeout_ms: int = 50               # per Redis round trip before degrading to artifact features
    redis_breaker_failures: int = 3          # consecutive Redis failures that open its circuit breaker
    redis_breaker_cooldown_ms: int = 1000    # Redis is skipped this long before one probe request tries it
    grace_s: float = 10.0                    # drain time for in-flight RPCs after SIGTERM
    max_message_bytes: int = 4 * 1024 * 1024  # gRPC send/receive limit
    tls: TlsConfig | None = None             # None = plaintext
    trusted_keys: Path = DEFAULT_TRUSTED_KEYS  # public key(s) whose signatures make a version servable
    allow_unsigned: bool = False             # serve unsigned versions (local experiments only; loud)
    workers: int = 1                         # worker processes behind the one port (recsys_serving.workers)
    # The nice value of the model's thread (recsys_serving.batching): above 0 the event loop (admission,
    # refusals, I/O) runs first when the cores are short; 0 = the same priority as the loop.
    compute_nice: int = COMPUTE_NICE_DEFAULT
    # How long a thread may hold the GIL before the interpreter hands it on (sys.setswitchinterval):
    # the event loop needs it for every callback, so while the model's thread runs Python (batch
    # assembly, post-processing) the loop, admission and refusals wait up to this long for it.
    gil_switch_ms: float = GIL_SWITCH_MS_DEFAULT


MAX_WORKERS = 64


def service_specs(prefix: str) -> dict[str, tuple[str, Parser]]:
    """Environment name -> (``ServiceConfig`` field, parser) for the settings both services have."""
    return {
        "RECSYS_ARTIFACT_ROOT": ("artifact_root", directory),
        "RECSYS_REDIS_URL": ("redis_url", redis_url_value),
        "RECSYS_REDIS_NAMESPACE": ("redis_namespace", namespace),
        "RECSYS_LOG_LEVEL": ("log_level", choice(LOG_LEVELS, upper=True)),
        "RECSYS_PINNED_VERSION": ("pinned_version", int_in(1)),
        **TRUST_SPECS,
        f"{prefix}HOST": ("host", host),
        f"{prefix}PORT": ("port", int_in(0, 65535)),
        f"{prefix}METRICS_HOST": ("metrics_host", host),
        f"{prefix}METRICS_PORT": ("metrics_port", int_in(0, 65535)),
        f"{prefix}POLL_INTERVAL_S": ("poll_interval_s", float_in(0.0, 3600.0, lo_open=True)),
        f"{prefix}MICROBATCH_MAX_SIZE": ("microbatch_max_size", int_in(1, 4096)),
        f"{prefix}MICROBATCH_MAX_WAIT_MS": ("microbatch_max_wait_ms", float_in(0.0, 1000.0)),
        f"{prefix}MAX_IN_FLIGHT": ("max_in_flight", int_in(1, 100_000)),
        f"{prefix}MAX_CONCURRENCY": ("max_concurrency", int_in(1, 100_000)),
        f"{prefix}MAX_LOOP_LAG_MS": ("max_loop_lag_ms", float_in(0.0, 60_000.0)),
        f"{prefix}MAX_QUEUE_MS": ("max_queue_ms", float_in(0.0, 60_000.0)),
        f"{prefix}DEFAULT_DEADLINE_MS": ("default_deadline_ms", int_in(1, 600_000)),
        f"{prefix}REDIS_TIMEOUT_MS": ("redis_timeout_ms", int_in(1, 60_000)),
        f"{prefix}REDIS_BREAKER_FAILURES": ("redis_breaker_failures", int_in(1, 1000)),
        f"{prefix}REDIS_BREAKER_COOLDOWN_MS": ("redis_breaker_cooldown_ms", int_in(1, 3_600_000)),
        f"{prefix}GRACE_S": ("grace_s", float_in(0.0, 300.0)),
        f"{prefix}MAX_MESSAGE_BYTES": ("max_message_bytes", int_in(1024, 2**31 - 1)),
        f"{prefix}WORKERS": ("workers", int_in(1, MAX_WORKERS)),
        f"{prefix}COMPUTE_NICE": ("compute_nice", int_in(0, 19)),
        f"{prefix}GIL_SWITCH_MS": ("gil_switch_ms", float_in(0.05, 100.0)),
    }


def server_tls_vars(prefix: str) -> tuple[str, str, str]:
    return f"{prefix}TLS_CERT_FILE", f"{prefix}TLS_KEY_FILE", f"{prefix}TLS_CLIENT_CA_FILE"


def server_tls(environ: Mapping[str, str], prefix: str) -> TlsConfig | None:
    """The server's TLS (cert + key, optionally a client CA for mTLS), or None for plaintext."""
    cert_name, key_name, ca_name = server_tls_vars(prefix)
    cert, key, client_ca = (pem_file(environ, name) for name in (cert_name, key_name, ca_name))
    if (cert is None) != (key is None):
        raise ValueError(f"{cert_name} and {key_name} must be set together, "
                         f"got cert={environ.get(cert_name, '')!r}, key={environ.get(key_name, '')!r}")
    if cert is None or key is None:
        if client_ca is not None:
            raise ValueError(f"{ca_name} requires {cert_name} and {key_name} (mTLS needs server TLS), "
                             f"got {str(client_ca)!r}")
        return None
    return TlsConfig(cert_file=cert, key_file=key, client_ca_file=client_ca)


def check_service(config: ServiceConfig, prefix: str) -> None:
    """The relations between the shared settings; ValueError naming both settings."""
    if config.metrics_port and config.metrics_port == config.port:
        raise ValueError(f"{prefix}METRICS_PORT must differ from {prefix}PORT, got {config.metrics_port!r}")
    if config.workers > 1 and config.port == 0:
        raise ValueError(f"{prefix}PORT must be a fixed port (1..65535) when {prefix}WORKERS > 1 "
                         f"({config.workers} worker processes share it), got 0 (any free port: each worker would "
                         f"get its own)")
    if config.max_in_flight < config.max_concurrency:
        raise ValueError(f"{prefix}MAX_IN_FLIGHT must be >= {prefix}MAX_CONCURRENCY ({config.max_concurrency}), "
                         f"got {config.max_in_flight!r}")
