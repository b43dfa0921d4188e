"""Arrival schedules: when each request of an open loop is due, and the rates a ramp steps through.

An open loop sends on a clock, whatever the replies do: request i is due ``i / rate`` seconds after
the start, and its latency is measured from that intended time, so a stalled server is charged for
the requests it delayed (no coordinated omission).
"""

from __future__ import annotations

import math

import numpy as np


def constant_arrivals(rate: float, duration_s: float, max_requests: int) -> np.ndarray:
    """(n,) float64 offsets in seconds, i / rate for every i with i / rate < duration_s, at most max_requests."""
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a finite number > 0 (requests/s), got {rate!r}")
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be a finite number > 0, got {duration_s!r}")
    if max_requests < 1:
        raise ValueError(f"max_requests must be >= 1, got {max_requests!r}")
    # The 1e-9 keeps a product such as 3 * (1/3) s from adding a request due exactly at the end.
    n = min(max_requests, math.ceil(rate * duration_s - 1e-9))
    return np.arange(n, dtype=np.float64) / rate


def ramp_rates(start: float, step: float, max_steps: int) -> list[float]:
    """The rates of a ramp: start, start + step, ... (max_steps of them), in requests/s."""
    if not (math.isfinite(start) and start > 0):
        raise ValueError(f"start must be a finite number > 0 (requests/s), got {start!r}")
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step must be a finite number > 0 (requests/s), got {step!r}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps!r}")
    return [start + i * step for i in range(max_steps)]
