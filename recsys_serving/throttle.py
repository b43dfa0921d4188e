"""Client-side adaptive throttling: a caller that sees its server refuse work stops sending most of it.

The server's admission refuses what it cannot finish in time, but each refusal still costs the
server a received call, a handler and a reply on its one event loop; at ~3x its capacity those
refusals alone keep the loop saturated, so they arrive late and crowd out the answers. The
remedy is the one in Google's SRE book ("Handling Overload", client-side throttling): each
client keeps, over a sliding window,

- ``requests``: calls the application asked for (including the ones rejected here), and
- ``accepts``: calls the server took (any answer except an overload or unavailability code),

and rejects a new call locally, before it leaves, with probability

    p = min(max_probability, max(0, (requests - K * accepts) / (requests + 1)))

While the server accepts everything, ``requests <= accepts`` and p = 0 (no cost). When it accepts
only C calls/s of R offered, p settles at 1 - K*C/R: the server then sees K times what it can
take (K = 2 by default, the book's: enough surplus to notice the server recovering within a
window, little enough that refusals no longer drown it). A rejection here costs the client
microseconds and the server nothing. Every client decides alone, so N clients need no
coordination; each one's window follows its own traffic.

Two guards, as in Envoy's admission-control filter (the same formula): below ``min_requests`` in
the window nothing is throttled (a few timeouts at low traffic are the circuit breakers' business,
not overload: without the floor, two failed calls out of two would reject the next one with
p = 2/3), and p never exceeds ``max_probability``, so some calls always reach the server and see
it recover.

``AdaptiveThrottle`` is the arithmetic (no gRPC); callers use ``admit()`` before a call and
``record(code)`` with its outcome. ``Throttled`` is what a rejected call raises where a gRPC error is
expected: a ``grpc.aio.AioRpcError`` with RESOURCE_EXHAUSTED, so callers handle one error type.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import grpc

# Codes that say "the server did not take this call": overload (its admission or gRPC's own limit),
# nobody there, or no answer in time (a saturated server that admits everything shows up as these).
REJECTED_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.DEADLINE_EXCEEDED})


class Throttled(grpc.aio.AioRpcError):
    """A call rejected by the client's own throttle, before it was sent: UNAVAILABLE when the server's
    latest rejection said it was not there, else RESOURCE_EXHAUSTED (refusing, or too slow to answer)."""

    def __init__(self, probability: float, last_rejection: grpc.StatusCode) -> None:
        code = grpc.StatusCode.UNAVAILABLE if last_rejection == grpc.StatusCode.UNAVAILABLE \
            else grpc.StatusCode.RESOURCE_EXHAUSTED
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                         details=f"rejected by the client's adaptive throttle (the server has been rejecting "
                                 f"calls, latest {last_rejection.name}: reject probability {probability:.2f})")


class AdaptiveThrottle:
    """The SRE book's client-side throttle over a sliding window of ``buckets`` slots spanning ``window_s``.

    ``k`` > 1 (how many times the accepted rate may be sent), ``window_s`` > 0 seconds (how long
    the throttle remembers: longer = steadier, slower to open again after the server recovers).
    """

    def __init__(self, k: float = 2.0, window_s: float = 10.0, buckets: int = 10, *, min_requests: int = 50,
                 max_probability: float = 0.9, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(k) and k > 1):
            raise ValueError(f"k must be a finite number > 1, got {k!r}")
        if not (isinstance(min_requests, int) and min_requests >= 0):
            raise ValueError(f"min_requests must be an integer >= 0, got {min_requests!r}")
        if not (0 < max_probability <= 1):
            raise ValueError(f"max_probability must be in (0, 1], got {max_probability!r}")
        if not (math.isfinite(window_s) and window_s > 0):
            raise ValueError(f"window_s must be a finite number > 0, got {window_s!r}")
        if not (isinstance(buckets, int) and buckets >= 1):
            raise ValueError(f"buckets must be an integer >= 1, got {buckets!r}")
        self.k = k
        self.window_s = window_s
        self.min_requests = min_requests
        self.max_probability = max_probability
        self._slot_s = window_s / buckets
        self._requests = [0] * buckets      # per slot, slot i covers [t, t + slot_s) for t = index * slot_s
        self._accepts = [0] * buckets
        self._index: int | None = None      # the absolute slot number the last count went to
        self._rng = rng or random.Random()
        self._clock = clock
        self.rejected = 0                   # calls rejected here since construction (for metrics and runs)
        self.last_rejection = grpc.StatusCode.RESOURCE_EXHAUSTED   # the latest of REJECTED_CODES seen

    def _advance(self) -> int:
        """Zeroes the slots that fell out of the window since the last call; returns the current slot."""
        index = int(self._clock() // self._slot_s)
        size = len(self._requests)
        first = index - size + 1 if self._index is None else max(self._index + 1, index - size + 1)
        for stale in range(first, index + 1):      # at most `size` slots, zeroed in place
            self._requests[stale % size] = self._accepts[stale % size] = 0
        self._index = index
        return index % size

    def _window(self) -> tuple[int, float]:
        """(the current slot, the chance that the next call is rejected here) from the window's counts."""
        slot = self._advance()
        requests, accepts = sum(self._requests), sum(self._accepts)
        if requests < self.min_requests:
            return slot, 0.0
        return slot, min(self.max_probability, max(0.0, (requests - self.k * accepts) / (requests + 1)))

    def probability(self) -> float:
        """The chance that the next call is rejected here, from the window's counts."""
        return self._window()[1]

    def decide(self) -> tuple[bool, float]:
        """Counts a call the application wants; (send it, the probability it was decided with), from
        one look at the window."""
        slot, p = self._window()
        self._requests[slot] += 1
        if p > 0 and self._rng.random() < p:
            self.rejected += 1
            return False, p
        return True, p

    def admit(self) -> bool:
        """Counts a call the application wants; False means reject it here (do not send it)."""
        return self.decide()[0]

    def record(self, code: grpc.StatusCode) -> None:
        """Counts a sent call's outcome: accepted unless its code is one of ``REJECTED_CODES``."""
        if code in REJECTED_CODES:
            self.last_rejection = code
        else:
            self._accepts[self._advance()] += 1

    def check(self) -> None:
        """``admit()`` for code that expects a gRPC error: raises ``Throttled`` when the call is rejected."""
        admitted, p = self.decide()
        if not admitted:
            raise Throttled(p, self.last_rejection)
