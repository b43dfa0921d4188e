"""A timeout that follows a peer's recent latency: don't wait out the caller's whole budget on a peer
that normally answers in a few milliseconds.

``AdaptiveTimeout(multiplier, floor_s)``: ``observe(seconds)`` after every call (answered or timed
out), ``timeout_s()`` before the next one: ``max(floor_s, multiplier x p99)`` of the last ``window``
observations, or None (no cut: the caller's budget) until ``min_samples`` calls were seen. The p99 is
recomputed at most every ``refresh_s``.

Why: a frozen peer (SIGSTOP, a stuck GC, a dead host whose connection stays open) holds every call
for the caller's full budget until the circuit breaker has seen enough failures to open; those calls
hold admission slots meanwhile, and a service at 200 req/s with a 150 ms retrieval budget has ~30
requests waiting before the first failure even arrives. Judged at a few times the peer's own p99, the
evidence reaches the breaker within tens of milliseconds and it opens before a queue forms (ranking
counts a call past the cut towards its breaker and lets it wait on: ``ranking_service.pipeline``).

A call that timed out is observed at its elapsed time (its timeout): when the peer slows down for
good rather than freezing, more than 1 % of the window times out, the p99 becomes the timeout, and the
next timeout is ``multiplier`` times larger: the cut follows a slower peer up within a few windows'
worth of calls instead of failing it for ever. During a freeze the breaker stops the calls, so the
cut stays tight where it matters: at the start.
"""

from __future__ import annotations

import time

import numpy as np

QUANTILE = 0.99


class AdaptiveTimeout:
    """``max(floor_s, multiplier x p99)`` of the recent calls (see the module docstring)."""

    def __init__(self, multiplier: float, floor_s: float, *, window: int = 512, min_samples: int = 50,
                 refresh_s: float = 0.1, clock=time.monotonic) -> None:
        if not multiplier > 0:
            raise ValueError(f"multiplier must be > 0, got {multiplier!r}")
        if not floor_s > 0:
            raise ValueError(f"floor_s must be > 0, got {floor_s!r}")
        if not 1 <= min_samples <= window:
            raise ValueError(f"min_samples must be in [1, window={window}], got {min_samples!r}")
        self.multiplier, self.floor_s, self.min_samples, self.refresh_s = multiplier, floor_s, min_samples, refresh_s
        self._samples = np.zeros(window, dtype=np.float64)
        self._count = 0                      # observations so far (the ring holds the last ``window``)
        self._clock = clock
        self._cached: float | None = None
        self._cached_at = -float("inf")

    def observe(self, seconds: float) -> None:
        self._samples[self._count % self._samples.size] = seconds
        self._count += 1

    def timeout_s(self) -> float | None:
        """The cut for the next call in seconds, None while fewer than ``min_samples`` calls were seen."""
        if self._count < self.min_samples:
            return None
        now = self._clock()
        if now - self._cached_at >= self.refresh_s:
            recent = self._samples[:min(self._count, self._samples.size)]
            self._cached = max(self.floor_s, self.multiplier * float(np.quantile(recent, QUANTILE)))
            self._cached_at = now
        return self._cached


__all__ = ["AdaptiveTimeout"]
