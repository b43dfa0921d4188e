"""Deadline-aware admission: refuse at once what cannot finish in time, never start what already expired.

Each service puts every RPC through one ``Admission``::

    async with admission.slot(deadline):        # deadline: a time.monotonic() instant
        ...serve the request...

- At most ``max_concurrency`` requests run at once; later ones wait in a FIFO queue for a slot.
  Capping what runs keeps each request's own time short under overload (on two shared cores, 50
  requests at once each take 50 times longer), so the queue's wait is what grows, and it is known.
- The service time ``s`` (seconds a request holds a slot) is a moving average (EWMA, weight
  ``EWMA_WEIGHT`` per completion). A request arriving when ``q`` are already queued and every slot
  is taken expects to finish after ``s * (q + 1) / max_concurrency`` (its wait: a slot frees every
  ``s / max_concurrency`` s on average) plus ``s`` (its own work); with a slot free, after ``s``.
- ``Refused`` is raised at once (the servicer answers RESOURCE_EXHAUSTED) when that expected time,
  its queue wait counted ``QUEUE_WAIT_SLACK`` times, is longer than the request's remaining
  deadline, or when ``max_in_flight`` requests are already admitted (running + queued): a request
  that would miss its deadline costs the caller no wait and the server no work. The slack is there
  because the wait is a mean: admitting every request whose mean finish just fits the deadline
  (the queue then grows until it does) makes about half of them miss it, and each such request
  spent CPU for nothing; on two cores that work also delays every refusal behind it in the event
  loop (refusals took 90-180 ms at p50 at 3x capacity). A queue half as deep still keeps every
  slot busy (throughput is set by the slots, not the queue). An idle service (nothing running) admits whatever the estimate says: the
  estimate only changes when requests complete, so refusing on it then could refuse everything
  forever after one slow spell.
- ``Refused`` (reason ``queue``) is also raised when the expected wait for a slot is longer than
  ``max_queue_s`` (``*_MAX_QUEUE_MS``; 0 = off), whatever the deadline: the deadline alone lets the
  queue grow until admitted work just fits it, so past capacity every answer waits ~half the
  deadline in the queue while the slots run no faster than with a short queue. A limit of a few
  service times keeps the slots busy and the answers' latency near their own work.
- ``Refused`` (reason ``lag``) is also raised while the event loop stands behind by more than
  ``max_lag_s`` (``recsys_serving.looplag``: the smallest lag of its probe over the last 100 ms), and
  that lag counts in the expected finish: on a loop that is behind, the request's own steps and its
  reply wait behind every ready callback, which the service time (measured while a slot is held)
  does not see. Past ~2x capacity on two cores the loop itself was the queue: refusals took ~195 ms
  and admitted work missed its deadline; refusing until the loop catches up keeps both short.
- ``Expired`` is raised when a queued request's deadline passes before it got a slot: it is dropped
  without starting (the servicer answers DEADLINE_EXCEEDED). Estimates are averages, so some
  admitted requests still wait too long; this catches them before they spend CPU.

Refusals carry a retry pushback in milliseconds for the ``grpc-retry-pushback-ms`` trailer. A
refusal for a full house gets the expected wait for a slot when a retry after it could still
finish within the deadline; every other refusal gets -1, which tells gRPC clients not to retry: a
request refused on time would not fit on a retry to this server either (the queue drains no faster
than its deadline runs out), and retrying what cannot fit only adds load.
``client_service_config`` is the matching client side: a gRPC retry policy that honours pushback
and a retry budget (``retryThrottling``) so retries stay a small share of the traffic.

Background calls (``background(deadline)``; a call marked with ``recsys_serving.runtime.PRIORITY_KEY``,
such as the shadow worker's Retrieve of a candidate version) are the service's spare-time work: one
at a time, each starts only when no live request runs or waits for a slot (and, between its steps,
``pause_for_live`` waits again while live requests run), and waits (up to
``MAX_BACKGROUND_QUEUED`` of them; more are refused at once) until then, or is dropped unstarted
(``Expired``) when its deadline passes first. It takes no live slot and no part in the service-time
estimate, so live admission never sees it; a live request that arrives while it runs starts at
once beside it. Live traffic is never queued behind background work, only shares the CPU with the
one call that started in a quiet moment.

One object per process, used from one event loop (no locks).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from recsys_serving.looplag import GAUGE_INTERVAL_S, PROBE_INTERVAL_S, LoopLag

PUSHBACK_KEY = "grpc-retry-pushback-ms"   # gRPC's trailer: wait this long before a retry; < 0 = don't retry
EWMA_WEIGHT = 0.1                         # weight of the newest service time in the moving average
QUEUE_WAIT_SLACK = 2.0                    # the expected queue wait counts this many times at admission
_CLOCK_SLACK_S = 0.002
MAX_BACKGROUND_QUEUED = 16                # background calls waiting for a quiet moment; more are refused


class Refused(Exception):
    """Not admitted: it cannot finish within its deadline, or too many requests are in flight."""

    def __init__(self, message: str, reason: str, pushback_ms: int) -> None:
        super().__init__(message)
        self.reason, self.pushback_ms = reason, pushback_ms

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((PUSHBACK_KEY, str(self.pushback_ms)),)


class Expired(Exception):
    """Its deadline passed while it waited for a slot: dropped before it started."""


@dataclass(frozen=True)
class AdmissionMetrics:
    """Each service's own metric objects (its name prefix); ``refused`` has one label, the reason."""

    in_flight: Gauge          # admitted now: running + queued
    queued: Gauge             # waiting for a slot
    refused: Counter          # reason: deadline | full
    expired: Counter          # dropped from the queue, deadline passed
    service_seconds: Gauge    # the moving average ``s``
    queue_wait: Histogram     # seconds admitted requests waited for a slot
    background: Counter | None = None   # background calls by result: ran | expired | refused
    loop_lag: Gauge | None = None       # the loop-lag probe's latest sample (recsys_serving.looplag)


def admission_metrics(prefix: str, calls: str, buckets: tuple[float, ...]) -> AdmissionMetrics:
    """A service's admission metrics, named ``{prefix}_in_flight`` etc.; ``calls`` names what is admitted
    in the help texts (e.g. "Retrieves", "RPCs")."""
    return AdmissionMetrics(
        # multiprocess_mode: how the one metrics port of N worker processes shows them (recsys_serving.workers).
        in_flight=Gauge(f"{prefix}_in_flight", f"{calls} admitted now: running + queued for a slot",
                        multiprocess_mode="livesum"),
        queued=Gauge(f"{prefix}_queued", f"{calls} admitted and waiting for a slot", multiprocess_mode="livesum"),
        refused=Counter(f"{prefix}_refused", f"{calls} refused at once with RESOURCE_EXHAUSTED, by reason "
                        "(deadline: could not finish in time given the queue; full: max in flight; lag: the "
                        "event loop stood further behind than the limit)", ["reason"]),
        expired=Counter(f"{prefix}_expired", f"Queued {calls} dropped unstarted: their deadline passed"),
        service_seconds=Gauge(f"{prefix}_service_seconds_estimate",
                              f"Moving average of the seconds one of the {calls} holds a slot",
                              multiprocess_mode="liveall"),
        queue_wait=Histogram(f"{prefix}_queue_wait_seconds", f"Seconds admitted {calls} waited for a slot",
                             buckets=buckets),
        background=Counter(f"{prefix}_background", f"Background {calls} (the shadow's), by result: ran (in a "
                           "moment without live work), expired (deadline passed waiting), refused (too many waiting)",
                           ["result"]),
        loop_lag=Gauge(f"{prefix}_loop_lag_seconds", "How late the event loop ran its lag probe (latest sample)",
                       multiprocess_mode="liveall"))


class Admission:
    def __init__(self, max_concurrency: int, max_in_flight: int, metrics: AdmissionMetrics | None = None,
                 lag: LoopLag | None = None, max_lag_s: float = 0.0, max_queue_s: float = 0.0) -> None:
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be an integer >= 1, got {max_concurrency!r}")
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < max_concurrency:
            raise ValueError(f"max_in_flight must be an integer >= max_concurrency ({max_concurrency}), "
                             f"got {max_in_flight!r}")
        if not (isinstance(max_lag_s, (int, float)) and 0 <= max_lag_s < math.inf):
            raise ValueError(f"max_lag_s must be a number of seconds >= 0 (0 = off), got {max_lag_s!r}")
        if not (isinstance(max_queue_s, (int, float)) and 0 <= max_queue_s < math.inf):
            raise ValueError(f"max_queue_s must be a number of seconds >= 0 (0 = off), got {max_queue_s!r}")
        self.max_queue_s = float(max_queue_s)      # the longest expected wait for a slot admitted (0 = off)
        self.max_concurrency, self.max_in_flight, self.metrics = max_concurrency, max_in_flight, metrics
        self.lag, self.max_lag_s = lag, float(max_lag_s)    # the loop's standing lag and its limit (0 = off)
        self.running = 0
        self.service_s = 0.0          # EWMA of slot-holding seconds; 0 until the first completion
        self._waiters: deque[asyncio.Future] = deque()
        self.background_running = False
        self._background_waiters: deque[asyncio.Future] = deque()
        self._paused: list[asyncio.Future] = []     # background calls paused for live work (``pause_for_live``)

    @classmethod
    def for_service(cls, config, metrics: AdmissionMetrics) -> Admission:
        """A service's admission from its settings (``recsys_serving.env.ServiceConfig``): slots, the
        in-flight cap and the loop-lag limit with its probe (``start`` it on the serving loop)."""
        # The probe wakes every 5 ms only when admission reads it; for the gauge alone every 50 ms
        # (200 wake-ups a second cost ~3 % of retrieval's event-loop time at 200 req/s, py-spy).
        interval_s = PROBE_INTERVAL_S if config.max_loop_lag_ms else GAUGE_INTERVAL_S
        return cls(config.max_concurrency, config.max_in_flight, metrics,
                   lag=LoopLag(interval_s, gauge=metrics.loop_lag), max_lag_s=config.max_loop_lag_ms / 1000,
                   max_queue_s=config.max_queue_ms / 1000)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def in_flight(self) -> int:
        return self.running + len(self._waiters)

    def expected_wait_s(self) -> float:
        """Seconds a request arriving now would wait for a slot."""
        if self.running < self.max_concurrency and not self._waiters:
            return 0.0
        return self.service_s * (len(self._waiters) + 1) / self.max_concurrency

    def start(self) -> None:
        """Starts the loop-lag probe (when there is one) on the running loop: its gauge shows the lag
        even when no limit is set."""
        if self.lag is not None:
            self.lag.start()

    async def close(self) -> None:
        if self.lag is not None:
            await self.lag.close()

    def check(self, remaining_s: float) -> None:
        """Raises ``Refused`` when a request with ``remaining_s`` left should not be admitted now."""
        wait_s = self.expected_wait_s()
        if self.in_flight >= self.max_in_flight:
            self._refuse("full", f"too many requests in flight (max {self.max_in_flight})", wait_s, remaining_s)
        if self.running == 0:
            return                      # an idle service admits: nothing of its own is making it late
        if wait_s > self.max_queue_s > 0:
            self._refuse("queue", f"the queue is too long: {wait_s * 1000:.0f} ms expected wait for a slot "
                         f"(limit {self.max_queue_s * 1000:g} ms)", wait_s, remaining_s)
        lag_s = self.lag.standing_s() if self.lag is not None and self.max_lag_s > 0 else 0.0
        if lag_s > self.max_lag_s > 0:
            self._refuse("lag", f"the server is behind: its event loop runs {lag_s * 1000:.0f} ms late "
                         f"(limit {self.max_lag_s * 1000:g} ms)", wait_s, remaining_s)
        if QUEUE_WAIT_SLACK * wait_s + self.service_s + lag_s > remaining_s:
            self._refuse("deadline", f"cannot finish within the deadline: {remaining_s * 1000:.0f} ms left, "
                         f"expected {wait_s * 1000:.0f} ms queued (x{QUEUE_WAIT_SLACK:g}) + "
                         f"{self.service_s * 1000:.0f} ms serving + {lag_s * 1000:.0f} ms loop lag",
                         wait_s, remaining_s)

    def _refuse(self, reason: str, message: str, wait_s: float, remaining_s: float) -> None:
        # A retry after the wait could still finish here only if time would be left for the work.
        fits_after_wait = remaining_s - wait_s >= self.service_s and reason in ("full", "queue")
        # At least 1 ms: grpcio 1.85's client never retries a call given a pushback of 0 (it waits out
        # its deadline instead; tests/test_retry_policy.py shows the 1 ms case).
        pushback_ms = max(1, math.ceil(wait_s * 1000)) if fits_after_wait else -1
        if self.metrics is not None:
            self.metrics.refused.labels(reason).inc()
        raise Refused(f"{message}; retry with backoff", reason, pushback_ms)

    @contextlib.asynccontextmanager
    async def slot(self, deadline: float) -> AsyncIterator[None]:
        """Admits (or raises ``Refused`` at once), waits for a slot (or raises ``Expired``), runs the body."""
        arrived = time.monotonic()
        self.check(deadline - arrived)
        if self.running < self.max_concurrency and not self._waiters:
            self.running += 1
        else:
            await self._wait(deadline)
        started = time.monotonic()
        if started >= deadline:           # handed a slot just as its time ran out
            self._release()
            if self.metrics is not None:
                self.metrics.expired.inc()
            raise Expired("the deadline passed while the request waited for a slot")
        self._observe_wait(started - arrived)
        try:
            yield
        finally:
            self._release()
            self._record(time.monotonic() - started)

    @property
    def quiet(self) -> bool:
        """No live request runs or waits, and no background call runs: a background call may start."""
        return self.running == 0 and not self._waiters and not self.background_running

    @contextlib.asynccontextmanager
    async def background(self, deadline: float) -> AsyncIterator[None]:
        """Runs the body as background work (see the module docstring): ``Refused`` at once when
        ``MAX_BACKGROUND_QUEUED`` already wait, ``Expired`` when the deadline passes before a quiet moment."""
        if not self.quiet or self._background_waiters:
            if len(self._background_waiters) >= MAX_BACKGROUND_QUEUED:
                self._count_background("refused")
                raise Refused(f"too many background calls waiting (max {MAX_BACKGROUND_QUEUED})", "background", -1)
            waiter = asyncio.get_running_loop().create_future()
            self._background_waiters.append(waiter)
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    await waiter                      # ``_wake_background`` set background_running for us
            except BaseException as error:
                if waiter.done() and not waiter.cancelled():
                    self._background_done()           # it was handed the turn as it gave up: pass it on
                else:
                    with contextlib.suppress(ValueError):
                        self._background_waiters.remove(waiter)
                self._background_wait_ended(error, deadline, "waited for a quiet moment")
                raise
        else:
            self.background_running = True
        self._count_background("ran")
        try:
            yield
        finally:
            self._background_done()

    async def pause_for_live(self, deadline: float) -> None:
        """Inside a background call, between two steps of its work: returns at once when no live request
        runs or waits, else when the last one ends (``Expired`` when the deadline passes first), so a
        live request that arrived meanwhile shares the process with at most one step of it."""
        while self.running or self._waiters:
            waiter = asyncio.get_running_loop().create_future()
            self._paused.append(waiter)
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    await waiter
            except BaseException as error:
                self._background_wait_ended(error, deadline, "was paused for live work")
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self._paused.remove(waiter)

    def _background_wait_ended(self, error: BaseException, deadline: float, waiting: str) -> None:
        """After a background call's wait ended with ``error``: counts it expired when its deadline ended
        it, and raises ``Expired`` when its own timeout did (the caller re-raises anything else)."""
        if _expired(error, deadline):
            self._count_background("expired")
        if isinstance(error, TimeoutError):
            raise Expired(f"the deadline passed while the background call {waiting}") from None

    def _live_idle(self) -> None:
        """No live request runs or waits any more: paused background work goes on, or the next starts."""
        for waiter in self._paused:
            if not waiter.done():
                waiter.set_result(None)
        self._paused.clear()
        self._wake_background()

    def _background_done(self) -> None:
        self.background_running = False
        self._wake_background()

    def _wake_background(self) -> None:
        """Hands the turn to the first background waiter when the service is quiet."""
        while self.quiet and self._background_waiters:
            waiter = self._background_waiters.popleft()
            if not waiter.done():
                self.background_running = True
                waiter.set_result(None)
                return

    def _count_background(self, result: str) -> None:
        if self.metrics is not None and self.metrics.background is not None:
            self.metrics.background.labels(result).inc()

    async def _wait(self, deadline: float) -> None:
        """Queues until ``_release`` hands this request a slot; Expired when the deadline passes first."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._gauges()
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                await waiter
        except BaseException as error:
            if waiter.done() and not waiter.cancelled():
                self._release()           # the slot came as we gave up: pass it on
            else:
                self._drop(waiter)
            if _expired(error, deadline) and self.metrics is not None:
                self.metrics.expired.inc()
            if isinstance(error, TimeoutError):
                raise Expired("the deadline passed while the request waited for a slot") from None
            raise

    def _drop(self, waiter: asyncio.Future) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        self._gauges()

    def _release(self) -> None:
        """Hands the slot to the first live waiter, else frees it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)   # ``running`` is unchanged: the slot moves to the waiter
                self._gauges()
                return
        self.running -= 1
        self._gauges()
        if self.running == 0 and (self._paused or self._background_waiters):
            self._live_idle()

    def _record(self, seconds: float) -> None:
        self.service_s = seconds if self.service_s == 0.0 else (
            (1 - EWMA_WEIGHT) * self.service_s + EWMA_WEIGHT * seconds)
        if self.metrics is not None:
            self.metrics.service_seconds.set(self.service_s)

    def _observe_wait(self, seconds: float) -> None:
        self._gauges()
        if self.metrics is not None:
            self.metrics.queue_wait.observe(seconds)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.in_flight.set(self.in_flight)
            self.metrics.queued.set(len(self._waiters))


def _expired(error: BaseException, deadline: float) -> bool:
    """Whether a wait that ended with ``error`` ended by its deadline: its own timeout, or gRPC's
    cancellation of the call at the caller's deadline, the instant that timeout would fire (within the
    clock reads between them)."""
    return isinstance(error, TimeoutError) or time.monotonic() >= deadline - _CLOCK_SLACK_S


def client_service_config(*services: str, max_attempts: int = 3, codes: tuple[str, ...] = (
        "UNAVAILABLE", "RESOURCE_EXHAUSTED")) -> dict:
    """A gRPC service config for calls to ``services`` (full names such as ``recsys.v1.RankingService``;
    the ``grpc.service_config`` channel option, with ``grpc.enable_retries`` 1).

    Retries ``codes`` up to ``max_attempts`` attempts in all, 10..100 ms exponential backoff, or after
    the server's ``grpc-retry-pushback-ms`` when it sends one (-1: no retry). ``retryThrottling`` is
    the retry budget that keeps retries from amplifying an overload: the channel holds 10 tokens,
    each failed attempt takes 1, each success gives 0.1 back, and retries stop while 5 or fewer
    are left, so a failing server sees about one retry per ten successes at most.
    """
    return {
        "methodConfig": [{
            "name": [{"service": service} for service in services],
            "retryPolicy": {"maxAttempts": max_attempts, "initialBackoff": "0.01s", "maxBackoff": "0.1s",
                            "backoffMultiplier": 2, "retryableStatusCodes": list(codes)},
        }],
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }
