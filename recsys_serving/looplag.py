"""How far behind the event loop runs: the lag a new request meets before any of its code runs.

A probe task sleeps ``interval_s`` and records how much later than due it woke: on a loop with
spare time that is ~0; on a saturated one it is how long every ready callback waits, including the
next request's admission check and every reply. ``standing_s`` is the *smallest* lag seen over the
last ``window_s`` (a lag that stood the whole window, not one spike such as a collection), or, when
no probe woke within the window, how late the pending one already is.

Admission (``recsys_serving.admission``) refuses new live work while the standing lag is above the
service's ``MAX_LOOP_LAG_MS``: on a loop that is behind, every admitted request makes every
refusal, and every reply, later still; refusing until it catches up keeps refusals fast and the
work that was admitted within its deadline (CoDel's idea, on the loop instead of a queue).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from prometheus_client import Gauge

PROBE_INTERVAL_S = 0.005      # when admission refuses by the lag: a fine reading of it
GAUGE_INTERVAL_S = 0.05       # when the lag only feeds the gauge: 20 wake-ups a second, not 200
WINDOW_S = 0.1


class LoopLag:
    """The probe and its recent samples; ``start`` on the loop it measures, ``close`` when done."""

    def __init__(self, interval_s: float = PROBE_INTERVAL_S, window_s: float = WINDOW_S,
                 gauge: Gauge | None = None) -> None:
        if not 0 < interval_s <= window_s:
            raise ValueError(f"interval_s must be in (0, window_s={window_s!r}], got {interval_s!r}")
        self.interval_s, self.window_s, self.gauge = interval_s, window_s, gauge
        self._samples: deque[tuple[float, float]] = deque()     # (when the probe woke, its lag), oldest first
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._probe(), name="loop-lag-probe")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            now = loop.time()
            self.record(now, max(0.0, now - due))

    def record(self, now: float, lag_s: float) -> None:
        """One probe's wake-up at ``now`` (loop seconds), ``lag_s`` after it was due."""
        self._samples.append((now, lag_s))
        while len(self._samples) > 1 and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()
        if self.gauge is not None:
            self.gauge.set(lag_s)

    def standing_s(self, now: float | None = None) -> float:
        """The smallest lag of the last ``window_s``; with no wake-up in it, how overdue the next probe is."""
        if not self._samples:
            return 0.0
        now = asyncio.get_running_loop().time() if now is None else now
        recent = [lag for when, lag in self._samples if when >= now - self.window_s]
        if recent:
            return min(recent)
        return max(0.0, now - self._samples[-1][0] - self.interval_s)
