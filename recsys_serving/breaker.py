"""A circuit breaker for a dependency the request path may skip (Redis: the artifact answers instead).

States and transitions::

    closed ──(failure_threshold consecutive failures)──▶ open
    open ──(cool_down_s passed; the next caller is let through as the probe)──▶ half_open
    half_open ──(the probe succeeds)──▶ closed
    half_open ──(the probe fails)──▶ open (a fresh cool-down)

``allow()`` asks whether this call may touch the dependency; the caller then reports
``record_success()`` or ``record_failure()``. While open (and while a half-open probe is in
flight) ``allow()`` is False at once: callers take their fallback without waiting out a timeout,
so a frozen Redis costs ``failure_threshold`` timeouts, then one probe per cool-down. A probe
whose caller never reports (its task was cancelled) is written off after another cool-down and a
new probe is let through, so the breaker cannot stick half-open; one that never left (a client-side
throttle stopped it) is handed back with ``release_probe()`` and the next caller probes at once.

One breaker object per dependency per process, used from one event loop (no locks). The state is
exported through the gauge and counter the owner passes in (each service names its own metrics).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)


def breaker_metrics(prefix: str, what: str, when_open: str) -> tuple[Gauge, Counter]:
    """(state gauge, transitions counter) named ``{prefix}_breaker_state`` / ``_transitions``."""
    return (Gauge(f"{prefix}_breaker_state", f"{what} circuit breaker: 0 closed, 1 open ({when_open}), 2 half-open "
                  "(probing)", multiprocess_mode="liveall"),
            Counter(f"{prefix}_breaker_transitions", f"{what} circuit breaker state changes, by the state entered",
                    ["to"]))


class State(enum.IntEnum):
    """Gauge values: 0 closed (normal), 1 open (skipping the dependency), 2 half-open (probing)."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    def __init__(self, name: str, failure_threshold: int, cool_down_s: float, *,
                 state_gauge: Gauge | None = None, transitions: Counter | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``transitions`` must have one label, the state entered (``closed``, ``open``, ``half_open``)."""
        if isinstance(failure_threshold, bool) or not isinstance(failure_threshold, int) or failure_threshold < 1:
            raise ValueError(f"failure_threshold must be an integer >= 1, got {failure_threshold!r}")
        if not 0 < cool_down_s <= 3600:
            raise ValueError(f"cool_down_s must be in (0, 3600] seconds, got {cool_down_s!r}")
        self.name, self.failure_threshold, self.cool_down_s = name, failure_threshold, cool_down_s
        self._gauge, self._transitions, self._clock = state_gauge, transitions, clock
        self.state = State.CLOSED
        self._failures = 0            # consecutive, while closed
        self._opened_at = 0.0         # clock() when it last opened
        self._probe_at: float | None = None   # clock() when the half-open probe was let through
        if self._gauge is not None:
            self._gauge.set(State.CLOSED)

    def allow(self) -> bool:
        """True when this call may use the dependency (closed, or it is the half-open probe)."""
        if self.state is State.CLOSED:
            return True
        now = self._clock()
        if self.state is State.OPEN:
            if now - self._opened_at < self.cool_down_s:
                return False
            self._enter(State.HALF_OPEN)
        elif self._probe_at is not None and now - self._probe_at < self.cool_down_s:
            return False              # the probe is still out: everyone else takes the fallback
        self._probe_at = now
        return True

    def record_success(self) -> None:
        self._failures = 0
        if self.state is State.HALF_OPEN:
            self._enter(State.CLOSED)

    def record_failure(self, error: BaseException | None = None) -> None:
        if self.state is State.HALF_OPEN:
            self._open(error)
        elif self.state is State.CLOSED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open(error)

    def release_probe(self) -> None:
        """The call ``allow()`` just let through as the half-open probe did not touch the dependency (a
        client-side throttle stopped it before it left): the next caller probes instead, at once, rather
        than after the cool-down that writes off a probe that never reports. A no-op in other states."""
        if self.state is State.HALF_OPEN:
            self._probe_at = None

    def reset(self) -> None:
        """Closes at once: something else proved the dependency healthy (e.g. a bulk refill went through)."""
        self._failures = 0
        if self.state is not State.CLOSED:
            self._enter(State.CLOSED)

    def _open(self, error: BaseException | None) -> None:
        self._opened_at = self._clock()
        self._enter(State.OPEN)
        log.warning("circuit breaker %s open for %.2f s after %r", self.name, self.cool_down_s, error)

    def _enter(self, state: State) -> None:
        self.state, self._probe_at = state, None
        self._failures = 0
        if self._gauge is not None:
            self._gauge.set(state)
        if self._transitions is not None:
            self._transitions.labels(state.name.lower()).inc()
        if state is not State.OPEN:
            log.info("circuit breaker %s %s", self.name, state.name.lower())
