"""A load run's settings (one frozen dataclass, validated at once) and the loopback-only target rule."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

RPCS = ("recommend", "rank", "retrieve")
MODES = ("open", "closed", "ramp")
_SCHEMES = ("dns:///", "ipv4:", "ipv6:")


@dataclass(frozen=True)
class LoadConfig:
    target: str = "127.0.0.1:50052"   # gRPC target host:port
    rpc: str = "recommend"            # recommend | rank | retrieve
    mode: str = "open"                # open (constant arrival rate) | closed (fixed concurrency) | ramp
    rate: float = 100.0               # requests/s: the open loop's rate, the ramp's first step
    concurrency: int = 8              # closed loop: requests kept in flight
    duration_s: float = 10.0          # the run stops sending after this long (the whole ramp included)
    warmup_s: float = 0.0             # open-loop load at `rate` before the measured run, not recorded
    connect_timeout_s: float = 10.0   # the run fails (exit status 1) when the target takes no connection by then
    max_requests: int = 100_000       # the run stops sending after this many requests
    k: int = 10                       # Recommend's k
    num_candidates: int = 100         # Retrieve's num_candidates
    rank_items: int = 100             # item ids per Rank request
    deadline_ms: float = 200.0        # per-request gRPC deadline
    users_from: str = ""              # a data directory (ml-100k/u.data) or a count of users "1".."N"
    skew: float = 1.0                 # Zipf exponent over users ranked by activity; 0 = uniform
    unknown_share: float = 0.05       # share of requests for users the model has never seen
    seed: int = 0                     # the user / item sampling seed
    p99_target_ms: float = 50.0       # ramp: a step is held while its p99 stays at or below this
    ramp_step: float = 50.0           # ramp: requests/s added per step
    step_duration_s: float = 5.0      # ramp: seconds per step
    max_error_share: float = 0.01     # ramp: a step with more failed requests than this share is not held
    allow_remote: bool = False        # permit a non-loopback target
    retry: bool = False               # retry UNAVAILABLE / RESOURCE_EXHAUSTED with pushback, under a budget
    channels: int = 1                 # connections to the target, used in turn (N worker processes share
                                      # connections, not calls: recsys_serving.channels)
    throttle_k: float = 0.0           # > 1: the client's adaptive throttle with this K
                                      # (recsys_serving.throttle); 0 = off, every request is sent


def _require(name: str, value: float, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def validate(config: LoadConfig) -> LoadConfig:
    """Returns ``config`` unchanged, or raises ValueError naming the first bad field."""
    if config.rpc not in RPCS:
        raise ValueError(f"rpc must be one of {', '.join(RPCS)}, got {config.rpc!r}")
    if config.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    positive = {"rate": config.rate, "duration_s": config.duration_s, "deadline_ms": config.deadline_ms,
                "connect_timeout_s": config.connect_timeout_s,
                "p99_target_ms": config.p99_target_ms, "ramp_step": config.ramp_step,
                "step_duration_s": config.step_duration_s}
    for name, value in positive.items():
        _require(name, value, math.isfinite(value) and value > 0, "a finite number > 0")
    counts = {"concurrency": config.concurrency, "max_requests": config.max_requests, "k": config.k,
              "num_candidates": config.num_candidates, "rank_items": config.rank_items, "channels": config.channels}
    for name, value in counts.items():
        _require(name, value, isinstance(value, int) and value >= 1, "an integer >= 1")
    _require("warmup_s", config.warmup_s, math.isfinite(config.warmup_s) and config.warmup_s >= 0,
             "a finite number >= 0")
    _require("skew", config.skew, math.isfinite(config.skew) and config.skew >= 0, "a finite number >= 0")
    for name in ("unknown_share", "max_error_share"):
        value = getattr(config, name)
        _require(name, value, 0 <= value <= 1, "in [0, 1]")
    _require("throttle_k", config.throttle_k,
             config.throttle_k == 0 or (math.isfinite(config.throttle_k) and config.throttle_k > 1), "0 (off) or > 1")
    check_target(config.target, config.allow_remote)
    return config


def target_host(target: str) -> str:
    """The host part of a gRPC target ('host:port', '[v6]:port', 'dns:///host:port', 'ipv4:a.b.c.d:port')."""
    rest = target
    for scheme in _SCHEMES:
        if rest.startswith(scheme):
            rest = rest[len(scheme):]
            break
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise ValueError(f"target must be host:port with a closed [IPv6] bracket, got {target!r}")
        return rest[1:end]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"target must be host:port (e.g. 127.0.0.1:50052), got {target!r}")
    return host


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback IP literals; other names are not resolved (they could move)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_target(target: str, allow_remote: bool) -> None:
    """Refuses a target that is not on this machine unless ``allow_remote`` (``--allow-remote``) is set."""
    if target.startswith("unix:"):
        return
    host = target_host(target)
    if not allow_remote and not is_loopback(host):
        raise ValueError(f"target must be on loopback (localhost, 127.0.0.0/8, ::1) unless --allow-remote "
                         f"is given, got {target!r}")
